//! The embedded `MessageStore`: one SQLite file in WAL mode.
//!
//! Writes go to one writer thread (see `writer.rs`) that groups whatever is
//! queued into one transaction, so many sends share one fsync. Reads use a
//! small pool of separate connections, which WAL lets run beside the writer.

mod rows;
mod schema;
mod writer;
mod writes;

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use messenger_platform::supervise::Supervisor;
use r2d2_sqlite::{
    SqliteConnectionManager,
    rusqlite::{Connection, OpenFlags, params},
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::{
    error::{Error, Result},
    store::{
        Appended, BlockedUser, Blocks, Change, ChangeRequest, Conversation, DeviceCursors, HistoryRange, InboxCursor,
        Member, MessageStore, NewGroup, NewMessage, SendOutcome, SeqBounds, StoredMessage, SyncCursor,
    },
};
use rows::{CONVERSATION_COLUMNS, MESSAGE_COLUMNS, row_to_conversation, row_to_message};
use writer::Command;
use writes::storage;

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
    /// Conversations whose member list is kept in memory. Set 0 when several
    /// message-service processes share one database file: a process cannot see
    /// the others' membership writes, so it must read members every time.
    pub member_cache_entries: u64,
    /// WAL pages written before the writer copies them back into the database
    /// (SQLite's `wal_autocheckpoint`). Larger means hot pages are copied once
    /// for many commits (less work per message) and a larger `-wal` file.
    pub wal_autocheckpoint_pages: u32,
    /// How long the writer waits after the first queued write for more to
    /// share its commit (fsync and WAL pages); 0 commits at once.
    #[serde(with = "humantime_serde")]
    pub commit_linger: Duration,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            synchronous: Synchronous::Full,
            max_batch: 512,
            queue_depth: 8192,
            readers: 4,
            member_cache_entries: 100_000,
            wal_autocheckpoint_pages: 4000,
            commit_linger: Duration::ZERO,
        }
    }
}

pub struct SqliteStore {
    writes: mpsc::Sender<Command>,
    reads: r2d2::Pool<SqliteConnectionManager>,
    members: Arc<MemberCache>,
    /// False with `member_cache_entries = 0`.
    cache_members: bool,
}

/// Active member ids per conversation, in memory. Every membership write
/// bumps `epoch` and invalidates its conversation after the commit; a reader
/// caches what it read only if no membership write committed meanwhile, so a
/// read from an older snapshot can never be cached after the invalidation.
struct MemberCache {
    cache: moka::sync::Cache<Uuid, Arc<Vec<String>>>,
    epoch: AtomicU64,
    /// Makes "epoch unchanged, then insert" atomic with "bump, then invalidate".
    guard: std::sync::Mutex<()>,
}

impl MemberCache {
    /// Called by the writer thread after COMMIT, before it answers anyone.
    fn invalidate(&self, ids: &[Uuid]) {
        let _guard = self.guard.lock().unwrap_or_else(|e| e.into_inner());
        self.epoch.fetch_add(1, Ordering::SeqCst);
        for id in ids {
            self.cache.invalidate(id);
        }
    }

    fn insert_if_unchanged(&self, id: Uuid, ids: Arc<Vec<String>>, epoch: u64) {
        let _guard = self.guard.lock().unwrap_or_else(|e| e.into_inner());
        if self.epoch.load(Ordering::SeqCst) == epoch {
            self.cache.insert(id, ids);
        }
    }
}

/// How long a connection waits for another process's lock on the file.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

fn configure(connection: &Connection, options: &SqliteOptions) -> r2d2_sqlite::rusqlite::Result<()> {
    connection.busy_timeout(BUSY_TIMEOUT)?;
    connection.pragma_update(None, "wal_autocheckpoint", options.wal_autocheckpoint_pages)?;
    enable_wal(connection)?;
    let mode = match options.synchronous {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    };
    connection.pragma_update(None, "synchronous", mode)?;
    Ok(())
}

