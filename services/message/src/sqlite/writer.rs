//! The single writer thread. Every write goes through it; it drains whatever
//! is queued (up to `max_batch`) into one transaction and one fsync, then
//! answers each caller. Answers are sent only after COMMIT returns, which is
//! what makes a `SendAck` mean "durable".

use r2d2_sqlite::rusqlite::{Connection, OptionalExtension, Transaction, params};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error};
use uuid::Uuid;

use super::{row_to_message, uuid_column};
use crate::{
    error::{Error, Result},
    store::{NewMessage, SendOutcome},
};

pub(super) enum Command {
    Send(NewMessage, oneshot::Sender<Result<SendOutcome>>),
    Direct { user: String, peer: String, id: Uuid, now_ms: i64, reply: oneshot::Sender<Result<Uuid>> },
    Ack { user: String, device: String, cursors: Vec<(Uuid, u64)>, reply: oneshot::Sender<Result<Vec<(Uuid, u64)>>> },
}

enum Reply {
    Send(oneshot::Sender<Result<SendOutcome>>, Result<SendOutcome>),
    Direct(oneshot::Sender<Result<Uuid>>, Result<Uuid>),
    Ack(oneshot::Sender<Result<Vec<(Uuid, u64)>>>, Result<Vec<(Uuid, u64)>>),
}

impl Reply {
    fn fail(self, message: &str) -> Reply {
        match self {
            Reply::Send(tx, _) => Reply::Send(tx, failed(message)),
            Reply::Direct(tx, _) => Reply::Direct(tx, failed(message)),
            Reply::Ack(tx, _) => Reply::Ack(tx, failed(message)),
        }
    }

    fn send(self) {
        // A caller that gave up (timeout, disconnect) no longer listens; that is fine.
        match self {
            Reply::Send(tx, result) => drop(tx.send(result)),
            Reply::Direct(tx, result) => drop(tx.send(result)),
            Reply::Ack(tx, result) => drop(tx.send(result)),
        }
    }
}

pub(super) fn run(mut connection: Connection, mut commands: mpsc::Receiver<Command>, max_batch: usize) {
    while let Some(first) = commands.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match commands.try_recv() {
                Ok(command) => batch.push(command),
                Err(_) => break,
            }
        }
        let size = batch.len();
        let replies = match apply_batch(&mut connection, batch) {
            Ok(replies) => replies,
            Err((replies, error)) => {
                error!(%error, size, "write batch failed, rolled back");
                let message = format!("write failed: {error}");
                replies.into_iter().map(|r| r.fail(&message)).collect()
            }
        };
        debug!(size, "write batch committed");
        replies.into_iter().for_each(Reply::send);
    }
}

type BatchError = (Vec<Reply>, r2d2_sqlite::rusqlite::Error);

fn apply_batch(connection: &mut Connection, batch: Vec<Command>) -> Result<Vec<Reply>, BatchError> {
    let mut replies = Vec::with_capacity(batch.len());
    let mut transaction = match connection.transaction() {
        Ok(transaction) => transaction,
        Err(error) => {
            let replies = batch.into_iter().map(placeholder).collect();
            return Err((replies, error));
        }
    };
    for command in batch {
        // A savepoint per command: one command's failure rolls back only its own writes.
        let reply = match command {
            Command::Send(message, tx) => {
                let result = with_savepoint(&mut transaction, |tx| send(tx, &message));
                Reply::Send(tx, result)
            }
            Command::Direct { user, peer, id, now_ms, reply } => {
                let result = with_savepoint(&mut transaction, |tx| direct(tx, &user, &peer, id, now_ms));
                Reply::Direct(reply, result)
            }
            Command::Ack { user, device, cursors, reply } => {
                let result = with_savepoint(&mut transaction, |tx| ack(tx, &user, &device, &cursors));
                Reply::Ack(reply, result)
            }
        };
        replies.push(reply);
    }
    match transaction.commit() {
        Ok(()) => Ok(replies),
        Err(error) => Err((replies, error)),
    }
}

fn placeholder(command: Command) -> Reply {
    let message = "transaction could not start";
    match command {
        Command::Send(_, tx) => Reply::Send(tx, failed(message)),
        Command::Direct { reply, .. } => Reply::Direct(reply, failed(message)),
        Command::Ack { reply, .. } => Reply::Ack(reply, failed(message)),
    }
}

fn failed<T>(message: &str) -> Result<T> {
    Err(Error::Storage(message.to_owned()))
}

fn with_savepoint<T>(transaction: &mut Transaction<'_>, body: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
    let savepoint = transaction.savepoint().map_err(storage)?;
    let result = body(&savepoint);
    if result.is_ok() {
        savepoint.commit().map_err(storage)?;
    }
    // Dropping an uncommitted savepoint rolls it back.
    result
}

pub(super) fn storage(error: r2d2_sqlite::rusqlite::Error) -> Error {
    Error::Storage(error.to_string())
}

