//! The client's local model of each conversation: the current state after
//! applying every entry (edits, deletes, reactions, membership changes) and
//! every receipt, so an app renders it without bookkeeping of its own.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use messenger_proto::v1::{self as pb, MessageKind, Role};

/// A TEXT message as it stands now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageState {
    pub seq: u64,
    pub message_id: String,
    pub sender_id: String,
    pub body: String,
    pub sent_at_ms: i64,
    /// 0 when not a reply.
    pub reply_to_seq: u64,
    pub edited: bool,
    pub deleted: bool,
    /// One emoji per member.
    pub reactions: BTreeMap<String, String>,
    /// Sent by this user (from this device or another of its devices).
    pub own: bool,
    /// Photos, videos and files it carries (fetch with `Client::download`); empty once deleted.
    pub attachments: Vec<pb::Attachment>,
    /// Shown without content (`Message.withheld`): in a group, from a user
    /// this user blocked; body and attachments are empty.
    pub withheld: bool,
}

/// A conversation as this device knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConversationState {
    pub conversation_id: String,
    pub kind: i32,
    pub title: String,
    /// Active members and their roles (empty until known).
    pub members: BTreeMap<String, Role>,
    /// TEXT messages by seq, from what this device has received.
    pub messages: BTreeMap<u64, MessageState>,
    /// Highest seq applied.
    pub last_seq: u64,
    /// Per member: read up to, and delivered to any device up to.
    pub read_seq: BTreeMap<String, u64>,
    pub delivered_seq: BTreeMap<String, u64>,
    /// This user was removed or left.
    pub removed: bool,
}

impl ConversationState {
    /// TEXT messages from others after this user's read cursor.
    pub fn unread_count(&self, me: &str) -> usize {
        let read = self.read_seq.get(me).copied().unwrap_or(0);
        self.messages.range(read + 1..).filter(|(_, m)| !m.own && !m.deleted && !m.withheld).count()
    }

    /// Members other than the sender who have read `seq`.
    pub fn read_by(&self, seq: u64) -> Vec<String> {
        let sender = self.messages.get(&seq).map(|m| m.sender_id.as_str()).unwrap_or_default();
        self.read_seq
            .iter()
            .filter(|(user, read)| **read >= seq && user.as_str() != sender)
            .map(|(u, _)| u.clone())
            .collect()
    }
}

#[derive(Default)]
pub(crate) struct Model {
    pub me: String,
    pub conversations: HashMap<String, ConversationState>,
    /// (conversation, user) -> typing until.
    pub typing: HashMap<(String, String), Instant>,
    /// user -> the newest presence update (by `last_seen_ms`).
    pub presence: HashMap<String, pb::PresenceUpdate>,
}

impl Model {
    fn conversation(&mut self, id: &str) -> &mut ConversationState {
        self.conversations
            .entry(id.to_owned())
            .or_insert_with(|| ConversationState { conversation_id: id.to_owned(), ..Default::default() })
    }

    /// Applies one entry; returns true when the conversation was new to the model.
    pub fn apply(&mut self, entry: &pb::Message) -> bool {
        let is_new = !self.conversations.contains_key(&entry.conversation_id);
        let me = self.me.clone();
        let state = self.conversation(&entry.conversation_id);
        state.last_seq = state.last_seq.max(entry.seq);
        let kind = MessageKind::try_from(entry.kind).unwrap_or(MessageKind::Text);
        match kind {
            MessageKind::Text | MessageKind::Unspecified => {
                state.messages.insert(
                    entry.seq,
                    MessageState {
                        seq: entry.seq,
                        message_id: entry.message_id.clone(),
                        sender_id: entry.sender_id.clone(),
                        body: entry.body.clone(),
                        sent_at_ms: entry.sent_at_ms,
                        reply_to_seq: entry.reply_to_seq,
                        edited: entry.edited_at_ms != 0,
                        deleted: entry.deleted,
                        reactions: BTreeMap::new(),
                        own: entry.sender_id == me,
                        attachments: entry.attachments.clone(),
                        withheld: entry.withheld,
                    },
                );
                // Sending implies having read up to it.
                let read = state.read_seq.entry(entry.sender_id.clone()).or_default();
                *read = (*read).max(entry.seq);
            }
            MessageKind::Edit => {
                if let Some(target) = state.messages.get_mut(&entry.target_seq)
                    && !target.deleted
                {
                    // A withheld edit carries no text: what it changed is withheld too.
                    target.body = entry.body.clone();
                    target.edited = true;
                    if entry.withheld {
                        target.withheld = true;
                        target.attachments.clear();
                    }
                }
            }
            MessageKind::Delete => {
                if let Some(target) = state.messages.get_mut(&entry.target_seq) {
                    target.body.clear();
                    target.deleted = true;
                    target.reactions.clear();
                    target.attachments.clear();
                }
            }
            MessageKind::Reaction => {
                if let Some(target) = state.messages.get_mut(&entry.target_seq) {
                    if entry.reaction.is_empty() {
                        target.reactions.remove(&entry.sender_id);
                    } else {
                        target.reactions.insert(entry.sender_id.clone(), entry.reaction.clone());
                    }
                }
            }
            MessageKind::GroupCreated => {
                state.kind = pb::ConversationKind::Group as i32;
                state.title = entry.title.clone();
                for (index, member) in entry.member_ids.iter().enumerate() {
                    state.members.insert(member.clone(), if index == 0 { Role::Owner } else { Role::Member });
                }
            }
            MessageKind::MembersAdded => {
                for member in &entry.member_ids {
                    state.members.insert(member.clone(), Role::Member);
                    if *member == me {
                        state.removed = false;
                    }
                }
            }
            MessageKind::MemberRemoved => {
                for member in &entry.member_ids {
                    state.members.remove(member);
                    if *member == me {
                        state.removed = true;
                    }
                }
            }
            MessageKind::MemberLeft => {
                state.members.remove(&entry.sender_id);
                if entry.sender_id == me {
                    state.removed = true;
                }
            }
            MessageKind::Renamed => state.title = entry.title.clone(),
            MessageKind::RoleChanged => {
                let role = Role::try_from(entry.role).unwrap_or(Role::Member);
                for member in &entry.member_ids {
                    state.members.insert(member.clone(), role);
                }
            }
        }
        is_new
    }

