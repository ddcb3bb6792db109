//! What notify keeps: registered devices, mutes, and the outbox of push jobs.
//!
//! A job is stored before the message service's `Enqueue` is answered, and
//! its id is derived from what it pushes (kind, user, device, conversation,
//! seq), so a retried call stores nothing new and the provider sees one id
//! for every attempt. `store/contract.rs` is the suite every backend passes.

#[cfg(test)]
pub(crate) mod contract;

use async_trait::async_trait;
use uuid::Uuid;

use crate::error::Result;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Platform {
    Apns,
    Fcm,
    WebPush,
    Webhook,
}

impl Platform {
    pub fn code(self) -> i64 {
        match self {
            Platform::Apns => 1,
            Platform::Fcm => 2,
            Platform::WebPush => 3,
            Platform::Webhook => 4,
        }
    }

    pub fn from_code(code: i64) -> Option<Platform> {
        match code {
            1 => Some(Platform::Apns),
            2 => Some(Platform::Fcm),
            3 => Some(Platform::WebPush),
            4 => Some(Platform::Webhook),
            _ => None,
        }
    }

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Apns => "apns",
            Platform::Fcm => "fcm",
            Platform::WebPush => "webpush",
            Platform::Webhook => "webhook",
        }
    }
}

/// A browser's push subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebPushKeys {
    pub endpoint: String,
    pub p256dh: String,
    pub auth: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub user_id: String,
    pub device_id: String,
    pub platform: Platform,
    /// APNs / FCM token, or the webhook URL.
    pub token: String,
    pub web_push: Option<WebPushKeys>,
    pub app_id: String,
    pub locale: String,
    pub previews: bool,
    /// Webhooks: the signing key ("whsec_" + base64). Empty otherwise.
    pub secret: String,
    /// New at each registration: a dead token is removed only if the
    /// registration it was sent to is still the current one.
    pub registration: Uuid,
    pub updated_at_ms: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobKind {
    /// A visible notification of a new entry.
    Notify,
    /// A silent update that clears the conversation's notification.
    Retract,
}

impl JobKind {
    pub fn code(self) -> i64 {
        match self {
            JobKind::Notify => 0,
            JobKind::Retract => 1,
        }
    }

    pub fn from_code(code: i64) -> Option<JobKind> {
        match code {
            0 => Some(JobKind::Notify),
            1 => Some(JobKind::Retract),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobState {
    /// Waiting for its due time, or claimed and in flight.
    Queued,
    /// The provider accepted it.
    Sent,
    /// Out of attempts, or refused for good: kept for operators.
    Dead,
    /// Not sent: read meanwhile, the device unregistered, or it collapsed
    /// into a later push of the same conversation.
    Cancelled,
    /// Sent, then taken back by a retraction.
    Retracted,
}

impl JobState {
    pub fn code(self) -> i64 {
        match self {
            JobState::Queued => 0,
            JobState::Sent => 1,
            JobState::Dead => 2,
            JobState::Cancelled => 3,
            JobState::Retracted => 4,
        }
    }

    pub fn from_code(code: i64) -> Option<JobState> {
        match code {
            0 => Some(JobState::Queued),
            1 => Some(JobState::Sent),
            2 => Some(JobState::Dead),
            3 => Some(JobState::Cancelled),
            4 => Some(JobState::Retracted),
            _ => None,
        }
    }
}

/// What a preview shows (only for devices that allow previews).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Preview {
    pub sender_id: String,
    /// The group's title; empty for a direct conversation.
    pub title: String,
    /// Truncated to `notify.preview_chars`.
    pub body: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub id: Uuid,
    pub kind: JobKind,
    pub user_id: String,
    pub device_id: String,
    pub conversation_id: Uuid,
    pub seq: u64,
    pub state: JobState,
    pub due_at_ms: i64,
    pub attempts: u32,
    /// When the entry was committed (what commit-to-push latency counts from).
    pub created_at_ms: i64,
    pub preview: Option<Preview>,
    pub last_error: String,
    /// The W3C `traceparent` of the call that queued it (empty when that
    /// was not traced): the push's span joins the message's trace.
    pub trace_context: String,
}

/// Jobs are keyed by what they push; the namespace keeps these ids apart
/// from every other v5 id.
const JOB_NAMESPACE: Uuid = Uuid::from_u128(0x6d65_7373_656e_6765_722e_6e6f_7469_6679);

impl Job {
    /// The id of `kind` for this device, conversation and seq: the same for
    /// every retry of the call that queued it, and the idempotency key the
    /// provider gets (APNs `apns-id`, the webhook's `webhook-id`).
    pub fn id_for(kind: JobKind, user_id: &str, device_id: &str, conversation_id: Uuid, seq: u64) -> Uuid {
        let key = format!("{}\n{user_id}\n{device_id}\n{conversation_id}\n{seq}", kind.code());
        Uuid::new_v5(&JOB_NAMESPACE, key.as_bytes())
    }
}

/// A user's mute of a conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mute {
    /// Milliseconds since the epoch; 0 (or a past time) unmutes.
    pub until_ms: i64,
    /// Messages that mention the user are still pushed.
    pub mentions_only: bool,
}

/// Jobs in the outbox by state (the Scylla backend counts its due index,
/// which may briefly hold entries of jobs that just finished).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutboxSize {
    pub queued: u64,
    pub dead: u64,
}

