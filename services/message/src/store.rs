//! The `MessageStore` trait: everything the message service persists, behind
//! one interface with an embedded implementation ([`crate::sqlite`]) and the
//! production one ([`crate::scylla`]). One contract suite (`store/contract.rs`)
//! runs against each.

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::Result;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConversationKind {
    Direct,
    Group,
}

/// What a seq'd entry is; see `MessageKind` in `common.proto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    Text,
    Edit,
    Delete,
    Reaction,
    GroupCreated,
    MembersAdded,
    MemberRemoved,
    MemberLeft,
    Renamed,
    RoleChanged,
}

impl Kind {
    /// The stored (and wire) number.
    pub fn code(self) -> i64 {
        match self {
            Kind::Text => 1,
            Kind::Edit => 2,
            Kind::Delete => 3,
            Kind::Reaction => 4,
            Kind::GroupCreated => 5,
            Kind::MembersAdded => 6,
            Kind::MemberRemoved => 7,
            Kind::MemberLeft => 8,
            Kind::Renamed => 9,
            Kind::RoleChanged => 10,
        }
    }

    pub fn from_code(code: i64) -> Option<Kind> {
        [
            Kind::Text,
            Kind::Edit,
            Kind::Delete,
            Kind::Reaction,
            Kind::GroupCreated,
            Kind::MembersAdded,
            Kind::MemberRemoved,
            Kind::MemberLeft,
            Kind::Renamed,
            Kind::RoleChanged,
        ]
        .into_iter()
        .find(|kind| kind.code() == code)
    }
}

/// Who may do what in a group; see `policy.rs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    Member,
    Admin,
    Owner,
}

impl Role {
    pub fn code(self) -> i64 {
        match self {
            Role::Member => 1,
            Role::Admin => 2,
            Role::Owner => 3,
        }
    }

    /// Unknown codes (and 0, used by direct conversations) read as `Member`.
    pub fn from_code(code: i64) -> Role {
        match code {
            2 => Role::Admin,
            3 => Role::Owner,
            _ => Role::Member,
        }
    }
}

/// A membership, current or ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub user_id: String,
    pub role: Role,
    /// The entry that made it a member; it sees entries from there on.
    pub joined_seq: u64,
    /// The entry that ended the membership (removal or leaving), if it ended.
    pub removed_seq: Option<u64>,
    pub read_seq: u64,
    /// Highest delivered cursor over the member's devices (read by
    /// `MessageStore::members` only).
    pub delivered_seq: u64,
    /// Whether the member has sent a message in the conversation.
    #[serde(default)]
    pub took_part: bool,
    /// The memberships this user had before this one (each ended, oldest
    /// first): a re-added member sees them again (DESIGN section 4).
    #[serde(default)]
    pub earlier: Vec<SeqBounds>,
}

impl Member {
    pub fn is_active(&self) -> bool {
        self.removed_seq.is_none()
    }

    /// The membership alone (role and ranges), with no cursors: what the
    /// cache keeps across the sends and read marks that move them.
    pub fn without_cursors(self) -> Self {
        Self { read_seq: 0, delivered_seq: 0, took_part: false, ..self }
    }

    /// The seqs this member may read: every membership it had.
    pub fn visible(&self) -> Visible {
        let current = SeqBounds { from: self.joined_seq, to: self.removed_seq };
        Visible::new(self.earlier.iter().copied().chain([current]).collect())
    }
}

/// The seqs a reader may see: one range per membership, ascending and
/// disjoint (a re-add starts after the removal that ended the last one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Visible(Vec<SeqBounds>);

impl Visible {
    /// Ranges that overlap the one after them (a row written twice) are merged.
    pub fn new(mut ranges: Vec<SeqBounds>) -> Self {
        ranges.sort_by_key(|range| range.from);
        let mut merged: Vec<SeqBounds> = Vec::with_capacity(ranges.len());
        for range in ranges {
            match merged.last_mut() {
                Some(last) if last.to.is_none_or(|to| range.from <= to.saturating_add(1)) => {
                    last.to = match (last.to, range.to) {
                        (Some(a), Some(b)) => Some(a.max(b)),
                        _ => None,
                    };
                }
                _ => merged.push(range),
            }
        }
        Visible(merged)
    }

