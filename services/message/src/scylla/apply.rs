//! Creating conversations and applying changes to them.
//!
//! A change reads the head at SERIAL, checks `policy.rs` against the roster
//! in it and against member and message rows, then reserves its seqs with
//! the head LWT (`IF last_seq = <read>`), which also takes the head's
//! `applying` lock. It writes its rows and releases the lock. A change that
//! finds the lock held waits (or, past `lock_timeout`, takes it over), so
//! every change reads the rows of every earlier change: rows are written at
//! LOCAL_QUORUM before the release, and read at LOCAL_QUORUM after. Sends do
//! not take the lock; they depend only on the roster, which the LWT guards.
//!
//! Changes roll forward, never stay half applied: the LWT that takes the
//! lock also records the rows the change will write (`Pending`, in the
//! head's `pending`), and the lock is released only once they are written.
//! A writer that fails or stops leaves both; the next change or send that
//! finds the lock stale writes the recorded rows (idempotent upserts) and
//! releases it. Until then readers take the roster as the truth: a member
//! the roster no longer lists sees nothing past the removal's seq.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use ::scylla::statement::batch::BatchType;
use tracing::warn;
use uuid::Uuid;

use super::{
    BatchBuilder, Inner,
    head::{Effect, Pending, takeover_after_ms},
    reads::{self, conversation_for_member, head, member, members, message_at},
    rows::{
        Head, NewRow, bucket, conversation_kind_code, earlier_value, execution_error, outcome_unknown, roster_value,
        seq_value,
    },
};
use crate::{
    error::{Error, Result},
    policy,
    store::{
        Appended, Change, ChangeRequest, Conversation, ConversationKind, Kind, Member, NewGroup, Role, SeqBounds,
        StoredMessage,
    },
    visibility,
};

/// Statements per logged batch of membership rows.
const BATCH_STATEMENTS: usize = 120;

/// The rows of a membership that starts at `joined_seq`.
fn join_rows(batch: &mut BatchBuilder, inner: &Inner, id: Uuid, user: &str, role: Role, joined_seq: u64, now_ms: i64) {
    let s = &inner.statements;
    let joined = seq_value(joined_seq);
    batch.push(&s.member_upsert, (role.code() as i32, joined, None::<i64>, now_ms, id, user.to_owned()));
    // A rejoin starts reading from its join: larger than any earlier read cursor.
    batch.push(&s.member_read_seq, (joined, joined, id, user.to_owned()));
    batch.push(&s.inbox_upsert, (joined, None::<i64>, now_ms, user.to_owned(), id));
}

pub(super) async fn get_or_create_direct(
    inner: &Inner,
    user: &str,
    peer: &str,
    id: Uuid,
    now_ms: i64,
) -> Result<Conversation> {
    let (low, high) = if user <= peer { (user, peer) } else { (peer, user) };
    let existing: Option<(Uuid,)> = inner.first(&inner.statements.direct_read, (low, high)).await?;
    let id = match existing {
        Some((existing,)) => existing,
        None => claim_pair(inner, low, high, id).await?,
    };
    if let Some(conversation) = conversation_for_member(inner, id, user).await? {
        return Ok(conversation);
    }
    // The pair is claimed but its rows are missing: the claimer is still
    // writing them or stopped. Writing them again is idempotent.
    ensure_direct(inner, id, user, low, high, now_ms).await?;
    conversation_for_member(inner, id, user).await?.ok_or(Error::ConversationNotFound)
}

/// Claims the pair for `id`; whoever's claim applied decides the conversation.
async fn claim_pair(inner: &Inner, low: &str, high: &str, id: Uuid) -> Result<Uuid> {
    for _ in 0..3 {
        match inner.lwt(&inner.statements.direct_claim, (low, high, id)).await? {
            Ok(lwt) if lwt.applied => return Ok(id),
            Ok(lwt) => {
                return lwt.uuid("conversation_id").ok_or_else(|| Error::Storage("direct pair without id".into()));
            }
            // Retrying is safe: finding our own id means the first attempt applied.
            Err(error) if outcome_unknown(&error) => continue,
            Err(error) => return Err(execution_error(error)),
        }
    }
    Err(Error::Unavailable("cannot create the conversation now; retry".into()))
}

