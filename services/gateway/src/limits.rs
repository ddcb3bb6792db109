//! Rate limits of the public API, per user and per client address.
//!
//! A refused call is RESOURCE_EXHAUSTED with `google.rpc.RetryInfo` saying
//! when the next one would pass, so clients back off instead of hammering.
//! Limits are per gateway instance (a user's devices on one gateway share
//! them); a user spread over N gateways gets at most N times the rate.

use std::{
    collections::HashMap,
    net::IpAddr,
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::Duration,
};

use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use serde::{Deserialize, Serialize};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// A sustained rate with a burst above it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

impl Rate {
    pub(crate) const fn new(per_second: u32, burst: u32) -> Self {
        Self { per_second, burst }
    }
}

/// `gateway.rate_limits`: every public call beyond sends and typing (which
/// keep their own settings, `gateway.sends_per_second` and friends).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimits {
    /// Read marks (`Read` frames) that move a cursor; repeats of a mark
    /// already made cost nothing and are not counted.
    pub reads: Rate,
    /// `ModifyMessage`: edits, deletes, reaction toggles (each a stored entry
    /// fanned out to every member).
    pub modifications: Rate,
    /// `CreateGroup` and `UpdateGroup` together.
    pub group_changes: Rate,
    /// `GetOrCreateDirect`.
    pub direct_conversations: Rate,
    /// `BlockUser` and `UnblockUser` together.
    pub blocks: Rate,
    /// `History`, `ListConversations`, `GetConversation(s)`, `GetReceipts`,
    /// `ListBlockedUsers` together.
    pub queries: Rate,
    /// `CreateUpload`, `GetUpload`, `CompleteUpload` and `GetMediaUrl` together
    /// (the media service adds its own per-user ticket rate and quota).
    pub media: Rate,
    /// `RegisterPushDevice`, `UnregisterPushDevice`, `ListPushDevices` and
    /// `MuteConversation` together.
    pub push_settings: Rate,
    /// `Connect` attempts per user.
    pub connects_per_user: Rate,
    /// `Connect` attempts per client IP address (generous: many users share a NAT).
    pub connects_per_address: Rate,
    /// Every call (unary, `Connect`, gRPC-Web, WebSocket) per client IP
    /// address, counted before its token is verified: forged or garbage
    /// tokens cost a signature check each, and an address that floods is
    /// refused before any (generous: many users share a NAT).
    pub calls_per_address: Rate,
    /// Streams one client IP address may hold open before their Hello.
    pub max_pre_hello_streams_per_address: usize,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            reads: Rate::new(20, 50),
            modifications: Rate::new(10, 30),
            group_changes: Rate::new(2, 10),
            direct_conversations: Rate::new(2, 20),
            blocks: Rate::new(1, 20),
            queries: Rate::new(50, 100),
            media: Rate::new(20, 100),
            push_settings: Rate::new(2, 20),
            connects_per_user: Rate::new(2, 10),
            connects_per_address: Rate::new(50, 200),
            calls_per_address: Rate::new(500, 1000),
            max_pre_hello_streams_per_address: 64,
        }
    }
}

impl RateLimits {
    pub fn validate(&self) -> Result<(), String> {
        let rates = [
            ("reads", self.reads),
            ("modifications", self.modifications),
            ("group_changes", self.group_changes),
            ("direct_conversations", self.direct_conversations),
            ("blocks", self.blocks),
            ("queries", self.queries),
            ("media", self.media),
            ("push_settings", self.push_settings),
            ("connects_per_user", self.connects_per_user),
            ("connects_per_address", self.connects_per_address),
            ("calls_per_address", self.calls_per_address),
        ];
        for (name, rate) in rates {
            if rate.per_second == 0 || rate.burst == 0 {
                return Err(format!("gateway.rate_limits.{name}: per_second and burst must be positive"));
            }
        }
        if self.max_pre_hello_streams_per_address == 0 {
            return Err("gateway.rate_limits.max_pre_hello_streams_per_address must be positive".into());
        }
        Ok(())
    }
}

/// One keyed limit.
pub(crate) struct Limit {
    what: &'static str,
    rate: Rate,
    limiter: DefaultKeyedRateLimiter<String>,
}

impl Limit {
    pub(crate) fn new(what: &'static str, rate: Rate) -> Self {
        let nonzero = |value: u32| NonZeroU32::new(value.max(1)).expect("positive");
        let quota = Quota::per_second(nonzero(rate.per_second)).allow_burst(nonzero(rate.burst));
        Self { what, rate, limiter: RateLimiter::keyed(quota) }
    }

