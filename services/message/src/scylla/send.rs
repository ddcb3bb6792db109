//! Sends: a per-conversation batcher in front of one head LWT per batch.
//!
//! Concurrent sends to one conversation queue up here; one task per
//! conversation drains the queue, up to `max_reservation` sends at a time:
//! membership check against the head's roster, a dedupe claim per message
//! (in parallel), reply checks, ONE LWT reserving the whole seq range, then
//! each reserved seq recorded in its claim and the rows in unlogged
//! single-partition batches, and only then the answers. The task is detached from the callers, so a caller that gives up
//! cannot interrupt a batch between its reservation and its rows.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ::scylla::statement::batch::BatchType;
use futures::future::join_all;
use tokio::sync::oneshot;
use tracing::warn;
use uuid::Uuid;

use super::{
    BatchBuilder, Inner,
    head::{declare_lost, now_micros, stale_lock, takeover_after_ms},
    reads::{self, head, member, message_at},
    rows::{Head, NewRow, chunks, execution_error, outcome_unknown, seq_value},
};
use crate::{
    error::{Error, Result},
    policy,
    store::{Appended, Kind, NewMessage, SendOutcome, StoredMessage},
    visibility,
};

/// Seq reservations that did not apply at once (another writer took the
/// head first, or the outcome was unknown) and were tried again.
fn seq_conflicts() -> &'static messenger_platform::metrics::Counter<u64> {
    static CONFLICTS: std::sync::OnceLock<messenger_platform::metrics::Counter<u64>> = std::sync::OnceLock::new();
    CONFLICTS.get_or_init(|| {
        messenger_platform::metrics::meter()
            .u64_counter("messenger.message.scylla.seq_conflicts")
            .with_description("Seq reservations (LWT on the conversation head) that lost or were unknown, then retried")
            .build()
    })
}
/// Most messages written in one logged batch; their bytes are bounded by
/// `batch_max_bytes`, counting each row's body plus `ROW_BYTES` for its
/// other columns (ids, sender, client message id) and its dedupe update.
const BATCH_ROWS: usize = 64;
pub(super) const ROW_BYTES: usize = 400;

/// Tests: holds the rows of the send with this client message id.
#[cfg(test)]
#[derive(Clone)]
pub(crate) struct HoldRows {
    pub client_msg_id: String,
    pub reached: Arc<tokio::sync::Notify>,
    pub release: Arc<tokio::sync::Notify>,
}

#[cfg(test)]
async fn hold_rows(inner: &Inner, client_msg_ids: impl Iterator<Item = &str>) {
    // A slow write path: rows of concurrent writers land out of order.
    let jitter = inner.row_jitter_ms.load(std::sync::atomic::Ordering::SeqCst);
    if jitter > 0 {
        let wait = Uuid::new_v4().as_u128() as u64 % jitter;
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
    let hold = inner.hold_rows.lock().unwrap().clone();
    if let Some(hold) = hold
        && client_msg_ids.into_iter().any(|id| id == hold.client_msg_id)
    {
        hold.reached.notify_one();
        hold.release.notified().await;
    }
}

struct Pending {
    message: NewMessage,
    reply: oneshot::Sender<Result<SendOutcome>>,
}

/// Queued sends per conversation. A conversation has an entry exactly while
/// a task drains it, so a send either joins a running task's queue or starts one.
#[derive(Default)]
pub(crate) struct Batcher {
    queues: Mutex<HashMap<Uuid, VecDeque<Pending>>>,
}

pub(super) async fn send(inner: &Arc<Inner>, message: NewMessage) -> Result<SendOutcome> {
    let id = message.conversation_id;
    let (reply, answer) = oneshot::channel();
    let start = {
        let mut queues = inner.batcher.queues.lock().unwrap_or_else(|e| e.into_inner());
        match queues.get_mut(&id) {
            Some(queue) => {
                queue.push_back(Pending { message, reply });
                false
            }
            None => {
                queues.insert(id, VecDeque::from([Pending { message, reply }]));
                true
            }
        }
    };
    if start {
        let inner = inner.clone();
        tokio::spawn(async move { drain(inner, id).await });
    }
    answer.await.map_err(|_| Error::Unavailable("the send was dropped; retry".into()))?
}

/// Removes the conversation's queue if the draining task ends early (a
/// panic): its waiters are answered by their dropped senders.
struct DrainGuard {
    inner: Arc<Inner>,
    id: Uuid,
    done: bool,
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        if !self.done {
            self.inner.batcher.queues.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
        }
    }
}

