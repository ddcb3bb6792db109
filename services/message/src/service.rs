//! The message service's domain logic, independent of gRPC: validation,
//! membership checks, sends and changes with fan-out, history, inbox,
//! cursors, receipts, typing and sync.

use std::{
    collections::HashSet,
    sync::{Arc, OnceLock},
};

use messenger_platform::{ids, metrics, trace};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::{
    error::{Error, Result},
    options::Options,
    ports::{Deliveries, Hint, Media, MediaToAttach, Presence, Receipt, Typing},
    store::{
        Attachment, BlockedUser, Change, ChangeRequest, Conversation, ConversationKind, DeviceCursors, HistoryRange,
        InboxCursor, Limits, Member, MessageStore, NewGroup, NewMessage, SendOutcome, SeqBounds, StoredMessage,
        SyncCursor, Visible,
    },
    visibility,
};

/// Longest user, device or client message id accepted, in bytes.
pub const MAX_ID_BYTES: usize = 128;

pub struct Service {
    options: Options,
    store: Arc<dyn MessageStore>,
    fanout: Arc<dyn Deliveries>,
    media: Arc<dyn Media>,
    /// Conversation id -> whether it is direct (with its two members) or a
    /// group. Neither ever changes, so entries never go stale.
    directs: moka::sync::Cache<Uuid, Shape>,
}

/// What a conversation is, as block checks need it.
#[derive(Clone, Debug)]
enum Shape {
    /// A direct conversation and its two members.
    Direct(Arc<[String; 2]>),
    Group,
}

/// Conversations whose kind `Service::directs` remembers.
const DIRECTS_CACHED: u64 = 100_000;

/// Conversations one `GetConversations` call reads at once.
const CONVERSATIONS_READ_AT_ONCE: usize = 8;

/// Block checks a group creation or addition runs at once (one per user added).
const BLOCK_CHECKS_IN_PARALLEL: usize = 16;

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
    pub reply_to_seq: u64,
    /// Completed uploads to attach (the media service checks each).
    pub media_ids: Vec<String>,
}

/// One device's acks as received: (user, device, [(conversation id, seq)]).
pub type DeviceAckInput = (String, String, Vec<(String, u64)>);

/// Who has a message: members other than the asker.
pub struct Receipts {
    pub delivered_to: Vec<String>,
    pub read_by: Vec<String>,
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

/// From a new message's arrival at this service to its commit: checks,
/// the writer's queue and the commit itself.
fn send_to_commit() -> &'static metrics::Histogram<f64> {
    static HISTOGRAM: OnceLock<metrics::Histogram<f64>> = OnceLock::new();
    HISTOGRAM.get_or_init(|| {
        metrics::meter()
            .f64_histogram("messenger.message.send_to_commit")
            .with_unit("s")
            .with_description("From a new message's arrival at the message service to its commit")
            .with_boundaries(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0])
            .build()
    })
}

impl Service {
    pub fn new(
        options: Options,
        store: Arc<dyn MessageStore>,
        fanout: Arc<dyn Deliveries>,
        media: Arc<dyn Media>,
    ) -> Self {
        Self { options, store, fanout, media, directs: moka::sync::Cache::new(DIRECTS_CACHED) }
    }

    /// The attachments for a send's media ids, as the media service vouches for them.
    async fn attachments(
        &self,
        sender: &str,
        conversation_id: &str,
        client_msg_id: &str,
        media_ids: Vec<String>,
    ) -> Result<Vec<Attachment>> {
        if media_ids.is_empty() {
            return Ok(Vec::new());
        }
        if media_ids.len() > self.options.max_attachments {
            return Err(Error::InvalidArgument(format!(
                "{} attachments; a message carries at most {}",
                media_ids.len(),
                self.options.max_attachments
            )));
        }
        let mut unique = media_ids.clone();
        unique.sort();
        unique.dedup();
        if unique.len() != media_ids.len() {
            return Err(Error::InvalidArgument("a media id is attached twice".into()));
        }
        let request = MediaToAttach {
            sender: sender.to_owned(),
            conversation_id: conversation_id.to_owned(),
            client_msg_id: client_msg_id.to_owned(),
            media_ids,
        };
        self.media.describe(request).await
    }

