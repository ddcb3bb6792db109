//! A read-through cache in front of any `MessageStore`: the newest history
//! page of a conversation (what opening a chat reads), conversation metadata
//! as a member sees it, memberships (what every history call checks) and the
//! first inbox page of a user (what every app start reads).
//!
//! Two tiers. The *near* tier is an in-process moka cache; it is the whole
//! cache in the embedded default. With `backend = "redis"`, generations and
//! entries are shared through Redis ([`redis`]) so every message-service
//! instance sees every other's invalidations, and the near tier keeps hot
//! entries without a second round trip.
//!
//! Consistency: every key carries the *generations* of what it was read from
//! (a conversation's content, its memberships, a user's inbox). A write bumps
//! the generations of exactly what it changed after it commits and before it
//! returns, so later reads build new keys and never see the old entry; a read
//! that raced the write can only fill a key of the old generation, which
//! nobody reads again (it ages out). Generations are never reused: in process
//! they come from one counter, in Redis they are random, so a generation lost
//! to eviction or a flush is replaced by a never-used one: a miss, never a
//! stale hit. Concurrent misses for one key share one store read (moka's
//! `try_get_with` runs one loader per key).
//!
//! When Redis fails the cache is bypassed, not the request: reads go to the
//! store and writes skip their bumps but remember that they did; before the
//! shared tier is used again, one *epoch* bump retires every key written
//! before (see [`redis`]).

mod redis;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use messenger_platform::{metrics, redis::RedisOptions};
use moka::future::Cache;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use self::redis::RedisTier;
use crate::{
    error::{Error, Result},
    store::{
        Appended, BlockedUser, Blocks, Change, ChangeRequest, Conversation, DeviceCursors, HistoryRange, InboxCursor,
        Member, MessageStore, NewGroup, NewMessage, SendOutcome, SeqBounds, StoredMessage, SyncCursor,
    },
};

/// Where shared generations and entries live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheBackend {
    /// In process only: right for one message-service instance.
    #[default]
    Memory,
    /// Redis, shared by every instance, with the in-process tier in front.
    Redis,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheOptions {
    pub enabled: bool,
    pub backend: CacheBackend,
    /// Most entries kept in process (the near tier).
    pub max_entries: u64,
    /// Entries expire after this long, in process and in Redis.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Used when `backend = "redis"`: where it is, and a command timeout
    /// beyond which a call counts as failed and the cache is bypassed.
    pub redis: RedisOptions,
    /// How often a bypassed Redis cache checks whether Redis is back.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// At most one warning per this interval while Redis keeps failing.
    #[serde(with = "humantime_serde")]
    pub warn_interval: Duration,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            enabled: true,
            backend: CacheBackend::Memory,
            max_entries: 200_000,
            ttl: Duration::from_secs(600),
            redis: RedisOptions {
                key_prefix: "messenger:cache:".into(),
                command_timeout: Duration::from_millis(100),
                ..RedisOptions::default()
            },
            probe_interval: Duration::from_secs(1),
            warn_interval: Duration::from_secs(10),
        }
    }
}

impl CacheOptions {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_entries == 0 {
            return Err("message.cache.max_entries must be positive".into());
        }
        if self.ttl < Duration::from_millis(1) {
            return Err("message.cache.ttl must be at least 1ms".into());
        }
        if self.backend == CacheBackend::Redis {
            self.redis.validate("message.cache.redis")?;
            if self.probe_interval.is_zero() {
                return Err("message.cache.probe_interval must be positive".into());
            }
        }
        Ok(())
    }
}

