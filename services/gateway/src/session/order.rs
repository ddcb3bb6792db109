//! What one session pushes, in which order, and what it holds back.
//!
//! Invariant: a device receives each conversation's entries in seq order
//! with no gaps, starting after its delivered cursor, and is never pushed
//! past a seq it could not be given yet (not readable in the store for the
//! moment), or its cursor would skip that seq. `last_sent` remembers the
//! highest seq pushed per conversation: a live entry at or below it is a
//! duplicate and skipped, one above `last + 1` first pulls the missing range
//! from history, and what history cannot supply yet is held back and tried
//! again at the next gap retry. So a failed or overflowing live path costs a
//! fetch, never a lost or reordered entry.
//!
//! The message service is reached through [`Backlog`] (the gRPC client in
//! production, a fake in the tests below).

use std::{collections::HashMap, future::Future};

use messenger_platform::{discovery::RoleChannel, ids};
use messenger_proto::v1::{self as pb, message_service_client::MessageServiceClient};
use tonic::{Code, Status};
use tracing::debug;

use super::{End, Outlet, watch::session_metrics};

/// What a session's catch-up asks the message service.
pub(crate) trait Backlog: Send + Sync {
    /// One page of what the device has not acked (every conversation, or
    /// `only`), with the next page's token ("" at the end).
    fn sync(
        &self,
        only: Option<&str>,
        page_token: String,
        limit: u32,
    ) -> impl Future<Output = Result<(Vec<pb::Message>, String), Status>> + Send;

    /// Up to `limit` entries of a conversation after seq `after`, as the
    /// user may see them.
    fn after(
        &self,
        conversation_id: &str,
        after: u64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<pb::Message>, Status>> + Send;
}

/// The message service over gRPC, for one device.
pub(crate) struct GrpcBacklog {
    pub(crate) message: MessageServiceClient<RoleChannel>,
    pub(crate) user: String,
    pub(crate) device: String,
}

impl Backlog for GrpcBacklog {
    async fn sync(
        &self,
        only: Option<&str>,
        page_token: String,
        limit: u32,
    ) -> Result<(Vec<pb::Message>, String), Status> {
        let request = pb::SyncRequest {
            user_id: self.user.clone(),
            device_id: self.device.clone(),
            limit,
            page_token,
            conversation_id: only.unwrap_or_default().to_owned(),
        };
        let response = self.message.clone().sync(request).await?.into_inner();
        Ok((response.messages, response.next_page_token))
    }

    async fn after(&self, conversation_id: &str, after: u64, limit: u32) -> Result<Vec<pb::Message>, Status> {
        let request = pb::MessageHistoryRequest {
            user_id: self.user.clone(),
            conversation_id: conversation_id.to_owned(),
            before_seq: 0,
            after_seq: Some(after),
            limit,
        };
        let routed = messenger_platform::discovery::routed(conversation_id, request);
        Ok(self.message.clone().history(routed).await?.into_inner().messages)
    }
}

/// A message-service failure the session outlives: the catch-up is tried
/// again at the next gap retry, and the stream stays open.
pub(super) fn transient(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded)
}

/// One session's delivery order.
pub(super) struct Delivery<B> {
    backlog: B,
    outlet: Outlet,
    /// Entries per sync or history call.
    page: u32,
    /// Per conversation, the highest seq pushed in this session.
    last_sent: HashMap<String, u64>,
    /// Per conversation, the newest live entry held back behind seqs that
    /// history could not supply yet.
    deferred: HashMap<String, u64>,
    /// Conversations whose first sync in this session stopped before the
    /// live entry that started it (a seq right after the device's cursor
    /// not readable yet): synced again until it moves, with that entry's seq.
    unsynced: HashMap<String, u64>,
    /// A whole sync the message service could not answer (unreachable for
    /// a moment): tried again at the next gap retry.
    resync_pending: bool,
}

impl<B: Backlog> Delivery<B> {
    pub(super) fn new(backlog: B, outlet: Outlet, page: u32) -> Self {
        Self {
            backlog,
            outlet,
            page,
            last_sent: HashMap::new(),
            deferred: HashMap::new(),
            unsynced: HashMap::new(),
            resync_pending: false,
        }
    }

    /// Whether anything waits for the next gap retry.
    pub(super) fn held_back(&self) -> bool {
        !self.deferred.is_empty() || !self.unsynced.is_empty() || self.resync_pending
    }

    /// Pushes an entry unless this session already sent it.
    async fn push(&mut self, message: pb::Message) -> Result<(), End> {
        let last = self.last_sent.entry(message.conversation_id.clone()).or_insert(0);
        if message.seq <= *last {
            return Ok(());
        }
        *last = message.seq;
        self.outlet.emit(pb::ServerFrame { frame: Some(pb::server_frame::Frame::Message(message)) }).await
    }