    /// For the media service: may `user` (an active member) see the
    /// conversation, or the message at `seq` carrying `media_id`?
    pub async fn check_access(&self, user: &str, conversation_id: &str, seq: u64, media_id: &str) -> Result<()> {
        check_id("user_id", user)?;
        let conversation_id = parse_conversation(conversation_id)?;
        let member = self.store.member(conversation_id, user).await?.ok_or(Error::ConversationNotFound)?;
        if !member.is_active() {
            return Err(Error::ConversationNotFound);
        }
        if seq == 0 {
            return Ok(());
        }
        if !member.visible().contains(seq) {
            return Err(Error::MessageNotFound(seq));
        }
        let page = self.store.history(conversation_id, HistoryRange::Before(Some(seq + 1)), only(seq), 1).await?;
        match page.first() {
            Some(message)
                if message.seq == seq
                    && !message.deleted
                    && message.attachments.iter().any(|attachment| attachment.media_id == media_id) =>
            {
                Ok(())
            }
            _ => Err(Error::MessageNotFound(seq)),
        }
    }

    /// The media of the message at `seq` as `user` sees it (none when it cannot).
    /// (A store failure fails the delete before it is applied: its objects
    /// must not outlive it unnoticed.)
    async fn media_of(&self, user: &str, conversation_id: Uuid, seq: u64) -> Result<Vec<String>> {
        let Some(member) = self.store.member(conversation_id, user).await? else { return Ok(Vec::new()) };
        if !member.visible().contains(seq) {
            return Ok(Vec::new());
        }
        let page = self.store.history(conversation_id, HistoryRange::Before(Some(seq + 1)), only(seq), 1).await?;
        Ok(page
            .into_iter()
            .filter(|message| message.seq == seq)
            .flat_map(|message| message.attachments)
            .map(|attachment| attachment.media_id)
            .collect())
    }

    /// Refuses a write by `user` in a direct conversation where a block
    /// stands: the blocked side gets NOT_FOUND (as if the conversation were
    /// gone), the blocking side FAILED_PRECONDITION. Groups pass (true: the
    /// users who blocked `user` are left out of its entries' audiences);
    /// so do non-members, whom the store refuses itself.
    async fn check_not_blocked(&self, conversation_id: Uuid, user: &str) -> Result<bool> {
        match self.shape_of(conversation_id, user).await? {
            Some(Shape::Direct(pair)) => match pair.iter().find(|member| *member != user) {
                Some(peer) => self.check_blocks(user, peer).await.map(|()| false),
                None => Ok(false),
            },
            Some(Shape::Group) => Ok(true),
            None => Ok(false),
        }
    }

    /// Who blocked `user`, if its entries go to a group (none otherwise).
    async fn blockers(&self, user: &str, group: bool) -> Result<Vec<String>> {
        if group { self.store.blocked_by(user).await } else { Ok(Vec::new()) }
    }

    /// What a conversation `user` is an active member of is; None when
    /// `user` is not an active member.
    async fn shape_of(&self, conversation_id: Uuid, user: &str) -> Result<Option<Shape>> {
        if let Some(kind) = self.directs.get(&conversation_id) {
            return Ok(Some(kind));
        }
        let Some(conversation) = self.store.conversation_for_member(conversation_id, user).await? else {
            return Ok(None);
        };
        let kind = match (conversation.kind, conversation.members.as_slice()) {
            (ConversationKind::Direct, [a, b]) => Shape::Direct(Arc::new([a.clone(), b.clone()])),
            _ => Shape::Group,
        };
        self.directs.insert(conversation_id, kind.clone());
        Ok(Some(kind))
    }

    /// What `user` blocked: content from them in groups reads withheld.
    async fn blocked_set(&self, user: &str) -> Result<HashSet<String>> {
        let listed = self.store.blocked_users(user, self.options.max_blocked_users).await?;
        Ok(listed.into_iter().map(|entry| entry.user_id).collect())
    }