/// Switches the file to WAL. While another process switches the same fresh
/// file, SQLite answers SQLITE_BUSY at once instead of calling the busy
/// handler (two message services sharing one file, started together, failed
/// ~1 start in 10 with "database is locked"); waited out like a busy timeout.
fn enable_wal(connection: &Connection) -> r2d2_sqlite::rusqlite::Result<()> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match connection.pragma_update(None, "journal_mode", "WAL") {
            Err(error)
                if error.sqlite_error_code() == Some(r2d2_sqlite::rusqlite::ErrorCode::DatabaseBusy)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

impl SqliteStore {
    /// Opens (creating and migrating when needed) the database at `path`,
    /// outside a service process: a writer panic is only logged (every
    /// later write then fails with UNAVAILABLE).
    pub fn open(path: &Path, options: &SqliteOptions) -> Result<Self> {
        Self::open_supervised(path, options, &Supervisor::detached())
    }

    /// Opens the database at `path` with its writer thread under
    /// `supervisor`: a panic in it stops the process.
    pub fn open_supervised(path: &Path, options: &SqliteOptions, supervisor: &Supervisor) -> Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::Storage(format!("cannot create {}: {e}", parent.display())))?;
        }
        let connection = Connection::open(path).map_err(storage)?;
        configure(&connection, options).map_err(storage)?;
        migrate(&connection).map_err(storage)?;

        let manager = SqliteConnectionManager::file(path)
            .with_flags(OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .with_init(|c| c.busy_timeout(BUSY_TIMEOUT));
        let reads = r2d2::Pool::builder()
            .max_size(options.readers.max(1))
            .build(manager)
            .map_err(|e| Error::Storage(format!("cannot open read pool: {e}")))?;

        let members = Arc::new(MemberCache {
            cache: moka::sync::Cache::builder().max_capacity(options.member_cache_entries).build(),
            epoch: AtomicU64::new(0),
            guard: std::sync::Mutex::new(()),
        });
        let (writes, commands) = mpsc::channel(options.queue_depth.max(1));
        let (max_batch, linger) = (options.max_batch.max(1), options.commit_linger);
        let cache = members.clone();
        let on_commit: writer::OnCommit = Box::new(move |ids| cache.invalidate(ids));
        // A panic unwinds the open transaction (rolled back) and drops every
        // queued caller's reply (they hear UNAVAILABLE, never an ack) before
        // the supervisor stops the process.
        supervisor
            .thread("sqlite-writer", move || writer::run(connection, commands, max_batch, linger, on_commit))
            .map_err(|e| Error::Storage(format!("cannot start writer: {e}")))?;
        Ok(Self { writes, reads, members, cache_members: options.member_cache_entries > 0 })
    }

    async fn write<T: Send + 'static>(
        &self,
        body: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.submit(body, None).await
    }

    /// Queues a write; `membership_of` names a conversation whose member list
    /// the write may change (the member cache forgets it at commit).
    async fn submit<T: Send + 'static>(
        &self,
        body: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
        membership_of: Option<Uuid>,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        let mut command = Command::new(body, tx);
        if let Some(id) = membership_of {
            command = command.changing_membership_of(id);
        }
        // `send` waits only when the queue is full: that is the backpressure.
        self.writes.send(command).await.map_err(|_| Error::Unavailable("store writer stopped".into()))?;
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

/// Runs the migrations this file has not seen yet, each in its own
/// transaction. IMMEDIATE, with the version read inside it: two processes
/// opening one file at once run each migration once, one after the other.
fn migrate(connection: &Connection) -> r2d2_sqlite::rusqlite::Result<()> {
    for (index, migration) in schema::MIGRATIONS.iter().enumerate() {
        connection.execute_batch("BEGIN IMMEDIATE")?;
        let done: i64 = connection.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let step = if done > index as i64 {
            "COMMIT;".to_owned()
        } else {
            format!("{migration} PRAGMA user_version = {}; COMMIT;", index + 1)
        };
        if let Err(error) = connection.execute_batch(&step) {
            let _ = connection.execute_batch("ROLLBACK");
            return Err(error);
        }
    }
    Ok(())
}

#[async_trait]
impl MessageStore for SqliteStore {
    async fn get_or_create_direct(&self, user: &str, peer: &str, id: Uuid, now_ms: i64) -> Result<Conversation> {
        let (owned_user, peer) = (user.to_owned(), peer.to_owned());
        let id = self.write(move |tx| writes::direct(tx, &owned_user, &peer, id, now_ms)).await?;
        self.conversation_for_member(id, user).await?.ok_or(Error::ConversationNotFound)
    }

    async fn create_group(&self, group: NewGroup, max_group_size: usize) -> Result<(Conversation, Appended)> {
        let (id, creator) = (group.id, group.creator.clone());
        let created = self.submit(move |tx| writes::create_group(tx, &group, max_group_size), Some(id)).await?;
        let conversation = self.conversation_for_member(id, &creator).await?.ok_or(Error::ConversationNotFound)?;
        Ok((conversation, created))
    }

    async fn conversation_for_member(&self, id: Uuid, user: &str) -> Result<Option<Conversation>> {
        let user = user.to_owned();
        self.read(move |c| rows::conversation_for_member(c, &id.to_string(), &user)).await
    }

