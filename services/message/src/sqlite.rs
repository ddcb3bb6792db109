//! The embedded `MessageStore`: one SQLite file in WAL mode.
//!
//! Writes go to one writer thread (see `writer.rs`) that groups whatever is
//! queued into one transaction, so many sends share one fsync. Reads use a
//! small pool of separate connections, which WAL lets run beside the writer.

mod schema;
mod writer;

use std::{path::Path, time::Duration};

use async_trait::async_trait;
use r2d2_sqlite::{
    SqliteConnectionManager,
    rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params},
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::{
    error::{Error, Result},
    store::{
        Conversation, ConversationKind, HistoryRange, InboxCursor, MessageStore, NewMessage, SendOutcome,
        StoredMessage, SyncCursor,
    },
};
use writer::{Command, storage};

/// SQLite durability mode for commits. `full` fsyncs the WAL at every commit
/// (a SendAck survives power loss); `normal` may lose the last commits on power
/// loss but not on a process crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    Full,
    Normal,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SqliteOptions {
    pub synchronous: Synchronous,
    /// Most writes committed together in one transaction.
    pub max_batch: usize,
    /// Queued writes beyond this wait (backpressure) instead of growing memory.
    pub queue_depth: usize,
    /// Read connections.
    pub readers: u32,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self { synchronous: Synchronous::Full, max_batch: 512, queue_depth: 8192, readers: 4 }
    }
}

pub struct SqliteStore {
    writes: mpsc::Sender<Command>,
    reads: r2d2::Pool<SqliteConnectionManager>,
}

fn configure(connection: &Connection, synchronous: Synchronous) -> r2d2_sqlite::rusqlite::Result<()> {
    connection.busy_timeout(Duration::from_secs(10))?;
    connection.pragma_update(None, "journal_mode", "WAL")?;
    let mode = match synchronous {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    };
    connection.pragma_update(None, "synchronous", mode)?;
    Ok(())
}

impl SqliteStore {
    /// Opens (creating and migrating when needed) the database at `path`.
    pub fn open(path: &Path, options: &SqliteOptions) -> Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::Storage(format!("cannot create {}: {e}", parent.display())))?;
        }
        let connection = Connection::open(path).map_err(storage)?;
        configure(&connection, options.synchronous).map_err(storage)?;
        connection.execute_batch(schema::MIGRATION).map_err(storage)?;
        connection.pragma_update(None, "user_version", schema::VERSION).map_err(storage)?;

        let manager = SqliteConnectionManager::file(path)
            .with_flags(OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .with_init(|c| c.busy_timeout(Duration::from_secs(10)));
        let reads = r2d2::Pool::builder()
            .max_size(options.readers.max(1))
            .build(manager)
            .map_err(|e| Error::Storage(format!("cannot open read pool: {e}")))?;

        let (writes, commands) = mpsc::channel(options.queue_depth.max(1));
        let max_batch = options.max_batch.max(1);
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer::run(connection, commands, max_batch))
            .map_err(|e| Error::Storage(format!("cannot start writer: {e}")))?;
        Ok(Self { writes, reads })
    }

    async fn write<T>(&self, command: impl FnOnce(oneshot::Sender<Result<T>>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        // `send` waits only when the queue is full: that is the backpressure.
        self.writes.send(command(tx)).await.map_err(|_| Error::Unavailable("store writer stopped".into()))?;
        rx.await.map_err(|_| Error::Unavailable("store writer stopped".into()))?
    }

    async fn read<T: Send + 'static>(
        &self,
        body: impl FnOnce(&Connection) -> r2d2_sqlite::rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        let pool = self.reads.clone();
        tokio::task::spawn_blocking(move || {
            let connection = pool.get().map_err(|e| Error::Unavailable(format!("no read connection: {e}")))?;
            body(&connection).map_err(storage)
        })
        .await
        .map_err(|e| Error::Storage(e.to_string()))?
    }
}

pub(crate) fn uuid_column(row: &Row<'_>, index: usize) -> r2d2_sqlite::rusqlite::Result<Uuid> {
    let text: String = row.get(index)?;
    Uuid::try_parse(&text).map_err(|e| {
        r2d2_sqlite::rusqlite::Error::FromSqlConversionFailure(
            index,
            r2d2_sqlite::rusqlite::types::Type::Text,
            Box::new(e),
        )
    })
}