    pub fn contains(&self, seq: u64) -> bool {
        self.0.iter().any(|range| range.contains(seq))
    }

    /// The ranges, oldest first.
    pub fn ranges(&self) -> &[SeqBounds] {
        &self.0
    }

    /// The first seq of the first range (0 when there is none).
    pub fn from(&self) -> u64 {
        self.0.first().map_or(0, |range| range.from)
    }
}

impl From<SeqBounds> for Visible {
    fn from(range: SeqBounds) -> Self {
        Visible(vec![range])
    }
}

/// An inclusive range of seqs a reader may see (`to: None` is open-ended).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqBounds {
    pub from: u64,
    pub to: Option<u64>,
}

impl SeqBounds {
    pub const ALL: SeqBounds = SeqBounds { from: 0, to: None };

    pub fn contains(&self, seq: u64) -> bool {
        seq >= self.from && self.to.is_none_or(|to| seq <= to)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    pub id: Uuid,
    pub kind: ConversationKind,
    pub title: String,
    pub created_by: String,
    /// Active members' ids, sorted.
    pub members: Vec<String>,
    pub last_seq: u64,
    pub created_at_ms: i64,
    pub last_activity_ms: i64,
    /// For the member the conversation was read for: its read cursor, how many
    /// TEXT messages from others lie after it, and the newest TEXT message.
    pub read_seq: u64,
    pub unread_count: u64,
    pub last_message: Option<StoredMessage>,
    /// Whether that member created the conversation or has sent in it: only
    /// then does its presence reach the other members.
    #[serde(default)]
    pub took_part: bool,
}

/// A message as the service hands it to the store; the store assigns `seq`.
#[derive(Clone, Debug)]
pub struct NewMessage {
    pub conversation_id: Uuid,
    pub message_id: Uuid,
    pub sender: String,
    pub client_msg_id: String,
    pub body: String,
    /// 0: not a reply.
    pub reply_to_seq: u64,
    pub sent_at_ms: i64,
    /// Ready media of the sender in this conversation, as the media service described them.
    pub attachments: Vec<Attachment>,
}

/// A photo, video or file a TEXT message carries (the media service's record of it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub media_id: String,
    pub mime_type: String,
    pub size: u64,
    pub file_name: String,
    pub width: u32,
    pub height: u32,
    pub blurhash: String,
    pub has_thumbnail: bool,
}

impl Attachment {
    /// How stores keep a message's attachments: JSON, empty for none.
    pub fn encode(attachments: &[Attachment]) -> String {
        if attachments.is_empty() { String::new() } else { serde_json::to_string(attachments).unwrap_or_default() }
    }

    pub fn decode(text: &str) -> Result<Vec<Attachment>, serde_json::Error> {
        if text.is_empty() { Ok(Vec::new()) } else { serde_json::from_str(text) }
    }
}

/// A seq'd entry: a TEXT message with its current state, or an event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub conversation_id: Uuid,
    pub seq: u64,
    pub message_id: Uuid,
    pub sender: String,
    pub client_msg_id: String,
    pub body: String,
    pub sent_at_ms: i64,
    pub kind: Kind,
    pub reply_to_seq: u64,
    pub target_seq: u64,
    pub reaction: String,
    pub member_ids: Vec<String>,
    pub title: String,
    pub role: Option<Role>,
    pub edited_at_ms: i64,
    pub deleted: bool,
    /// TEXT: its media (empty once deleted). Absent in entries cached before media existed.
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    /// Shown to this reader without its content (`visibility::redacted`):
    /// set on the way out, never stored.
    #[serde(default)]
    pub withheld: bool,
    /// TEXT: the seq of its latest edit (0: never edited). Its body is that
    /// edit's text, so only a reader who sees that seq may read it.
    #[serde(default)]
    pub last_edit_seq: u64,
}

