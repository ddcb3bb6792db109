//! A read-through cache in front of any `MessageStore`: the newest history
//! page of a conversation (what opening a chat reads) and memberships (what
//! every history call checks). The embedded default keeps it in process
//! (moka); the trait keeps the door open for a shared cache.
//!
//! Consistency: every key carries its conversation's *generation*. A write
//! that changes what a key reads bumps the generation after it commits, so
//! later reads use new keys and never see the old entry; a read that raced
//! the write can only fill a key of the old generation, which nobody reads
//! again (it ages out). Generations come from one process-wide counter, so a
//! generation forgotten under memory pressure is replaced by a never-used one:
//! a miss, never a stale hit. Concurrent misses for one key share one store
//! read (moka's `get_with` runs one initializer per key).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use moka::future::Cache;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    error::{Error, Result},
    store::{
        Change, ChangeRequest, Conversation, DeviceCursors, HistoryRange, InboxCursor, Member, MessageStore, NewGroup,
        NewMessage, SendOutcome, SeqBounds, StoredMessage, SyncCursor,
    },
};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheOptions {
    pub enabled: bool,
    /// Most cached pages and memberships (each is one entry).
    pub max_entries: u64,
    /// Entries also expire after this long.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self { enabled: true, max_entries: 200_000, ttl: Duration::from_secs(600) }
    }
}

/// What a generation covers: entries (history) or memberships (roles, cursors).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Scope {
    Content,
    Membership,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    NewestPage { conversation: Uuid, generation: u64, from: u64, to: Option<u64>, limit: usize },
    Member { conversation: Uuid, generation: u64, user: String },
}

#[derive(Clone)]
enum Value {
    Page(Arc<Vec<StoredMessage>>),
    Member(Option<Member>),
}

/// Cache hits and misses, for the benchmark and for operators.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

pub struct CachedStore {
    inner: Arc<dyn MessageStore>,
    entries: Cache<Key, Value>,
    generations: Cache<(Uuid, Scope), u64>,
    next_generation: AtomicU64,
    pub stats: Arc<CacheStats>,
}

impl CachedStore {
    pub fn new(inner: Arc<dyn MessageStore>, options: &CacheOptions) -> Self {
        Self {
            inner,
            entries: Cache::builder().max_capacity(options.max_entries).time_to_live(options.ttl).build(),
            generations: Cache::builder().max_capacity(options.max_entries).build(),
            next_generation: AtomicU64::new(1),
            stats: Arc::default(),
        }
    }

    async fn generation(&self, conversation: Uuid, scope: Scope) -> u64 {
        self.generations
            .get_with((conversation, scope), async { self.next_generation.fetch_add(1, Ordering::Relaxed) })
            .await
    }

    /// After a committed write: later reads of `scope` use fresh keys.
    async fn bump(&self, conversation: Uuid, scope: Scope) {
        let fresh = self.next_generation.fetch_add(1, Ordering::Relaxed);
        self.generations.insert((conversation, scope), fresh).await;
    }

    async fn cached(&self, key: Key, load: impl std::future::Future<Output = Result<Value>>) -> Result<Value> {
        if let Some(value) = self.entries.get(&key).await {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(value);
        }
        // One store read per key however many callers miss at once; an error
        // is returned to every waiter and cached for none.
        let loaded = self
            .entries
            .try_get_with(key, async {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                load.await
            })
            .await;
        loaded.map_err(|shared: Arc<Error>| match Arc::try_unwrap(shared) {
            Ok(error) => error,
            Err(shared) => Error::Unavailable(shared.to_string()),
        })
    }
}

#[async_trait]
impl MessageStore for CachedStore {
    async fn get_or_create_direct(&self, user: &str, peer: &str, id: Uuid, now_ms: i64) -> Result<Conversation> {
        self.inner.get_or_create_direct(user, peer, id, now_ms).await
    }