async fn ensure_direct(inner: &Inner, id: Uuid, creator: &str, low: &str, high: &str, now_ms: i64) -> Result<()> {
    let roster: BTreeMap<String, Role> = [(low.to_owned(), Role::Member), (high.to_owned(), Role::Member)].into();
    let values = (
        id,
        conversation_kind_code(ConversationKind::Direct),
        String::new(),
        creator,
        now_ms,
        now_ms,
        0i64,
        Uuid::now_v7(),
        roster_value(&roster),
    );
    match inner.lwt(&inner.statements.head_create, values).await? {
        Ok(_) => {}
        // Another caller may have created it; the head read below tells.
        Err(error) if outcome_unknown(&error) => {}
        Err(error) => return Err(execution_error(error)),
    }
    let mut batch = BatchBuilder::new(BatchType::Logged);
    for user in [low, high] {
        join_rows(&mut batch, inner, id, user, Role::Member, 0, now_ms);
    }
    batch.write(inner).await
}

pub(super) async fn create_group(
    inner: &Inner,
    group: NewGroup,
    max_group_size: usize,
) -> Result<(Conversation, Appended)> {
    policy::group_size(group.members.len() + 1, max_group_size)?;
    let mut entry = StoredMessage::event(group.id, &group.creator, Kind::GroupCreated, group.now_ms);
    entry.seq = 1;
    entry.title = group.title.clone();
    entry.member_ids = std::iter::once(group.creator.clone()).chain(group.members.iter().cloned()).collect();
    // As in SQLite: the creator is the owner, then each listed member is a member.
    let mut roster = BTreeMap::from([(group.creator.clone(), Role::Owner)]);
    roster.extend(group.members.iter().map(|m| (m.clone(), Role::Member)));
    let token = Uuid::now_v7();
    let values = (
        group.id,
        conversation_kind_code(ConversationKind::Group),
        group.title.clone(),
        group.creator.clone(),
        group.now_ms,
        group.now_ms,
        1i64,
        token,
        roster_value(&roster),
    );
    let applied = match inner.lwt(&inner.statements.head_create, values).await? {
        Ok(lwt) => lwt.applied,
        Err(error) if outcome_unknown(&error) => {
            head(inner, group.id, true).await?.is_some_and(|head| head.last_reservation == Some(token))
        }
        Err(error) => return Err(execution_error(error)),
    };
    if !applied {
        return Err(Error::Storage(format!("conversation {} already exists", group.id)));
    }
    let mut batch = BatchBuilder::new(BatchType::Logged);
    batch.push(&inner.statements.message_insert, NewRow::from(&entry));
    let mut batches = Vec::new();
    for (user, role) in &roster {
        if batch.len() >= BATCH_STATEMENTS {
            batches.push(std::mem::replace(&mut batch, BatchBuilder::new(BatchType::Logged)));
        }
        join_rows(&mut batch, inner, group.id, user, *role, entry.seq, group.now_ms);
    }
    batches.push(batch);
    for batch in batches {
        batch.write(inner).await?;
    }
    let conversation =
        conversation_for_member(inner, group.id, &group.creator).await?.ok_or(Error::ConversationNotFound)?;
    Ok((conversation, visibility::appended_to_active(entry, roster.into_keys())))
}

/// What a change appends and changes.
struct Plan {
    entries: Vec<StoredMessage>,
    /// The roster and title after the change, when it changes them.
    state: Option<(BTreeMap<String, Role>, String)>,
    effects: Vec<Effect>,
}

impl Plan {
    fn none() -> Self {
        Plan { entries: Vec::new(), state: None, effects: Vec::new() }
    }
}

/// Completes the change of a holder that stopped (its lock is past the
/// takeover time): writes what it recorded, then releases its lock.
pub(super) async fn roll_forward(inner: &Inner, head: &Head) -> Result<()> {
    let Some((holder, _)) = head.applying else { return Ok(()) };
    if let Some(pending) = Pending::of(head) {
        warn!(conversation_id = %head.id, seqs = pending.entries.len(), "completing a change its writer left unfinished");
        write_plan(inner, head.id, &pending.entries, pending.effects, pending.now_ms).await?;
    }
    release(inner, head.id, holder).await;
    Ok(())
}

/// The actor's membership: role from the roster (exact), seqs from its row.
async fn actor(inner: &Inner, head: &Head, user: &str) -> Result<Member> {
    let row = member(inner, head.id, user).await?;
    match (head.roster.get(user), row) {
        (Some(role), Some(mut member)) => {
            member.role = *role;
            member.removed_seq = None;
            Ok(member)
        }
        (Some(_), None) => Err(Error::Unavailable("the membership is being stored; retry".into())),
        (None, Some(_)) => Err(Error::NoLongerMember),
        (None, None) => Err(Error::ConversationNotFound),
    }
}