async fn drain(inner: Arc<Inner>, id: Uuid) {
    let mut guard = DrainGuard { inner: inner.clone(), id, done: false };
    loop {
        let batch: Vec<Pending> = {
            let mut queues = inner.batcher.queues.lock().unwrap_or_else(|e| e.into_inner());
            let Some(queue) = queues.get_mut(&id) else { break };
            if queue.is_empty() {
                queues.remove(&id);
                break;
            }
            let take = queue.len().min(inner.options.max_reservation);
            queue.drain(..take).collect()
        };
        send_batch(&inner, id, batch).await;
    }
    guard.done = true;
}

/// What the dedupe claim found.
enum Claim {
    Ours,
    Duplicate(Box<StoredMessage>),
}

/// One distinct (sender, client_msg_id) of a batch, and the waiters for it
/// (a client may resend before its first attempt was answered).
struct Send {
    message: NewMessage,
    waiters: Vec<oneshot::Sender<Result<SendOutcome>>>,
}

impl Send {
    fn answer(self, outcome: Result<Appended, Error>, created: bool) {
        let mut first = true;
        for waiter in self.waiters {
            let answer = match &outcome {
                Ok(appended) if created && first => Ok(SendOutcome::Created(appended.clone())),
                Ok(appended) => Ok(SendOutcome::Duplicate(appended.clone())),
                Err(error) => Err(error.clone()),
            };
            first = false;
            // A caller that gave up no longer listens; the message is stored all the same.
            let _ = waiter.send(answer);
        }
    }

    fn fail(self, error: Error) {
        self.answer(Err(error), false);
    }
}

async fn send_batch(inner: &Inner, id: Uuid, batch: Vec<Pending>) {
    let started = Instant::now();
    let mut sends: Vec<Send> = Vec::with_capacity(batch.len());
    for pending in batch {
        let key = (&pending.message.sender, &pending.message.client_msg_id);
        match sends.iter_mut().find(|s| (&s.message.sender, &s.message.client_msg_id) == key) {
            Some(same) => same.waiters.push(pending.reply),
            None => sends.push(Send { message: pending.message, waiters: vec![pending.reply] }),
        }
    }
    // The head this instance kept saves the serial read: the reservation's
    // LWT checks it (`IF last_seq = ?`), and re-reads only if it was stale.
    // A sender the kept roster does not list may have been added on another
    // instance since: only a fresh head may refuse it.
    let kept = inner.heads.get(id).filter(|kept| sends.iter().all(|s| kept.roster.contains_key(&s.message.sender)));
    let from_kept = kept.is_some();
    let head = match kept {
        Some(kept) => Head::clone(&kept),
        None => match fresh_head(inner, id).await {
            Ok(Some(head)) => head,
            Ok(None) => return sends.into_iter().for_each(|s| s.fail(Error::ConversationNotFound)),
            Err(error) => return sends.into_iter().for_each(|s| s.fail(error.clone())),
        },
    };
    // Membership first, so a non-member never leaves a claim behind.
    let mut members = Vec::with_capacity(sends.len());
    for send in sends {
        match sender_error(inner, &head, &send.message.sender).await {
            None => members.push(send),
            Some(error) => send.fail(error),
        }
    }
    // Claims, in parallel: distinct partitions.
    let claims = join_all(members.iter().map(|s| claim(inner, &s.message))).await;
    let mut accepted = Vec::with_capacity(members.len());
    for (send, claim) in members.into_iter().zip(claims) {
        match claim {
            Ok(Claim::Ours) => accepted.push(send),
            Ok(Claim::Duplicate(original)) => {
                // Its audience among the memberships of now, by their ranges
                // (a read only on this path: retries are rare).
                let appended = match reads::current_members(inner, id).await {
                    Ok(members) => visibility::appended(*original, &members),
                    Err(error) => {
                        // The retry is answered all the same; only its repeat fan-out is lost.
                        warn!(%error, conversation_id = %id, "a retried send's audience unread; not fanned out again");
                        visibility::appended(*original, &[])
                    }
                };
                send.answer(Ok(appended), false)
            }
            Err(error) => send.fail(error),
        }
    }
    let mut checked = Vec::with_capacity(accepted.len());
    for send in accepted {
        match check_reply(inner, id, &send.message).await {
            Ok(()) => checked.push(send),
            Err(error) => {
                release(inner, &send.message).await;
                send.fail(error);
            }
        }
    }
    if checked.is_empty() {
        return;
    }
    let (first_seq, stamp, checked, roster) = match reserve(inner, head, from_kept, checked, started).await {
        Ok(reserved) => reserved,
        Err((sends, error)) => {
            inner.heads.forget(id);
            return give_up(inner, sends, error).await;
        }
    };
    // Stamped at the reservation, not at receipt: readers judge a missing
    // seq lost by the age of the next row, and a stamp from before queueing
    // could be older than the reservation by any queue wait.
    let entries: Vec<(StoredMessage, Send)> = checked
        .into_iter()
        .enumerate()
        .map(|(offset, send)| {
            let mut entry = entry(&send.message, first_seq + offset as u64);
            entry.sent_at_ms = stamp.millis();
            (entry, send)
        })
        .collect();
    write_and_answer(inner, entries, stamp, roster).await;
}