    /// Refuses to put into a group with `user` anyone who blocked `user`
    /// (NOT_FOUND, as a direct conversation with them answers) or whom
    /// `user` blocked (FAILED_PRECONDITION): a block reaches groups too.
    async fn check_may_add(&self, user: &str, members: &[String]) -> Result<()> {
        use futures::{StreamExt as _, TryStreamExt as _};
        let mut checks = Vec::with_capacity(members.len());
        for member in members {
            if member != user {
                checks.push(self.check_blocks(user, member));
            }
        }
        futures::stream::iter(checks).buffer_unordered(BLOCK_CHECKS_IN_PARALLEL).try_collect::<()>().await.map_err(
            |error| match error {
                Error::ConversationNotFound => Error::UserNotFound,
                other => other,
            },
        )
    }

    /// Whether `user` may talk to `peer`, in the words `check_not_blocked` uses.
    async fn check_blocks(&self, user: &str, peer: &str) -> Result<()> {
        let blocks = self.store.blocks_between(user, peer).await?;
        if blocks.b_blocked_a {
            return Err(Error::ConversationNotFound);
        }
        if blocks.a_blocked_b {
            return Err(Error::FailedPrecondition(format!("you blocked {peer}; unblock them to message them")));
        }
        Ok(())
    }

    fn check_body(&self, body: &str) -> Result<()> {
        if body.trim().is_empty() {
            return Err(Error::InvalidArgument("body must not be empty".into()));
        }
        if body.len() > self.options.max_body_bytes {
            return Err(Error::BodyTooLarge { size: body.len(), limit: self.options.max_body_bytes });
        }
        Ok(())
    }

    fn check_title(&self, title: &str) -> Result<()> {
        if title.trim().is_empty() {
            return Err(Error::InvalidArgument("title must not be empty".into()));
        }
        if title.len() > self.options.max_title_bytes || title.chars().any(char::is_control) {
            return Err(Error::InvalidArgument(format!(
                "title must be at most {} bytes without control characters",
                self.options.max_title_bytes
            )));
        }
        Ok(())
    }

    fn limits(&self) -> Limits {
        Limits {
            max_group_size: self.options.max_group_size,
            edit_window_ms: self.options.edit_window.as_millis() as i64,
        }
    }

    /// Commits the message (or finds the original of a retry), then queues fan-out.
    /// Returns the stored message and whether it was created by this call.
    pub async fn send(&self, input: SendInput<'_>) -> Result<(StoredMessage, bool)> {
        let received = std::time::Instant::now();
        check_id("sender_id", input.sender)?;
        check_id("client_msg_id", input.client_msg_id)?;
        let conversation_id = parse_conversation(input.conversation_id)?;
        if input.media_ids.is_empty() || !input.body.is_empty() {
            self.check_body(&input.body)?;
        }
        let group = self.check_not_blocked(conversation_id, input.sender).await?;
        // Read before the commit, so a failed read loses nothing.
        let (attachments, blockers) = futures::future::try_join(
            self.attachments(input.sender, input.conversation_id, input.client_msg_id, input.media_ids),
            self.blockers(input.sender, group),
        )
        .await?;
        let message = NewMessage {
            conversation_id,
            message_id: ids::new_id(),
            sender: input.sender.to_owned(),
            client_msg_id: input.client_msg_id.to_owned(),
            body: input.body,
            reply_to_seq: input.reply_to_seq,
            sent_at_ms: ids::now_ms(),
            attachments,
        };
        let (store, fanout) = (self.store.clone(), self.fanout.clone());
        let commit = trace::internal("store commit");
        detached(
            async move {
                match store.send(message).instrument(commit).await? {
                    SendOutcome::Created(appended) => {
                        send_to_commit().record(received.elapsed().as_secs_f64(), &[]);
                        let message = appended.entry.clone();
                        fanout.entry(visibility::without_blockers(appended, &blockers)).await;
                        Ok((message, true))
                    }
                    // Published again: if the first fan-out was lost (a crash between
                    // commit and publish), a retry repairs it; gateways drop repeats.
                    SendOutcome::Duplicate(appended) => {
                        let original = appended.entry.clone();
                        fanout.entry(visibility::without_blockers(appended, &blockers)).await;
                        Ok((original, false))
                    }
                }
            }
            // The call's span goes with the detached work.
            .in_current_span(),
        )
        .await
    }