/// Another member as the policy sees it: active per the roster.
async fn target_member(inner: &Inner, head: &Head, user: &str) -> Result<Option<Member>> {
    Ok(member(inner, head.id, user).await?.map(|mut member| {
        match head.roster.get(user) {
            Some(role) => {
                member.role = *role;
                member.removed_seq = None;
            }
            None if member.removed_seq.is_none() => member.removed_seq = Some(head.last_seq),
            None => {}
        }
        member
    }))
}

async fn plan(inner: &Inner, head: &Head, actor: &Member, request: &ChangeRequest) -> Result<Plan> {
    let event = |kind: Kind| StoredMessage::event(request.conversation_id, &request.actor, kind, request.now_ms);
    let kind = head.kind;
    let mut roster = head.roster.clone();
    let target_message = |seq: u64| async move { message_at(inner, head.id, seq).await };
    match &request.change {
        Change::AddMembers(users) => {
            let mut adding: Vec<String> = users.iter().filter(|user| !roster.contains_key(*user)).cloned().collect();
            adding.sort();
            adding.dedup();
            if adding.is_empty() {
                return Ok(Plan::none());
            }
            policy::add_members(kind, actor, roster.len(), adding.len(), request.limits.max_group_size)?;
            let mut entry = event(Kind::MembersAdded);
            entry.member_ids = adding.clone();
            roster.extend(adding.iter().map(|user| (user.clone(), Role::Member)));
            let effects = adding.into_iter().map(|user| Effect::Join(user, Role::Member)).collect();
            Ok(Plan { entries: vec![entry], state: Some((roster, head.title.clone())), effects })
        }
        Change::RemoveMember(user) => {
            let target = target_member(inner, head, user).await?;
            policy::remove_member(kind, actor, target.as_ref())?;
            let mut entry = event(Kind::MemberRemoved);
            entry.member_ids = vec![user.clone()];
            roster.remove(user);
            let effects = vec![Effect::End(user.clone())];
            Ok(Plan { entries: vec![entry], state: Some((roster, head.title.clone())), effects })
        }
        Change::Leave => {
            policy::leave(kind)?;
            roster.remove(&actor.user_id);
            let mut entries = vec![event(Kind::MemberLeft)];
            let mut effects = vec![Effect::End(actor.user_id.clone())];
            if actor.role == Role::Owner {
                // Ownership passes to the longest-standing admin, else member.
                let successor = members(inner, head.id)
                    .await?
                    .into_iter()
                    .filter_map(|mut m| {
                        roster.get(&m.user_id).map(|role| {
                            m.role = *role;
                            m
                        })
                    })
                    .min_by_key(|m| (std::cmp::Reverse(m.role), m.joined_seq, m.user_id.clone()));
                if let Some(successor) = successor {
                    roster.insert(successor.user_id.clone(), Role::Owner);
                    let mut handover = event(Kind::RoleChanged);
                    handover.member_ids = vec![successor.user_id.clone()];
                    handover.role = Some(Role::Owner);
                    entries.push(handover);
                    effects.push(Effect::SetRole(successor.user_id, Role::Owner));
                }
            }
            Ok(Plan { entries, state: Some((roster, head.title.clone())), effects })
        }
        Change::Rename(title) => {
            policy::rename(kind, actor)?;
            let mut entry = event(Kind::Renamed);
            entry.title = title.clone();
            Ok(Plan { entries: vec![entry], state: Some((roster, title.clone())), effects: Vec::new() })
        }
        Change::SetRole(user, role) => {
            let target = target_member(inner, head, user).await?;
            policy::set_role(kind, actor, target.as_ref(), *role)?;
            if target.is_some_and(|t| t.role == *role) {
                return Ok(Plan::none());
            }
            roster.insert(user.clone(), *role);
            let mut entry = event(Kind::RoleChanged);
            entry.member_ids = vec![user.clone()];
            entry.role = Some(*role);
            let effects = vec![Effect::SetRole(user.clone(), *role)];
            Ok(Plan { entries: vec![entry], state: Some((roster, head.title.clone())), effects })
        }
        Change::Edit { target_seq, body } => {
            let found = target_message(*target_seq).await?.map(|(message, _)| message);
            let target = policy::target(actor, found.as_ref(), *target_seq)?;
            policy::edit(actor, target, request.now_ms, request.limits.edit_window_ms)?;
            let mut entry = event(Kind::Edit);
            entry.target_seq = *target_seq;
            entry.body = body.clone();
            let effects = vec![Effect::Edit { target_seq: *target_seq, body: body.clone(), now_ms: request.now_ms }];
            Ok(Plan { entries: vec![entry], state: None, effects })
        }
        Change::Delete { target_seq } => {
            let found = target_message(*target_seq).await?;
            let (found, edits) = found.map_or((None, Vec::new()), |(message, edits)| (Some(message), edits));
            let target = policy::target(actor, found.as_ref(), *target_seq)?;
            policy::delete(kind, actor, target)?;
            if target.deleted {
                return Ok(Plan::none());
            }
            let mut entry = event(Kind::Delete);
            entry.target_seq = *target_seq;
            let effects = vec![Effect::Delete { target_seq: *target_seq, edits }];
            Ok(Plan { entries: vec![entry], state: None, effects })
        }
        Change::React { target_seq, emoji } => {
            let found = target_message(*target_seq).await?.map(|(message, _)| message);
            let target = policy::target(actor, found.as_ref(), *target_seq)?;
            policy::react(target)?;
            let current: Option<(Option<String>,)> = inner
                .first(&inner.statements.reaction_read, (head.id, seq_value(*target_seq), actor.user_id.as_str()))
                .await?;
            if current.and_then(|(emoji,)| emoji).unwrap_or_default() == *emoji {
                return Ok(Plan::none());
            }
            let mut entry = event(Kind::Reaction);
            entry.target_seq = *target_seq;
            entry.reaction = emoji.clone();
            let effects =
                vec![Effect::React { target_seq: *target_seq, user: actor.user_id.clone(), emoji: emoji.clone() }];
            Ok(Plan { entries: vec![entry], state: None, effects })
        }
    }
}

