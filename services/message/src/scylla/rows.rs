//! Rows as Scylla returns them, their conversion to the domain types, the
//! bucket arithmetic, and the mapping of driver errors to the crate's `Error`.

use std::collections::BTreeMap;

use ::scylla::{
    DeserializeRow, SerializeRow,
    errors::{DbError, ExecutionError, PagerExecutionError, RequestAttemptError, WriteType},
};
use messenger_platform::cql;
use uuid::Uuid;

use super::statements::Arity;
use crate::{
    error::Error,
    store::{Attachment, ConversationKind, Kind, Member, Role, SeqBounds, StoredMessage},
};

/// A partition of `messages` holds the seqs sharing `seq >> BUCKET_BITS`.
pub(super) const BUCKET_BITS: u32 = 12;

pub(super) fn bucket(seq: u64) -> i64 {
    (seq >> BUCKET_BITS) as i64
}

/// The part of `from..=to` that lies in bucket `bucket` (assumes `from <= to`
/// and that the bucket is one of `bucket(from)..=bucket(to)`).
pub(super) fn bucket_span(bucket: i64, from: u64, to: u64) -> (u64, u64) {
    let start = (bucket as u64) << BUCKET_BITS;
    let end = start + (1 << BUCKET_BITS) - 1;
    (from.max(start), to.min(end))
}

/// The per-bucket pieces of `from..=to`, in reading order: each is
/// `(bucket, low, high)`. Empty when `from > to`.
pub(super) fn spans(from: u64, to: u64, descending: bool) -> Vec<(i64, u64, u64)> {
    if from > to {
        return Vec::new();
    }
    let mut spans: Vec<(i64, u64, u64)> = (bucket(from)..=bucket(to))
        .map(|index| {
            let (low, high) = bucket_span(index, from, to);
            (index, low, high)
        })
        .collect();
    if descending {
        spans.reverse();
    }
    spans
}

/// Splits `items` (ascending by seq) into runs that share a bucket and hold at
/// most `max_items` items and, beyond the first item, at most `max_bytes` bytes.
pub(super) fn chunks<T>(
    items: Vec<T>,
    seq: impl Fn(&T) -> u64,
    size: impl Fn(&T) -> usize,
    max_items: usize,
    max_bytes: usize,
) -> Vec<Vec<T>> {
    let mut chunks: Vec<Vec<T>> = Vec::new();
    let mut bytes = 0;
    for item in items {
        let fits = chunks.last().is_some_and(|chunk| {
            chunk.len() < max_items
                && bytes + size(&item) <= max_bytes
                && chunk.first().is_some_and(|first| bucket(seq(first)) == bucket(seq(&item)))
        });
        if fits {
            bytes += size(&item);
            if let Some(chunk) = chunks.last_mut() {
                chunk.push(item);
            }
        } else {
            bytes = size(&item);
            chunks.push(vec![item]);
        }
    }
    chunks
}