    pub async fn get_or_create_direct(&self, user: &str, peer: &str) -> Result<Conversation> {
        check_id("user_id", user)?;
        check_id("peer_id", peer)?;
        if user == peer {
            return Err(Error::InvalidArgument("peer_id must be another user".into()));
        }
        self.check_blocks(user, peer).await.map_err(|error| match error {
            Error::ConversationNotFound => Error::UserNotFound,
            other => other,
        })?;
        self.store.get_or_create_direct(user, peer, ids::new_id(), ids::now_ms()).await
    }

    pub async fn create_group(&self, user: &str, title: &str, members: Vec<String>) -> Result<Conversation> {
        check_id("user_id", user)?;
        self.check_title(title)?;
        let mut members = members;
        for member in &members {
            check_id("member_ids", member)?;
        }
        members.sort();
        members.dedup();
        members.retain(|m| m != user);
        self.check_may_add(user, &members).await?;
        let group = NewGroup {
            id: ids::new_id(),
            creator: user.to_owned(),
            title: title.to_owned(),
            members,
            now_ms: ids::now_ms(),
        };
        let (store, fanout, max) = (self.store.clone(), self.fanout.clone(), self.options.max_group_size);
        detached(async move {
            let (conversation, created) = store.create_group(group, max).await?;
            fanout.entry(created).await;
            Ok(conversation)
        })
        .await
    }

    /// `blockers`: who blocked `user`, left out of the audience of what it
    /// appends (`visibility::without_blockers`).
    async fn apply(
        &self,
        user: &str,
        conversation_id: &str,
        change: Change,
        blockers: Vec<String>,
    ) -> Result<Vec<StoredMessage>> {
        check_id("user_id", user)?;
        let conversation_id = parse_conversation(conversation_id)?;
        let request = ChangeRequest {
            conversation_id,
            actor: user.to_owned(),
            change,
            now_ms: ids::now_ms(),
            limits: self.limits(),
        };
        let (store, fanout) = (self.store.clone(), self.fanout.clone());
        detached(async move {
            let appended = store.apply(request).await?;
            let entries = appended.iter().map(|appended| appended.entry.clone()).collect();
            for appended in appended {
                fanout.entry(visibility::without_blockers(appended, &blockers)).await;
            }
            Ok(entries)
        })
        .await
    }

    /// Applies a membership, title or role change; returns the entry recording it.
    pub async fn update_group(
        &self,
        user: &str,
        conversation_id: &str,
        change: Change,
    ) -> Result<Option<StoredMessage>> {
        match &change {
            Change::AddMembers(users) => {
                if users.is_empty() {
                    return Err(Error::InvalidArgument("add_members needs at least one user".into()));
                }
                users.iter().try_for_each(|u| check_id("user_ids", u))?;
                self.check_may_add(user, users).await?;
            }
            Change::RemoveMember(target) | Change::SetRole(target, _) => check_id("user_id", target)?,
            Change::Rename(title) => self.check_title(title)?,
            Change::Leave => {}
            Change::Edit { .. } | Change::Delete { .. } | Change::React { .. } => {
                return Err(Error::InvalidArgument("not a group change".into()));
            }
        }
        // Events carry nothing of the actor's to withhold: no blockers to read.
        Ok(self.apply(user, conversation_id, change, Vec::new()).await?.into_iter().next())
    }

    /// Edits, deletes or reacts to a message; returns the entry recording it
    /// (None when nothing changed).
    pub async fn modify_message(
        &self,
        user: &str,
        conversation_id: &str,
        change: Change,
    ) -> Result<Option<StoredMessage>> {
        match &change {
            Change::Edit { target_seq, body } => {
                self.check_body(body)?;
                check_seq(*target_seq)?;
            }
            Change::Delete { target_seq } => check_seq(*target_seq)?,
            Change::React { target_seq, emoji } => {
                check_seq(*target_seq)?;
                if emoji.len() > self.options.max_reaction_bytes
                    || emoji.chars().any(|c| c.is_control() || c.is_whitespace())
                {
                    return Err(Error::InvalidArgument(format!(
                        "a reaction is one emoji of at most {} bytes",
                        self.options.max_reaction_bytes
                    )));
                }
            }
            _ => return Err(Error::InvalidArgument("not a message change".into())),
        }
        let id = parse_conversation(conversation_id)?;
        let group = self.check_not_blocked(id, user).await?;
        let (deleted_media, blockers) = match &change {
            // A delete carries nothing of the actor's to withhold.
            Change::Delete { target_seq } => (self.media_of(user, id, *target_seq).await?, Vec::new()),
            _ => (Vec::new(), self.blockers(user, group).await?),
        };
        let entry = self.apply(user, conversation_id, change, blockers).await?.into_iter().next();
        if entry.is_some() && !deleted_media.is_empty() {
            // After the commit: the message is gone for everyone, so are its objects.
            let (media, conversation_id) = (self.media.clone(), conversation_id.to_owned());
            tokio::spawn(async move {
                if let Err(error) = media.delete(&conversation_id, deleted_media).await {
                    // URLs for it are refused regardless: the message is deleted.
                    tracing::error!(%error, "media of a deleted message not deleted: its objects remain");
                }
            });
        }
        Ok(entry)
    }

