//! Store latency per operation: a `MessageStore` that times every call of
//! the store it wraps (`messenger.message.store.duration`, by operation and
//! backend). It sits under the cache, so it times what reaches the store.

use std::{
    sync::{Arc, OnceLock},
    time::Instant,
};

use async_trait::async_trait;
use messenger_platform::metrics;
use uuid::Uuid;

use crate::{
    error::Result,
    store::{
        Appended, BlockedUser, Blocks, ChangeRequest, Conversation, DeviceCursors, HistoryRange, InboxCursor, Member,
        MessageStore, NewGroup, NewMessage, ReadMark, SendOutcome, SeqBounds, StoredMessage, SyncCursor,
    },
};

fn durations() -> &'static metrics::Histogram<f64> {
    static DURATIONS: OnceLock<metrics::Histogram<f64>> = OnceLock::new();
    DURATIONS.get_or_init(|| {
        metrics::meter()
            .f64_histogram("messenger.message.store.duration")
            .with_unit("s")
            .with_description("Message store calls by operation and backend, errors included")
            .with_boundaries(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
            ])
            .build()
    })
}

pub struct TimedStore {
    inner: Arc<dyn MessageStore>,
    backend: &'static str,
}

impl TimedStore {
    /// `backend` labels the figures (`sqlite`, `scylla`).
    pub fn new(inner: Arc<dyn MessageStore>, backend: &'static str) -> Self {
        Self { inner, backend }
    }

    async fn timed<T>(&self, operation: &'static str, call: impl Future<Output = T>) -> T {
        let started = Instant::now();
        let result = call.await;
        let labels = [metrics::KeyValue::new("operation", operation), metrics::KeyValue::new("store", self.backend)];
        durations().record(started.elapsed().as_secs_f64(), &labels);
        result
    }
}

#[async_trait]
impl MessageStore for TimedStore {
    async fn get_or_create_direct(&self, user: &str, peer: &str, id: Uuid, now_ms: i64) -> Result<Conversation> {
        self.timed("get_or_create_direct", self.inner.get_or_create_direct(user, peer, id, now_ms)).await
    }

    async fn create_group(&self, group: NewGroup, max_group_size: usize) -> Result<(Conversation, Appended)> {
        self.timed("create_group", self.inner.create_group(group, max_group_size)).await
    }

    async fn conversation_for_member(&self, id: Uuid, user: &str) -> Result<Option<Conversation>> {
        self.timed("conversation_for_member", self.inner.conversation_for_member(id, user)).await
    }

    async fn member(&self, id: Uuid, user: &str) -> Result<Option<Member>> {
        self.timed("member", self.inner.member(id, user)).await
    }

    async fn active_member_ids(&self, id: Uuid) -> Result<Arc<Vec<String>>> {
        self.timed("active_member_ids", self.inner.active_member_ids(id)).await
    }

    async fn members(&self, id: Uuid) -> Result<Vec<Member>> {
        self.timed("members", self.inner.members(id)).await
    }

    async fn send(&self, message: NewMessage) -> Result<SendOutcome> {
        self.timed("send", self.inner.send(message)).await
    }

    async fn apply(&self, request: ChangeRequest) -> Result<Vec<Appended>> {
        self.timed("apply", self.inner.apply(request)).await
    }

    async fn history(
        &self,
        id: Uuid,
        range: HistoryRange,
        visible: SeqBounds,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        self.timed("history", self.inner.history(id, range, visible, limit)).await
    }

    async fn list_conversations(
        &self,
        user: &str,
        after: Option<InboxCursor>,
        limit: usize,
    ) -> Result<Vec<Conversation>> {
        self.timed("list_conversations", self.inner.list_conversations(user, after, limit)).await
    }

    async fn ack_delivered(&self, user: &str, device: &str, cursors: Vec<(Uuid, u64)>) -> Result<Vec<(Uuid, u64)>> {
        self.timed("ack_delivered", self.inner.ack_delivered(user, device, cursors)).await
    }

    async fn ack_delivered_many(&self, acks: Vec<DeviceCursors>) -> Result<Vec<DeviceCursors>> {
        self.timed("ack_delivered_many", self.inner.ack_delivered_many(acks)).await
    }

    async fn mark_read(&self, id: Uuid, user: &str, seq: u64) -> Result<ReadMark> {
        self.timed("mark_read", self.inner.mark_read(id, user, seq)).await
    }

    async fn sync(
        &self,
        user: &str,
        device: &str,
        only: Option<Uuid>,
        after: Option<SyncCursor>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        self.timed("sync", self.inner.sync(user, device, only, after, limit)).await
    }

    async fn block(&self, user: &str, target: &str, now_ms: i64) -> Result<bool> {
        self.timed("block", self.inner.block(user, target, now_ms)).await
    }

    async fn unblock(&self, user: &str, target: &str) -> Result<bool> {
        self.timed("unblock", self.inner.unblock(user, target)).await
    }

    async fn blocked_users(&self, user: &str, limit: usize) -> Result<Vec<BlockedUser>> {
        self.timed("blocked_users", self.inner.blocked_users(user, limit)).await
    }

    async fn blocks_between(&self, a: &str, b: &str) -> Result<Blocks> {
        self.timed("blocks_between", self.inner.blocks_between(a, b)).await
    }

    async fn blocked_by(&self, user: &str) -> Result<Vec<String>> {
        self.timed("blocked_by", self.inner.blocked_by(user)).await
    }
}