/// When a batch's seqs were reserved, taken just before the head LWT that
/// reserved them: on this instance's wall clock (its rows' write timestamp
/// and `sent_at_ms`, which readers compare with theirs) and on its monotonic
/// clock (the budgets the writer keeps).
#[derive(Clone, Copy)]
pub(super) struct Stamp {
    micros: i64,
    at: Instant,
}

impl Stamp {
    fn now() -> Stamp {
        Stamp { micros: now_micros(), at: Instant::now() }
    }

    fn millis(self) -> i64 {
        self.micros / 1000
    }
}

/// The head at serial consistency, kept for the next batch; a change whose
/// writer stopped is completed first by whoever comes next.
async fn fresh_head(inner: &Inner, id: Uuid) -> Result<Option<Head>> {
    let Some(head) = head(inner, id, true).await? else { return Ok(None) };
    if stale_lock(inner, &head, messenger_platform::ids::now_ms())
        && let Err(error) = super::apply::roll_forward(inner, &head).await
    {
        warn!(%error, conversation_id = %id, "cannot complete an unfinished change yet");
    }
    inner.heads.keep(head.clone());
    Ok(Some(head))
}

/// The first seq a reservation of `head` up to `last` took and the roster it
/// was made against; the head as the reservation left it is kept.
fn reserved(inner: &Inner, mut head: Head, last: u64, activity: i64, token: Uuid) -> (u64, Vec<String>) {
    let first = head.last_seq + 1;
    let roster = head.roster.keys().cloned().collect();
    head.last_seq = last;
    head.last_activity_ms = activity;
    head.last_reservation = Some(token);
    inner.heads.keep(head);
    (first, roster)
}

/// Why `user` may not send, judged by the roster in the head.
async fn sender_error(inner: &Inner, head: &Head, user: &str) -> Option<Error> {
    if head.roster.contains_key(user) {
        return None;
    }
    match member(inner, head.id, user).await {
        Ok(Some(_)) => Some(Error::NoLongerMember),
        Ok(None) => Some(Error::ConversationNotFound),
        Err(error) => Some(error),
    }
}