impl StoredMessage {
    /// An event entry with every optional field empty; `seq` is set by the store.
    pub fn event(conversation_id: Uuid, sender: &str, kind: Kind, now_ms: i64) -> Self {
        let message_id = messenger_platform::ids::new_id();
        Self {
            conversation_id,
            seq: 0,
            message_id,
            sender: sender.to_owned(),
            // Events are never retried by clients; their own id keeps the dedupe index unique.
            client_msg_id: message_id.to_string(),
            body: String::new(),
            sent_at_ms: now_ms,
            kind,
            reply_to_seq: 0,
            target_seq: 0,
            reaction: String::new(),
            member_ids: Vec::new(),
            title: String::new(),
            role: None,
            edited_at_ms: 0,
            deleted: false,
            attachments: Vec::new(),
            withheld: false,
            last_edit_seq: 0,
        }
    }
}

/// Delivered cursors of one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceCursors {
    pub user: String,
    pub device: String,
    pub cursors: Vec<(Uuid, u64)>,
}

/// A new group: `creator` becomes its owner.
#[derive(Clone, Debug)]
pub struct NewGroup {
    pub id: Uuid,
    pub creator: String,
    pub title: String,
    /// Initial members besides the creator, deduplicated.
    pub members: Vec<String>,
    pub now_ms: i64,
}

/// A change to a conversation, recorded as a seq'd entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    AddMembers(Vec<String>),
    RemoveMember(String),
    Leave,
    Rename(String),
    SetRole(String, Role),
    Edit {
        target_seq: u64,
        body: String,
    },
    Delete {
        target_seq: u64,
    },
    /// An empty emoji removes the actor's reaction.
    React {
        target_seq: u64,
        emoji: String,
    },
}

/// Limits the store enforces inside the transaction, where the state is exact.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_group_size: usize,
    pub edit_window_ms: i64,
}

#[derive(Clone, Debug)]
pub struct ChangeRequest {
    pub conversation_id: Uuid,
    pub actor: String,
    pub change: Change,
    pub now_ms: i64,
    pub limits: Limits,
}

/// An entry a write appended, with the users to deliver it to, as of the
/// write (`visibility::appended`), so fan-out never re-reads a roster that
/// may have changed since.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    pub entry: StoredMessage,
    /// Who is shown the entry in full.
    pub audience: Arc<Vec<String>>,
    /// Who is shown it without content (`visibility::View::Redacted`; in a
    /// group, also its sender's blockers): delivered so, withheld, so their
    /// devices' seqs stay dense without waiting for a gap fill.
    pub withheld_from: Arc<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// Committed now with the next seq.
    Created(Appended),
    /// `(conversation, sender, client_msg_id)` was already stored: the
    /// original, with its audience among the memberships of now.
    Duplicate(Appended),
}

impl SendOutcome {
    pub fn message(&self) -> &StoredMessage {
        match self {
            SendOutcome::Created(appended) | SendOutcome::Duplicate(appended) => &appended.entry,
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

/// One entry of a user's block list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockedUser {
    pub user_id: String,
    pub blocked_at_ms: i64,
}

/// Blocks between two users `a` and `b`, in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Blocks {
    pub a_blocked_b: bool,
    pub b_blocked_a: bool,
}

/// A member's read cursor after a read mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadMark {
    pub read_seq: u64,
    /// Whether the mark moved the cursor (only then is there a receipt).
    pub moved: bool,
}