pub(super) async fn apply(inner: &Inner, request: ChangeRequest) -> Result<Vec<Appended>> {
    let id = request.conversation_id;
    let token = Uuid::now_v7();
    let lock_timeout_ms = takeover_after_ms(inner);
    let mut wait = Duration::from_millis(5);
    for _ in 0..inner.options.lwt_max_retries {
        let head = head(inner, id, true).await?.ok_or(Error::ConversationNotFound)?;
        let now = messenger_platform::ids::now_ms();
        if let Some((holder, since)) = head.applying
            && holder != token
        {
            if now.saturating_sub(since) < lock_timeout_ms {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_millis(200));
            } else {
                roll_forward(inner, &head).await?;
            }
            continue;
        }
        let actor = actor(inner, &head, &request.actor).await?;
        let mut plan = plan(inner, &head, &actor, &request).await?;
        if plan.entries.is_empty() {
            return Ok(Vec::new());
        }
        for (offset, entry) in plan.entries.iter_mut().enumerate() {
            entry.seq = head.last_seq + 1 + offset as u64;
            // As for sends: stamped at the reservation, not the request.
            entry.sent_at_ms = now;
        }
        let pending = Pending { entries: plan.entries.clone(), effects: plan.effects.clone(), now_ms: request.now_ms };
        let pending = serde_json::to_string(&pending).map_err(|e| Error::Storage(format!("pending change: {e}")))?;
        let last = head.last_seq + plan.entries.len() as u64;
        let activity = head.last_activity_ms.max(request.now_ms);
        let (expected, new_last) = (seq_value(head.last_seq), seq_value(last));
        let outcome = match &plan.state {
            Some((roster, title)) => {
                let (roster, title) = (roster_value(roster), title.clone());
                let values = (new_last, activity, token, token, now, pending, roster, title, id, expected);
                inner.lwt(&inner.statements.head_reserve_state, values).await?
            }
            None => {
                let values = (new_last, activity, token, token, now, pending, id, expected);
                inner.lwt(&inner.statements.head_reserve_locked, values).await?
            }
        };
        let applied = match outcome {
            Ok(lwt) => lwt.applied,
            Err(error) if outcome_unknown(&error) => reads::head(inner, id, true)
                .await?
                .is_some_and(|current| current.last_reservation == Some(token) && current.last_seq == last),
            Err(error) => return Err(execution_error(error)),
        };
        if !applied {
            continue;
        }
        let entries = plan.entries;
        #[cfg(test)]
        if inner.fail_plan_writes.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::Unavailable("injected: the change's rows were not written".into()));
        }
        // On failure the lock and the recorded rows stay: the change is
        // committed (the roster already says so) and the next writer
        // completes it. Released only once everything is written.
        write_plan(inner, id, &entries, plan.effects, request.now_ms).await?;
        // The membership rows as this change left them (written above, read
        // at LOCAL_QUORUM), read while the lock still holds off the next
        // change: the entries' audiences. The change is committed whatever
        // this read does: without it nobody gets the entries live, and
        // devices fetch them with the next gap fill or sync.
        let roster = members(inner, id).await.unwrap_or_else(|error| {
            warn!(%error, conversation_id = %id, "change committed; its audience unread, so not delivered live");
            Vec::new()
        });
        release(inner, id, token).await;
        return Ok(entries.into_iter().map(|entry| visibility::appended(entry, &roster)).collect());
    }
    Err(Error::Unavailable("the conversation is too busy; retry".into()))
}