fn send(tx: &Connection, message: &NewMessage) -> Result<SendOutcome> {
    let conversation = message.conversation_id.to_string();
    let member: Option<i64> = tx
        .prepare_cached("SELECT 1 FROM members WHERE conversation_id = ?1 AND user_id = ?2")
        .and_then(|mut s| s.query_row(params![conversation, message.sender], |r| r.get(0)).optional())
        .map_err(storage)?;
    if member.is_none() {
        return Err(Error::ConversationNotFound);
    }
    let existing = tx
        .prepare_cached(
            "SELECT conversation_id, seq, message_id, sender, client_msg_id, body, sent_at_ms
             FROM messages WHERE conversation_id = ?1 AND sender = ?2 AND client_msg_id = ?3",
        )
        .and_then(|mut s| {
            s.query_row(params![conversation, message.sender, message.client_msg_id], row_to_message).optional()
        })
        .map_err(storage)?;
    if let Some(original) = existing {
        return Ok(SendOutcome::Duplicate(original));
    }
    let seq: i64 = tx
        .prepare_cached(
            "UPDATE conversations SET last_seq = last_seq + 1, last_activity_ms = ?2
             WHERE id = ?1 RETURNING last_seq",
        )
        .and_then(|mut s| s.query_row(params![conversation, message.sent_at_ms], |r| r.get(0)))
        .map_err(storage)?;
    tx.prepare_cached(
        "INSERT INTO messages (conversation_id, seq, message_id, sender, client_msg_id, body, sent_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .and_then(|mut s| {
        s.execute(params![
            conversation,
            seq,
            message.message_id.to_string(),
            message.sender,
            message.client_msg_id,
            message.body,
            message.sent_at_ms
        ])
    })
    .map_err(storage)?;
    Ok(SendOutcome::Created(crate::store::StoredMessage {
        conversation_id: message.conversation_id,
        seq: seq as u64,
        message_id: message.message_id,
        sender: message.sender.clone(),
        client_msg_id: message.client_msg_id.clone(),
        body: message.body.clone(),
        sent_at_ms: message.sent_at_ms,
    }))
}

fn direct(tx: &Connection, user: &str, peer: &str, id: Uuid, now_ms: i64) -> Result<Uuid> {
    let (low, high) = if user <= peer { (user, peer) } else { (peer, user) };
    let existing: Option<Uuid> = tx
        .prepare_cached("SELECT conversation_id FROM direct_pairs WHERE user_low = ?1 AND user_high = ?2")
        .and_then(|mut s| s.query_row(params![low, high], |r| uuid_column(r, 0)).optional())
        .map_err(storage)?;
    if let Some(existing) = existing {
        return Ok(existing);
    }
    let text = id.to_string();
    tx.prepare_cached(
        "INSERT INTO conversations (id, kind, title, created_by, created_at_ms, last_activity_ms, last_seq)
         VALUES (?1, 1, '', ?2, ?3, ?3, 0)",
    )
    .and_then(|mut s| s.execute(params![text, user, now_ms]))
    .map_err(storage)?;
    for member in [low, high] {
        tx.prepare_cached(
            "INSERT INTO members (conversation_id, user_id, role, joined_seq, read_seq, joined_at_ms)
             VALUES (?1, ?2, 0, 0, 0, ?3)",
        )
        .and_then(|mut s| s.execute(params![text, member, now_ms]))
        .map_err(storage)?;
    }
    tx.prepare_cached("INSERT INTO direct_pairs (user_low, user_high, conversation_id) VALUES (?1, ?2, ?3)")
        .and_then(|mut s| s.execute(params![low, high, text]))
        .map_err(storage)?;
    Ok(id)
}

fn ack(tx: &Connection, user: &str, device: &str, cursors: &[(Uuid, u64)]) -> Result<Vec<(Uuid, u64)>> {
    let mut stored = Vec::with_capacity(cursors.len());
    for (conversation, seq) in cursors {
        let text = conversation.to_string();
        // Clamp to the head, and only for members: a cursor can't point past what exists.
        let head: Option<i64> = tx
            .prepare_cached(
                "SELECT c.last_seq FROM conversations c
                 JOIN members m ON m.conversation_id = c.id AND m.user_id = ?2
                 WHERE c.id = ?1",
            )
            .and_then(|mut s| s.query_row(params![text, user], |r| r.get(0)).optional())
            .map_err(storage)?;
        let Some(head) = head else { continue };
        let wanted = (*seq).min(head as u64) as i64;
        let value: i64 = tx
            .prepare_cached(
                "INSERT INTO device_cursors (user_id, device_id, conversation_id, delivered_seq)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (user_id, device_id, conversation_id)
                 DO UPDATE SET delivered_seq = max(delivered_seq, excluded.delivered_seq)
                 RETURNING delivered_seq",
            )
            .and_then(|mut s| s.query_row(params![user, device, text, wanted], |r| r.get(0)))
            .map_err(storage)?;
        stored.push((*conversation, value as u64));
    }
    Ok(stored)
}
