//! The single writer thread. Every write goes through it; it drains whatever
//! is queued (up to `max_batch`) into one transaction and one fsync, then
//! answers each caller. Answers are sent only after COMMIT returns, which is
//! what makes a `SendAck` mean "durable".

use r2d2_sqlite::rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error};

use crate::error::{Error, Result};

/// Called once the batch's fate is known: `None` after a successful commit,
/// `Some(reason)` when the batch was rolled back.
type Reply = Box<dyn FnOnce(Option<&str>) + Send>;

/// One write. It runs inside its own savepoint (given `None` when no
/// transaction could start) and says whether to keep its changes.
pub(super) struct Command {
    run: Run,
    /// A conversation whose membership this write may change: the writer tells
    /// `on_commit` after COMMIT and before answering anyone.
    membership_of: Option<uuid::Uuid>,
}

/// Runs the write (given no connection when no transaction could start);
/// returns whether to keep its changes, and what to answer.
type Run = Box<dyn FnOnce(Option<&Connection>) -> (bool, Reply) + Send>;

impl Command {
    pub fn new<T: Send + 'static>(
        body: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
        reply: oneshot::Sender<Result<T>>,
    ) -> Self {
        let run = move |connection: Option<&Connection>| {
            let result = match connection {
                Some(connection) => body(connection),
                None => Err(Error::Storage("transaction could not start".into())),
            };
            let keep = result.is_ok();
            let reply: Reply = Box::new(move |rolled_back: Option<&str>| {
                let result = match rolled_back {
                    None => result,
                    Some(reason) => Err(Error::Storage(format!("write failed: {reason}"))),
                };
                // A caller that gave up (timeout, disconnect) no longer listens; that is fine.
                let _ = reply.send(result);
            });
            (keep, reply)
        };
        Self { run: Box::new(run), membership_of: None }
    }

    pub fn changing_membership_of(mut self, conversation: uuid::Uuid) -> Self {
        self.membership_of = Some(conversation);
        self
    }
}

// Savepoint statements, prepared once per connection: rusqlite's `Savepoint`
// parses its SQL on every use, a measurable share of the writer's time.
const SAVEPOINT: &str = "SAVEPOINT command";
const RELEASE: &str = "RELEASE command";
const ROLLBACK_TO: &str = "ROLLBACK TO command";

fn statement(connection: &Connection, sql: &str) -> r2d2_sqlite::rusqlite::Result<()> {
    connection.prepare_cached(sql)?.execute([]).map(drop)
}

/// Undoes the current command's writes and leaves the savepoint.
fn roll_back_command(connection: &Connection) -> r2d2_sqlite::rusqlite::Result<()> {
    statement(connection, ROLLBACK_TO)?;
    statement(connection, RELEASE)
}

/// Called with the conversations whose membership a committed batch may have changed.
pub(super) type OnCommit = Box<dyn Fn(&[uuid::Uuid]) + Send>;

pub(super) fn run(
    mut connection: Connection,
    mut commands: mpsc::Receiver<Command>,
    max_batch: usize,
    linger: std::time::Duration,
    on_commit: OnCommit,
) {
    let mut batch = Vec::with_capacity(max_batch);
    while commands.blocking_recv_many(&mut batch, max_batch) > 0 {
        // A commit costs an fsync and a WAL frame per dirty page whatever it
        // holds: under load, waiting a moment for more writes shares both.
        if !linger.is_zero() && batch.len() < max_batch {
            std::thread::sleep(linger);
            while batch.len() < max_batch {
                match commands.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
        }
        let size = batch.len();
        let mut replies = Vec::with_capacity(size);
        let memberships: Vec<uuid::Uuid> = batch.iter().filter_map(|c| c.membership_of).collect();
        // IMMEDIATE: the write lock is taken up front, so seqs stay dense even when
        // another process writes the same file (it waits, up to busy_timeout).
        let outcome = match connection.transaction_with_behavior(r2d2_sqlite::rusqlite::TransactionBehavior::Immediate)
        {
            Ok(transaction) => {
                for command in batch.drain(..) {
                    // A savepoint per command: one command's failure rolls back only its own writes.
                    match statement(&transaction, SAVEPOINT) {
                        Ok(()) => {
                            let (keep, reply) = (command.run)(Some(&transaction));
                            let ended =
                                if keep { statement(&transaction, RELEASE) } else { roll_back_command(&transaction) };
                            match ended {
                                Ok(()) => replies.push(reply),
                                // Its writes are undone with the savepoint as far as
                                // SQLite lets: the caller hears of a failure either way.
                                Err(error) => {
                                    error!(%error, "ending a write's savepoint failed");
                                    if keep {
                                        let _ = roll_back_command(&transaction);
                                    }
                                    reply(Some(&error.to_string()));
                                }
                            }
                        }
                        Err(_) => replies.push((command.run)(None).1),
                    }
                }
                transaction.commit()
            }
            Err(error) => {
                replies.extend(batch.drain(..).map(|command| (command.run)(None).1));
                Err(error)
            }
        };
        match outcome {
            Ok(()) => {
                debug!(size, "write batch committed");
                if !memberships.is_empty() {
                    on_commit(&memberships);
                }
                replies.into_iter().for_each(|reply| reply(None));
            }
            Err(error) => {
                error!(%error, size, "write batch failed, rolled back");
                let reason = error.to_string();
                replies.into_iter().for_each(|reply| reply(Some(&reason)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(connection: &Connection, value: &str) -> i64 {
        connection.query_row("SELECT count(*) FROM t WHERE v = ?1", [value], |r| r.get(0)).unwrap()
    }

    /// Commands queued together share one transaction, yet a command that
    /// wrote and then failed loses only its own writes.
    #[test]
    fn a_failed_command_rolls_back_only_its_own_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let connection = Connection::open(&path).unwrap();
        connection.execute_batch("CREATE TABLE t (v TEXT NOT NULL)").unwrap();
        let (commands, queue) = mpsc::channel(8);
        let insert = |value: &'static str, fail: bool| {
            let (reply, answer) = oneshot::channel();
            let body = move |c: &Connection| {
                c.execute("INSERT INTO t (v) VALUES (?1)", [value]).map_err(|e| Error::Storage(e.to_string()))?;
                if fail { Err(Error::InvalidArgument("refused after writing".into())) } else { Ok(value) }
            };
            commands.try_send(Command::new(body, reply)).unwrap();
            answer
        };
        let (first, failed, last) = (insert("first", false), insert("failed", true), insert("last", false));
        drop(commands);
        // All three are queued before the writer starts: one batch.
        run(connection, queue, 8, std::time::Duration::ZERO, Box::new(|_| {}));
        assert_eq!(first.blocking_recv().unwrap().unwrap(), "first");
        assert!(matches!(failed.blocking_recv().unwrap(), Err(Error::InvalidArgument(_))));
        assert_eq!(last.blocking_recv().unwrap().unwrap(), "last");
        let check = Connection::open(&path).unwrap();
        assert_eq!((count(&check, "first"), count(&check, "failed"), count(&check, "last")), (1, 0, 1));
    }
}