    async fn member(&self, id: Uuid, user: &str) -> Result<Option<Member>> {
        let user = user.to_owned();
        self.read(move |c| rows::member(c, &id.to_string(), &user)).await
    }

    async fn members(&self, id: Uuid) -> Result<Vec<Member>> {
        self.read(move |c| rows::members(c, &id.to_string())).await
    }

    async fn active_member_ids(&self, id: Uuid) -> Result<Arc<Vec<String>>> {
        if !self.cache_members {
            return Ok(Arc::new(self.read(move |c| rows::active_member_ids(c, &id.to_string())).await?));
        }
        if let Some(ids) = self.members.cache.get(&id) {
            return Ok(ids);
        }
        let epoch = self.members.epoch.load(Ordering::SeqCst);
        let ids = Arc::new(self.read(move |c| rows::active_member_ids(c, &id.to_string())).await?);
        // Cache only what no membership write can have overtaken; never cache
        // a conversation that does not exist (yet).
        if !ids.is_empty() {
            self.members.insert_if_unchanged(id, ids.clone(), epoch);
        }
        Ok(ids)
    }

    async fn send(&self, message: NewMessage) -> Result<SendOutcome> {
        self.write(move |tx| writes::send(tx, &message)).await
    }

    async fn apply(&self, request: ChangeRequest) -> Result<Vec<Appended>> {
        let id = request.conversation_id;
        let membership = matches!(request.change, Change::AddMembers(_) | Change::RemoveMember(_) | Change::Leave);
        self.submit(move |tx| writes::apply(tx, &request), membership.then_some(id)).await
    }