    /// The caller's membership, or NOT_FOUND (never a member).
    async fn membership(&self, conversation_id: Uuid, user: &str) -> Result<Member> {
        self.store.member(conversation_id, user).await?.ok_or(Error::ConversationNotFound)
    }

    async fn active_membership(&self, conversation_id: Uuid, user: &str) -> Result<Member> {
        let member = self.membership(conversation_id, user).await?;
        if member.is_active() { Ok(member) } else { Err(Error::NoLongerMember) }
    }

    /// History within what the caller may see (former members: up to their removal).
    pub async fn history(
        &self,
        user: &str,
        conversation_id: &str,
        range: HistoryRange,
        limit: u32,
    ) -> Result<HistoryPage> {
        check_id("user_id", user)?;
        let conversation_id = parse_conversation(conversation_id)?;
        let member = self.membership(conversation_id, user).await?;
        let visible = member.visible();
        let limit = clamp(limit, self.options.history_page_default, self.options.history_page_max);
        let page = self.history_within(conversation_id, range, &visible, limit).await?;
        let shown = page.into_iter().filter_map(|message| visibility::shown(message, &visible)).collect();
        let messages = self.withhold_blocked(user, shown).await?;
        let has_more = match range {
            HistoryRange::Before(_) => messages.first().is_some_and(|m| m.seq > visible.from().max(1)),
            HistoryRange::After(_) => messages.len() == limit,
        };
        Ok(HistoryPage { messages, has_more })
    }

    /// A page of history across the reader's ranges: newest ranges first
    /// for a page before a seq, oldest first after one; ascending.
    async fn history_within(
        &self,
        id: Uuid,
        range: HistoryRange,
        visible: &Visible,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        let mut page = Vec::new();
        // Only the ranges the cursor leaves anything of, nearest first.
        let ranges: Vec<SeqBounds> = match range {
            HistoryRange::Before(before) => {
                visible.ranges().iter().rev().filter(|r| before.is_none_or(|before| r.from < before)).copied().collect()
            }
            HistoryRange::After(after) => {
                visible.ranges().iter().filter(|r| r.to.is_none_or(|to| to > after)).copied().collect()
            }
        };
        for bounds in ranges {
            let wanted = limit - page.len();
            let mut part = self.store.history(id, range, bounds, wanted).await?;
            // A range read short of its far end (a row not readable yet) ends
            // the page there: the next range would skip the missing seq.
            let short = part.len() < wanted
                && match range {
                    HistoryRange::Before(_) => part.first().is_none_or(|first| first.seq > bounds.from.max(1)),
                    HistoryRange::After(_) => bounds.to.is_some_and(|to| part.last().is_none_or(|last| last.seq < to)),
                };
            match range {
                HistoryRange::Before(_) => {
                    part.append(&mut page);
                    page = part;
                }
                HistoryRange::After(_) => page.append(&mut part),
            }
            if short || page.len() >= limit {
                break;
            }
        }
        Ok(page)
    }

    /// The conversation with its members, roles and cursors.
    pub async fn get_conversation(&self, user: &str, conversation_id: &str) -> Result<(Conversation, Vec<Member>)> {
        check_id("user_id", user)?;
        let id = parse_conversation(conversation_id)?;
        let (conversation, members) = self.conversation_with_members(id, user).await?;
        let mut previewed = self.withhold_previews(user, vec![conversation]).await?;
        Ok((previewed.remove(0), members))
    }

