//! The shared tier of the cache in Redis (`fred`).
//!
//! Keys (all under `key_prefix`):
//! - `epoch`: one random token every entry key carries;
//! - `g:c:<conversation>`, `g:m:<conversation>`, `g:i:<user>`: the current
//!   generation of a conversation's content, its memberships, a user's inbox;
//! - `e<format>:<epoch>:<generations>:<what>`: an entry (JSON), with the
//!   cache TTL. `<format>` ([`FORMAT`]) changes whenever what a cached value
//!   means changes (a field added whose absence would read as something
//!   else), so instances of two builds sharing Redis in a rolling upgrade
//!   never read each other's entries.
//!
//! Reads fetch the epoch and the generations they need in one `MGET`; a
//! missing one is created with `SET NX GET` (whoever comes first wins), so a
//! flush or an eviction only ever produces fresh tokens. Writes set fresh
//! random generations in one pipeline after they commit.
//!
//! Degrade, don't fail: the first failed call (error or `command_timeout`)
//! marks the tier *degraded*: reads bypass it and writes do not even try to
//! bump, they only mark it *dirty*, because entries of what they changed are
//! now stale in Redis. A probe pings every `probe_interval`; once Redis
//! answers, a dirty tier first sets a new epoch (retiring every entry key
//! made before) and only then serves again. Writes during an outage take the
//! lock only to mark the tier dirty; the probe holds it only for the epoch
//! write, never for a ping into a dead server. A process also starts dirty: it
//! cannot know whether its predecessor died between a commit and its bump.
//! Every reconnection makes it dirty too: the server on the other end may
//! have restarted from an older snapshot (or be a promoted replica), bringing
//! back generations that bumps had already replaced.
//! Transitions happen under one lock, so a failure racing the recovery is
//! never lost.
//!
//! Limit, with several instances: while instance A cannot reach Redis but B
//! can, B may serve entries A's writes made stale, until A's probe reaches
//! Redis and bumps the epoch (at most `probe_interval` after Redis is back
//! for A). With routing by conversation, one instance usually owns a
//! conversation, which keeps that window rare.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use fred::{
    clients::Client,
    interfaces::{ClientLike, EventInterface, KeysInterface},
    types::{Expiration, SetOptions},
};
use tokio::sync::Mutex;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{info, warn};

use super::{CacheOptions, CacheStats, Subject, Value};
use crate::error::{Error, Result};

/// The format of the entries this build writes and reads. 2: messages carry
/// `last_edit_seq` (absent, it read as "never edited", and a reader would
/// be shown an edit made outside its ranges).
const FORMAT: u32 = 2;

#[derive(Default)]
struct State {
    degraded: bool,
    dirty: bool,
}

struct Health {
    /// Mirrors `state.degraded` for the read path, which must not wait on the lock.
    degraded: AtomicBool,
    state: Mutex<State>,
    warned: std::sync::Mutex<(Option<Instant>, u64)>,
    warn_interval: Duration,
    stats: Arc<CacheStats>,
}

impl Health {
    /// A failed call: bypass from now on; `dirty` when a bump was lost.
    async fn fail(&self, what: &str, error: &(dyn std::fmt::Display + Sync), dirty: bool) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        {
            let mut state = self.state.lock().await;
            state.degraded = true;
            state.dirty |= dirty;
            self.degraded.store(true, Ordering::SeqCst);
        }
        let mut warned = self.warned.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        if warned.0.is_none_or(|at| now.duration_since(at) >= self.warn_interval) {
            let suppressed = std::mem::take(&mut warned.1);
            warned.0 = Some(now);
            warn!(%error, suppressed, "redis cache {what} failed; serving from the store until redis answers");
        } else {
            warned.1 += 1;
        }
    }
}

pub(super) struct RedisTier {
    client: Client,
    prefix: String,
    ttl: Duration,
    health: Arc<Health>,
    _probe: DropGuard,
}

fn generation_ttl(ttl: Duration) -> Expiration {
    // Longer than any entry lives: a generation that expires early only costs a miss.
    Expiration::PX(i64::try_from(ttl.as_millis().saturating_mul(2)).unwrap_or(i64::MAX))
}

impl RedisTier {
    pub(super) async fn connect(options: &CacheOptions, stats: Arc<CacheStats>) -> Result<Self> {
        let (redis, ttl) = (&options.redis, options.ttl);
        let client = redis.client().map_err(|error| Error::InvalidArgument(format!("message.cache.redis: {error}")))?;
        let health = Arc::new(Health {
            degraded: AtomicBool::new(true),
            state: Mutex::new(State { degraded: true, dirty: true }),
            warned: std::sync::Mutex::new((None, 0)),
            warn_interval: options.warn_interval,
            stats,
        });
        let stop = CancellationToken::new();
        let tier = Self {
            client: client.clone(),
            prefix: redis.key_prefix.clone(),
            ttl,
            health: health.clone(),
            _probe: stop.clone().drop_guard(),
        };
        match tokio::time::timeout(redis.connect_timeout, client.wait_for_connect()).await {
            Ok(Ok(())) => {
                if let Err(error) = tier.recover().await {
                    health.fail("start", &error, false).await;
                }
            }
            Ok(Err(error)) => health.fail("connect", &error, false).await,
            Err(_) => health.fail("connect", &"timed out", false).await,
        }
        tokio::spawn(probe(tier.clone_handle(), options.probe_interval, stop));
        Ok(tier)
    }

    fn clone_handle(&self) -> Handle {
        Handle { client: self.client.clone(), prefix: self.prefix.clone(), health: self.health.clone() }
    }

