//! Reads (history, inbox, sync, members) and the cursor writes.
//!
//! Messages are spread over buckets of 4096 seqs, so every range read walks
//! the buckets of its range in order and stops once it has enough rows. The
//! head's `last_seq` bounds every walk.
//!
//! Missing seqs: rows of concurrent writers land out of order, so a seq
//! missing below a present one may still be written. Forward reads (gap fill,
//! sync) stop at such a gap, so no device's cursor passes a seq that could
//! still arrive, unless the next present row is older than twice
//! `lock_timeout`: every writer that reserved before it is past its last
//! acknowledgement by then, so the seq is declared lost (a range tombstone
//! that shadows a row landing later) and skipped; see "Lost seqs" in
//! `scylla.rs`. Backward reads (the newest page) show what exists.

use std::collections::{HashMap, HashSet};

use futures::{StreamExt, TryStreamExt, stream};
use uuid::Uuid;

use super::{
    Inner,
    head::{Pending, declare_lost},
    rows::{FlagsRow, Head, HeadRow, InboxRow, MemberRow, MessageRow, bucket, bucket_span, seq_value, spans},
};
use crate::{
    error::{Error, Result},
    store::{
        BlockedUser, Blocks, Conversation, ConversationKind, HistoryRange, InboxCursor, Member, SeqBounds,
        StoredMessage, SyncCursor, Visible,
    },
};

/// An unread count looks at this many entries after the read cursor at most
/// (the newest ones); beyond it the count is a lower bound ("999+").
pub(super) const UNREAD_SCAN: u64 = 1000;
/// The inbox's newest message is searched among this many newest entries.
pub(super) const LAST_MESSAGE_SCAN: u64 = 1000;
/// Heads read at once when listing a user's conversations.
const PARALLEL_READS: usize = 16;

pub(crate) async fn head(inner: &Inner, id: Uuid, serial: bool) -> Result<Option<Head>> {
    let statement = if serial { &inner.statements.head_read_serial } else { &inner.statements.head_read };
    let row: Option<HeadRow> = inner.first(statement, (id,)).await?;
    Ok(row.and_then(HeadRow::into_head))
}

/// Where `user`'s membership ends as the head has it: a member the roster
/// no longer lists ends at its removal's seq even while the removal's rows
/// (recorded in the head's pending change) are still being written.
fn removed_as_of_head(removed: Option<u64>, user: &str, head: &Head) -> Option<u64> {
    removed.or_else(|| {
        (!head.roster.contains_key(user))
            .then(|| Pending::of(head).and_then(|pending| pending.ends(user)).unwrap_or(head.last_seq))
    })
}

/// A membership row as the head has it (`removed_as_of_head`).
fn as_of_head(mut member: Member, head: &Head) -> Member {
    member.removed_seq = removed_as_of_head(member.removed_seq, &member.user_id, head);
    member
}

/// One membership as readers must see it (`as_of_head`).
pub(super) async fn current_member(inner: &Inner, id: Uuid, user: &str) -> Result<Option<Member>> {
    let (row, head) = futures::future::try_join(member(inner, id, user), head(inner, id, false)).await?;
    Ok(match head {
        Some(head) => row.map(|member| as_of_head(member, &head)),
        None => row,
    })
}

/// Every membership as readers must see it (`as_of_head`).
pub(super) async fn current_members(inner: &Inner, id: Uuid) -> Result<Vec<Member>> {
    let (rows, head) = futures::future::try_join(members(inner, id), head(inner, id, false)).await?;
    Ok(match head {
        Some(head) => rows.into_iter().map(|member| as_of_head(member, &head)).collect(),
        None => rows,
    })
}

/// One membership row, current or ended, with its cursors.
pub(crate) async fn member(inner: &Inner, id: Uuid, user: &str) -> Result<Option<Member>> {
    let row: Option<MemberRow> = inner.first(&inner.statements.member_read, (id, user)).await?;
    Ok(row.and_then(MemberRow::into_member))
}

pub(super) async fn members(inner: &Inner, id: Uuid) -> Result<Vec<Member>> {
    let rows: Vec<MemberRow> = inner.paged(&inner.statements.members_read, (id,)).await?;
    let mut members: Vec<Member> = rows.into_iter().filter_map(MemberRow::into_member).collect();
    members.sort_by(|a, b| a.user_id.cmp(&b.user_id));
    Ok(members)
}

