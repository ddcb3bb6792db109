//! The `MessageStore` trait: everything the message service persists, behind
//! one interface with an embedded implementation ([`crate::sqlite`]) and, later,
//! a production one. One contract suite (`store/contract.rs`) runs against each.

use async_trait::async_trait;
use uuid::Uuid;

use crate::error::Result;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConversationKind {
    Direct,
    Group,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conversation {
    pub id: Uuid,
    pub kind: ConversationKind,
    pub title: String,
    pub created_by: String,
    pub members: Vec<String>,
    pub last_seq: u64,
    pub created_at_ms: i64,
    pub last_activity_ms: i64,
}

/// A message as the service hands it to the store; the store assigns `seq`.
#[derive(Clone, Debug)]
pub struct NewMessage {
    pub conversation_id: Uuid,
    pub message_id: Uuid,
    pub sender: String,
    pub client_msg_id: String,
    pub body: String,
    pub sent_at_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    pub conversation_id: Uuid,
    pub seq: u64,
    pub message_id: Uuid,
    pub sender: String,
    pub client_msg_id: String,
    pub body: String,
    pub sent_at_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// Committed now with the next seq.
    Created(StoredMessage),
    /// `(conversation, sender, client_msg_id)` was already stored: the original.
    Duplicate(StoredMessage),
}

impl SendOutcome {
    pub fn message(&self) -> &StoredMessage {
        match self {
            SendOutcome::Created(message) | SendOutcome::Duplicate(message) => message,
        }
    }
}

/// Which part of a conversation's history to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HistoryRange {
    /// Newest first page: `seq < before` (or from the head when `before` is None),
    /// returned ascending.
    Before(Option<u64>),
    /// `seq > after`, ascending.
    After(u64),
}

/// Position in the inbox listing: strictly older than this.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboxCursor {
    pub last_activity_ms: i64,
    pub conversation_id: Uuid,
}

/// Position in a sync: strictly after this message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncCursor {
    pub conversation_id: Uuid,
    pub seq: u64,
}

#[async_trait]
pub trait MessageStore: Send + Sync + 'static {
    /// The one direct conversation between two users, created on first use.
    async fn get_or_create_direct(&self, user: &str, peer: &str, id: Uuid, now_ms: i64) -> Result<Conversation>;

    /// The conversation, if `user` is a member (None otherwise, as if absent).
    async fn conversation_for_member(&self, id: Uuid, user: &str) -> Result<Option<Conversation>>;

    async fn members(&self, id: Uuid) -> Result<Vec<String>>;

    /// Membership check, dedupe, next dense seq and commit, atomically.
    /// Fails with `ConversationNotFound` when the sender is not a member.
    /// Returns only after the commit is durable.
    async fn send(&self, message: NewMessage) -> Result<SendOutcome>;

    /// A page of history, ascending by seq. Membership is the caller's check.
    async fn history(&self, id: Uuid, range: HistoryRange, limit: usize) -> Result<Vec<StoredMessage>>;

    /// The user's conversations, most recent activity first.
    async fn list_conversations(
        &self,
        user: &str,
        after: Option<InboxCursor>,
        limit: usize,
    ) -> Result<Vec<Conversation>>;

    /// Moves a device's delivered cursors forward; returns the stored values.
    /// Cursors never move back and never pass the conversation head; conversations
    /// the user is not a member of are ignored.
    async fn ack_delivered(&self, user: &str, device: &str, cursors: Vec<(Uuid, u64)>) -> Result<Vec<(Uuid, u64)>>;

    /// Messages after the device's delivered cursor in each of the user's
    /// conversations (or only `only`), ordered by (conversation, seq).
    async fn sync(
        &self,
        user: &str,
        device: &str,
        only: Option<Uuid>,
        after: Option<SyncCursor>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>>;
}

#[cfg(test)]
pub(crate) mod contract;
