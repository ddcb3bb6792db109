//! Upload records: what was declared at the ticket, and what complete found.
//!
//! The bytes live in object storage; a record says who uploaded what to which
//! conversation and whether it is ready. `store/contract.rs` is the suite
//! every backend passes.

#[cfg(test)]
pub(crate) mod contract;

use async_trait::async_trait;
use uuid::Uuid;

use crate::error::Result;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Ticket issued; bytes may or may not be in storage yet.
    Pending,
    /// Checked and processed: may be attached and fetched.
    Ready,
    /// Its message was deleted, or the upload was abandoned: objects gone or going.
    Deleted,
}

impl State {
    pub fn code(self) -> i64 {
        match self {
            State::Pending => 0,
            State::Ready => 1,
            State::Deleted => 2,
        }
    }

    pub fn from_code(code: i64) -> Option<State> {
        match code {
            0 => Some(State::Pending),
            1 => Some(State::Ready),
            2 => Some(State::Deleted),
            _ => None,
        }
    }
}

/// A multipart upload: S3's upload id and what each part must be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Multipart {
    pub upload_id: String,
    pub part_size: u64,
    /// SHA-256 of each part, in order.
    pub part_sha256: Vec<[u8; 32]>,
}

/// What complete found and made.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Processed {
    /// Bytes of the stored original (re-encoded images differ from the upload).
    pub stored_size: u64,
    pub width: u32,
    pub height: u32,
    pub blurhash: String,
    pub has_thumbnail: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upload {
    pub id: Uuid,
    pub owner: String,
    pub conversation_id: Uuid,
    pub mime: String,
    /// Declared size and SHA-256 of the upload.
    pub size: u64,
    pub sha256: [u8; 32],
    pub file_name: String,
    pub created_at_ms: i64,
    pub state: State,
    pub multipart: Option<Multipart>,
    /// Set once ready.
    pub processed: Processed,
}

#[async_trait]
pub trait MediaStore: Send + Sync + 'static {
    /// Records a new pending upload.
    async fn create(&self, upload: &Upload) -> Result<()>;

    async fn get(&self, id: Uuid) -> Result<Option<Upload>>;

    /// Pending -> ready with what complete found. False when the upload was
    /// not pending (completed already, or deleted meanwhile).
    async fn mark_ready(&self, id: Uuid, processed: &Processed) -> Result<bool>;

    /// Any state -> deleted. False when it was deleted already or is unknown.
    async fn mark_deleted(&self, id: Uuid) -> Result<bool>;

    /// Ties a ready upload to the message `client_msg_id` names: true when
    /// it was free or already tied to that message (a retried send).
    async fn attach(&self, id: Uuid, client_msg_id: &str) -> Result<bool>;

    /// Pending -> deleted (the sweep's claim). False when it is not pending
    /// any more: completed or deleted meanwhile.
    async fn abandon(&self, id: Uuid) -> Result<bool>;

    /// What the quota counts of `owner`: the stored bytes of its ready
    /// media and the declared size of its pending uploads (each may be
    /// completed at any time, so it counts from its ticket on).
    async fn used_bytes(&self, owner: &str) -> Result<u64>;

    /// Pending uploads created before `cutoff_ms`, oldest first, at most `limit`.
    async fn pending_before(&self, cutoff_ms: i64, limit: usize) -> Result<Vec<Upload>>;
}