/// Reads `conversation_id, seq, message_id, sender, client_msg_id, body, sent_at_ms`.
pub(crate) fn row_to_message(row: &Row<'_>) -> r2d2_sqlite::rusqlite::Result<StoredMessage> {
    Ok(StoredMessage {
        conversation_id: uuid_column(row, 0)?,
        seq: row.get::<_, i64>(1)? as u64,
        message_id: uuid_column(row, 2)?,
        sender: row.get(3)?,
        client_msg_id: row.get(4)?,
        body: row.get(5)?,
        sent_at_ms: row.get(6)?,
    })
}

const CONVERSATION_COLUMNS: &str =
    "c.id, c.kind, c.title, c.created_by, c.last_seq, c.created_at_ms, c.last_activity_ms";

fn row_to_conversation(row: &Row<'_>) -> r2d2_sqlite::rusqlite::Result<Conversation> {
    Ok(Conversation {
        id: uuid_column(row, 0)?,
        kind: if row.get::<_, i64>(1)? == 2 { ConversationKind::Group } else { ConversationKind::Direct },
        title: row.get(2)?,
        created_by: row.get(3)?,
        members: Vec::new(),
        last_seq: row.get::<_, i64>(4)? as u64,
        created_at_ms: row.get(5)?,
        last_activity_ms: row.get(6)?,
    })
}

fn load_members(connection: &Connection, id: &str) -> r2d2_sqlite::rusqlite::Result<Vec<String>> {
    let mut statement =
        connection.prepare_cached("SELECT user_id FROM members WHERE conversation_id = ?1 ORDER BY user_id")?;
    statement.query_map(params![id], |r| r.get(0))?.collect()
}

fn load_conversation(
    connection: &Connection,
    id: &str,
    member: &str,
) -> r2d2_sqlite::rusqlite::Result<Option<Conversation>> {
    let sql = format!(
        "SELECT {CONVERSATION_COLUMNS} FROM conversations c
         JOIN members m ON m.conversation_id = c.id AND m.user_id = ?2 WHERE c.id = ?1"
    );
    let conversation =
        connection.prepare_cached(&sql)?.query_row(params![id, member], row_to_conversation).optional()?;
    match conversation {
        Some(mut conversation) => {
            conversation.members = load_members(connection, id)?;
            Ok(Some(conversation))
        }
        None => Ok(None),
    }
}

const MESSAGE_COLUMNS: &str = "conversation_id, seq, message_id, sender, client_msg_id, body, sent_at_ms";

#[async_trait]
impl MessageStore for SqliteStore {
    async fn get_or_create_direct(&self, user: &str, peer: &str, id: Uuid, now_ms: i64) -> Result<Conversation> {
        let (user, peer) = (user.to_owned(), peer.to_owned());
        let member = user.clone();
        let id = self.write(|reply| Command::Direct { user, peer, id, now_ms, reply }).await?;
        self.conversation_for_member(id, &member).await?.ok_or(Error::ConversationNotFound)
    }

    async fn conversation_for_member(&self, id: Uuid, user: &str) -> Result<Option<Conversation>> {
        let user = user.to_owned();
        self.read(move |c| load_conversation(c, &id.to_string(), &user)).await
    }

    async fn members(&self, id: Uuid) -> Result<Vec<String>> {
        self.read(move |c| load_members(c, &id.to_string())).await
    }

    async fn send(&self, message: NewMessage) -> Result<SendOutcome> {
        self.write(|reply| Command::Send(message, reply)).await
    }

    async fn history(&self, id: Uuid, range: HistoryRange, limit: usize) -> Result<Vec<StoredMessage>> {
        let limit = limit as i64;
        self.read(move |c| {
            let id = id.to_string();
            let mut messages: Vec<StoredMessage> = match range {
                HistoryRange::Before(before) => {
                    let before = before.map_or(i64::MAX, |b| b as i64);
                    let sql = format!(
                        "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ?1 AND seq < ?2
                         ORDER BY seq DESC LIMIT ?3"
                    );
                    let mut statement = c.prepare_cached(&sql)?;
                    let rows = statement.query_map(params![id, before, limit], row_to_message)?;
                    let mut page = rows.collect::<r2d2_sqlite::rusqlite::Result<Vec<_>>>()?;
                    page.reverse();
                    page
                }
                HistoryRange::After(after) => {
                    let sql = format!(
                        "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ?1 AND seq > ?2
                         ORDER BY seq ASC LIMIT ?3"
                    );
                    let mut statement = c.prepare_cached(&sql)?;
                    let rows = statement.query_map(params![id, after as i64, limit], row_to_message)?;
                    rows.collect::<r2d2_sqlite::rusqlite::Result<Vec<_>>>()?
                }
            };
            messages.shrink_to_fit();
            Ok(messages)
        })
        .await
    }