/// What one generation covers; a write bumps each subject it changed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Subject {
    /// A conversation's entries and head (history pages, title, last message).
    Content(Uuid),
    /// A conversation's memberships: who, in which role, seeing which
    /// ranges. Only membership changes bump it: sends and read marks move
    /// cursors, which no value under it holds (`member` keeps none), so a
    /// busy group's members keep hitting their cached membership.
    Membership(Uuid),
    /// A user's inbox listing.
    Inbox(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
enum Value {
    Page(Arc<Vec<StoredMessage>>),
    Member(Option<Member>),
    Conversation(Option<Box<Conversation>>),
    Inbox(Arc<Vec<Conversation>>),
}

/// Counters for operators and the benchmark.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Reads answered from the near tier or from Redis.
    pub hits: AtomicU64,
    /// Reads that went to the store and filled the cache.
    pub misses: AtomicU64,
    /// Reads that went to the store because the shared tier was unusable.
    pub bypassed: AtomicU64,
    /// Failed Redis calls (each one degrades the cache until Redis answers again).
    pub errors: AtomicU64,
}

impl CacheStats {
    /// One read of a `kind` of value with `result`: counted here (what tests
    /// read) and in `messenger.message.cache.reads` (the hit ratio SREs and
    /// the benchmark watch, per kind).
    fn read(&self, count: &AtomicU64, result: &'static str, kind: &'static str) {
        static READS: std::sync::OnceLock<metrics::Counter<u64>> = std::sync::OnceLock::new();
        count.fetch_add(1, Ordering::Relaxed);
        READS
            .get_or_init(|| {
                metrics::meter()
                    .u64_counter("messenger.message.cache.reads")
                    .with_description(
                        "Reads through the cache, by result (hit, miss, bypass: Redis unavailable) and kind \
                         (member, page, conversation, inbox)",
                    )
                    .build()
            })
            .add(1, &[metrics::KeyValue::new("result", result), metrics::KeyValue::new("kind", kind)]);
    }
}

/// Generations kept in process, striped: a subject's generation is the slot
/// its hash falls in, and a bump gives that slot a value from one counter, so
/// no value is ever reused. Subjects sharing a slot only cost each other
/// misses, never a stale hit. A read is one atomic load and a bump one store:
/// no map, no allocation, no eviction bookkeeping on the send path.
struct LocalGenerations {
    slots: Box<[AtomicU64]>,
    next: AtomicU64,
    hasher: std::hash::RandomState,
}

impl LocalGenerations {
    /// About one slot per cached entry (a power of two, at most 4 Mi slots).
    fn new(max_entries: u64) -> Self {
        let count = max_entries.clamp(1024, 1 << 22).next_power_of_two() as usize;
        Self {
            slots: (0..count).map(|_| AtomicU64::new(0)).collect(),
            next: AtomicU64::new(1),
            hasher: Default::default(),
        }
    }

    fn slot(&self, subject: &Subject) -> &AtomicU64 {
        let hash = std::hash::BuildHasher::hash_one(&self.hasher, subject) as usize;
        &self.slots[hash & (self.slots.len() - 1)]
    }

    fn get(&self, subject: &Subject) -> u64 {
        self.slot(subject).load(Ordering::Acquire)
    }

    fn bump(&self, subject: &Subject) {
        self.slot(subject).store(self.next.fetch_add(1, Ordering::Relaxed), Ordering::Release);
    }
}

enum Shared {
    Local(LocalGenerations),
    Redis(RedisTier),
}

pub struct CachedStore {
    inner: Arc<dyn MessageStore>,
    near: Cache<String, Value>,
    shared: Shared,
    pub stats: Arc<CacheStats>,
}

impl CachedStore {
    /// The in-process cache (`backend = "memory"`).
    pub fn new(inner: Arc<dyn MessageStore>, options: &CacheOptions) -> Self {
        let local = LocalGenerations::new(options.max_entries);
        Self::with_shared(inner, options, Shared::Local(local), Arc::default())
    }

    /// The shared cache (`backend = "redis"`). Never fails on an unreachable
    /// Redis: the cache starts bypassed and takes over once Redis answers.
    pub async fn redis(inner: Arc<dyn MessageStore>, options: &CacheOptions) -> Result<Self> {
        let stats = Arc::new(CacheStats::default());
        let tier = RedisTier::connect(options, stats.clone()).await?;
        Ok(Self::with_shared(inner, options, Shared::Redis(tier), stats))
    }

