//! Where each role's instances listen.
//!
//! [`Discovery`] answers "which addresses serve role R right now";
//! [`StaticDiscovery`] reads them from configuration (the embedded default),
//! [`EtcdDiscovery`] watches leased registrations in etcd ([`etcd`]). Callers
//! reach a role through a [`RoleChannel`] (per call: rendezvous by route key,
//! or round robin; unreachable instances passed over), or go through
//! [`ChannelPool`] when they must reach one specific instance (a gateway that
//! holds a session).

pub mod etcd;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tonic::{codegen::http, transport::Endpoint};

use crate::{local::LocalLink, trace::Traced};

/// A channel to one instance: every call on it is traced (`trace.rs`).
pub type Channel = Traced<Link>;

/// How calls reach one instance: directly when this process serves its
/// address ([`crate::local`]), else over the network.
#[derive(Clone)]
pub enum Link {
    Network(tonic::transport::Channel),
    Local(LocalLink),
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Link::Network(_) => "Link::Network",
            Link::Local(_) => "Link::Local",
        })
    }
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for Link {
    type Response = http::Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), BoxError>> {
        match self {
            Link::Network(channel) => tonic::codegen::Service::poll_ready(channel, cx).map_err(BoxError::from),
            Link::Local(_) => std::task::Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        match self {
            Link::Network(channel) => {
                let call = tonic::codegen::Service::call(channel, request);
                Box::pin(async move { call.await.map_err(BoxError::from) })
            }
            Link::Local(link) => link.call(request),
        }
    }
}

pub use self::etcd::{EtcdDiscovery, EtcdOptions};
pub use crate::role::Role;

/// Where the addresses of other instances come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryBackend {
    /// `message` / `presence` below: right for one host or a fixed fleet.
    #[default]
    Static,
    /// Instances register in etcd with a lease and are watched ([`etcd`]).
    Etcd,
}

/// How instances find each other.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoveryOptions {
    pub backend: DiscoveryBackend,
    /// Static addresses of the internal APIs, as `host:port` (backend = "static").
    pub message: Vec<String>,
    pub presence: Vec<String>,
    pub media: Vec<String>,
    pub notify: Vec<String>,
    pub etcd: EtcdOptions,
    /// The host other instances reach this one at, registered in etcd with each
    /// bound port. Default: the IP the service listens on (which must then not
    /// be a wildcard such as 0.0.0.0).
    pub advertise_host: Option<String>,
    /// Timeout for establishing a connection to another service.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Deadline of each internal unary call.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// An instance a call could not reach is passed over for this long (unless
    /// no other is known), so retries go elsewhere before its lease expires.
    #[serde(with = "humantime_serde")]
    pub unhealthy_for: Duration,
    /// Calls to a service this same process serves (at the exact address
    /// discovery gives) skip TCP, TLS and HTTP/2 and go to its handlers
    /// directly, still authorized by this process's certificate roles.
    pub in_process: bool,
    /// Mutual TLS for every internal call: set by the binary from `tls.*`,
    /// never read from configuration itself.
    #[serde(skip)]
    pub tls: Option<crate::tls::ClientTls>,
}

impl Default for DiscoveryOptions {
    fn default() -> Self {
        Self {
            backend: DiscoveryBackend::Static,
            message: vec!["127.0.0.1:7710".into()],
            presence: vec!["127.0.0.1:7720".into()],
            media: vec!["127.0.0.1:7730".into()],
            notify: vec!["127.0.0.1:7740".into()],
            etcd: EtcdOptions::default(),
            advertise_host: None,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            unhealthy_for: Duration::from_secs(5),
            in_process: true,
            tls: None,
        }
    }
}

impl DiscoveryOptions {
    pub fn validate(&self) -> Result<(), String> {
        match self.backend {
            DiscoveryBackend::Static => {
                for (role, list) in [("discovery.message", &self.message), ("discovery.presence", &self.presence)] {
                    if list.is_empty() {
                        return Err(format!("{role} needs at least one address"));
                    }
                    for address in list {
                        endpoint(address, self).map_err(|e| format!("{role}: {e}"))?;
                    }
                }
            }
            DiscoveryBackend::Etcd => self.etcd.validate()?,
        }
        Ok(())
    }

