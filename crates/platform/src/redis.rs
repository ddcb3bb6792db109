//! Where a service's Redis is and how it is reached, and the one way services
//! build a Redis client (`fred`), so every Redis user fails fast and
//! reconnects the same way.

use std::time::Duration;

use fred::{
    clients::Client,
    interfaces::ClientLike,
    types::{
        Builder,
        config::{Config, ReconnectPolicy},
    },
};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisOptions {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// Every key starts with this, so several deployments (and services) can share a Redis.
    pub key_prefix: String,
    /// A call slower than this fails (and the caller degrades or answers UNAVAILABLE).
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            key_prefix: "messenger:".into(),
            command_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(1),
        }
    }
}

impl RedisOptions {
    /// `section` names these options in messages, e.g. `presence.redis`.
    pub fn validate(&self, section: &str) -> Result<(), String> {
        Config::from_url(&self.url).map_err(|error| format!("{section}.url: {error}"))?;
        if self.key_prefix.is_empty() {
            return Err(format!("{section}.key_prefix must not be empty"));
        }
        for (key, value) in [("command_timeout", self.command_timeout), ("connect_timeout", self.connect_timeout)] {
            if value.is_zero() {
                return Err(format!("{section}.{key} must be positive"));
            }
        }
        Ok(())
    }

    /// A client whose commands fail after `command_timeout` (never queued for
    /// long behind a dead server) and that reconnects forever, 50 ms doubling
    /// to 2 s. Connecting starts in the background; `Err` only for an
    /// unusable URL.
    pub fn client(&self) -> Result<Client, String> {
        let config = Config::from_url(&self.url).map_err(|error| format!("{:?}: {error}", self.url))?;
        let client = Builder::from_config(config)
            .with_performance_config(|performance| performance.default_command_timeout = self.command_timeout)
            .with_connection_config(|connection| {
                connection.connection_timeout = self.connect_timeout;
                connection.internal_command_timeout = self.connect_timeout;
                connection.max_command_attempts = 1;
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2))
            .build()
            .map_err(|error| error.to_string())?;
        client.connect();
        Ok(client)
    }
}
