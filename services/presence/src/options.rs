//! The presence service's configuration.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use messenger_platform::redis::RedisOptions;

/// Where sessions and last-seen times live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// In this process: right for one presence instance (`messenger up`).
    #[default]
    Memory,
    /// Redis, shared by every presence instance.
    Redis,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// Internal gRPC address (never exposed to clients).
    pub listen: String,
    /// Most users one Locate or Status call may ask about, and most sessions
    /// one Renew may carry.
    pub max_users_per_call: usize,
    /// Most concurrent sessions (devices) one user may hold; expired ones do not count.
    pub max_sessions_per_user: usize,
    /// How long a registration lives without renewal. Gateways renew their
    /// sessions more often than this (`gateway.presence_renew_interval`), so
    /// only the sessions of a gateway that died or lost presence expire.
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    pub backend: Backend,
    /// Used when `backend = "redis"`.
    pub redis: RedisOptions,
}

/// Shorter leases would expire between two renewals of a healthy gateway.
const MIN_SESSION_TTL: Duration = Duration::from_millis(100);

impl Default for Options {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7720".into(),
            max_users_per_call: 10_000,
            max_sessions_per_user: 16,
            session_ttl: Duration::from_secs(30),
            backend: Backend::Memory,
            redis: RedisOptions { key_prefix: "messenger:presence:".into(), ..RedisOptions::default() },
        }
    }
}

impl Options {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_users_per_call == 0 {
            return Err("presence.max_users_per_call must be positive".into());
        }
        if self.max_sessions_per_user == 0 {
            return Err("presence.max_sessions_per_user must be positive".into());
        }
        if self.session_ttl < MIN_SESSION_TTL {
            return Err(format!("presence.session_ttl must be at least {}ms", MIN_SESSION_TTL.as_millis()));
        }
        if self.backend == Backend::Redis {
            self.redis.validate("presence.redis")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_refused() {
        Options::default().validate().unwrap();
        let short = Options { session_ttl: Duration::from_millis(10), ..Options::default() };
        assert!(short.validate().unwrap_err().contains("session_ttl"));
        let mut redis = Options { backend: Backend::Redis, ..Options::default() };
        redis.validate().unwrap();
        redis.redis.url = "not a url".into();
        assert!(redis.validate().unwrap_err().contains("presence.redis.url"));
        redis.redis = RedisOptions { command_timeout: Duration::ZERO, ..RedisOptions::default() };
        assert!(redis.validate().unwrap_err().contains("command_timeout"));
    }
}
