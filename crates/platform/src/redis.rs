//! Where a service's Redis is and how it is reached, and the one way services
//! build a Redis client (`fred`), so every Redis user fails fast and
//! reconnects the same way, over TLS when `tls` says so.

use std::{borrow::Cow, time::Duration};

use fred::{
    clients::Client,
    interfaces::ClientLike,
    types::{
        Builder,
        config::{Config, ReconnectPolicy, TlsConfig},
    },
};
use serde::{Deserialize, Serialize};

use crate::tls::BackendTls;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisOptions {
    /// `redis://[user:password@]host:port[/db]`; `rediss://` says TLS, and
    /// needs `tls.ca_file` (with it set, `redis://` goes over TLS too).
    pub url: String,
    /// Every key starts with this, so several deployments (and services) can share a Redis.
    pub key_prefix: String,
    /// A call slower than this fails (and the caller degrades or answers UNAVAILABLE).
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// TLS to Redis: on when `tls.ca_file` is set.
    pub tls: BackendTls,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            key_prefix: "messenger:".into(),
            command_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(1),
            tls: BackendTls::default(),
        }
    }
}

impl RedisOptions {
    /// `section` names these options in messages, e.g. `presence.redis`.
    pub fn validate(&self, section: &str) -> Result<(), String> {
        let (url, says_tls) = without_tls_scheme(&self.url);
        Config::from_url(&url).map_err(|error| format!("{section}.url: {error}"))?;
        if says_tls && !self.tls.enabled() {
            return Err(format!(
                "{section}.url is rediss:// but {section}.tls.ca_file is unset: name the CA that signed \
                 Redis's certificate"
            ));
        }
        self.tls.validate(&format!("{section}.tls"))?;
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
    /// unusable URL or TLS file.
    pub fn client(&self) -> Result<Client, String> {
        let (url, _) = without_tls_scheme(&self.url);
        let mut config = Config::from_url(&url).map_err(|error| format!("url {:?}: {error}", self.url))?;
        if let Some(tls) = self.tls.client_config().map_err(|error| format!("tls: {error}"))? {
            config.tls = Some(TlsConfig::from(tls));
        }
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

/// The URL as fred should parse it, and whether its scheme asked for TLS
/// (`rediss`, `valkeys`). Given a TLS scheme, fred builds TLS settings of its
/// own (the system's CAs, and `ClientConfig::builder()`, which panics when
/// rustls was built with more than one crypto provider, as here): TLS comes
/// from `tls` alone.
fn without_tls_scheme(url: &str) -> (Cow<'_, str>, bool) {
    for (tls, plain) in [("rediss", "redis"), ("valkeys", "valkey")] {
        if let Some(rest) = url.strip_prefix(tls) {
            return (Cow::Owned(format!("{plain}{rest}")), true);
        }
    }
    (Cow::Borrowed(url), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tls_scheme_needs_a_ca_and_is_parsed_as_plain() {
        assert_eq!(without_tls_scheme("rediss://h:6380/1"), (Cow::Borrowed("redis://h:6380/1"), true));
        assert_eq!(without_tls_scheme("rediss-cluster://h:1"), (Cow::Borrowed("redis-cluster://h:1"), true));
        assert_eq!(without_tls_scheme("redis://h:6379"), (Cow::Borrowed("redis://h:6379"), false));
        let tls_url = RedisOptions { url: "rediss://127.0.0.1:6380".into(), ..RedisOptions::default() };
        let error = tls_url.validate("presence.redis").unwrap_err();
        assert!(error.contains("presence.redis.tls.ca_file"), "{error}");
        let with_ca =
            RedisOptions { tls: BackendTls { ca_file: Some("ca.pem".into()), ..BackendTls::default() }, ..tls_url };
        with_ca.validate("presence.redis").unwrap();
        // The files are read when the client is built: a missing one is named then.
        let error = with_ca.client().unwrap_err();
        assert!(error.contains("ca.pem"), "{error}");
    }
}
