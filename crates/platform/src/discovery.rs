//! Where each role's instances listen.
//!
//! [`Discovery`] answers "which addresses serve role R right now"; [`StaticDiscovery`]
//! reads them from configuration (the embedded default). Callers build channels with
//! [`channel`] for a role, or go through [`ChannelPool`] when they must reach one
//! specific instance (a gateway that holds a session).

use std::{collections::HashMap, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Gateway,
    Message,
    Presence,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Message => "message",
            Role::Presence => "presence",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "gateway" => Ok(Role::Gateway),
            "message" => Ok(Role::Message),
            "presence" => Ok(Role::Presence),
            other => Err(format!("unknown service {other:?} (expected gateway, message or presence)")),
        }
    }
}

/// Static addresses of the internal APIs, as `host:port`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoveryOptions {
    pub message: Vec<String>,
    pub presence: Vec<String>,
    /// Timeout for establishing a connection to another service.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Deadline of each internal unary call.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for DiscoveryOptions {
    fn default() -> Self {
        Self {
            message: vec!["127.0.0.1:7710".into()],
            presence: vec!["127.0.0.1:7720".into()],
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
        }
    }
}

impl DiscoveryOptions {
    pub fn validate(&self) -> Result<(), String> {
        for (role, list) in [("discovery.message", &self.message), ("discovery.presence", &self.presence)] {
            if list.is_empty() {
                return Err(format!("{role} needs at least one address"));
            }
            for address in list {
                endpoint(address, self).map_err(|e| format!("{role}: {e}"))?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no {0} instance is known")]
    NoInstances(Role),
    #[error("invalid address {address:?}: {reason}")]
    InvalidAddress { address: String, reason: String },
}

/// Answers which addresses serve a role.
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

/// A lazily connecting channel balanced over every instance of `role`.
pub fn channel(discovery: &dyn Discovery, role: Role, options: &DiscoveryOptions) -> Result<Channel, Error> {
    let endpoints =
        discovery.endpoints(role).iter().map(|address| endpoint(address, options)).collect::<Result<Vec<_>, _>>()?;
    match endpoints.len() {
        0 => Err(Error::NoInstances(role)),
        1 => Ok(endpoints.into_iter().next().expect("one endpoint").connect_lazy()),
        _ => Ok(Channel::balance_list(endpoints.into_iter())),
    }
}

/// One lazily connecting channel per instance address, reused across calls.
#[derive(Clone, Debug)]
pub struct ChannelPool {
    options: DiscoveryOptions,
    channels: Arc<std::sync::Mutex<HashMap<String, Channel>>>,
}

impl ChannelPool {
    pub fn new(options: DiscoveryOptions) -> Self {
        Self { options, channels: Arc::default() }
    }

    pub fn get(&self, address: &str) -> Result<Channel, Error> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let channel = endpoint(address, &self.options)?.connect_lazy();
        channels.insert(address.to_owned(), channel.clone());
        Ok(channel)
    }
}