    /// The backend `options` name.
    pub async fn from_options(inner: Arc<dyn MessageStore>, options: &CacheOptions) -> Result<Self> {
        match options.backend {
            CacheBackend::Memory => Ok(Self::new(inner, options)),
            CacheBackend::Redis => Self::redis(inner, options).await,
        }
    }

    fn with_shared(
        inner: Arc<dyn MessageStore>,
        options: &CacheOptions,
        shared: Shared,
        stats: Arc<CacheStats>,
    ) -> Self {
        let near = Cache::builder().max_capacity(options.max_entries).time_to_live(options.ttl).build();
        Self { inner, near, shared, stats }
    }

    /// True while the shared tier is unusable and reads go to the store.
    pub fn is_bypassed(&self) -> bool {
        match &self.shared {
            Shared::Local(_) => false,
            Shared::Redis(tier) => tier.is_degraded(),
        }
    }

    /// The current generation of each subject, or None when the cache must be bypassed.
    async fn generations(&self, subjects: &[Subject]) -> Option<Vec<u64>> {
        match &self.shared {
            Shared::Local(local) => Some(subjects.iter().map(|subject| local.get(subject)).collect()),
            Shared::Redis(tier) => tier.generations(subjects).await,
        }
    }

    /// After a committed write: later reads of `subjects` use fresh keys.
    async fn bump(&self, subjects: Vec<Subject>) {
        match &self.shared {
            Shared::Local(local) => subjects.iter().for_each(|subject| local.bump(subject)),
            Shared::Redis(tier) => tier.bump(&subjects).await,
        }
    }

    /// `key` names what is read (the subjects' generations are prefixed to it).
    async fn cached(
        &self,
        subjects: &[Subject],
        key: String,
        load: impl std::future::Future<Output = Result<Value>>,
    ) -> Result<Value> {
        // What is read: the key's first word (`member:…`, `page:…`).
        let kind = match key.split(':').next() {
            Some("member") => "member",
            Some("page") => "page",
            Some("conversation") => "conversation",
            Some("inbox") => "inbox",
            _ => "other",
        };
        let Some(generations) = self.generations(subjects).await else {
            self.stats.read(&self.stats.bypassed, "bypass", kind);
            return load.await;
        };
        let mut full = String::with_capacity(key.len() + 21 * generations.len());
        for generation in &generations {
            full.push_str(&generation.to_string());
            full.push(':');
        }
        full.push_str(&key);
        if let Some(value) = self.near.get(&full).await {
            self.stats.read(&self.stats.hits, "hit", kind);
            return Ok(value);
        }
        // One load per key however many callers miss at once; an error is
        // returned to every waiter and cached for none.
        let loaded = self
            .near
            .try_get_with(full.clone(), async {
                if let Shared::Redis(tier) = &self.shared
                    && let Some(value) = tier.fetch(&full).await
                {
                    self.stats.read(&self.stats.hits, "hit", kind);
                    return Ok(value);
                }
                self.stats.read(&self.stats.misses, "miss", kind);
                let value = load.await?;
                if let Shared::Redis(tier) = &self.shared {
                    tier.fill(&full, &value).await;
                }
                Ok(value)
            })
            .await;
        loaded.map_err(|shared: Arc<Error>| match Arc::try_unwrap(shared) {
            Ok(error) => error,
            Err(shared) => Error::Unavailable(shared.to_string()),
        })
    }

    /// Inbox subjects of everyone who is a member after a write, plus `extra`
    /// (members the write removed). When the members cannot be read, whose
    /// inboxes changed is unknown: every key is retired instead.
    async fn inboxes(&self, id: Uuid, extra: &[&str]) -> Vec<Subject> {
        let mut users: Vec<String> = match self.inner.active_member_ids(id).await {
            Ok(ids) => ids.to_vec(),
            Err(error) => {
                self.retire_everything(&error).await;
                Vec::new()
            }
        };
        users.extend(extra.iter().map(|user| (*user).to_owned()));
        users.into_iter().map(Subject::Inbox).collect()
    }