    /// Sends everything after the device's delivered cursor (every conversation, or one).
    pub(super) async fn sync(&mut self, only: Option<&str>) -> Result<(), End> {
        let mut page_token = String::new();
        loop {
            let (messages, next) = self.backlog.sync(only, page_token, self.page).await.map_err(End::Upstream)?;
            for message in messages {
                self.push(message).await?;
            }
            if next.is_empty() {
                return Ok(());
            }
            page_token = next;
        }
    }

    /// A live entry from fan-out: pushed now, after what it follows, or held back.
    pub(super) async fn live(&mut self, message: &pb::Message) -> Result<(), End> {
        let id = &message.conversation_id;
        if let Some(waiting) = self.unsynced.get_mut(id) {
            *waiting = (*waiting).max(message.seq);
            return Ok(());
        }
        if !self.last_sent.contains_key(id) {
            // First entry of this conversation in this session: start from
            // the cursor. The entry is committed, so sync returns it too
            // unless a seq between the cursor and it is not readable yet;
            // then it waits, never pushed past that seq.
            match self.sync(Some(id)).await {
                Err(End::Upstream(status)) if transient(&status) => {}
                other => other?,
            }
            if !self.last_sent.contains_key(id) {
                self.unsynced.insert(id.clone(), message.seq);
                return Ok(());
            }
        }
        match self.last_sent.get(id).copied() {
            None => Ok(()),
            Some(last) if message.seq <= last => Ok(()),
            Some(last) if message.seq == last + 1 => {
                let latency = (ids::now_ms() - message.sent_at_ms).max(0) as f64 / 1000.0;
                session_metrics().commit_to_deliver.record(latency, &[]);
                self.push(message.clone()).await
            }
            Some(last) => {
                if self.fill_gap(&message.conversation_id, last, message.seq).await? {
                    self.push(message.clone()).await?;
                } else {
                    // Earlier seqs are not readable yet (a store whose
                    // concurrent writers land out of order): held back.
                    let deferred = self.deferred.entry(message.conversation_id.clone()).or_insert(0);
                    *deferred = (*deferred).max(message.seq);
                }
                Ok(())
            }
        }?;
        self.catch_up_deferred(&message.conversation_id).await
    }

    /// Syncs every conversation; a message service unreachable for the
    /// moment leaves it for the next gap retry instead of ending the stream.
    pub(super) async fn resync(&mut self, session_id: &str) -> Result<(), End> {
        self.resync_pending = false;
        match self.sync(None).await {
            Err(End::Upstream(status)) if transient(&status) => {
                debug!(session_id, code = ?status.code(), "sync postponed: message service unavailable");
                self.resync_pending = true;
                Ok(())
            }
            other => other,
        }
    }

    /// Looks again at every conversation with live entries held back.
    pub(super) async fn retry_held_back(&mut self, session_id: &str) -> Result<(), End> {
        if self.resync_pending {
            self.resync(session_id).await?;
        }
        let unsynced: Vec<(String, u64)> = self.unsynced.drain().collect();
        for (id, newest) in unsynced {
            match self.sync(Some(&id)).await {
                Err(End::Upstream(status)) if transient(&status) => {}
                other => other?,
            }
            match self.last_sent.get(&id).copied() {
                None => {
                    self.unsynced.insert(id, newest);
                }
                Some(last) if last < newest => {
                    let deferred = self.deferred.entry(id).or_insert(0);
                    *deferred = (*deferred).max(newest);
                }
                Some(_) => {}
            }
        }
        let deferred: Vec<String> = self.deferred.keys().cloned().collect();
        for id in deferred {
            self.catch_up_deferred(&id).await?;
        }
        Ok(())
    }

    /// Pushes live entries held back behind a gap, once the gap is readable.
    async fn catch_up_deferred(&mut self, conversation_id: &str) -> Result<(), End> {
        let Some(&deferred) = self.deferred.get(conversation_id) else { return Ok(()) };
        let last = self.last_sent.get(conversation_id).copied().unwrap_or(0);
        if deferred <= last || self.fill_gap(conversation_id, last, deferred + 1).await? {
            self.deferred.remove(conversation_id);
        }
        Ok(())
    }

    /// Fetches and pushes (last, upto) exclusive, from history; false if
    /// history could not (yet) supply all of it.
    async fn fill_gap(&mut self, conversation_id: &str, mut last: u64, upto: u64) -> Result<bool, End> {
        while last + 1 < upto {
            let limit = (upto - last - 1).min(u64::from(self.page)) as u32;
            let messages = match self.backlog.after(conversation_id, last, limit).await {
                Ok(messages) => messages,
                // Removed from the conversation meanwhile, say: nothing more to show.
                Err(status) if status.code() == Code::NotFound => return Ok(true),
                // Not readable now: held back, fetched at the next gap retry.
                Err(status) if transient(&status) => return Ok(false),
                Err(status) => return Err(End::Upstream(status)),
            };
            if messages.is_empty() {
                return Ok(false);
            }
            for message in messages {
                last = last.max(message.seq);
                self.push(message).await?;
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests;