/// An entry that notified a user: it counts in the user's badge until the
/// user reads it (on any device).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unread {
    pub user_id: String,
    pub conversation_id: Uuid,
    pub seq: u64,
    pub at_ms: i64,
}

/// The sent pushes a read passed, one per device: the latest seq each showed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shown {
    pub device_id: String,
    pub seq: u64,
}

#[async_trait]
pub trait PushStore: Send + Sync + 'static {
    /// Adds or replaces (same user and device id) a registration.
    async fn put_device(&self, device: &Device) -> Result<()>;

    async fn device(&self, user_id: &str, device_id: &str) -> Result<Option<Device>>;

    /// A user's devices, by device id.
    async fn devices(&self, user_id: &str) -> Result<Vec<Device>>;

    /// False when there was none.
    async fn remove_device(&self, user_id: &str, device_id: &str) -> Result<bool>;

    /// Removes the device only if `registration` is still its current one
    /// (a dead token must not remove the fresh one registered meanwhile).
    async fn remove_device_if(&self, user_id: &str, device_id: &str, registration: Uuid) -> Result<bool>;

    /// Mutes `conversation_id` for the user (`until_ms` 0 unmutes).
    async fn set_mute(&self, user_id: &str, conversation_id: Uuid, mute: Mute) -> Result<()>;

    /// How each of `user_ids` muted `conversation_id` (absent: never).
    async fn mutes(&self, user_ids: &[String], conversation_id: Uuid) -> Result<Vec<(String, Mute)>>;

    /// Stores the jobs whose id is new; returns how many it stored.
    async fn enqueue(&self, jobs: &[Job]) -> Result<usize>;

    /// Queued jobs due by `now_ms` that nobody holds, at most `limit`,
    /// oldest due first, each now held until `now_ms + lease_ms`.
    async fn claim(&self, now_ms: i64, lease_ms: i64, limit: usize) -> Result<Vec<Job>>;

    async fn job(&self, id: Uuid) -> Result<Option<Job>>;

    /// Queued -> `state` (sent, cancelled or dead), with the attempts made
    /// and the last error. False when it was not queued (a read cancelled it).
    async fn finish(&self, id: Uuid, state: JobState, attempts: u32, error: &str) -> Result<bool>;

    /// Queued again, due at `due_at_ms`, not held (a retry, or a push that
    /// waits for its device's rate limit).
    async fn reschedule(&self, id: Uuid, due_at_ms: i64, attempts: u32, error: &str) -> Result<()>;

    /// Sent notifications of the user's conversation through `read_seq` not
    /// yet retracted: the latest per device.
    async fn shown_through(&self, user_id: &str, conversation_id: Uuid, read_seq: u64) -> Result<Vec<Shown>>;

    /// The read's effect on stored jobs: queued notifications through
    /// `read_seq` -> cancelled, sent ones -> retracted. Returns how many
    /// were cancelled.
    async fn read_through(&self, user_id: &str, conversation_id: Uuid, read_seq: u64) -> Result<usize>;

    /// Adds entries to their users' unread counts; a repeat adds nothing.
    async fn add_unread(&self, entries: &[Unread]) -> Result<()>;

    /// Entries of the conversation through `read_seq` leave the user's
    /// unread count.
    async fn clear_unread(&self, user_id: &str, conversation_id: Uuid, read_seq: u64) -> Result<()>;

    /// The user's unread count (the badge), at most `cap`.
    async fn unread(&self, user_id: &str, cap: u32) -> Result<u32>;

    /// Forgets jobs that finished (sent, cancelled, retracted) before
    /// `finished_before_ms`, dead-lettered ones before `dead_before_ms`, and
    /// unread marks made before `finished_before_ms`. Returns rows removed.
    /// A backend may instead expire them itself (Scylla: TTLs) and do nothing here.
    async fn purge(&self, finished_before_ms: i64, dead_before_ms: i64) -> Result<u64>;

    /// Dead-lettered jobs, most recent first, at most `limit`.
    async fn dead_letters(&self, limit: usize) -> Result<Vec<Job>>;

    /// What the outbox holds (queued) and what waits for an operator (dead).
    async fn outbox(&self) -> Result<OutboxSize>;
}
