//! The `PresenceStore` trait, its domain types, and the in-process
//! implementation.
//!
//! A session is a lease: it lives `session_ttl` from its registration or its
//! last renewal by the gateway that registered it. An expired session is
//! never located and does not count as online or against the session limit;
//! stores drop it lazily, whenever they next touch the user.
//!
//! Last seen is "the last time presence knew the user was connected": every
//! registration, renewal and unregistration moves it forward (never back), so
//! when a user's sessions expire it already holds the last renewal, and no
//! write is needed at the moment of expiry.

use std::{collections::HashMap, time::Duration};

use async_trait::async_trait;
use messenger_platform::ids;
use tokio::sync::RwLock;

#[cfg(test)]
pub(crate) mod contract;
#[cfg(test)]
mod tests;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub user_id: String,
    pub device_id: String,
    pub session_id: String,
    pub gateway_id: String,
    pub gateway_addr: String,
    pub connected_at_ms: i64,
}

/// One session a gateway holds, as named in a renewal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRef {
    pub user_id: String,
    pub session_id: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserStatus {
    pub user_id: String,
    pub online: bool,
    /// Milliseconds since the epoch when the user was last known connected; 0 if never seen.
    pub last_seen_ms: i64,
}

/// How a registration treats a live session of the same device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A new connection: it replaces the device's older session (the device
    /// reconnected before its old stream was noticed as closed).
    Connect,
    /// A gateway restoring a lease presence no longer knows: it replaces only
    /// sessions of the same device that connected before it; a newer one wins
    /// and this one is refused as superseded. Without this, two gateways
    /// holding a stale and a fresh stream of one device would replace each
    /// other at every renewal. (Connect times come from the gateways' clocks;
    /// skew matters only for two connections of one device within it.)
    Restore,
}

/// What a registration or unregistration changed for its user, decided
/// atomically with the write: two racing for one user cannot both see the
/// state before the other's write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// Registration: the user had no live session before (came online).
    /// Unregistration: no live session is left (went offline).
    pub changed: bool,
    /// The user's last-seen time after the write. A change is stamped after
    /// every earlier stamp of the user (`max(now, last + 1)`), so receivers
    /// keeping the newest update by this time end at the true state, in
    /// whatever order the updates reach them.
    pub at_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("user {user} already has {limit} sessions")]
    TooManySessions { user: String, limit: usize },
    #[error("session {session} was superseded by a newer session of its device")]
    Superseded { session: String },
    #[error("presence backend unavailable: {0}")]
    Unavailable(String),
    #[error("invalid presence configuration: {0}")]
    InvalidConfig(String),
}

#[async_trait]
pub trait PresenceStore: Send + Sync + 'static {
    /// Adds (or refreshes) a session with a fresh lease; says whether the
    /// user came online with it. Refused when the user already holds
    /// `max_per_user` other live sessions.
    async fn register(&self, session: Session, max_per_user: usize, mode: Mode) -> Result<Transition, Error>;
    /// Extends the leases of `sessions` that are live and were registered by
    /// `gateway_id`; returns the ids of the others (unknown, expired,
    /// replaced, or another gateway's), which the gateway registers again.
    async fn renew(&self, gateway_id: &str, sessions: &[SessionRef]) -> Result<Vec<String>, Error>;
    /// Removes a session (a no-op when it is unknown); says whether the user
    /// has no live session left (went offline).
    async fn unregister(&self, user_id: &str, session_id: &str) -> Result<Transition, Error>;
    /// The live sessions of `user_ids`.
    async fn locate(&self, user_ids: &[String]) -> Result<Vec<Session>, Error>;
    /// One status per user, in the order asked.
    async fn status(&self, user_ids: &[String]) -> Result<Vec<UserStatus>, Error>;
    /// The lease length this store applies.
    fn session_ttl(&self) -> Duration;
}

pub(crate) fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

struct Lease {
    session: Session,
    expires_at_ms: i64,
}

#[derive(Default)]
struct State {
    sessions: HashMap<String, Vec<Lease>>,
    last_seen: HashMap<String, i64>,
    /// When every user's expired leases were last dropped.
    swept_at_ms: i64,
}

impl State {
    fn seen(&mut self, user_id: &str, now_ms: i64) -> i64 {
        let last_seen = self.last_seen.entry(user_id.to_owned()).or_default();
        *last_seen = (*last_seen).max(now_ms);
        *last_seen
    }

    /// Stamps a transition of the user after every earlier stamp.
    fn stamp(&mut self, user_id: &str, now_ms: i64) -> i64 {
        let last_seen = self.last_seen.entry(user_id.to_owned()).or_default();
        *last_seen = now_ms.max(*last_seen + 1);
        *last_seen
    }

    /// Drops expired leases of every user, at most once per `ttl`: memory
    /// stays proportional to live sessions even for users never asked about
    /// again (a gateway that died with all its sessions).
    fn sweep(&mut self, now_ms: i64, ttl_ms: i64) {
        if now_ms - self.swept_at_ms < ttl_ms {
            return;
        }
        self.swept_at_ms = now_ms;
        self.sessions.retain(|_, leases| {
            leases.retain(|lease| lease.expires_at_ms > now_ms);
            !leases.is_empty()
        });
    }
}