async fn write_plan(
    inner: &Inner,
    id: Uuid,
    entries: &[StoredMessage],
    effects: Vec<Effect>,
    now_ms: i64,
) -> Result<()> {
    let s = &inner.statements;
    let first = entries[0].seq;
    // Members added back: the membership each had before (its rows are
    // complete, the lock holds off other changes) becomes an earlier range,
    // written in the same logged batch as the new one.
    let before: HashMap<String, Member> = if effects.iter().any(|effect| matches!(effect, Effect::Join(..))) {
        members(inner, id).await?.into_iter().map(|member| (member.user_id.clone(), member)).collect()
    } else {
        HashMap::new()
    };
    let mut batches = vec![BatchBuilder::new(BatchType::Logged)];
    let current = |batches: &mut Vec<BatchBuilder>| {
        if batches.last().is_some_and(|b| b.len() >= BATCH_STATEMENTS) {
            batches.push(BatchBuilder::new(BatchType::Logged));
        }
        batches.len() - 1
    };
    for entry in entries {
        let index = current(&mut batches);
        batches[index].push(&s.message_insert, NewRow::from(entry));
    }
    for effect in effects {
        let index = current(&mut batches);
        let batch = &mut batches[index];
        match effect {
            Effect::Join(user, role) => {
                let ended = before.get(&user).and_then(|member| {
                    let removed = member.removed_seq.filter(|_| member.joined_seq < first)?;
                    Some(SeqBounds { from: member.joined_seq, to: Some(removed) })
                });
                if let Some(ended) = ended {
                    batch.push(&s.member_earlier, (earlier_value(ended), id, user.clone()));
                    batch.push(&s.inbox_earlier, (earlier_value(ended), user.clone(), id));
                }
                join_rows(batch, inner, id, &user, role, first, now_ms)
            }
            Effect::End(user) => {
                batch.push(&s.member_removed, (seq_value(first), id, user.clone()));
                batch.push(&s.inbox_removed, (seq_value(first), user, id));
            }
            Effect::SetRole(user, role) => batch.push(&s.member_role, (role.code() as i32, id, user)),
            Effect::Edit { target_seq, body, now_ms } => {
                let edit_seq = vec![seq_value(first)];
                let key = (id, bucket(target_seq), seq_value(target_seq));
                batch.push(&s.message_edit, (body, now_ms, edit_seq, key.0, key.1, key.2));
            }
            Effect::Delete { target_seq, edits } => {
                // The body leaves storage: the message itself and every edit of it.
                let key = (id, bucket(target_seq), seq_value(target_seq));
                batch.push(&s.message_delete, (String::new(), String::new(), true, key.0, key.1, key.2));
                for edit in edits {
                    batch.push(&s.message_blank, (String::new(), id, bucket(edit), seq_value(edit)));
                }
                batch.push(&s.reactions_clear, (id, seq_value(target_seq)));
            }
            Effect::React { target_seq, user, emoji } if emoji.is_empty() => {
                batch.push(&s.reaction_delete, (id, seq_value(target_seq), user));
            }
            Effect::React { target_seq, user, emoji } => {
                batch.push(&s.reaction_upsert, (emoji, id, seq_value(target_seq), user));
            }
        }
    }
    for batch in batches {
        batch.write(inner).await?;
    }
    Ok(())
}

/// Releases the apply lock; if this fails the lock expires after `lock_timeout`.
async fn release(inner: &Inner, id: Uuid, token: Uuid) {
    match inner.lwt(&inner.statements.head_release, (id, token)).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => warn!(%error, conversation_id = %id, "cannot release the apply lock"),
        Err(error) => warn!(%error, conversation_id = %id, "cannot release the apply lock"),
    }
}