async fn claim(inner: &Inner, message: &NewMessage) -> Result<Claim> {
    let s = &inner.statements;
    let ttl = inner.options.dedupe_ttl_seconds();
    let (id, sender, client) = (message.conversation_id, message.sender.as_str(), message.client_msg_id.as_str());
    let mut attempts = 0;
    loop {
        let now = messenger_platform::ids::now_ms();
        let outcome = inner.lwt(&s.dedupe_claim, (id, sender, client, message.message_id, now, ttl)).await?;
        let lwt = match outcome {
            Ok(lwt) => lwt,
            // Retrying is safe: a claim carrying our own message id is ours.
            Err(error) if outcome_unknown(&error) && attempts < 3 => {
                attempts += 1;
                continue;
            }
            Err(error) => return Err(execution_error(error)),
        };
        if lwt.applied {
            return Ok(Claim::Ours);
        }
        let holder = lwt.uuid("message_id");
        let claimed_at = lwt.bigint("claimed_at_ms").unwrap_or(0);
        // Twice the holder's budget: it reserves within `lock_timeout / 2` of
        // its claim and acknowledges rows only within `lock_timeout` of its
        // reservation, so a claim this old has no writer that may still succeed.
        let stale = now.saturating_sub(claimed_at) > takeover_after_ms(inner);
        if let Some(seq) = lwt.bigint("seq") {
            let seq = seq.max(0) as u64;
            let original = message_at(inner, id, seq).await?.map(|(message, _)| message);
            match original {
                Some(original) if original.sender == sender && original.client_msg_id == client => {
                    return Ok(Claim::Duplicate(Box::new(original)));
                }
                Some(_) => return Err(Error::Storage(format!("seq {seq} holds another message than its claim"))),
                None if !stale || attempts >= 3 => {
                    return Err(Error::Unavailable("the original of this message is being stored; retry".into()));
                }
                None => {}
            }
            attempts += 1;
            // Its holder stopped between recording the seq and writing the
            // row: the seq is lost, shadowed first so a late row never shows,
            // then the claim is ours for a new seq.
            declare_lost(inner, id, seq, seq).await?;
            let takeover = (ttl, message.message_id, now, id, sender, client, holder, seq_value(seq));
            if let Ok(lwt) = inner.lwt(&s.dedupe_takeover_lost, takeover).await?
                && lwt.applied
            {
                return Ok(Claim::Ours);
            }
            continue;
        }
        if holder == Some(message.message_id) {
            return Ok(Claim::Ours);
        }
        if !stale || attempts >= 3 {
            return Err(Error::Unavailable("an earlier attempt of this message is in flight; retry".into()));
        }
        attempts += 1;
        // Its holder stopped before recording a seq: take the claim over.
        let takeover = (ttl, message.message_id, now, id, sender, client, holder);
        if let Ok(lwt) = inner.lwt(&s.dedupe_takeover, takeover).await?
            && lwt.applied
        {
            return Ok(Claim::Ours);
        }
    }
}

/// Gives a claim up (the send failed before its seq was reserved), so the
/// client's retry is not refused as in flight. Best effort: a claim left
/// behind is taken over after `lock_timeout`.
async fn release(inner: &Inner, message: &NewMessage) {
    let values = (message.conversation_id, message.sender.as_str(), message.client_msg_id.as_str(), message.message_id);
    match inner.lwt(&inner.statements.dedupe_release, values).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => warn!(%error, conversation_id = %message.conversation_id, "cannot release a send claim"),
        Err(error) => warn!(%error, conversation_id = %message.conversation_id, "cannot release a send claim"),
    }
}

async fn check_reply(inner: &Inner, id: Uuid, message: &NewMessage) -> Result<()> {
    if message.reply_to_seq == 0 {
        return Ok(());
    }
    let Some(sender) = member(inner, id, &message.sender).await? else {
        return Err(Error::Unavailable("the membership is being stored; retry".into()));
    };
    let target = message_at(inner, id, message.reply_to_seq).await?.map(|(message, _)| message);
    policy::target(&sender, target.as_ref(), message.reply_to_seq).map_err(|_| {
        Error::InvalidArgument(format!("reply_to_seq {} is not a message you can see", message.reply_to_seq))
    })?;
    Ok(())
}