    async fn recover(&self) -> Result<(), fred::error::Error> {
        self.clone_handle().recover().await
    }

    pub(super) fn is_degraded(&self) -> bool {
        self.health.degraded.load(Ordering::SeqCst)
    }

    fn key(&self, subject: &Subject) -> String {
        match subject {
            Subject::Content(id) => format!("{}g:c:{id}", self.prefix),
            Subject::Membership(id) => format!("{}g:m:{id}", self.prefix),
            Subject::Inbox(user) => format!("{}g:i:{user}", self.prefix),
        }
    }

    /// The epoch followed by each subject's generation; None: bypass.
    pub(super) async fn generations(&self, subjects: &[Subject]) -> Option<Vec<u64>> {
        if self.is_degraded() {
            return None;
        }
        let keys: Vec<String> =
            std::iter::once(format!("{}epoch", self.prefix)).chain(subjects.iter().map(|s| self.key(s))).collect();
        let values: Vec<Option<String>> = match self.client.mget(keys.clone()).await {
            Ok(values) => values,
            Err(error) => {
                self.health.fail("read", &error, false).await;
                return None;
            }
        };
        let mut generations = Vec::with_capacity(keys.len());
        for (key, value) in keys.into_iter().zip(values) {
            let current = match value.and_then(|value| value.parse::<u64>().ok()) {
                Some(current) => current,
                None => match self.create(key).await {
                    Ok(created) => created,
                    Err(error) => {
                        self.health.fail("read", &error, false).await;
                        return None;
                    }
                },
            };
            generations.push(current);
        }
        Some(generations)
    }

    /// Sets a fresh token unless someone else did first; returns the one that won.
    async fn create(&self, key: String) -> Result<u64, fred::error::Error> {
        let fresh: u64 = rand::random();
        let existing: Option<String> =
            self.client.set(key, fresh.to_string(), Some(generation_ttl(self.ttl)), Some(SetOptions::NX), true).await?;
        Ok(existing.and_then(|value| value.parse().ok()).unwrap_or(fresh))
    }

    pub(super) async fn bump(&self, subjects: &[Subject]) {
        if self.is_degraded() {
            // Checked again under the lock: a recovery may have just finished.
            let mut state = self.health.state.lock().await;
            if state.degraded {
                state.dirty = true;
                return;
            }
        }
        let pipeline = self.client.pipeline();
        for subject in subjects {
            let fresh: u64 = rand::random();
            let queued: Result<(), _> =
                pipeline.set(self.key(subject), fresh.to_string(), Some(generation_ttl(self.ttl)), None, false).await;
            if let Err(error) = queued {
                return self.health.fail("invalidation", &error, true).await;
            }
        }
        if let Err(error) = pipeline.all::<Vec<fred::types::Value>>().await {
            self.health.fail("invalidation", &error, true).await;
        }
    }

    /// Off until a new epoch is set (by the probe, at once if Redis answers).
    pub(super) async fn retire_everything(&self, cause: &Error) {
        self.health.fail("invalidation", cause, true).await;
    }

    pub(super) async fn fetch(&self, key: &str) -> Option<Value> {
        let bytes: Option<Vec<u8>> = match self.client.get(format!("{}e{FORMAT}:{key}", self.prefix)).await {
            Ok(bytes) => bytes,
            Err(error) => {
                self.health.fail("read", &error, false).await;
                return None;
            }
        };
        // An entry that no longer decodes (another version wrote it) is a miss.
        serde_json::from_slice(&bytes?).ok()
    }

    pub(super) async fn fill(&self, key: &str, value: &Value) {
        let Ok(json) = serde_json::to_vec(value) else { return };
        let ttl = Expiration::PX(i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX));
        let stored: Result<(), _> =
            self.client.set(format!("{}e{FORMAT}:{key}", self.prefix), json, Some(ttl), None, false).await;
        if let Err(error) = stored {
            self.health.fail("fill", &error, false).await;
        }
    }
}

/// What the probe task holds: the tier itself stays with the store.
struct Handle {
    client: Client,
    prefix: String,
    health: Arc<Health>,
}

impl Handle {
    /// Redis answers: retire every older key if a bump was lost, then serve again.
    async fn recover(&self) -> Result<(), fred::error::Error> {
        // Not under the lock: writes that find the tier degraded take it to
        // mark it dirty, and must not wait for a ping into a dead server.
        let _: String = self.client.ping(None).await?;
        let mut state = self.health.state.lock().await;
        if state.dirty {
            let epoch: u64 = rand::random();
            let _: () = self.client.set(format!("{}epoch", self.prefix), epoch.to_string(), None, None, false).await?;
            state.dirty = false;
        }
        let was_degraded = std::mem::take(&mut state.degraded);
        self.health.degraded.store(false, Ordering::SeqCst);
        drop(state);
        if was_degraded {
            info!("redis cache in use");
        }
        Ok(())
    }
}

async fn probe(handle: Handle, interval: Duration, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reconnects = handle.client.reconnect_rx();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticks.tick() => {}
            // A new connection may be to a Redis restarted from an older
            // snapshot, or a promoted replica that missed recent bumps: old
            // generations with their entries could be back. Retire them all.
            reconnected = reconnects.recv() => {
                if !matches!(reconnected, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                    handle.health.fail("connection", &"redis reconnected", true).await;
                }
            }
        }
        if handle.health.degraded.load(Ordering::SeqCst)
            && let Err(error) = handle.recover().await
        {
            handle.health.fail("probe", &error, false).await;
        }
    }
    let _ = handle.client.quit().await;
}