#[async_trait]
pub trait MessageStore: Send + Sync + 'static {
    /// The one direct conversation between two users, created on first use.
    async fn get_or_create_direct(&self, user: &str, peer: &str, id: Uuid, now_ms: i64) -> Result<Conversation>;

    /// Creates a group and its GROUP_CREATED entry (seq 1). `max_group_size`
    /// counts the creator.
    async fn create_group(&self, group: NewGroup, max_group_size: usize) -> Result<(Conversation, Appended)>;

    /// The conversation as `user` sees it, if `user` is an active member.
    async fn conversation_for_member(&self, id: Uuid, user: &str) -> Result<Option<Conversation>>;

    /// One membership, current or ended (its role and ranges: what access
    /// is decided by); None if `user` never was a member. Its cursors are
    /// not part of it (the cache serves it with none): use `members` for them.
    async fn member(&self, id: Uuid, user: &str) -> Result<Option<Member>>;

    /// The ids of the active members: what fan-out needs for every entry,
    /// receipt and typing hint, so stores serve it from memory when they can.
    async fn active_member_ids(&self, id: Uuid) -> Result<Arc<Vec<String>>>;

    /// Every membership of the conversation, current and ended, with cursors.
    async fn members(&self, id: Uuid) -> Result<Vec<Member>>;

    /// Membership check, dedupe, reply check, next dense seq and commit,
    /// atomically. Fails with `ConversationNotFound` for non-members and
    /// `NoLongerMember` for former ones. Returns only after the commit is durable.
    async fn send(&self, message: NewMessage) -> Result<SendOutcome>;

    /// Applies a group or message change after checking the actor's rights on
    /// the state inside the transaction (`policy.rs`). Returns the entries it
    /// appended, each with its audience: none when nothing changed (the same
    /// reaction again, deleting a deleted message), two when an owner's
    /// leaving hands ownership on.
    async fn apply(&self, request: ChangeRequest) -> Result<Vec<Appended>>;

    /// A page of history within `visible`, ascending by seq.
    async fn history(
        &self,
        id: Uuid,
        range: HistoryRange,
        visible: SeqBounds,
        limit: usize,
    ) -> Result<Vec<StoredMessage>>;

    /// The user's active conversations, most recent activity first, with its
    /// read cursor, unread count and newest message.
    async fn list_conversations(
        &self,
        user: &str,
        after: Option<InboxCursor>,
        limit: usize,
    ) -> Result<Vec<Conversation>>;

    /// Moves a device's delivered cursors forward; returns the stored values.
    /// Cursors never move back and never pass what the user may see;
    /// conversations the user never belonged to are ignored.
    async fn ack_delivered(&self, user: &str, device: &str, cursors: Vec<(Uuid, u64)>) -> Result<Vec<(Uuid, u64)>>;

    /// Many devices' acks at once (a gateway batches its sessions' acks).
    /// Stores may do it in one transaction; the default does one call each.
    async fn ack_delivered_many(&self, acks: Vec<DeviceCursors>) -> Result<Vec<DeviceCursors>> {
        let mut stored = Vec::with_capacity(acks.len());
        for ack in acks {
            let cursors = self.ack_delivered(&ack.user, &ack.device, ack.cursors).await?;
            stored.push(DeviceCursors { user: ack.user, device: ack.device, cursors });
        }
        Ok(stored)
    }

    /// Moves an active member's read cursor forward (clamped to the head);
    /// returns the stored value and whether it moved. A mark that moves
    /// nothing writes nothing.
    async fn mark_read(&self, id: Uuid, user: &str, seq: u64) -> Result<ReadMark>;

    /// Entries after the device's delivered cursor in each of the user's
    /// conversations (or only `only`), within what the user may see, ordered
    /// by (conversation, seq).
    async fn sync(
        &self,
        user: &str,
        device: &str,
        only: Option<Uuid>,
        after: Option<SyncCursor>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>>;

    /// Adds `target` to `user`'s block list; false when it was there already
    /// (its `blocked_at_ms` is kept).
    async fn block(&self, user: &str, target: &str, now_ms: i64) -> Result<bool>;

    /// Removes `target` from `user`'s block list; false when it was not there.
    async fn unblock(&self, user: &str, target: &str) -> Result<bool>;

    /// Up to `limit` entries of `user`'s block list, oldest block first
    /// (ties by user id).
    async fn blocked_users(&self, user: &str, limit: usize) -> Result<Vec<BlockedUser>>;

    /// Whether `a` blocked `b` and whether `b` blocked `a`.
    async fn blocks_between(&self, a: &str, b: &str) -> Result<Blocks>;

    /// The users who blocked `user`, sorted: whom its group entries are
    /// not delivered to. Stores may answer from an index that trails a
    /// block or unblock by a moment.
    async fn blocked_by(&self, user: &str) -> Result<Vec<String>>;
}

#[cfg(test)]
pub(crate) mod contract;