/// Reserves one seq per send with the head LWT; returns the first seq, the
/// stamp taken before the LWT that reserved it, the sends still accepted
/// and the active roster the reservation was made against (the LWT
/// guards it, so it is exactly who was a member at those seqs). Sends refused on the way are answered here; on failure the
/// rest come back with the error to answer them with.
async fn reserve(
    inner: &Inner,
    mut head: Head,
    from_kept: bool,
    mut sends: Vec<Send>,
    started: Instant,
) -> Result<(u64, Stamp, Vec<Send>, Vec<String>), (Vec<Send>, Error)> {
    let token = Uuid::now_v7();
    let budget = inner.options.lock_timeout / 2;
    // A first try on a kept head that another instance moved is not one of
    // the `lwt_max_retries` conflicts: it stood for the serial read.
    let mut attempt = 0;
    let retries = inner.options.lwt_max_retries + u32::from(from_kept);
    loop {
        if sends.is_empty() {
            return Err((sends, Error::NoLongerMember));
        }
        if attempt >= retries || started.elapsed() > budget {
            let error = Error::Unavailable("the conversation is too busy; retry".into());
            return Err((sends, error));
        }
        attempt += 1;
        let count = sends.len() as u64;
        let last = head.last_seq + count;
        let activity = sends.iter().map(|s| s.message.sent_at_ms).max().unwrap_or(0).max(head.last_activity_ms);
        let values = (seq_value(last), activity, token, head.id, seq_value(head.last_seq));
        let stamp = Stamp::now();
        let applied = match inner.lwt(&inner.statements.head_reserve, values).await {
            Ok(Ok(lwt)) => lwt.applied,
            Ok(Err(error)) if outcome_unknown(&error) => false,
            Ok(Err(error)) => return Err((sends, execution_error(error))),
            Err(error) => return Err((sends, error)),
        };
        if applied {
            let (first, roster) = reserved(inner, head, last, activity, token);
            return Ok((first, stamp, sends, roster));
        }
        seq_conflicts().add(1, &[]);
        // Lost to another writer, or the outcome is unknown: the serial read
        // completes any LWT in progress and tells which.
        let current = match reads::head(inner, head.id, true).await {
            Ok(Some(current)) => current,
            Ok(None) => return Err((sends, Error::ConversationNotFound)),
            Err(error) => return Err((sends, error)),
        };
        if current.last_reservation == Some(token) && current.last_seq == last {
            let (first, roster) = reserved(inner, head, last, activity, token);
            return Ok((first, stamp, sends, roster));
        }
        inner.heads.keep(current.clone());
        if current.last_seq > head.last_seq && current.last_reservation != Some(token) {
            tokio::time::sleep(Duration::from_millis(u64::from(attempt.min(10)))).await;
        }
        head = current;
        // Senders removed meanwhile are refused now, as the head says.
        let mut still = Vec::with_capacity(sends.len());
        for send in sends {
            if head.roster.contains_key(&send.message.sender) {
                still.push(send);
            } else {
                release(inner, &send.message).await;
                send.fail(Error::NoLongerMember);
            }
        }
        sends = still;
    }
}

async fn give_up(inner: &Inner, sends: Vec<Send>, error: Error) {
    join_all(sends.iter().map(|s| release(inner, &s.message))).await;
    sends.into_iter().for_each(|s| s.fail(error.clone()));
}

fn entry(message: &NewMessage, seq: u64) -> StoredMessage {
    let mut entry = StoredMessage::event(message.conversation_id, &message.sender, Kind::Text, message.sent_at_ms);
    entry.seq = seq;
    entry.message_id = message.message_id;
    entry.client_msg_id = message.client_msg_id.clone();
    entry.body = message.body.clone();
    entry.reply_to_seq = message.reply_to_seq;
    entry.attachments = message.attachments.clone();
    entry
}