/// Presence held in this process (`messenger up`, or one presence instance).
pub struct MemoryStore {
    state: RwLock<State>,
    ttl: Duration,
}

impl MemoryStore {
    pub fn new(session_ttl: Duration) -> Self {
        Self { state: RwLock::default(), ttl: session_ttl }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(crate::Options::default().session_ttl)
    }
}

#[async_trait]
impl PresenceStore for MemoryStore {
    async fn register(&self, session: Session, max_per_user: usize, mode: Mode) -> Result<Transition, Error> {
        let now = ids::now_ms();
        let ttl = ttl_ms(self.ttl);
        let mut state = self.state.write().await;
        state.sweep(now, ttl);
        let leases = state.sessions.entry(session.user_id.clone()).or_default();
        leases.retain(|lease| lease.expires_at_ms > now);
        let same_device = |lease: &Lease| {
            lease.session.device_id == session.device_id && lease.session.session_id != session.session_id
        };
        let newer = |lease: &Lease| same_device(lease) && lease.session.connected_at_ms >= session.connected_at_ms;
        if mode == Mode::Restore && leases.iter().any(newer) {
            return Err(Error::Superseded { session: session.session_id });
        }
        // Count what would remain before removing anything: a refused
        // registration must not cost the device its live session.
        let replaced = |lease: &Lease| same_device(lease) || lease.session.session_id == session.session_id;
        if leases.iter().filter(|lease| !replaced(lease)).count() >= max_per_user {
            return Err(Error::TooManySessions { user: session.user_id, limit: max_per_user });
        }
        let came_online = leases.is_empty();
        leases.retain(|lease| !replaced(lease));
        let user_id = session.user_id.clone();
        leases.push(Lease { session, expires_at_ms: now + ttl });
        let at_ms = if came_online { state.stamp(&user_id, now) } else { state.seen(&user_id, now) };
        Ok(Transition { changed: came_online, at_ms })
    }

    async fn renew(&self, gateway_id: &str, sessions: &[SessionRef]) -> Result<Vec<String>, Error> {
        let now = ids::now_ms();
        let ttl = ttl_ms(self.ttl);
        let mut state = self.state.write().await;
        state.sweep(now, ttl);
        let mut unknown = Vec::new();
        for reference in sessions {
            let lease = state.sessions.get_mut(&reference.user_id).and_then(|leases| {
                leases.iter_mut().find(|lease| {
                    lease.session.session_id == reference.session_id
                        && lease.session.gateway_id == gateway_id
                        && lease.expires_at_ms > now
                })
            });
            match lease {
                Some(lease) => {
                    lease.expires_at_ms = now + ttl;
                    state.seen(&reference.user_id, now);
                }
                None => unknown.push(reference.session_id.clone()),
            }
        }
        Ok(unknown)
    }

    async fn unregister(&self, user_id: &str, session_id: &str) -> Result<Transition, Error> {
        let now = ids::now_ms();
        let mut state = self.state.write().await;
        let (removed, left) = match state.sessions.get_mut(user_id) {
            Some(leases) => {
                // An expired lease being unregistered still means the user was
                // connected until now: the gateway held the stream all along.
                let removed = leases.iter().any(|lease| lease.session.session_id == session_id);
                leases.retain(|lease| lease.session.session_id != session_id && lease.expires_at_ms > now);
                (removed, leases.len())
            }
            None => (false, 0),
        };
        if left == 0 {
            state.sessions.remove(user_id);
        }
        // No live session left: offline, whether this one was still known
        // or its lease had expired (its gateway held the stream until now,
        // and its contacts were never told).
        let at_ms = match (removed, left) {
            (_, 0) => state.stamp(user_id, now),
            (true, _) => state.seen(user_id, now),
            (false, _) => state.last_seen.get(user_id).copied().unwrap_or_default(),
        };
        Ok(Transition { changed: left == 0, at_ms })
    }

    async fn locate(&self, user_ids: &[String]) -> Result<Vec<Session>, Error> {
        let now = ids::now_ms();
        let state = self.state.read().await;
        Ok(user_ids
            .iter()
            .filter_map(|user| state.sessions.get(user))
            .flatten()
            .filter(|lease| lease.expires_at_ms > now)
            .map(|lease| lease.session.clone())
            .collect())
    }

    async fn status(&self, user_ids: &[String]) -> Result<Vec<UserStatus>, Error> {
        let now = ids::now_ms();
        let state = self.state.read().await;
        Ok(user_ids
            .iter()
            .map(|user| UserStatus {
                user_id: user.clone(),
                online: state.sessions.get(user).is_some_and(|leases| leases.iter().any(|l| l.expires_at_ms > now)),
                last_seen_ms: state.last_seen.get(user).copied().unwrap_or_default(),
            })
            .collect())
    }

    fn session_ttl(&self) -> Duration {
        self.ttl
    }
}