    async fn history(
        &self,
        id: Uuid,
        range: HistoryRange,
        visible: SeqBounds,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        let (from, to) = (visible.from as i64, visible.to.map_or(i64::MAX, |to| to as i64));
        self.read(move |c| {
            let id = id.to_string();
            match range {
                HistoryRange::Before(before) => {
                    let before = before.map_or(i64::MAX, |b| b as i64);
                    let sql = format!(
                        "SELECT {MESSAGE_COLUMNS} FROM messages
                         WHERE conversation_id = ?1 AND seq < ?2 AND seq >= ?3 AND seq <= ?4
                         ORDER BY seq DESC LIMIT ?5"
                    );
                    let mut statement = c.prepare_cached(&sql)?;
                    let rows = statement.query_map(params![id, before, from, to, limit as i64], row_to_message)?;
                    let mut page = rows.collect::<r2d2_sqlite::rusqlite::Result<Vec<_>>>()?;
                    page.reverse();
                    Ok(page)
                }
                HistoryRange::After(after) => {
                    let sql = format!(
                        "SELECT {MESSAGE_COLUMNS} FROM messages
                         WHERE conversation_id = ?1 AND seq > ?2 AND seq >= ?3 AND seq <= ?4
                         ORDER BY seq ASC LIMIT ?5"
                    );
                    let mut statement = c.prepare_cached(&sql)?;
                    let rows =
                        statement.query_map(params![id, after as i64, from, to, limit as i64], row_to_message)?;
                    rows.collect()
                }
            }
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
                 WHERE m.user_id = ?1 AND m.removed_seq IS NULL
                   AND (?4 = '' OR (c.last_activity_ms, c.id) < (?2, ?4))
                 ORDER BY c.last_activity_ms DESC, c.id DESC LIMIT ?3"
            );
            let mut statement = c.prepare_cached(&sql)?;
            let rows = statement.query_map(params![user, activity, limit as i64, id], row_to_conversation)?;
            let mut conversations = rows.collect::<r2d2_sqlite::rusqlite::Result<Vec<_>>>()?;
            for conversation in &mut conversations {
                rows::complete(c, conversation, &user)?;
            }
            Ok(conversations)
        })
        .await
    }

    async fn ack_delivered(&self, user: &str, device: &str, cursors: Vec<(Uuid, u64)>) -> Result<Vec<(Uuid, u64)>> {
        let (user, device) = (user.to_owned(), device.to_owned());
        self.write(move |tx| writes::ack(tx, &user, &device, &cursors)).await
    }

    async fn ack_delivered_many(&self, acks: Vec<DeviceCursors>) -> Result<Vec<DeviceCursors>> {
        self.write(move |tx| {
            acks.into_iter()
                .map(|ack| {
                    let cursors = writes::ack(tx, &ack.user, &ack.device, &ack.cursors)?;
                    Ok(DeviceCursors { user: ack.user, device: ack.device, cursors })
                })
                .collect()
        })
        .await
    }

    async fn mark_read(&self, id: Uuid, user: &str, seq: u64) -> Result<crate::store::ReadMark> {
        let user = user.to_owned();
        self.write(move |tx| writes::mark_read(tx, id, &user, seq)).await
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
            // Per conversation: what the member may see (each membership's
            // joined_seq ..= removed_seq) after the device cursor, skipping
            // conversations the device has caught up on.
            let sql = "SELECT msg.conversation_id, msg.seq, msg.message_id, msg.sender, msg.client_msg_id,
                    msg.body, msg.sent_at_ms, msg.kind, msg.reply_to_seq, msg.target_seq, msg.reaction,
                    msg.member_ids, msg.title, msg.role, msg.edited_at_ms, msg.deleted, msg.attachments,
                    msg.last_edit_seq
                 FROM members m
                 JOIN conversations c ON c.id = m.conversation_id
                 LEFT JOIN device_cursors d
                   ON d.user_id = m.user_id AND d.device_id = ?2 AND d.conversation_id = m.conversation_id
                 JOIN messages msg
                   ON msg.conversation_id = m.conversation_id
                  AND msg.seq > max(coalesce(d.delivered_seq, 0), m.joined_seq - 1)
                  AND (m.removed_seq IS NULL OR msg.seq <= m.removed_seq)
                 WHERE m.user_id = ?1
                   AND (?3 = '' OR m.conversation_id = ?3)
                   AND coalesce(m.removed_seq, c.last_seq) > coalesce(d.delivered_seq, 0)
                   AND (msg.conversation_id, msg.seq) > (?4, ?5)
                 UNION ALL
                 SELECT msg.conversation_id, msg.seq, msg.message_id, msg.sender, msg.client_msg_id,
                    msg.body, msg.sent_at_ms, msg.kind, msg.reply_to_seq, msg.target_seq, msg.reaction,
                    msg.member_ids, msg.title, msg.role, msg.edited_at_ms, msg.deleted, msg.attachments,
                    msg.last_edit_seq
                 FROM earlier_memberships e
                 LEFT JOIN device_cursors d
                   ON d.user_id = e.user_id AND d.device_id = ?2 AND d.conversation_id = e.conversation_id
                 JOIN messages msg
                   ON msg.conversation_id = e.conversation_id
                  AND msg.seq > max(coalesce(d.delivered_seq, 0), e.joined_seq - 1)
                  AND msg.seq <= e.removed_seq
                 WHERE e.user_id = ?1
                   AND (?3 = '' OR e.conversation_id = ?3)
                   AND e.removed_seq > coalesce(d.delivered_seq, 0)
                   AND (msg.conversation_id, msg.seq) > (?4, ?5)
                 ORDER BY 1, 2
                 LIMIT ?6";
            let mut statement = c.prepare_cached(sql)?;
            let rows = statement
                .query_map(params![user, device, only, after_conversation, after_seq, limit as i64], row_to_message)?;
            rows.collect()
        })
        .await
    }

    async fn block(&self, user: &str, target: &str, now_ms: i64) -> Result<bool> {
        let (user, target) = (user.to_owned(), target.to_owned());
        self.write(move |tx| writes::block(tx, &user, &target, now_ms)).await
    }

    async fn unblock(&self, user: &str, target: &str) -> Result<bool> {
        let (user, target) = (user.to_owned(), target.to_owned());
        self.write(move |tx| writes::unblock(tx, &user, &target)).await
    }

    async fn blocked_users(&self, user: &str, limit: usize) -> Result<Vec<BlockedUser>> {
        let user = user.to_owned();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT blocked_id, blocked_at_ms FROM blocks WHERE user_id = ?1
                 ORDER BY blocked_at_ms, blocked_id LIMIT ?2",
            )?
            .query_map(params![user, limit as i64], |r| {
                Ok(BlockedUser { user_id: r.get(0)?, blocked_at_ms: r.get(1)? })
            })?
            .collect()
        })
        .await
    }

    async fn blocks_between(&self, a: &str, b: &str) -> Result<Blocks> {
        let (a, b) = (a.to_owned(), b.to_owned());
        self.read(move |c| {
            let blockers: Vec<String> = c
                .prepare_cached(
                    "SELECT user_id FROM blocks
                     WHERE (user_id = ?1 AND blocked_id = ?2) OR (user_id = ?2 AND blocked_id = ?1)",
                )?
                .query_map(params![a, b], |r| r.get(0))?
                .collect::<r2d2_sqlite::rusqlite::Result<_>>()?;
            Ok(Blocks { a_blocked_b: blockers.contains(&a), b_blocked_a: blockers.contains(&b) })
        })
        .await
    }

    async fn blocked_by(&self, user: &str) -> Result<Vec<String>> {
        let user = user.to_owned();
        self.read(move |c| {
            c.prepare_cached("SELECT user_id FROM blocks WHERE blocked_id = ?1 ORDER BY user_id")?
                .query_map(params![user], |r| r.get(0))?
                .collect()
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

    /// Schema 7 fills `last_edit_seq` of messages edited before it existed.
    #[tokio::test]
    async fn the_latest_edit_of_older_messages_is_backfilled() {
        use crate::store::{Change, ChangeRequest, HistoryRange, Limits, SeqBounds};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("messages.db");
        let store = SqliteStore::open(&path, &SqliteOptions::default()).unwrap();
        let id = store.get_or_create_direct("a", "b", Uuid::now_v7(), 1).await.unwrap().id;
        let seq = crate::store::contract::send(&store, id, "a", "m1", "hello").await.unwrap().message().seq;
        let plain = crate::store::contract::send(&store, id, "a", "m2", "plain").await.unwrap().message().seq;
        let mut edits = Vec::new();
        for body in ["first edit", "second edit"] {
            let request = ChangeRequest {
                conversation_id: id,
                actor: "a".into(),
                change: Change::Edit { target_seq: seq, body: body.into() },
                now_ms: messenger_platform::ids::now_ms(),
                limits: Limits { max_group_size: 10, edit_window_ms: 60_000 },
            };
            edits.push(store.apply(request).await.unwrap()[0].entry.seq);
        }
        // As a database from before schema 7 holds them, then the backfill alone.
        let raw = Connection::open(&path).unwrap();
        raw.execute_batch("UPDATE messages SET last_edit_seq = 0").unwrap();
        let (_, backfill) = schema::MIGRATIONS[6].split_once(';').unwrap();
        raw.execute_batch(backfill).unwrap();
        let page = store.history(id, HistoryRange::Before(None), SeqBounds::ALL, 10).await.unwrap();
        let latest = |seq: u64| page.iter().find(|m| m.seq == seq).unwrap().last_edit_seq;
        assert_eq!((latest(seq), latest(plain)), (edits[1], 0));
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

    /// A panic in the writer thread stops the process (the supervisor's token
    /// is the process's shutdown, which turns health NOT_SERVING), and a send
    /// in the batch the panic broke is answered with an error, never an ack,
    /// because it never committed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_panic_stops_the_process_and_acks_nothing_uncommitted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("messages.db");
        // A long linger puts the send and the panic into one batch.
        let options = SqliteOptions { commit_linger: Duration::from_millis(300), ..SqliteOptions::default() };
        let stop = tokio_util::sync::CancellationToken::new();
        let supervisor = Supervisor::new(stop.clone());
        let store = Arc::new(SqliteStore::open_supervised(&path, &options, &supervisor).unwrap());
        let id = store.get_or_create_direct("a", "b", Uuid::now_v7(), 1).await.unwrap().id;
        let before = store.history(id, HistoryRange::Before(None), SeqBounds::ALL, 10).await.unwrap().len();

        let sending = store.clone();
        let send = tokio::spawn(async move { crate::store::contract::send(&*sending, id, "a", "m1", "lost").await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let broken = store.write(|_| -> Result<()> { panic!("injected writer panic") });
        // Its caller hears of the panic once it happened (after the batch's linger).
        assert!(matches!(broken.await, Err(Error::Unavailable(_))));
        let panicked_at = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(1), stop.cancelled())
            .await
            .expect("the process was not stopped within a second of the writer's panic");
        assert!(panicked_at.elapsed() < Duration::from_secs(1));
        assert!(supervisor.failure().unwrap().contains("sqlite-writer"), "{:?}", supervisor.failure());
        let answer = send.await.unwrap();
        assert!(matches!(answer, Err(Error::Unavailable(_))), "a send that did not commit was answered {answer:?}");
        // Later writes fail at once instead of waiting.
        let later = crate::store::contract::send(&*store, id, "a", "m2", "after").await;
        assert!(matches!(later, Err(Error::Unavailable(_))), "{later:?}");

        drop(store);
        let reopened = SqliteStore::open(&path, &SqliteOptions::default()).unwrap();
        let stored = reopened.history(id, HistoryRange::Before(None), SeqBounds::ALL, 10).await.unwrap();
        assert_eq!(stored.len(), before, "the uncommitted send was stored");
    }
}