    async fn list_conversations(
        &self,
        user: &str,
        after: Option<InboxCursor>,
        limit: usize,
    ) -> Result<Vec<Conversation>> {
        let user = user.to_owned();
        self.read(move |c| {
            let (activity, id) = match &after {
                Some(cursor) => (cursor.last_activity_ms, cursor.conversation_id.to_string()),
                None => (i64::MAX, String::new()),
            };
            let sql = format!(
                "SELECT {CONVERSATION_COLUMNS} FROM members m JOIN conversations c ON c.id = m.conversation_id
                 WHERE m.user_id = ?1 AND (?4 = '' OR (c.last_activity_ms, c.id) < (?2, ?4))
                 ORDER BY c.last_activity_ms DESC, c.id DESC LIMIT ?3"
            );
            let mut statement = c.prepare_cached(&sql)?;
            let rows = statement.query_map(params![user, activity, limit as i64, id], row_to_conversation)?;
            let mut conversations = rows.collect::<r2d2_sqlite::rusqlite::Result<Vec<_>>>()?;
            for conversation in &mut conversations {
                conversation.members = load_members(c, &conversation.id.to_string())?;
            }
            Ok(conversations)
        })
        .await
    }

    async fn ack_delivered(&self, user: &str, device: &str, cursors: Vec<(Uuid, u64)>) -> Result<Vec<(Uuid, u64)>> {
        let (user, device) = (user.to_owned(), device.to_owned());
        self.write(|reply| Command::Ack { user, device, cursors, reply }).await
    }

    async fn sync(
        &self,
        user: &str,
        device: &str,
        only: Option<Uuid>,
        after: Option<SyncCursor>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        let (user, device) = (user.to_owned(), device.to_owned());
        self.read(move |c| {
            let only = only.map(|id| id.to_string()).unwrap_or_default();
            let (after_conversation, after_seq) = match after {
                Some(cursor) => (cursor.conversation_id.to_string(), cursor.seq as i64),
                None => (String::new(), 0),
            };
            // Per conversation: from max(device cursor, joined_seq), skipping
            // conversations whose head the device already has.
            let sql = "SELECT msg.conversation_id, msg.seq, msg.message_id, msg.sender, msg.client_msg_id,
                              msg.body, msg.sent_at_ms
                 FROM members m
                 JOIN conversations c ON c.id = m.conversation_id
                 LEFT JOIN device_cursors d
                   ON d.user_id = m.user_id AND d.device_id = ?2 AND d.conversation_id = m.conversation_id
                 JOIN messages msg
                   ON msg.conversation_id = m.conversation_id
                  AND msg.seq > max(coalesce(d.delivered_seq, 0), m.joined_seq)
                 WHERE m.user_id = ?1
                   AND (?3 = '' OR m.conversation_id = ?3)
                   AND c.last_seq > coalesce(d.delivered_seq, 0)
                   AND (msg.conversation_id, msg.seq) > (?4, ?5)
                 ORDER BY msg.conversation_id, msg.seq
                 LIMIT ?6";
            let mut statement = c.prepare_cached(sql)?;
            let rows = statement
                .query_map(params![user, device, only, after_conversation, after_seq, limit as i64], row_to_message)?;
            rows.collect()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sqlite_store_passes_the_contract_suite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("messages.db");
        let store = SqliteStore::open(&path, &SqliteOptions::default()).unwrap();
        let cases = crate::store::contract::run_all(&store).await;
        eprintln!("message store contract: {cases} cases passed on sqlite");
    }

    #[tokio::test]
    async fn data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("messages.db");
        let conversation = {
            let store = SqliteStore::open(&path, &SqliteOptions::default()).unwrap();
            let conversation = store.get_or_create_direct("a", "b", Uuid::now_v7(), 1).await.unwrap();
            crate::store::contract::send(&store, conversation.id, "a", "m1", "hello").await.unwrap();
            conversation
        };
        let store = SqliteStore::open(&path, &SqliteOptions::default()).unwrap();
        let outcome = crate::store::contract::send(&store, conversation.id, "b", "m2", "again").await.unwrap();
        assert_eq!(outcome.message().seq, 2);
    }
}