    pub fn apply_receipt(&mut self, receipt: &pb::Receipt) {
        let state = self.conversation(&receipt.conversation_id);
        if receipt.read_seq > 0 {
            let read = state.read_seq.entry(receipt.user_id.clone()).or_default();
            *read = (*read).max(receipt.read_seq);
        }
        if receipt.delivered_seq > 0 {
            let delivered = state.delivered_seq.entry(receipt.user_id.clone()).or_default();
            *delivered = (*delivered).max(receipt.delivered_seq);
        }
    }

    pub fn apply_presence(&mut self, update: &pb::PresenceUpdate) {
        let newer = self.presence.get(&update.user_id).is_none_or(|known| update.last_seen_ms >= known.last_seen_ms);
        if newer {
            self.presence.insert(update.user_id.clone(), update.clone());
        }
    }

    pub fn apply_typing(&mut self, typing: &pb::Typing) {
        let key = (typing.conversation_id.clone(), typing.user_id.clone());
        if typing.typing {
            self.typing.insert(key, Instant::now() + Duration::from_millis(typing.expires_in_ms as u64));
        } else {
            self.typing.remove(&key);
        }
    }

    /// Members typing now in a conversation (expired indicators are dropped).
    pub fn typing(&mut self, conversation_id: &str) -> Vec<String> {
        let now = Instant::now();
        self.typing.retain(|_, until| *until > now);
        let mut users: Vec<String> =
            self.typing.keys().filter(|(c, _)| c == conversation_id).map(|(_, u)| u.clone()).collect();
        users.sort();
        users
    }

    /// Takes what the server says about a conversation (members, title, cursors).
    /// Members and title only from a snapshot at least as new as the model, so
    /// a slow answer cannot undo entries applied meanwhile; cursors only move forward.
    pub fn refresh(&mut self, conversation: &pb::Conversation) {
        let state = self.conversation(&conversation.conversation_id);
        if conversation.last_seq >= state.last_seq {
            state.kind = conversation.kind;
            state.title = conversation.title.clone();
            state.members = conversation
                .members
                .iter()
                .map(|m| (m.user_id.clone(), Role::try_from(m.role).unwrap_or(Role::Member)))
                .collect();
        }
        for member in &conversation.members {
            let read = state.read_seq.entry(member.user_id.clone()).or_default();
            *read = (*read).max(member.read_seq);
            let delivered = state.delivered_seq.entry(member.user_id.clone()).or_default();
            *delivered = (*delivered).max(member.delivered_seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, kind: MessageKind, sender: &str) -> pb::Message {
        pb::Message {
            conversation_id: "c".into(),
            seq,
            sender_id: sender.into(),
            kind: kind as i32,
            ..Default::default()
        }
    }

    #[test]
    fn entries_fold_into_current_state() {
        let mut model = Model { me: "alice".into(), ..Default::default() };
        let mut created = entry(1, MessageKind::GroupCreated, "alice");
        created.member_ids = vec!["alice".into(), "bob".into()];
        created.title = "t".into();
        model.apply(&created);
        let mut text = entry(2, MessageKind::Text, "bob");
        text.body = "hi".into();
        model.apply(&text);
        let mut edit = entry(3, MessageKind::Edit, "bob");
        edit.target_seq = 2;
        edit.body = "hello".into();
        model.apply(&edit);
        let mut react = entry(4, MessageKind::Reaction, "alice");
        react.target_seq = 2;
        react.reaction = "👍".into();
        model.apply(&react);
        let state = &model.conversations["c"];
        assert_eq!(state.messages[&2].body, "hello");
        assert!(state.messages[&2].edited);
        assert_eq!(state.messages[&2].reactions["alice"], "👍");
        assert_eq!(state.members["alice"], Role::Owner);
        assert_eq!(state.unread_count("alice"), 1);
        model.apply_receipt(&pb::Receipt {
            conversation_id: "c".into(),
            user_id: "alice".into(),
            read_seq: 4,
            delivered_seq: 0,
        });
        assert_eq!(model.conversations["c"].unread_count("alice"), 0);
        let mut delete = entry(5, MessageKind::Delete, "bob");
        delete.target_seq = 2;
        model.apply(&delete);
        let message = &model.conversations["c"].messages[&2];
        assert!(message.deleted && message.body.is_empty() && message.reactions.is_empty());
    }
}