    /// Makes every key written so far unreachable.
    async fn retire_everything(&self, cause: &Error) {
        tracing::warn!(%cause, "cache cannot tell what a write changed; retiring every entry");
        match &self.shared {
            Shared::Local(local) => {
                // Every slot moves to a value from the counter: none repeats an old one.
                local
                    .slots
                    .iter()
                    .for_each(|slot| slot.store(local.next.fetch_add(1, Ordering::Relaxed), Ordering::Release));
                self.near.invalidate_all();
            }
            Shared::Redis(tier) => tier.retire_everything(cause).await,
        }
    }
}

fn wrong_kind() -> Error {
    Error::Storage("cache key held the wrong kind of value".into())
}

#[async_trait]
impl MessageStore for CachedStore {
    async fn get_or_create_direct(&self, user: &str, peer: &str, id: Uuid, now_ms: i64) -> Result<Conversation> {
        let conversation = self.inner.get_or_create_direct(user, peer, id, now_ms).await;
        if conversation.is_ok() {
            // It may have been created just now: both inboxes list it.
            self.bump(vec![Subject::Inbox(user.to_owned()), Subject::Inbox(peer.to_owned())]).await;
        }
        conversation
    }

    async fn create_group(&self, group: NewGroup, max_group_size: usize) -> Result<(Conversation, Appended)> {
        let id = group.id;
        let mut subjects = vec![Subject::Content(id), Subject::Membership(id), Subject::Inbox(group.creator.clone())];
        subjects.extend(group.members.iter().cloned().map(Subject::Inbox));
        let created = self.inner.create_group(group, max_group_size).await;
        self.bump(subjects).await;
        created
    }

    async fn conversation_for_member(&self, id: Uuid, user: &str) -> Result<Option<Conversation>> {
        // The reader's inbox too: its blocks change what counts as unread.
        let subjects = [Subject::Content(id), Subject::Membership(id), Subject::Inbox(user.to_owned())];
        let load = async { Ok(Value::Conversation(self.inner.conversation_for_member(id, user).await?.map(Box::new))) };
        match self.cached(&subjects, format!("conversation:{id}:{user}"), load).await? {
            Value::Conversation(conversation) => Ok(conversation.map(|boxed| *boxed)),
            _ => Err(wrong_kind()),
        }
    }

    async fn member(&self, id: Uuid, user: &str) -> Result<Option<Member>> {
        let load = async { Ok(Value::Member(self.inner.member(id, user).await?.map(Member::without_cursors))) };
        match self.cached(&[Subject::Membership(id)], format!("member:{id}:{user}"), load).await? {
            Value::Member(member) => Ok(member),
            _ => Err(wrong_kind()),
        }
    }

    /// Not cached here: fan-out needs the member list exact at commit, which
    /// the store guarantees (the SQLite writer invalidates it inside the commit).
    async fn active_member_ids(&self, id: Uuid) -> Result<Arc<Vec<String>>> {
        self.inner.active_member_ids(id).await
    }

    async fn members(&self, id: Uuid) -> Result<Vec<Member>> {
        self.inner.members(id).await
    }

    async fn send(&self, message: NewMessage) -> Result<SendOutcome> {
        let id = message.conversation_id;
        let outcome = self.inner.send(message).await;
        if let Ok(SendOutcome::Created(appended)) = &outcome {
            // The content, and the inbox of everyone the message reaches
            // (every active member: a message changes no other entry; the
            // sender's cursor and everyone's unread count live there), known
            // from the write itself. No membership changed: a busy group's
            // members keep their cached membership.
            let mut subjects = vec![Subject::Content(id)];
            subjects.extend(appended.audience.iter().cloned().map(Subject::Inbox));
            self.bump(subjects).await;
        }
        outcome
    }

