//! The message service's domain logic, independent of gRPC: validation,
//! membership checks, send with fan-out, history, inbox, cursors and sync.

use std::sync::Arc;

use messenger_platform::ids;
use uuid::Uuid;

use crate::{
    error::{Error, Result},
    fanout::Fanout,
    options::Options,
    store::{
        Conversation, HistoryRange, InboxCursor, MessageStore, NewMessage, SendOutcome, StoredMessage, SyncCursor,
    },
};

/// Longest user, device or client message id accepted, in bytes.
pub const MAX_ID_BYTES: usize = 128;

pub struct Service {
    options: Options,
    store: Arc<dyn MessageStore>,
    fanout: Fanout,
}

/// One page of history.
pub struct HistoryPage {
    pub messages: Vec<StoredMessage>,
    pub has_more: bool,
}

pub struct SendInput<'a> {
    pub sender: &'a str,
    pub conversation_id: &'a str,
    pub client_msg_id: &'a str,
    pub body: String,
}

pub(crate) fn check_id(kind: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::InvalidArgument(format!("{kind} is required")));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(Error::InvalidArgument(format!("{kind} is longer than {MAX_ID_BYTES} bytes")));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::InvalidArgument(format!("{kind} contains control characters")));
    }
    Ok(())
}

pub(crate) fn parse_conversation(text: &str) -> Result<Uuid> {
    ids::parse(text).ok_or_else(|| Error::InvalidArgument("conversation_id must be a UUID".into()))
}

fn clamp(requested: u32, default: u32, max: u32) -> usize {
    (if requested == 0 { default } else { requested.min(max) }) as usize
}

impl Service {
    pub fn new(options: Options, store: Arc<dyn MessageStore>, fanout: Fanout) -> Self {
        Self { options, store, fanout }
    }

    /// Commits the message (or finds the original of a retry), then queues fan-out.
    /// Returns the stored message and whether it was created by this call.
    pub async fn send(&self, input: SendInput<'_>) -> Result<(StoredMessage, bool)> {
        check_id("sender_id", input.sender)?;
        check_id("client_msg_id", input.client_msg_id)?;
        let conversation_id = parse_conversation(input.conversation_id)?;
        if input.body.trim().is_empty() {
            return Err(Error::InvalidArgument("body must not be empty".into()));
        }
        if input.body.len() > self.options.max_body_bytes {
            return Err(Error::BodyTooLarge { size: input.body.len(), limit: self.options.max_body_bytes });
        }
        let outcome = self
            .store
            .send(NewMessage {
                conversation_id,
                message_id: ids::new_id(),
                sender: input.sender.to_owned(),
                client_msg_id: input.client_msg_id.to_owned(),
                body: input.body,
                sent_at_ms: ids::now_ms(),
            })
            .await?;
        match outcome {
            SendOutcome::Created(message) => {
                self.fanout.publish(message.clone()).await;
                Ok((message, true))
            }
            SendOutcome::Duplicate(original) => Ok((original, false)),
        }
    }

    pub async fn get_or_create_direct(&self, user: &str, peer: &str) -> Result<Conversation> {
        check_id("user_id", user)?;
        check_id("peer_id", peer)?;
        if user == peer {
            return Err(Error::InvalidArgument("peer_id must be another user".into()));
        }
        self.store.get_or_create_direct(user, peer, ids::new_id(), ids::now_ms()).await
    }

    async fn require_member(&self, conversation_id: Uuid, user: &str) -> Result<Conversation> {
        self.store.conversation_for_member(conversation_id, user).await?.ok_or(Error::ConversationNotFound)
    }

    pub async fn history(
        &self,
        user: &str,
        conversation_id: &str,
        range: HistoryRange,
        limit: u32,
    ) -> Result<HistoryPage> {
        check_id("user_id", user)?;
        let conversation_id = parse_conversation(conversation_id)?;
        self.require_member(conversation_id, user).await?;
        let limit = clamp(limit, self.options.history_page_default, self.options.history_page_max);
        let messages = self.store.history(conversation_id, range, limit).await?;
        let has_more = match range {
            HistoryRange::Before(_) => messages.first().is_some_and(|m| m.seq > 1),
            HistoryRange::After(_) => messages.len() == limit,
        };
        Ok(HistoryPage { messages, has_more })
    }

    /// One inbox page and the token of the next (None at the end).
    pub async fn list_conversations(
        &self,
        user: &str,
        page_token: &str,
        limit: u32,
    ) -> Result<(Vec<Conversation>, Option<String>)> {
        check_id("user_id", user)?;
        let after = if page_token.is_empty() { None } else { Some(parse_inbox_token(page_token)?) };
        let limit = clamp(limit, self.options.inbox_page_default, self.options.inbox_page_max);
        let conversations = self.store.list_conversations(user, after, limit).await?;
        let next = (conversations.len() == limit)
            .then(|| conversations.last().map(|c| format!("{}:{}", c.last_activity_ms, c.id)))
            .flatten();
        Ok((conversations, next))
    }

    pub async fn ack_delivered(
        &self,
        user: &str,
        device: &str,
        cursors: Vec<(String, u64)>,
    ) -> Result<Vec<(Uuid, u64)>> {
        check_id("user_id", user)?;
        check_id("device_id", device)?;
        let cursors = cursors
            .into_iter()
            .map(|(conversation, seq)| Ok((parse_conversation(&conversation)?, seq)))
            .collect::<Result<Vec<_>>>()?;
        self.store.ack_delivered(user, device, cursors).await
    }

    /// One sync page and the token of the next (None when caught up).
    pub async fn sync(
        &self,
        user: &str,
        device: &str,
        only: &str,
        page_token: &str,
        limit: u32,
    ) -> Result<(Vec<StoredMessage>, Option<String>)> {
        check_id("user_id", user)?;
        check_id("device_id", device)?;
        let only = if only.is_empty() { None } else { Some(parse_conversation(only)?) };
        let after = if page_token.is_empty() { None } else { Some(parse_sync_token(page_token)?) };
        let limit = clamp(limit, self.options.sync_page_max, self.options.sync_page_max);
        let messages = self.store.sync(user, device, only, after, limit).await?;
        let next = (messages.len() == limit)
            .then(|| messages.last().map(|m| format!("{}:{}", m.conversation_id, m.seq)))
            .flatten();
        Ok((messages, next))
    }
}

fn parse_inbox_token(token: &str) -> Result<InboxCursor> {
    let invalid = || Error::InvalidArgument("invalid page_token".into());
    let (activity, id) = token.split_once(':').ok_or_else(invalid)?;
    Ok(InboxCursor {
        last_activity_ms: activity.parse().map_err(|_| invalid())?,
        conversation_id: ids::parse(id).ok_or_else(invalid)?,
    })
}

fn parse_sync_token(token: &str) -> Result<SyncCursor> {
    let invalid = || Error::InvalidArgument("invalid page_token".into());
    let (id, seq) = token.split_once(':').ok_or_else(invalid)?;
    Ok(SyncCursor { conversation_id: ids::parse(id).ok_or_else(invalid)?, seq: seq.parse().map_err(|_| invalid())? })
}