/// The entry at `seq`, with the seqs of its edits.
pub(crate) async fn message_at(inner: &Inner, id: Uuid, seq: u64) -> Result<Option<(StoredMessage, Vec<u64>)>> {
    let row: Option<MessageRow> =
        inner.first(&inner.statements.message_read, (id, bucket(seq), seq_value(seq))).await?;
    Ok(row.and_then(MessageRow::into_message))
}

/// Entries with seq in `from..=to`, ascending or descending, at most `limit`.
async fn range(
    inner: &Inner,
    id: Uuid,
    from: u64,
    to: u64,
    limit: usize,
    descending: bool,
) -> Result<Vec<StoredMessage>> {
    let mut found = Vec::new();
    if from > to || limit == 0 {
        return Ok(found);
    }
    // Forward reads: the next seq due, and when a gap counts as lost for good.
    let mut expected = from;
    let settled = messenger_platform::ids::now_ms() - 2 * inner.options.lock_timeout.as_millis() as i64;
    for (index, low, high) in spans(from, to, descending) {
        let want = i32::try_from(limit - found.len()).unwrap_or(i32::MAX);
        let statement =
            if descending { &inner.statements.messages_descending } else { &inner.statements.messages_ascending };
        let rows: Vec<MessageRow> = inner.rows(statement, (id, index, seq_value(low), seq_value(high), want)).await?;
        let before = found.len();
        found.extend(rows.into_iter().filter_map(|row| row.into_message().map(|(message, _)| message)));
        if !descending {
            let mut readable = readable_prefix(&found[before..], expected, settled);
            // A gap old enough to count as lost may belong to a change whose
            // writer stopped: recorded in the head, it will be written.
            if let Some(gap) = first_gap(&found[before..before + readable], expected)
                && let Some(head) = head(inner, id, false).await?
                && let Some(pending) = Pending::of(&head)
            {
                readable = readable.min(pending.first_row_after(&found[before..], gap));
            }
            // What is skipped is declared lost first, so it never appears
            // behind a cursor that passed it.
            for (low, high) in gaps(&found[before..before + readable], expected) {
                declare_lost(inner, id, low, high).await?;
            }
            if readable < found.len() - before {
                found.truncate(before + readable);
                break;
            }
            expected = found.last().map_or(expected, |row| row.seq + 1);
        }
        if found.len() >= limit {
            found.truncate(limit);
            break;
        }
    }
    Ok(found)
}

/// The first missing seq among `rows` (ascending, the first expected at `expected`).
fn first_gap(rows: &[StoredMessage], expected: u64) -> Option<u64> {
    gaps(rows, expected).next().map(|(low, _)| low)
}

/// The runs of missing seqs among `rows` (ascending, the first expected at
/// `expected`), as inclusive ranges.
pub(super) fn gaps(rows: &[StoredMessage], mut expected: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
    rows.iter().filter_map(move |row| {
        let gap = (row.seq > expected).then(|| (expected, row.seq - 1));
        expected = row.seq + 1;
        gap
    })
}

/// How many of `rows` (ascending, the first expected at `expected`) can be
/// handed out: up to the first gap that may still fill, i.e. whose next
/// present row was sent after `settled`.
pub(super) fn readable_prefix(rows: &[StoredMessage], mut expected: u64, settled: i64) -> usize {
    for (index, row) in rows.iter().enumerate() {
        if row.seq > expected && row.sent_at_ms > settled {
            return index;
        }
        expected = row.seq + 1;
    }
    rows.len()
}

pub(super) async fn history(
    inner: &Inner,
    id: Uuid,
    range_wanted: HistoryRange,
    visible: SeqBounds,
    limit: usize,
) -> Result<Vec<StoredMessage>> {
    let Some(head) = head(inner, id, false).await? else { return Ok(Vec::new()) };
    let top = visible.to.map_or(head.last_seq, |to| to.min(head.last_seq));
    match range_wanted {
        HistoryRange::Before(before) => {
            let upper = match before {
                Some(0) => return Ok(Vec::new()),
                Some(before) => top.min(before - 1),
                None => top,
            };
            let mut page = range(inner, id, visible.from.max(1), upper, limit, true).await?;
            page.reverse();
            Ok(page)
        }
        HistoryRange::After(after) => {
            let lower = visible.from.max(after.saturating_add(1)).max(1);
            range(inner, id, lower, top, limit, false).await
        }
    }
}