pub(super) fn seq_value(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn seq_from(value: Option<i64>) -> u64 {
    value.map_or(0, |v| v.max(0) as u64)
}

fn kind_code(kind: ConversationKind) -> i32 {
    match kind {
        ConversationKind::Direct => 1,
        ConversationKind::Group => 2,
    }
}

pub(super) fn conversation_kind_code(kind: ConversationKind) -> i32 {
    kind_code(kind)
}

pub(super) fn roster_value(roster: &BTreeMap<String, Role>) -> BTreeMap<String, i32> {
    roster.iter().map(|(user, role)| (user.clone(), role.code() as i32)).collect()
}

#[derive(DeserializeRow)]
pub(super) struct HeadRow {
    conversation_id: Uuid,
    kind: Option<i32>,
    title: Option<String>,
    created_by: Option<String>,
    created_at_ms: Option<i64>,
    last_activity_ms: Option<i64>,
    last_seq: Option<i64>,
    last_reservation: Option<Uuid>,
    roster: Option<BTreeMap<String, i32>>,
    applying: Option<Uuid>,
    applying_since_ms: Option<i64>,
    pending: Option<String>,
}

/// A conversation's head: everything the LWT on `last_seq` guards.
#[derive(Clone, Debug)]
pub(super) struct Head {
    pub id: Uuid,
    pub kind: ConversationKind,
    pub title: String,
    pub created_by: String,
    pub created_at_ms: i64,
    pub last_activity_ms: i64,
    pub last_seq: u64,
    pub last_reservation: Option<Uuid>,
    /// Active members and their roles.
    pub roster: BTreeMap<String, Role>,
    /// The apply lock: holder and since when (ms).
    pub applying: Option<(Uuid, i64)>,
    /// The rows the lock holder's change has yet to write (JSON of
    /// `head::Pending`), present exactly while the lock is held.
    pub pending: Option<String>,
}

impl HeadRow {
    /// None for a row that was never created (only stray cells).
    pub(super) fn into_head(self) -> Option<Head> {
        let kind = match self.kind? {
            2 => ConversationKind::Group,
            _ => ConversationKind::Direct,
        };
        Some(Head {
            id: self.conversation_id,
            kind,
            title: self.title.unwrap_or_default(),
            created_by: self.created_by.unwrap_or_default(),
            created_at_ms: self.created_at_ms.unwrap_or(0),
            last_activity_ms: self.last_activity_ms.unwrap_or(0),
            last_seq: seq_from(self.last_seq),
            last_reservation: self.last_reservation,
            roster: self
                .roster
                .unwrap_or_default()
                .into_iter()
                .map(|(user, role)| (user, Role::from_code(role.into())))
                .collect(),
            applying: self.applying.map(|holder| (holder, self.applying_since_ms.unwrap_or(0))),
            pending: self.pending,
        })
    }
}

#[derive(DeserializeRow)]
pub(super) struct MemberRow {
    user_id: String,
    role: Option<i32>,
    joined_seq: Option<i64>,
    removed_seq: Option<i64>,
    read_seq: Option<i64>,
    delivered_seq: Option<i64>,
    took_part: Option<bool>,
    earlier: Option<BTreeMap<i64, i64>>,
}

impl MemberRow {
    /// None when the membership row was never written (only cursor cells).
    pub(super) fn into_member(self) -> Option<Member> {
        Some(Member {
            user_id: self.user_id,
            role: Role::from_code(self.role?.into()),
            joined_seq: seq_from(self.joined_seq),
            removed_seq: self.removed_seq.map(|s| s.max(0) as u64),
            read_seq: seq_from(self.read_seq),
            delivered_seq: seq_from(self.delivered_seq),
            took_part: self.took_part.unwrap_or(false),
            earlier: earlier_ranges(self.earlier),
        })
    }
}

#[derive(DeserializeRow)]
pub(super) struct InboxRow {
    pub conversation_id: Uuid,
    pub joined_seq: Option<i64>,
    pub removed_seq: Option<i64>,
    pub earlier: Option<BTreeMap<i64, i64>>,
}

/// A row's `earlier` map as ranges, oldest first.
fn earlier_ranges(earlier: Option<BTreeMap<i64, i64>>) -> Vec<SeqBounds> {
    earlier
        .unwrap_or_default()
        .into_iter()
        .map(|(from, to)| SeqBounds { from: from.max(0) as u64, to: Some(to.max(0) as u64) })
        .collect()
}

/// `{joined_seq: removed_seq}` of an ended membership, as `earlier` keeps it.
pub(super) fn earlier_value(range: SeqBounds) -> BTreeMap<i64, i64> {
    BTreeMap::from([(seq_value(range.from), seq_value(range.to.unwrap_or(range.from)))])
}

impl InboxRow {
    /// Its earlier memberships, oldest first.
    pub(super) fn earlier(&self) -> Vec<SeqBounds> {
        earlier_ranges(self.earlier.clone())
    }

    pub(super) fn joined(&self) -> u64 {
        seq_from(self.joined_seq)
    }

    pub(super) fn removed(&self) -> Option<u64> {
        self.removed_seq.map(|s| s.max(0) as u64)
    }
}

#[derive(DeserializeRow)]
pub(super) struct MessageRow {
    conversation_id: Uuid,
    seq: i64,
    message_id: Option<Uuid>,
    sender: Option<String>,
    client_msg_id: Option<String>,
    body: Option<String>,
    sent_at_ms: Option<i64>,
    kind: Option<i32>,
    reply_to_seq: Option<i64>,
    target_seq: Option<i64>,
    reaction: Option<String>,
    member_ids: Option<Vec<String>>,
    title: Option<String>,
    role: Option<i32>,
    edited_at_ms: Option<i64>,
    deleted: Option<bool>,
    edit_seqs: Option<Vec<i64>>,
    attachments: Option<String>,
}

impl MessageRow {
    /// The entry and the seqs of its edits; None for a row that was never
    /// inserted (stray cells of an update that reached no row).
    pub(super) fn into_message(self) -> Option<(StoredMessage, Vec<u64>)> {
        let kind = Kind::from_code(self.kind?.into())?;
        // Written by this code only: unreadable JSON would be a bug, shown as no attachments.
        let attachments = Attachment::decode(self.attachments.as_deref().unwrap_or_default()).unwrap_or_default();
        let role = self.role.unwrap_or(0);
        let mut message = StoredMessage {
            conversation_id: self.conversation_id,
            seq: self.seq.max(0) as u64,
            message_id: self.message_id?,
            sender: self.sender.unwrap_or_default(),
            client_msg_id: self.client_msg_id.unwrap_or_default(),
            body: self.body.unwrap_or_default(),
            sent_at_ms: self.sent_at_ms.unwrap_or(0),
            kind,
            reply_to_seq: seq_from(self.reply_to_seq),
            target_seq: seq_from(self.target_seq),
            reaction: self.reaction.unwrap_or_default(),
            member_ids: self.member_ids.unwrap_or_default(),
            title: self.title.unwrap_or_default(),
            role: (role != 0).then(|| Role::from_code(role.into())),
            edited_at_ms: self.edited_at_ms.unwrap_or(0),
            deleted: self.deleted.unwrap_or(false),
            attachments,
            withheld: false,
            last_edit_seq: 0,
        };
        let edits: Vec<u64> = self.edit_seqs.unwrap_or_default().into_iter().map(|s| s.max(0) as u64).collect();
        message.last_edit_seq = edits.iter().copied().max().unwrap_or(0);
        Some((message, edits))
    }
}

/// What an unread count reads of a message.
#[derive(DeserializeRow)]
pub(super) struct FlagsRow {
    pub kind: Option<i32>,
    pub sender: Option<String>,
    pub deleted: Option<bool>,
}

impl FlagsRow {
    /// A TEXT message from someone other than `user`, not deleted.
    pub(super) fn unread_for(&self, user: &str) -> bool {
        self.kind == Some(Kind::Text.code() as i32)
            && !self.deleted.unwrap_or(false)
            && self.sender.as_deref().is_some_and(|sender| sender != user)
    }
}

/// The values of `message_insert`, in its column order.
#[derive(SerializeRow, Clone, Debug)]
#[scylla(flavor = "enforce_order")]
pub(super) struct NewRow {
    conversation_id: Uuid,
    bucket: i64,
    seq: i64,
    message_id: Uuid,
    sender: String,
    client_msg_id: String,
    body: String,
    sent_at_ms: i64,
    kind: i32,
    reply_to_seq: i64,
    target_seq: i64,
    reaction: String,
    member_ids: Vec<String>,
    title: String,
    role: i32,
    edited_at_ms: i64,
    deleted: bool,
    attachments: String,
}

impl Arity<18> for NewRow {}

impl From<&StoredMessage> for NewRow {
    fn from(message: &StoredMessage) -> Self {
        Self {
            conversation_id: message.conversation_id,
            bucket: bucket(message.seq),
            seq: seq_value(message.seq),
            message_id: message.message_id,
            sender: message.sender.clone(),
            client_msg_id: message.client_msg_id.clone(),
            body: message.body.clone(),
            sent_at_ms: message.sent_at_ms,
            kind: message.kind.code() as i32,
            reply_to_seq: seq_value(message.reply_to_seq),
            target_seq: seq_value(message.target_seq),
            reaction: message.reaction.clone(),
            member_ids: message.member_ids.clone(),
            title: message.title.clone(),
            role: message.role.map_or(0, |role| role.code() as i32),
            edited_at_ms: message.edited_at_ms,
            deleted: message.deleted,
            attachments: Attachment::encode(&message.attachments),
        }
    }
}

pub(super) use messenger_platform::cql::Lwt;

pub(super) fn other(context: &str, error: impl std::fmt::Display) -> Error {
    cql::other(context, error).into()
}

pub(super) fn execution_error(error: ExecutionError) -> Error {
    cql::execution_error(error).into()
}

/// Whether a conditional statement that failed this way may still have
/// applied: a timeout, or a connection lost after sending it.
pub(super) fn outcome_unknown(error: &ExecutionError) -> bool {
    match error {
        ExecutionError::RequestTimeout(_) => true,
        ExecutionError::LastAttemptError(attempt) => match attempt {
            RequestAttemptError::DbError(DbError::WriteTimeout { write_type, .. }, _) => {
                matches!(write_type, WriteType::Cas | WriteType::Simple | WriteType::BatchLog | WriteType::Batch)
            }
            RequestAttemptError::BrokenConnectionError(_) => true,
            _ => false,
        },
        _ => false,
    }
}

pub(super) fn pager_error(error: PagerExecutionError) -> Error {
    cql::pager_error(error).into()
}