    async fn create_group(&self, group: NewGroup, max_group_size: usize) -> Result<(Conversation, StoredMessage)> {
        let id = group.id;
        let created = self.inner.create_group(group, max_group_size).await;
        self.bump(id, Scope::Membership).await;
        created
    }

    async fn conversation_for_member(&self, id: Uuid, user: &str) -> Result<Option<Conversation>> {
        self.inner.conversation_for_member(id, user).await
    }

    async fn member(&self, id: Uuid, user: &str) -> Result<Option<Member>> {
        let generation = self.generation(id, Scope::Membership).await;
        let key = Key::Member { conversation: id, generation, user: user.to_owned() };
        match self.cached(key, async { Ok(Value::Member(self.inner.member(id, user).await?)) }).await? {
            Value::Member(member) => Ok(member),
            Value::Page(_) => Err(Error::Storage("cache key held the wrong kind of value".into())),
        }
    }

    async fn active_member_ids(&self, id: Uuid) -> Result<Arc<Vec<String>>> {
        self.inner.active_member_ids(id).await
    }

    async fn members(&self, id: Uuid) -> Result<Vec<Member>> {
        self.inner.members(id).await
    }

    async fn send(&self, message: NewMessage) -> Result<SendOutcome> {
        let id = message.conversation_id;
        let outcome = self.inner.send(message).await;
        if let Ok(SendOutcome::Created(_)) = &outcome {
            // The sender's read cursor moved too.
            self.bump(id, Scope::Content).await;
            self.bump(id, Scope::Membership).await;
        }
        outcome
    }

    async fn apply(&self, request: ChangeRequest) -> Result<Vec<StoredMessage>> {
        let id = request.conversation_id;
        let membership = matches!(
            request.change,
            Change::AddMembers(_) | Change::RemoveMember(_) | Change::Leave | Change::SetRole(..)
        );
        let applied = self.inner.apply(request).await;
        if applied.as_ref().is_ok_and(|entries| !entries.is_empty()) {
            self.bump(id, Scope::Content).await;
            if membership {
                self.bump(id, Scope::Membership).await;
            }
        }
        applied
    }

    async fn history(
        &self,
        id: Uuid,
        range: HistoryRange,
        visible: SeqBounds,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        // Only the newest page is cached: it is what opening a conversation reads.
        if range != HistoryRange::Before(None) {
            return self.inner.history(id, range, visible, limit).await;
        }
        let generation = self.generation(id, Scope::Content).await;
        let key = Key::NewestPage { conversation: id, generation, from: visible.from, to: visible.to, limit };
        let load = async { Ok(Value::Page(Arc::new(self.inner.history(id, range, visible, limit).await?))) };
        match self.cached(key, load).await? {
            Value::Page(page) => Ok(page.as_ref().clone()),
            Value::Member(_) => Err(Error::Storage("cache key held the wrong kind of value".into())),
        }
    }

    async fn list_conversations(
        &self,
        user: &str,
        after: Option<InboxCursor>,
        limit: usize,
    ) -> Result<Vec<Conversation>> {
        self.inner.list_conversations(user, after, limit).await
    }

    async fn ack_delivered(&self, user: &str, device: &str, cursors: Vec<(Uuid, u64)>) -> Result<Vec<(Uuid, u64)>> {
        self.inner.ack_delivered(user, device, cursors).await
    }

    async fn ack_delivered_many(&self, acks: Vec<DeviceCursors>) -> Result<Vec<DeviceCursors>> {
        self.inner.ack_delivered_many(acks).await
    }

    async fn mark_read(&self, id: Uuid, user: &str, seq: u64) -> Result<u64> {
        let read = self.inner.mark_read(id, user, seq).await;
        if read.is_ok() {
            self.bump(id, Scope::Membership).await;
        }
        read
    }

    async fn sync(
        &self,
        user: &str,
        device: &str,
        only: Option<Uuid>,
        after: Option<SyncCursor>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        self.inner.sync(user, device, only, after, limit).await
    }
}

#[cfg(test)]
mod tests;