    /// The conversation as an active member `user` sees it, with its active
    /// members; previews not yet withheld (`withhold_previews`).
    async fn conversation_with_members(&self, id: Uuid, user: &str) -> Result<(Conversation, Vec<Member>)> {
        self.active_membership(id, user).await?;
        let conversation = self.store.conversation_for_member(id, user).await?.ok_or(Error::NoLongerMember)?;
        let members = self.store.members(id).await?.into_iter().filter(Member::is_active).collect();
        Ok((conversation, members))
    }

    /// Several conversations, each as [`Service::get_conversation`] gives
    /// it, in the order asked (repeats once); those `user` is not an active
    /// member of are left out. At most `conversations_per_call` ids.
    pub async fn get_conversations(
        &self,
        user: &str,
        conversation_ids: &[String],
    ) -> Result<Vec<(Conversation, Vec<Member>)>> {
        check_id("user_id", user)?;
        let max = self.options.conversations_per_call;
        if conversation_ids.len() > max {
            return Err(Error::InvalidArgument(format!(
                "at most {max} conversation ids per call (message.conversations_per_call); ask in batches"
            )));
        }
        let mut ids = Vec::with_capacity(conversation_ids.len());
        for id in conversation_ids {
            let id = parse_conversation(id)?;
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        use futures::StreamExt as _;
        // A few at a time; the caller's block list is read once, for all previews.
        let each = ids.into_iter().map(|id| self.conversation_with_members(id, user));
        let answers: Vec<Result<(Conversation, Vec<Member>)>> =
            futures::stream::iter(each).buffered(CONVERSATIONS_READ_AT_ONCE).collect().await;
        let (mut conversations, mut members) = (Vec::new(), Vec::new());
        for answer in answers {
            match answer {
                Ok((conversation, its_members)) => {
                    conversations.push(conversation);
                    members.push(its_members);
                }
                Err(Error::ConversationNotFound | Error::NoLongerMember) => {}
                Err(error) => return Err(error),
            }
        }
        let previewed = self.withhold_previews(user, conversations).await?;
        Ok(previewed.into_iter().zip(members).collect())
    }

    pub async fn get_receipts(&self, user: &str, conversation_id: &str, seq: u64) -> Result<Receipts> {
        check_id("user_id", user)?;
        check_seq(seq)?;
        let id = parse_conversation(conversation_id)?;
        let caller = self.active_membership(id, user).await?;
        if !caller.visible().contains(seq) {
            return Err(Error::MessageNotFound(seq));
        }
        // Only members who could see `seq`: a re-added member's cursors
        // pass what was sent while it was out.
        let others: Vec<Member> = self
            .store
            .members(id)
            .await?
            .into_iter()
            .filter(|m| m.is_active() && m.user_id != user && m.visible().contains(seq))
            .collect();
        Ok(Receipts {
            delivered_to: others.iter().filter(|m| m.delivered_seq >= seq).map(|m| m.user_id.clone()).collect(),
            read_by: others.iter().filter(|m| m.read_seq >= seq).map(|m| m.user_id.clone()).collect(),
        })
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
        let conversations = self.withhold_previews(user, conversations).await?;
        let next = (conversations.len() == limit)
            .then(|| conversations.last().map(|c| format!("{}:{}", c.last_activity_ms, c.id)))
            .flatten();
        Ok((conversations, next))
    }

    /// Inbox previews with content from users `user` blocked withheld, in groups.
    async fn withhold_previews(&self, user: &str, mut conversations: Vec<Conversation>) -> Result<Vec<Conversation>> {
        let in_groups = |conversation: &Conversation| {
            conversation.kind == ConversationKind::Group && conversation.last_message.is_some()
        };
        if !conversations.iter().any(in_groups) {
            return Ok(conversations);
        }
        let blocked = self.blocked_set(user).await?;
        for conversation in conversations.iter_mut().filter(|conversation| in_groups(conversation)) {
            if let Some(preview) = conversation.last_message.take_if(|m| visibility::from_blocked(m, &blocked)) {
                conversation.last_message = Some(visibility::redacted(preview));
            }
        }
        Ok(conversations)
    }

    /// Moves delivered cursors of many devices and tells the other members
    /// (small conversations).
    pub async fn ack_delivered(&self, acks: Vec<DeviceAckInput>) -> Result<Vec<DeviceCursors>> {
        // One device's bad ack must not cost every other device in the batch:
        // invalid entries are skipped one by one.
        let mut parsed = Vec::with_capacity(acks.len());
        for (user, device, cursors) in acks {
            if check_id("user_id", &user).is_err() || check_id("device_id", &device).is_err() {
                continue;
            }
            let cursors: Vec<(Uuid, u64)> =
                cursors.into_iter().filter_map(|(conversation, seq)| Some((ids::parse(&conversation)?, seq))).collect();
            if !cursors.is_empty() {
                parsed.push(DeviceCursors { user, device, cursors });
            }
        }
        let stored = self.store.ack_delivered_many(parsed).await?;
        for device in &stored {
            for (id, seq) in &device.cursors {
                let receipt =
                    Receipt { conversation_id: *id, user_id: device.user.clone(), read_seq: 0, delivered_seq: *seq };
                self.fanout.hint(Hint::Receipt(receipt));
            }
        }
        Ok(stored)
    }

    /// Moves the member's read cursor and tells every member's devices, its own included.
    pub async fn mark_read(&self, user: &str, conversation_id: &str, seq: u64) -> Result<u64> {
        check_id("user_id", user)?;
        let id = parse_conversation(conversation_id)?;
        let (store, owned_user) = (self.store.clone(), user.to_owned());
        let mark = detached(async move { store.mark_read(id, &owned_user, seq).await }).await?;
        if mark.moved {
            let receipt =
                Receipt { conversation_id: id, user_id: user.to_owned(), read_seq: mark.read_seq, delivered_seq: 0 };
            self.fanout.hint(Hint::Receipt(receipt));
            self.fanout.read_marked(user, id, mark.read_seq);
        }
        Ok(mark.read_seq)
    }

    /// Tells the other online members; stores nothing.
    pub async fn notify_typing(&self, user: &str, conversation_id: &str, typing: bool) -> Result<()> {
        check_id("user_id", user)?;
        let id = parse_conversation(conversation_id)?;
        self.active_membership(id, user).await?;
        let group = self.check_not_blocked(id, user).await?;
        let indicator = Typing {
            conversation_id: id,
            user_id: user.to_owned(),
            typing,
            expires_in_ms: self.options.typing_ttl.as_millis() as u32,
            hidden_from: self.blockers(user, group).await?,
        };
        self.fanout.hint(Hint::Typing(indicator));
        Ok(())
    }

    /// Tells the users `update.user_id` shares a small conversation with,
    /// among those it took part in (created, or sent in: a stranger who opens
    /// a conversation learns nothing until it is answered), except users it
    /// blocked; stores nothing.
    pub async fn presence_changed(&self, update: Presence) -> Result<()> {
        check_id("user_id", &update.user_id)?;
        let limit = self.options.presence_updates_max_conversations;
        let user = &update.user_id;
        let (conversations, blocked) = futures::future::try_join(
            self.store.list_conversations(user, None, limit),
            self.store.blocked_users(user, self.options.max_blocked_users),
        )
        .await?;
        let blocked: std::collections::HashSet<String> = blocked.into_iter().map(|b| b.user_id).collect();
        let contacts: std::collections::BTreeSet<String> = conversations
            .into_iter()
            .filter(|conversation| conversation.took_part)
            .filter(|conversation| conversation.members.len() <= self.options.presence_updates_max_members)
            .flat_map(|conversation| conversation.members)
            .filter(|member| member != user && !blocked.contains(member))
            .collect();
        if !contacts.is_empty() {
            self.fanout.hint(Hint::Presence(Arc::new(contacts.into_iter().collect()), update));
        }
        Ok(())
    }

    /// Adds `target` to `user`'s block list; false when it was there already.
    pub async fn block(&self, user: &str, target: &str) -> Result<bool> {
        check_id("user_id", user)?;
        check_id("target user_id", target)?;
        if user == target {
            return Err(Error::InvalidArgument("you cannot block yourself".into()));
        }
        let max = self.options.max_blocked_users;
        let listed = self.store.blocked_users(user, max).await?;
        if listed.iter().any(|entry| entry.user_id == target) {
            return Ok(false);
        }
        if listed.len() >= max {
            return Err(Error::FailedPrecondition(format!(
                "your block list holds its limit of {max} users; unblock someone first"
            )));
        }
        self.store.block(user, target, ids::now_ms()).await
    }

    /// Removes `target` from `user`'s block list; false when it was not there.
    pub async fn unblock(&self, user: &str, target: &str) -> Result<bool> {
        check_id("user_id", user)?;
        check_id("target user_id", target)?;
        self.store.unblock(user, target).await
    }

    /// `user`'s whole block list (at most `max_blocked_users`), oldest first.
    pub async fn blocked_users(&self, user: &str) -> Result<Vec<BlockedUser>> {
        check_id("user_id", user)?;
        self.store.blocked_users(user, self.options.max_blocked_users).await
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
        let shown = self.shown_to(user, messages).await?;
        Ok((self.withhold_blocked(user, shown).await?, next))
    }

    /// Entries (ordered by conversation) with content from users `user`
    /// blocked withheld, in groups. Only a page with content from others in
    /// a group reads the block list, once (a direct conversation's kind is
    /// cached); a former member's conversation is a group: directs cannot
    /// be left.
    async fn withhold_blocked(&self, user: &str, messages: Vec<StoredMessage>) -> Result<Vec<StoredMessage>> {
        let from_others = |message: &StoredMessage| visibility::is_content(message) && message.sender != user;
        let mut groups = HashSet::new();
        for message in messages.iter().filter(|message| from_others(message)) {
            let id = message.conversation_id;
            if !groups.contains(&id) && !matches!(self.shape_of(id, user).await?, Some(Shape::Direct(_))) {
                groups.insert(id);
            }
        }
        if groups.is_empty() {
            return Ok(messages);
        }
        let blocked = self.blocked_set(user).await?;
        Ok(messages
            .into_iter()
            .map(|message| {
                let withheld =
                    groups.contains(&message.conversation_id) && visibility::from_blocked(&message, &blocked);
                if withheld { visibility::redacted(message) } else { message }
            })
            .collect())
    }

    /// Entries from several conversations as `user` may be shown them. The
    /// store already kept each within the user's range; changes of other
    /// entries and edited messages need that range to tell whether their
    /// target or latest edit is seen, read once per conversation that has one.
    async fn shown_to(&self, user: &str, messages: Vec<StoredMessage>) -> Result<Vec<StoredMessage>> {
        let mut ranges: std::collections::HashMap<Uuid, Option<Visible>> = std::collections::HashMap::new();
        let mut shown = Vec::with_capacity(messages.len());
        for message in messages {
            if !visibility::depends_on_ranges(&message) {
                shown.push(message);
                continue;
            }
            let id = message.conversation_id;
            if let std::collections::hash_map::Entry::Vacant(vacant) = ranges.entry(id) {
                vacant.insert(self.store.member(id, user).await?.map(|member| member.visible()));
            }
            // The store admitted the entry into this user's range: a range
            // read since (a re-add in between, a row not readable) can only
            // take content away, never a seq, or the page would not be dense.
            shown.push(match ranges[&id].as_ref().map(|bounds| visibility::view(&message, bounds)) {
                Some(visibility::View::Full) => message,
                _ => visibility::redacted(message),
            });
        }
        Ok(shown)
    }
}

/// The one seq `seq`, as history bounds.
fn only(seq: u64) -> SeqBounds {
    SeqBounds { from: seq, to: Some(seq) }
}

/// Runs a write and what must follow its commit (fan-out, cache generations)
/// as its own task, so a caller that gives up (a closed stream, a deadline)
/// cannot cut the work off between the commit and its effects.
async fn detached<T: Send + 'static>(work: impl std::future::Future<Output = Result<T>> + Send + 'static) -> Result<T> {
    tokio::spawn(work).await.map_err(|e| Error::Unavailable(format!("write task failed: {e}")))?
}

fn check_seq(seq: u64) -> Result<()> {
    if seq == 0 { Err(Error::InvalidArgument("target_seq is required".into())) } else { Ok(()) }
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

#[cfg(test)]
pub(crate) mod tests;