/// Writes the reserved entries and answers. Each entry's seq is first
/// recorded in its claim (so whoever takes the claim over knows which seq to
/// declare lost), then the rows go in one batch per bucket chunk (a single
/// partition: atomic without the batchlog), timestamped at the reservation.
///
/// The writer keeps two budgets from the stamp, which make "lost" safe to
/// declare (see the known gaps in `scylla.rs`): it writes no row once
/// `lock_timeout / 2` has passed, and acknowledges none written after
/// `lock_timeout` (the client retries and finds the original or a lost seq).
async fn write_and_answer(inner: &Inner, entries: Vec<(StoredMessage, Send)>, stamp: Stamp, roster: Vec<String>) {
    let ttl = inner.options.dedupe_ttl_seconds();
    let s = &inner.statements;
    let budget = inner.options.lock_timeout;
    let late = || Error::Unavailable("the conversation is too busy; retry".into());
    let records = entries.iter().map(|(entry, _)| {
        let key = (entry.conversation_id, entry.sender.clone(), entry.client_msg_id.clone());
        inner.run(&s.dedupe_commit, (ttl, stamp.micros, seq_value(entry.seq), key.0, key.1, key.2))
    });
    let records = join_all(records).await;
    let mut recorded = Vec::with_capacity(entries.len());
    for (entry, result) in entries.into_iter().zip(records) {
        match result {
            Ok(()) => recorded.push(entry),
            Err(error) => {
                warn!(%error, seq = entry.0.seq, "cannot record a reserved seq; it stays without a row");
                release(inner, &entry.1.message).await;
                entry.1.fail(error);
            }
        }
    }
    let size = |(entry, _): &(StoredMessage, Send)| entry.body.len() + entry.attachments.len() * 512 + ROW_BYTES;
    let groups = chunks(recorded, |(entry, _)| entry.seq, size, BATCH_ROWS, inner.options.batch_max_bytes);
    let writes = groups.into_iter().map(|group| async move {
        if stamp.at.elapsed() > budget / 2 {
            return (group, Err(late()), false);
        }
        let mut batch = BatchBuilder::new(BatchType::Unlogged);
        batch.timestamp(stamp.micros);
        for (entry, _) in &group {
            batch.push(&s.message_insert, NewRow::from(entry));
        }
        #[cfg(test)]
        hold_rows(inner, group.iter().map(|(entry, _)| entry.client_msg_id.as_str())).await;
        let result = batch.write(inner).await;
        let result = match result {
            Ok(()) if stamp.at.elapsed() > budget => Err(late()),
            other => other,
        };
        (group, result, true)
    });
    let mut stored = Vec::new();
    for (group, result, written) in join_all(writes).await {
        match result {
            Ok(()) => stored.extend(group),
            Err(error) => {
                let seqs: Vec<u64> = group.iter().map(|(entry, _)| entry.seq).collect();
                warn!(%error, ?seqs, written, "reserved seqs left without acknowledged rows");
                for (_, send) in group {
                    // Nothing written: the retry needs no takeover.
                    if !written {
                        release(inner, &send.message).await;
                    }
                    send.fail(error.clone());
                }
            }
        }
    }
    if stored.is_empty() {
        return;
    }
    // Whoever sends has read up to its own message, and has taken part.
    let mut read: HashMap<&str, u64> = HashMap::new();
    for (entry, _) in &stored {
        let seq = read.entry(entry.sender.as_str()).or_default();
        *seq = (*seq).max(entry.seq);
    }
    let cursors = read.iter().map(|(user, seq)| {
        let value = seq_value(*seq);
        inner.run(&s.member_sent, (value, value, true, stored[0].0.conversation_id, *user))
    });
    for result in join_all(cursors).await {
        if let Err(error) = result {
            warn!(%error, "cannot move a sender's read cursor");
        }
    }
    drop(read);
    // Every entry of the batch is a message reserved against one roster.
    let audience = visibility::audience_of_active(&stored[0].0, roster);
    for (entry, send) in stored {
        send.answer(Ok(Appended { entry, audience: audience.clone(), withheld_from: Arc::default() }), true);
    }
}