/// Who `user` blocked, read only when one of `heads` is a group: in a
/// group their messages count as nothing unread (`visibility::from_blocked`).
async fn blocked_in_groups<'a>(
    inner: &Inner,
    user: &str,
    mut heads: impl Iterator<Item = &'a Head>,
) -> Result<HashSet<String>> {
    if !heads.any(|head| head.kind == ConversationKind::Group) {
        return Ok(HashSet::new());
    }
    let rows: Vec<(String, Option<i64>)> = inner.paged(&inner.statements.blocks_read, (user,)).await?;
    Ok(rows.into_iter().map(|(blocked, _)| blocked).collect())
}

/// Fills the active members, the unread count and the newest TEXT message for `user`.
async fn complete(
    inner: &Inner,
    head: &Head,
    user: &str,
    member: Option<Member>,
    blocked: &HashSet<String>,
) -> Result<Conversation> {
    let read_seq = member.as_ref().map_or(0, |m| m.read_seq);
    // Without its row (being stored), nothing is previewed rather than too much.
    let joined_seq = member.as_ref().map_or(u64::MAX, |m| m.joined_seq);
    let mut conversation = Conversation {
        id: head.id,
        kind: head.kind,
        title: head.title.clone(),
        created_by: head.created_by.clone(),
        members: head.roster.keys().cloned().collect(),
        last_seq: head.last_seq,
        created_at_ms: head.created_at_ms,
        last_activity_ms: head.last_activity_ms,
        read_seq,
        unread_count: 0,
        last_message: None,
        took_part: head.created_by == user || member.is_some_and(|m| m.took_part),
    };
    if head.last_seq > read_seq {
        let from = (read_seq + 1).max(head.last_seq.saturating_sub(UNREAD_SCAN - 1));
        for index in bucket(from)..=bucket(head.last_seq) {
            let (low, high) = bucket_span(index, from, head.last_seq);
            let rows: Vec<FlagsRow> =
                inner.rows(&inner.statements.message_flags, (head.id, index, seq_value(low), seq_value(high))).await?;
            let from_blocked = |row: &FlagsRow| {
                head.kind == ConversationKind::Group && row.sender.as_ref().is_some_and(|s| blocked.contains(s))
            };
            conversation.unread_count +=
                rows.iter().filter(|row| row.unread_for(user) && !from_blocked(row)).count() as u64;
        }
    }
    conversation.last_message = last_text(inner, head, joined_seq).await?;
    Ok(conversation)
}

/// The newest TEXT message among the newest `LAST_MESSAGE_SCAN` entries,
/// none from before `joined_seq` (what the member may see).
async fn last_text(inner: &Inner, head: &Head, joined_seq: u64) -> Result<Option<StoredMessage>> {
    const PAGE: usize = 50;
    let floor = head.last_seq.saturating_sub(LAST_MESSAGE_SCAN - 1).max(1).max(joined_seq);
    let mut top = head.last_seq;
    while top >= floor && top > 0 {
        let page = range(inner, head.id, floor, top, PAGE, true).await?;
        if let Some(text) = page.iter().find(|m| m.kind == crate::store::Kind::Text) {
            return Ok(Some(text.clone()));
        }
        match page.last() {
            Some(oldest) if page.len() == PAGE && oldest.seq > floor => top = oldest.seq - 1,
            _ => break,
        }
    }
    Ok(None)
}

pub(super) async fn conversation_for_member(inner: &Inner, id: Uuid, user: &str) -> Result<Option<Conversation>> {
    let Some(head) = head(inner, id, false).await? else { return Ok(None) };
    if !head.roster.contains_key(user) {
        return Ok(None);
    }
    let (member, blocked) =
        futures::future::try_join(member(inner, id, user), blocked_in_groups(inner, user, [&head].into_iter())).await?;
    Ok(Some(complete(inner, &head, user, member, &blocked).await?))
}

