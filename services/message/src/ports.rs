//! What the message service's domain logic (`service.rs`) needs from other
//! services, as small traits it owns: committed entries and live hints go
//! to [`Deliveries`] (fan-out to gateways and pushes, `fanout.rs`), media
//! questions to [`Media`] (the media service, over gRPC in `grpc.rs`).
//! Domain values only: proto types stay in `convert.rs` and the adapters,
//! so `service.rs` is unit tested against fakes.

use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;

use crate::{
    error::Result,
    store::{Appended, Attachment},
};

/// A member's cursors moved (a read mark, or a device's delivered ack).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub conversation_id: Uuid,
    pub user_id: String,
    /// 0 when only the delivered cursor moved.
    pub read_seq: u64,
    /// 0 when only the read cursor moved.
    pub delivered_seq: u64,
}

/// A member started or stopped typing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Typing {
    pub conversation_id: Uuid,
    pub user_id: String,
    pub typing: bool,
    pub expires_in_ms: u32,
    /// Who blocked the typist, in a group: not told (`visibility::from_blocked`).
    pub hidden_from: Vec<String>,
}

/// A user came online or went offline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Presence {
    pub user_id: String,
    pub online: bool,
    pub last_seen_ms: i64,
}

/// A live-only hint: dropped rather than waited for when fan-out is saturated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hint {
    /// To the conversation's active members.
    Receipt(Receipt),
    /// To the conversation's active members but the typist.
    Typing(Typing),
    /// To these users (the changed user's contacts).
    Presence(Arc<Vec<String>>, Presence),
}

/// Where committed entries and hints go after the commit.
#[async_trait]
pub trait Deliveries: Send + Sync + 'static {
    /// A committed entry, to its audience; waits when fan-out is full
    /// (backpressure on writers).
    async fn entry(&self, appended: Appended);

    fn hint(&self, hint: Hint);

    /// A read mark moved: pushes the reader has not seen yet are withdrawn.
    fn read_marked(&self, user_id: &str, conversation_id: Uuid, read_seq: u64);
}

/// Media a send asks to attach, as the media service checks it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MediaToAttach {
    pub sender: String,
    pub conversation_id: String,
    pub client_msg_id: String,
    pub media_ids: Vec<String>,
}

/// The media service, as the message service uses it.
#[async_trait]
pub trait Media: Send + Sync + 'static {
    /// The attachments for a send: each ready, the sender's, this
    /// conversation's and bound to this `client_msg_id` (else
    /// `Error::Media`); `Error::Unavailable` when the service cannot say.
    async fn describe(&self, request: MediaToAttach) -> Result<Vec<Attachment>>;

    /// Deletes the objects of a deleted message's media.
    async fn delete(&self, conversation_id: &str, media_ids: Vec<String>) -> Result<()>;
}