    async fn apply(&self, request: ChangeRequest) -> Result<Vec<Appended>> {
        let id = request.conversation_id;
        let leaving = match &request.change {
            Change::RemoveMember(user) => Some(user.clone()),
            Change::Leave => Some(request.actor.clone()),
            _ => None,
        };
        let applied = self.inner.apply(request).await;
        if applied.as_ref().is_ok_and(|entries| !entries.is_empty()) {
            // Every entry moves the head and may change roles or ranges.
            let mut subjects = vec![Subject::Content(id), Subject::Membership(id)];
            let leaving: Vec<&str> = leaving.iter().map(String::as_str).collect();
            subjects.extend(self.inboxes(id, &leaving).await);
            self.bump(subjects).await;
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
        let to = visible.to.map_or_else(|| "-".to_owned(), |to| to.to_string());
        let key = format!("page:{id}:{}:{to}:{limit}", visible.from);
        let load = async { Ok(Value::Page(Arc::new(self.inner.history(id, range, visible, limit).await?))) };
        match self.cached(&[Subject::Content(id)], key, load).await? {
            Value::Page(page) => Ok(page.as_ref().clone()),
            _ => Err(wrong_kind()),
        }
    }

    async fn list_conversations(
        &self,
        user: &str,
        after: Option<InboxCursor>,
        limit: usize,
    ) -> Result<Vec<Conversation>> {
        // Only the first page is cached: it is what an app shows on start.
        if after.is_some() {
            return self.inner.list_conversations(user, after, limit).await;
        }
        let load = async { Ok(Value::Inbox(Arc::new(self.inner.list_conversations(user, None, limit).await?))) };
        match self.cached(&[Subject::Inbox(user.to_owned())], format!("inbox:{limit}:{user}"), load).await? {
            Value::Inbox(page) => Ok(page.as_ref().clone()),
            _ => Err(wrong_kind()),
        }
    }

    async fn ack_delivered(&self, user: &str, device: &str, cursors: Vec<(Uuid, u64)>) -> Result<Vec<(Uuid, u64)>> {
        self.inner.ack_delivered(user, device, cursors).await
    }

    async fn ack_delivered_many(&self, acks: Vec<DeviceCursors>) -> Result<Vec<DeviceCursors>> {
        self.inner.ack_delivered_many(acks).await
    }

    async fn mark_read(&self, id: Uuid, user: &str, seq: u64) -> Result<crate::store::ReadMark> {
        let read = self.inner.mark_read(id, user, seq).await;
        if read.as_ref().is_ok_and(|mark| mark.moved) {
            // The reader's cursor and unread count: its inbox.
            self.bump(vec![Subject::Inbox(user.to_owned())]).await;
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

    /// Block lists are not cached: a block must hold on every instance at once.
    /// The blocker's unread counts leave the blocked user's group messages out.
    async fn block(&self, user: &str, target: &str, now_ms: i64) -> Result<bool> {
        let changed = self.inner.block(user, target, now_ms).await;
        self.bump(vec![Subject::Inbox(user.to_owned())]).await;
        changed
    }

    async fn unblock(&self, user: &str, target: &str) -> Result<bool> {
        let changed = self.inner.unblock(user, target).await;
        self.bump(vec![Subject::Inbox(user.to_owned())]).await;
        changed
    }

    async fn blocked_users(&self, user: &str, limit: usize) -> Result<Vec<BlockedUser>> {
        self.inner.blocked_users(user, limit).await
    }

    async fn blocks_between(&self, a: &str, b: &str) -> Result<Blocks> {
        self.inner.blocks_between(a, b).await
    }

    async fn blocked_by(&self, user: &str) -> Result<Vec<String>> {
        self.inner.blocked_by(user).await
    }
}

#[cfg(test)]
mod tests;