/// The user's memberships as recorded by user (current and ended).
async fn memberships(inner: &Inner, user: &str) -> Result<Vec<InboxRow>> {
    let mut rows: Vec<InboxRow> = inner.paged(&inner.statements.inbox_read, (user,)).await?;
    // Scylla orders uuid clustering keys by version and time, not by bytes:
    // the contract orders by id as the other stores do.
    rows.sort_by_key(|row| row.conversation_id);
    Ok(rows)
}

/// The heads of `ids`, in order, read a few at a time.
async fn heads(inner: &Inner, ids: Vec<Uuid>) -> Result<Vec<Option<Head>>> {
    stream::iter(ids).map(|id| head(inner, id, false)).buffered(PARALLEL_READS).try_collect().await
}

/// The user's active conversations, newest activity first. Reads every
/// active membership's head and sorts in memory: bounded by how many
/// conversations one user belongs to, which the product keeps in the
/// hundreds; a per-user activity index would replace it beyond that.
pub(super) async fn list_conversations(
    inner: &Inner,
    user: &str,
    after: Option<InboxCursor>,
    limit: usize,
) -> Result<Vec<Conversation>> {
    let active: Vec<Uuid> = memberships(inner, user)
        .await?
        .into_iter()
        .filter(|row| row.removed_seq.is_none())
        .map(|row| row.conversation_id)
        .collect();
    let mut listed: Vec<Head> = heads(inner, active)
        .await?
        .into_iter()
        .flatten()
        .filter(|head| head.roster.contains_key(user))
        .filter(|head| {
            after.as_ref().is_none_or(|cursor| {
                (head.last_activity_ms, head.id) < (cursor.last_activity_ms, cursor.conversation_id)
            })
        })
        .collect();
    listed.sort_by_key(|head| std::cmp::Reverse((head.last_activity_ms, head.id)));
    listed.truncate(limit);
    let blocked = &blocked_in_groups(inner, user, listed.iter()).await?;
    stream::iter(listed)
        .map(|head| async move {
            let member = member(inner, head.id, user).await?;
            complete(inner, &head, user, member, blocked).await
        })
        .buffered(PARALLEL_READS)
        .try_collect()
        .await
}

/// Moves one device's cursors forward, clamped to what the user may see.
pub(super) async fn ack_delivered(
    inner: &Inner,
    user: &str,
    device: &str,
    cursors: Vec<(Uuid, u64)>,
) -> Result<Vec<(Uuid, u64)>> {
    let mut stored = Vec::with_capacity(cursors.len());
    for (id, seq) in cursors {
        // Within the kept head of a conversation the user is a member of,
        // the cursor needs no clamp (see `head::Heads`).
        let kept = inner.heads.get(id).filter(|head| head.last_seq >= seq && head.roster.contains_key(user));
        let wanted = match kept {
            Some(_) => seq,
            None => {
                let (membership, head) =
                    futures::future::try_join(member(inner, id, user), head(inner, id, false)).await?;
                let Some(membership) = membership else { continue };
                let limit = match membership.removed_seq {
                    Some(removed) => removed,
                    None => head.map_or(0, |head| head.last_seq),
                };
                seq.min(limit)
            }
        };
        let wanted = seq_value(wanted);
        // The value is its own timestamp: the largest cursor wins, whatever
        // the order of writes. The read sees the cursor before or after this
        // write; either way the larger of it and `wanted` is what it holds after.
        let s = &inner.statements;
        let (_, _, value) = futures::future::try_join3(
            inner.run(&s.cursor_advance, (wanted, wanted, user, device, id)),
            inner.run(&s.member_delivered, (wanted, wanted, id, user)),
            inner.first::<3, (Option<i64>,)>(&s.cursor_read, (user, device, id)),
        )
        .await?;
        let value = value.and_then(|(value,)| value).unwrap_or(0).max(wanted).max(0) as u64;
        stored.push((id, value));
    }
    Ok(stored)
}