    /// `Ok`, or how long until the next call for `key` would pass.
    // `&String`, not `&str`: the limiter's map is keyed by `String`, and a
    // `&str` would cost an allocation per call (sends are the hot path).
    #[allow(clippy::ptr_arg)]
    pub(crate) fn wait(&self, key: &String) -> Result<(), Duration> {
        self.limiter.check_key(key).map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// `Ok`, or RESOURCE_EXHAUSTED with RetryInfo.
    #[allow(clippy::ptr_arg)]
    pub(crate) fn check(&self, key: &String) -> Result<(), Status> {
        self.wait(key).map_err(|wait| self.exhausted(wait))
    }

    /// `check` for a call that costs `n` (one per conversation it reads, say).
    #[allow(clippy::ptr_arg)]
    pub(crate) fn check_n(&self, key: &String, n: u32) -> Result<(), Status> {
        let Some(cost) = NonZeroU32::new(n) else { return self.check(key) };
        match self.limiter.check_key_n(key, cost) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(self.exhausted(not_until.wait_time_from(DefaultClock::default().now()))),
            Err(_) => Err(Status::resource_exhausted(format!(
                "a call costing {n} exceeds the burst of the rate limit for {} ({}); ask for fewer at once",
                self.what, self.rate.burst
            ))),
        }
    }

    pub(crate) fn exhausted(&self, wait: Duration) -> Status {
        let message = format!(
            "rate limit for {} ({} per second, burst {}) exceeded; retry in {} ms",
            self.what,
            self.rate.per_second,
            self.rate.burst,
            wait.as_millis().max(1)
        );
        Status::with_error_details(Code::ResourceExhausted, message, ErrorDetails::with_retry_info(Some(wait)))
    }

    /// Forgets keys that are back at full burst (memory follows active users).
    pub(crate) fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// Every limit of one gateway instance.
pub(crate) struct Limits {
    pub sends: Limit,
    /// Typing indicators beyond it are dropped: hints, not data.
    pub typing: Limit,
    pub reads: Limit,
    pub modifications: Limit,
    pub group_changes: Limit,
    pub direct_conversations: Limit,
    pub blocks: Limit,
    pub queries: Limit,
    pub media: Limit,
    pub push_settings: Limit,
    pub connects_per_user: Limit,
    pub connects_per_address: Limit,
    /// Checked before the token is verified (`Limits::authenticate`).
    pub calls_per_address: Limit,
    pub pre_hello: PreHello,
}

impl Limits {
    /// `sends` and `typing_per_second` per user, with the rest from `options`.
    pub(crate) fn new(sends: Rate, typing_per_second: u32, options: &RateLimits) -> Self {
        let typing = Rate::new(typing_per_second, typing_per_second.saturating_mul(2));
        Self {
            sends: Limit::new("sends", sends),
            typing: Limit::new("typing indicators", typing),
            reads: Limit::new("read marks", options.reads),
            modifications: Limit::new("message modifications", options.modifications),
            group_changes: Limit::new("group changes", options.group_changes),
            direct_conversations: Limit::new("direct conversations", options.direct_conversations),
            blocks: Limit::new("block list changes", options.blocks),
            queries: Limit::new("queries", options.queries),
            media: Limit::new("media calls", options.media),
            push_settings: Limit::new("push settings calls", options.push_settings),
            connects_per_user: Limit::new("connects per user", options.connects_per_user),
            connects_per_address: Limit::new("connects per address", options.connects_per_address),
            calls_per_address: Limit::new("calls per address", options.calls_per_address),
            pre_hello: PreHello::new(options.max_pre_hello_streams_per_address),
        }
    }

    pub(crate) fn forget_idle(&self) {
        for limit in [
            &self.sends,
            &self.typing,
            &self.reads,
            &self.modifications,
            &self.group_changes,
            &self.direct_conversations,
            &self.blocks,
            &self.queries,
            &self.media,
            &self.push_settings,
            &self.connects_per_user,
            &self.connects_per_address,
            &self.calls_per_address,
        ] {
            limit.forget_idle();
        }
    }
}

/// Streams per client address that have not sent Hello yet.
pub(crate) struct PreHello {
    max: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One stream's place among its address's pre-Hello streams; given back on drop.
pub(crate) struct PreHelloSlot {
    address: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PreHello {
    fn new(max: usize) -> Self {
        Self { max, open: Arc::default() }
    }

    /// A slot, or RESOURCE_EXHAUSTED when `address` already holds the maximum.
    pub(crate) fn take(&self, address: IpAddr) -> Result<PreHelloSlot, Status> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(address).or_insert(0);
        if *count >= self.max {
            let message =
                format!("{} streams from this address are waiting for their Hello; send Hello first", self.max);
            return Err(Status::with_error_details(
                Code::ResourceExhausted,
                message,
                ErrorDetails::with_retry_info(Some(Duration::from_secs(1))),
            ));
        }
        *count += 1;
        Ok(PreHelloSlot { address, open: self.open.clone() })
    }
}

impl Drop for PreHelloSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.address);
            }
        }
    }
}
