//! The message service's configuration.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{cache::CacheOptions, scylla::ScyllaOptions, sqlite::SqliteOptions};

/// Which `MessageStore` holds conversations and messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// One SQLite file (`database`): the embedded default, one writer process.
    #[default]
    Sqlite,
    /// A ScyllaDB cluster (`scylla`): several message-service instances.
    Scylla,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// Internal gRPC address (never exposed to clients).
    pub listen: String,
    /// SQLite database file; empty means `<data_dir>/messages.db`.
    pub database: Option<PathBuf>,
    /// Largest message body, in bytes of UTF-8.
    pub max_body_bytes: usize,
    /// History page size when the client asks for none, and the most it may ask for.
    pub history_page_default: u32,
    pub history_page_max: u32,
    /// Inbox page size when the client asks for none, and the most it may ask for.
    pub inbox_page_default: u32,
    pub inbox_page_max: u32,
    /// Most messages one Sync response carries.
    pub sync_page_max: u32,
    /// Most members a group may have, its creator included.
    pub max_group_size: usize,
    /// Longest group title, in bytes.
    pub max_title_bytes: usize,
    /// How long after sending its sender may edit a message.
    #[serde(with = "humantime_serde")]
    pub edit_window: Duration,
    /// Longest reaction, in bytes (one emoji, possibly with modifiers).
    pub max_reaction_bytes: usize,
    /// How long a typing indicator lasts without a renewal.
    #[serde(with = "humantime_serde")]
    pub typing_ttl: Duration,
    /// Delivered receipts are pushed live only in conversations up to this many
    /// members (every device's ack would otherwise fan out to every member);
    /// larger groups ask with GetReceipts. Read receipts are always pushed.
    pub delivered_receipts_max_members: usize,
    /// Presence updates (online / offline) go to the members of a user's
    /// conversations up to this size, among its `presence_updates_max_conversations`
    /// most recent ones; larger groups do not show who is online.
    pub presence_updates_max_members: usize,
    pub presence_updates_max_conversations: usize,
    /// Most conversations one `GetConversations` call may ask for; more
    /// answers INVALID_ARGUMENT naming the limit.
    pub conversations_per_call: usize,
    /// Longest block list one user may have; blocking one more answers
    /// FAILED_PRECONDITION naming the limit (unblock someone first).
    pub max_blocked_users: usize,
    /// Most media one message may carry.
    pub max_attachments: usize,
    /// Sends one `SendStream` (one gateway) may have in progress; the stream
    /// is read no further until some finish (HTTP/2 flow control holds the rest).
    pub send_stream_max_inflight: usize,
    pub store: StoreBackend,
    pub sqlite: SqliteOptions,
    pub scylla: ScyllaOptions,
    /// The read-through cache in front of the store.
    pub cache: CacheOptions,
    pub fanout: FanoutOptions,
    /// Handing entries and read marks to the notify service.
    pub push: PushOptions,
}

/// `message.push`: what goes to the notify service after commit.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushOptions {
    /// Off: no push notifications from this instance. On by default; an
    /// instance whose static discovery names no notify address sends none.
    pub enabled: bool,
    /// Batches of entries and read marks waiting for the notify service; a
    /// full queue drops what does not fit (counted), never slows sends.
    pub queue_depth: usize,
    /// Tries of each call while notify is unavailable, with backoff.
    pub max_attempts: u32,
}