pub(super) async fn mark_read(inner: &Inner, id: Uuid, user: &str, seq: u64) -> Result<crate::store::ReadMark> {
    let head = head(inner, id, false).await?.ok_or(Error::ConversationNotFound)?;
    let membership = member(inner, id, user).await?;
    if !head.roster.contains_key(user) {
        return Err(if membership.is_some() { Error::NoLongerMember } else { Error::ConversationNotFound });
    }
    let before = membership.as_ref().map_or(0, |m| m.read_seq);
    let wanted = seq.min(head.last_seq);
    if wanted <= before {
        return Ok(crate::store::ReadMark { read_seq: before, moved: false });
    }
    let value = seq_value(wanted);
    inner.run(&inner.statements.member_read_seq, (value, value, id, user)).await?;
    let stored = member(inner, id, user).await?.map_or(0, |m| m.read_seq);
    Ok(crate::store::ReadMark { read_seq: stored.max(wanted), moved: true })
}

/// Entries after the device's cursor in each membership (current or ended),
/// within what the member may see, ordered by (conversation, seq).
pub(super) async fn sync(
    inner: &Inner,
    user: &str,
    device: &str,
    only: Option<Uuid>,
    after: Option<SyncCursor>,
    limit: usize,
) -> Result<Vec<StoredMessage>> {
    let mut found = Vec::new();
    if limit == 0 {
        return Ok(found);
    }
    let rows: Vec<(Uuid, Option<i64>)> = inner.paged(&inner.statements.device_cursors_read, (user, device)).await?;
    let delivered: HashMap<Uuid, u64> =
        rows.into_iter().map(|(id, seq)| (id, seq.unwrap_or(0).max(0) as u64)).collect();
    let memberships: Vec<InboxRow> = memberships(inner, user)
        .await?
        .into_iter()
        .filter(|row| only.is_none_or(|id| row.conversation_id == id))
        .filter(|row| after.is_none_or(|cursor| row.conversation_id >= cursor.conversation_id))
        .collect();
    for chunk in memberships.chunks(PARALLEL_READS) {
        let chunk_heads = heads(inner, chunk.iter().map(|row| row.conversation_id).collect()).await?;
        for (membership, head) in chunk.iter().zip(chunk_heads) {
            let Some(head) = head else { continue };
            let cursor = delivered.get(&membership.conversation_id).copied().unwrap_or(0);
            let removed = removed_as_of_head(membership.removed(), user, &head);
            let mut ranges = membership.earlier();
            ranges.push(SeqBounds { from: membership.joined(), to: removed });
            for bounds in Visible::new(ranges).ranges() {
                let upper = bounds.to.unwrap_or(head.last_seq).min(head.last_seq);
                let mut lower = (cursor + 1).max(bounds.from);
                if let Some(position) = after
                    && position.conversation_id == membership.conversation_id
                {
                    lower = lower.max(position.seq.saturating_add(1));
                }
                if upper < lower.max(1) {
                    continue;
                }
                let wanted = limit - found.len();
                let part = range(inner, head.id, lower.max(1), upper, wanted, false).await?;
                // Short of `upper` (a row not readable yet): the next range
                // waits, or a device would pass the missing seq.
                let short = part.len() < wanted && part.last().is_none_or(|last| last.seq < upper);
                found.extend(part);
                if found.len() >= limit {
                    return Ok(found);
                }
                if short {
                    break;
                }
            }
        }
    }
    Ok(found)
}

pub(super) async fn blocked_users(inner: &Inner, user: &str, limit: usize) -> Result<Vec<BlockedUser>> {
    let rows: Vec<(String, Option<i64>)> = inner.paged(&inner.statements.blocks_read, (user,)).await?;
    let mut users: Vec<BlockedUser> =
        rows.into_iter().map(|(user_id, at)| BlockedUser { user_id, blocked_at_ms: at.unwrap_or_default() }).collect();
    users.sort_by(|a, b| (a.blocked_at_ms, &a.user_id).cmp(&(b.blocked_at_ms, &b.user_id)));
    users.truncate(limit);
    Ok(users)
}

pub(super) async fn blocks_between(inner: &Inner, a: &str, b: &str) -> Result<Blocks> {
    let read = |user: &str, target: &str| {
        let (user, target) = (user.to_owned(), target.to_owned());
        async move {
            let found: Option<(String,)> = inner.first(&inner.statements.block_read, (user, target)).await?;
            Ok::<_, Error>(found.is_some())
        }
    };
    let (a_blocked_b, b_blocked_a) = futures::future::try_join(read(a, b), read(b, a)).await?;
    Ok(Blocks { a_blocked_b, b_blocked_a })
}