    /// The address this instance registers for a server bound to `bound`.
    pub fn advertised(&self, bound: std::net::SocketAddr) -> Result<String, String> {
        match &self.advertise_host {
            Some(host) => Ok(format!("{host}:{}", bound.port())),
            None if bound.ip().is_unspecified() => Err(format!(
                "listening on {bound} with etcd discovery needs discovery.advertise_host (the address others reach)"
            )),
            None => Ok(bound.to_string()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no {0} instance is known")]
    NoInstances(Role),
    #[error("invalid address {address:?}: {reason}")]
    InvalidAddress { address: String, reason: String },
}

/// A failed call to an instance as callers see it: DEADLINE_EXCEEDED when
/// it was slow, UNAVAILABLE otherwise, naming the role and an error id. The
/// instance's address and the transport's own text go only to the log, with
/// that id: the gateway passes these statuses on to clients, who must not
/// learn the cluster's internal addresses.
pub fn transport_status(
    role: Role,
    address: &str,
    error: &(dyn std::fmt::Display + Sync),
    slow: bool,
) -> tonic::Status {
    let error_id = crate::ids::new_id();
    if slow {
        tracing::warn!(%error_id, %role, %address, %error, "call timed out");
        tonic::Status::deadline_exceeded(format!("the {role} service did not answer in time (error id {error_id})"))
    } else {
        tracing::warn!(%error_id, %role, %address, %error, "call failed; passing over this instance for a while");
        tonic::Status::unavailable(format!("the {role} service is unavailable, retry (error id {error_id})"))
    }
}

/// Answers which addresses serve a role, now.
pub trait Discovery: Send + Sync + 'static {
    fn endpoints(&self, role: Role) -> Vec<String>;
}

/// Addresses fixed by configuration.
#[derive(Debug, Clone)]
pub struct StaticDiscovery {
    options: DiscoveryOptions,
}

impl StaticDiscovery {
    pub fn new(options: DiscoveryOptions) -> Self {
        Self { options }
    }
}

impl Discovery for StaticDiscovery {
    fn endpoints(&self, role: Role) -> Vec<String> {
        match role {
            Role::Message => self.options.message.clone(),
            Role::Presence => self.options.presence.clone(),
            Role::Media => self.options.media.clone(),
            Role::Notify => self.options.notify.clone(),
            // Gateways are reached one by one, at the address each registers with presence.
            Role::Gateway => Vec::new(),
        }
    }
}

fn endpoint(address: &str, options: &DiscoveryOptions) -> Result<Endpoint, Error> {
    let uri = if address.contains("://") { address.to_owned() } else { format!("http://{address}") };
    let endpoint = Endpoint::from_shared(uri)
        .map_err(|e| Error::InvalidAddress { address: address.to_owned(), reason: e.to_string() })?;
    Ok(endpoint
        .connect_timeout(options.connect_timeout)
        .timeout(options.request_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

/// The gRPC metadata key whose value routes a call ([`route`]).
pub const ROUTE_KEY: &str = "messenger-route";

/// Routes `request` by `key` (a conversation id): every caller sends calls
/// with one key to the same live instance while membership is unchanged.
pub fn route<T>(request: &mut tonic::Request<T>, key: &str) {
    if let Ok(value) = key.parse() {
        request.metadata_mut().insert(ROUTE_KEY, value);
    }
}

/// `message` as a request routed by `key` (a conversation id, say), so one
/// instance usually serves a key and its caches stay warm; any instance is
/// correct.
pub fn routed<T>(key: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    route(&mut request, key);
    request
}

/// Rendezvous (highest random weight) order of `addresses` for `key`: adding
/// or removing an instance moves only the keys it wins or owned.
pub fn rank(key: &[u8], addresses: &[String]) -> Vec<String> {
    let mut weighted: Vec<(u64, &String)> = addresses.iter().map(|a| (weight(key, a.as_bytes()), a)).collect();
    weighted.sort_unstable_by(|x, y| y.cmp(x));
    weighted.into_iter().map(|(_, address)| address.clone()).collect()
}

/// FNV-1a over key and address, then a 64-bit finalizer (splitmix64): stable
/// across processes and builds, which std's hasher does not promise.
fn weight(key: &[u8], address: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.iter().chain([0xffu8].iter()).chain(address) {
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A channel to "some instance of a role", chosen per call from what
/// discovery knows now: by rendezvous over the [`ROUTE_KEY`] when the call
/// carries one, round robin otherwise. An instance a call could not reach is
/// passed over for `unhealthy_for`. Calls are never retried here (their
/// bodies are streams); callers retry idempotent calls.
///
/// Cloning is one reference count: generated clients are cloned per call.
#[derive(Clone)]
pub struct RoleChannel {
    inner: Arc<RoleChannelInner>,
}

struct RoleChannelInner {
    role: Role,
    discovery: Arc<dyn Discovery>,
    pool: ChannelPool,
    next: AtomicUsize,
    unhealthy: std::sync::Mutex<HashMap<String, Instant>>,
    unhealthy_for: Duration,
}

impl RoleChannel {
    pub fn new(discovery: Arc<dyn Discovery>, role: Role, options: &DiscoveryOptions) -> Self {
        let inner = RoleChannelInner {
            role,
            discovery,
            pool: ChannelPool::new(options.clone(), role),
            next: AtomicUsize::new(0),
            unhealthy: std::sync::Mutex::default(),
            unhealthy_for: options.unhealthy_for,
        };
        Self { inner: Arc::new(inner) }
    }

    /// The instance a call with `key` goes to now.
    pub fn pick(&self, key: Option<&[u8]>) -> Result<String, Error> {
        let this = &self.inner;
        let mut addresses = this.discovery.endpoints(this.role);
        match addresses.len() {
            0 => return Err(Error::NoInstances(this.role)),
            // Nothing to choose, nothing to pass over.
            1 => return Ok(addresses.swap_remove(0)),
            _ => {}
        }
        match key {
            Some(key) => addresses = rank(key, &addresses),
            None => {
                // Discovery lists instances in a stable order.
                let start = this.next.fetch_add(1, Ordering::Relaxed) % addresses.len();
                addresses.rotate_left(start);
            }
        }
        let now = Instant::now();
        let mut unhealthy = this.unhealthy.lock().unwrap_or_else(|e| e.into_inner());
        unhealthy.retain(|_, until| *until > now);
        let healthy = addresses.iter().find(|address| !unhealthy.contains_key(*address));
        Ok(healthy.unwrap_or(&addresses[0]).clone())
    }

    /// The channel to one instance (for callers that keep their own stream
    /// per instance); pair with [`RoleChannel::mark_unhealthy`].
    pub fn instance(&self, address: &str) -> Result<Channel, Error> {
        self.inner.pool.get(address)
    }

    pub fn role(&self) -> Role {
        self.inner.role
    }

    /// The instances discovery knows now.
    pub fn instances(&self) -> Vec<String> {
        self.inner.discovery.endpoints(self.inner.role)
    }

    /// Passes `address` over for `unhealthy_for` (a call could not reach it).
    pub fn mark_unhealthy(&self, address: String) {
        let until = Instant::now() + self.inner.unhealthy_for;
        self.inner.unhealthy.lock().unwrap_or_else(|e| e.into_inner()).insert(address, until);
    }
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for RoleChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), BoxError>> {
        // Each call readies the instance channel it picks.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let key = request.headers().get(ROUTE_KEY).map(|value| value.as_bytes().to_vec());
            let unavailable = |error: Error| BoxError::from(tonic::Status::unavailable(error.to_string()));
            let address = this.pick(key.as_deref()).map_err(unavailable)?;
            let mut channel = this
                .inner
                .pool
                .get(&address)
                .map_err(|error| BoxError::from(transport_status(this.inner.role, &address, &error, false)))?;
            let result = async {
                futures::future::poll_fn(|cx| tonic::codegen::Service::poll_ready(&mut channel, cx)).await?;
                tonic::codegen::Service::call(&mut channel, request).await
            }
            .await;
            // Every error here is the transport's (the server's own errors
            // arrive as responses). A call past its deadline says the call
            // was slow, not that the instance is gone: DEADLINE_EXCEEDED, and
            // the instance keeps its traffic. Anything else (refused, reset)
            // means unreachable, or the call's fate unknown: UNAVAILABLE, which
            // tells callers to retry idempotent calls, and the instance is
            // passed over for a while.
            result.map_err(|error| {
                let role = this.inner.role;
                let slow = timed_out(&*error);
                if !slow {
                    this.mark_unhealthy(address.clone());
                }
                BoxError::from(transport_status(role, &address, &error, slow))
            })
        })
    }
}

/// Whether a transport error is the per-call deadline expiring.
pub fn timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error.is::<tonic::TimeoutExpired>() {
            return true;
        }
        cause = error.source();
    }
    false
}

/// A channel to the instances of `role`, following discovery as it changes.
pub fn channel(discovery: Arc<dyn Discovery>, role: Role, options: &DiscoveryOptions) -> RoleChannel {
    RoleChannel::new(discovery, role, options)
}

/// One lazily connecting channel per instance address of `role`, reused
/// across calls (over mutual TLS when configured, verifying the server as
/// that role). Cloning shares the pool (reference counts only).
#[derive(Clone, Debug)]
pub struct ChannelPool {
    options: Arc<DiscoveryOptions>,
    role: Role,
    channels: Arc<std::sync::Mutex<HashMap<String, Channel>>>,
}

impl ChannelPool {
    pub fn new(options: DiscoveryOptions, role: Role) -> Self {
        Self { options: Arc::new(options), role, channels: Arc::default() }
    }

    pub fn get(&self, address: &str) -> Result<Channel, Error> {
        if self.options.in_process {
            let caller = self.options.tls.as_ref().map(crate::tls::ClientTls::roles);
            if let Some(link) = crate::local::link(address, caller, self.options.request_timeout) {
                return Ok(Traced::new(Link::Local(link)));
            }
        }
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let endpoint = endpoint(address, &self.options)?;
        let channel = Traced::new(Link::Network(match &self.options.tls {
            Some(tls) => endpoint.connect_with_connector_lazy(tls.connector(self.role)),
            None => endpoint.connect_lazy(),
        }));
        channels.insert(address.to_owned(), channel.clone());
        Ok(channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addresses(count: usize) -> Vec<String> {
        (0..count).map(|i| format!("10.0.0.{i}:7710")).collect()
    }

    #[test]
    fn rendezvous_spreads_keys_and_moves_only_the_leavers_keys() {
        let five = addresses(5);
        let keys: Vec<String> = (0..5000).map(|i| format!("conversation-{i}")).collect();
        let owner = |key: &String, set: &[String]| rank(key.as_bytes(), set)[0].clone();
        let mut load: HashMap<String, usize> = HashMap::new();
        for key in &keys {
            *load.entry(owner(key, &five)).or_default() += 1;
        }
        assert!(load.values().all(|&n| (700..=1300).contains(&n)), "uneven spread: {load:?}");
        let four = &five[..4];
        for key in &keys {
            let before = owner(key, &five);
            if before != five[4] {
                assert_eq!(owner(key, four), before, "a key moved that the leaver did not own");
            }
        }
    }

    #[test]
    fn role_channel_routes_by_key_and_passes_over_unreachable_instances() {
        let options = DiscoveryOptions { message: addresses(3), ..DiscoveryOptions::default() };
        let channel = RoleChannel::new(Arc::new(StaticDiscovery::new(options.clone())), Role::Message, &options);
        let first = channel.pick(Some(b"c-1")).unwrap();
        assert_eq!(channel.pick(Some(b"c-1")).unwrap(), first, "one key, one instance");
        channel.mark_unhealthy(first.clone());
        let second = channel.pick(Some(b"c-1")).unwrap();
        assert_ne!(second, first);
        assert_eq!(second, rank(b"c-1", &options.message)[1], "the next in rendezvous order");
        // Without a key: round robin over all three.
        let picks: std::collections::HashSet<String> = (0..3).map(|_| channel.pick(None).unwrap()).collect();
        assert_eq!(picks.len(), 2, "the unhealthy instance is passed over while others exist");
        let empty = DiscoveryOptions { message: Vec::new(), ..DiscoveryOptions::default() };
        let none = RoleChannel::new(Arc::new(StaticDiscovery::new(empty.clone())), Role::Message, &empty);
        assert!(matches!(none.pick(None), Err(Error::NoInstances(Role::Message))));
    }
}