impl Default for PushOptions {
    fn default() -> Self {
        Self { enabled: true, queue_depth: 1024, max_attempts: 5 }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FanoutOptions {
    /// Parallel fan-out workers; a conversation always maps to the same worker,
    /// so its messages are pushed in seq order.
    pub workers: usize,
    /// Messages waiting per worker; a full queue slows senders down (backpressure).
    pub queue_depth: usize,
    /// Most messages fanned out together in one Locate + one Deliver per gateway.
    pub max_batch: usize,
    /// How long a worker waits for more items before fanning out a partial
    /// batch, when more than one was already waiting (under load): fewer
    /// calls then, at most this much added latency. A lone item never waits.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// Users per presence `Locate` call; a batch with more recipients is
    /// located in several calls. Keep it at or below `presence.max_users_per_call`.
    pub locate_max_users: usize,
    /// Times a failed `Deliver` of messages and receipts is sent again (the
    /// link to a gateway broke for a moment), the first after
    /// `redeliver_backoff`, each next after twice the wait before: an online
    /// device gets the entry once its gateway answers again, within the
    /// repair bound `redeliver_backoff x (2^redeliver_attempts - 1)` (3.75 s
    /// by default), without a later message or a reconnect. 0: not sent again.
    pub redeliver_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub redeliver_backoff: Duration,
    /// Most deliveries (one event for one gateway's sessions) waiting to be
    /// sent again, across workers (each holds its message: with 16 KiB
    /// bodies, 4096 of them hold at most about 64 MiB); past it a failed delivery is dropped and
    /// its devices catch up at their conversation's next entry or their next
    /// reconnect (`messenger.message.fanout.deliveries_dropped`).
    pub redeliver_max_pending: usize,
}

impl Default for FanoutOptions {
    fn default() -> Self {
        Self {
            workers: 4,
            queue_depth: 4096,
            max_batch: 256,
            linger: Duration::from_millis(1),
            locate_max_users: 5000,
            redeliver_attempts: 4,
            redeliver_backoff: Duration::from_millis(250),
            redeliver_max_pending: 4096,
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7710".into(),
            database: None,
            max_body_bytes: 16 * 1024,
            history_page_default: 50,
            history_page_max: 200,
            inbox_page_default: 50,
            inbox_page_max: 200,
            sync_page_max: 500,
            max_group_size: 1024,
            max_title_bytes: 256,
            edit_window: Duration::from_secs(15 * 60),
            max_reaction_bytes: 64,
            typing_ttl: Duration::from_secs(5),
            delivered_receipts_max_members: 32,
            presence_updates_max_members: 32,
            presence_updates_max_conversations: 200,
            conversations_per_call: 100,
            max_blocked_users: 1000,
            max_attachments: 10,
            send_stream_max_inflight: 1024,
            store: StoreBackend::Sqlite,
            sqlite: SqliteOptions::default(),
            scylla: ScyllaOptions::default(),
            cache: CacheOptions::default(),
            fanout: FanoutOptions::default(),
            push: PushOptions::default(),
        }
    }
}

impl Options {
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("message.max_body_bytes", self.max_body_bytes),
            ("message.history_page_default", self.history_page_default as usize),
            ("message.history_page_max", self.history_page_max as usize),
            ("message.inbox_page_default", self.inbox_page_default as usize),
            ("message.inbox_page_max", self.inbox_page_max as usize),
            ("message.sync_page_max", self.sync_page_max as usize),
            ("message.max_group_size", self.max_group_size),
            ("message.max_title_bytes", self.max_title_bytes),
            ("message.max_reaction_bytes", self.max_reaction_bytes),
            ("message.sqlite.max_batch", self.sqlite.max_batch),
            ("message.sqlite.queue_depth", self.sqlite.queue_depth),
            ("message.sqlite.wal_autocheckpoint_pages", self.sqlite.wal_autocheckpoint_pages as usize),
            ("message.fanout.workers", self.fanout.workers),
            ("message.push.queue_depth", self.push.queue_depth),
            ("message.push.max_attempts", self.push.max_attempts as usize),
            ("message.fanout.queue_depth", self.fanout.queue_depth),
            ("message.fanout.max_batch", self.fanout.max_batch),
            ("message.fanout.redeliver_max_pending", self.fanout.redeliver_max_pending),
            ("message.presence_updates_max_conversations", self.presence_updates_max_conversations),
            ("message.max_blocked_users", self.max_blocked_users),
            ("message.conversations_per_call", self.conversations_per_call),
            ("message.max_attachments", self.max_attachments),
            ("message.send_stream_max_inflight", self.send_stream_max_inflight),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(format!("{key} must be positive"));
            }
        }
        // `scylla` is checked with the cluster it runs on (`[scylla]`), where
        // the whole configuration is.
        self.cache.validate()?;
        if self.max_group_size < 2 {
            return Err("message.max_group_size must be at least 2".into());
        }
        if self.fanout.redeliver_attempts > 0 && self.fanout.redeliver_backoff.is_zero() {
            return Err("message.fanout.redeliver_backoff must be positive when redeliver_attempts is".into());
        }
        if self.fanout.redeliver_attempts > 16 {
            return Err("message.fanout.redeliver_attempts is at most 16 (the wait doubles each time)".into());
        }
        if self.typing_ttl.is_zero() {
            return Err("message.typing_ttl must be positive".into());
        }
        if self.history_page_default > self.history_page_max {
            return Err("message.history_page_default exceeds message.history_page_max".into());
        }
        if self.inbox_page_default > self.inbox_page_max {
            return Err("message.inbox_page_default exceeds message.inbox_page_max".into());
        }
        Ok(())
    }
}
