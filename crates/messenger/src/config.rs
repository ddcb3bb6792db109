//! The whole system's configuration: one section per service plus what they share.
//!
//! Loaded by [`messenger_platform::config::load`]: defaults -> `--config` TOML
//! file -> `MESSENGER_*` environment (`__` between sections) -> flags.

use std::path::PathBuf;

use messenger_platform::{
    auth::AuthOptions,
    config::Validate,
    discovery::DiscoveryOptions,
    server::ServerOptions,
    telemetry::{LogOptions, TracingOptions},
    tls::TlsOptions,
};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where embedded backends keep their files (`messages.db`, `media.db`, `notify.db`, `objects/`).
    pub data_dir: PathBuf,
    pub log: LogOptions,
    /// Traces (and metrics) over OTLP.
    pub tracing: TracingOptions,
    /// The admin port: `/metrics`, `/livez`, `/readyz`.
    pub admin: messenger_platform::admin::AdminOptions,
    pub auth: AuthOptions,
    pub tls: TlsOptions,
    pub server: ServerOptions,
    pub discovery: DiscoveryOptions,
    pub gateway: messenger_gateway::Options,
    pub message: messenger_message::Options,
    pub presence: messenger_presence::Options,
    pub media: messenger_media::Options,
    pub notify: messenger_notify::Options,
    /// The ScyllaDB (or Cassandra) cluster of the message, media and notify
    /// stores that are on it, and `messenger migrate`.
    pub scylla: messenger_platform::cql::Cluster,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data"),
            log: LogOptions::default(),
            tracing: TracingOptions::default(),
            admin: messenger_platform::admin::AdminOptions::default(),
            auth: AuthOptions::default(),
            tls: TlsOptions::default(),
            server: ServerOptions::default(),
            discovery: DiscoveryOptions::default(),
            gateway: messenger_gateway::Options::default(),
            message: messenger_message::Options::default(),
            presence: messenger_presence::Options::default(),
            media: messenger_media::Options::default(),
            notify: messenger_notify::Options::default(),
            scylla: messenger_platform::cql::Cluster::default(),
        }
    }
}

impl Validate for Config {
    fn validate(&self) -> Result<(), String> {
        messenger_platform::config::refuse_redacted(self)?;
        self.server.validate()?;
        self.tracing.validate()?;
        self.tls.validate()?;
        self.discovery.validate()?;
        self.gateway.validate()?;
        self.message.validate()?;
        self.presence.validate()?;
        self.media.validate()?;
        self.notify.validate()?;
        if self.message.store == messenger_message::StoreBackend::Scylla {
            self.message.scylla.validate(&self.scylla)?;
        }
        if self.uses_scylla() {
            self.scylla.validate()?;
        }
        self.gateway.validate_renewal(self.presence.session_ttl)?;
        // Key files must parse; whether any key is configured is checked
        // where a gateway starts (`messenger up` runs in development mode).
        messenger_platform::auth::Verifier::from_options(&self.auth.clone().or_development())
            .map_err(|e| format!("auth: {e}"))?;
        Ok(())
    }
}

impl Config {
    /// Whether any store is on the Scylla cluster (`[scylla]`).
    pub fn uses_scylla(&self) -> bool {
        self.message.store == messenger_message::StoreBackend::Scylla
            || self.media.store == messenger_media::StoreBackend::Scylla
            || self.notify.store == messenger_notify::StoreBackend::Scylla
    }

    /// The SQLite file of the message service.
    pub fn database_path(&self) -> PathBuf {
        messenger_message::database_path(&self.message, &self.data_dir)
    }

    /// A configuration for tests and benchmarks: every listener on a free
    /// loopback port, data under `data_dir`, development keys.
    pub fn for_loopback(data_dir: impl Into<PathBuf>) -> Self {
        let mut config = Config { data_dir: data_dir.into(), ..Config::default() };
        config.auth.development = true;
        config.admin.listen = "127.0.0.1:0".into();
        config.gateway.listen = "127.0.0.1:0".into();
        config.gateway.internal_listen = "127.0.0.1:0".into();
        config.gateway.web.listen = "127.0.0.1:0".into();
        config.message.listen = "127.0.0.1:0".into();
        config.presence.listen = "127.0.0.1:0".into();
        config.media.listen = "127.0.0.1:0".into();
        config.notify.listen = "127.0.0.1:0".into();
        config.media.s3.embedded = true;
        config.media.s3.embedded_listen = "127.0.0.1:0".into();
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_render() {
        let config = Config::default();
        config.validate().unwrap();
        let text = messenger_platform::config::render(&config).unwrap();
        assert!(text.contains("[gateway]"), "{text}");
        let parsed: Config = toml::from_str(&text).unwrap();
        assert_eq!(parsed.gateway.listen, config.gateway.listen);
    }

    /// Through the layers `messenger` loads (defaults under the file): a
    /// file's replication replaces the default one instead of merging into it.
    #[test]
    fn a_files_replication_is_taken_whole_over_the_defaults() {
        let text = r#"
            [scylla.replication]
            strategy = "NetworkTopologyStrategy"
            datacenters = { dc1 = 3 }
        "#;
        let config: Config = messenger_platform::config::parse(text).unwrap();
        let expected = messenger_platform::cql::Replication::NetworkTopologyStrategy {
            datacenters: [("dc1".to_owned(), 3)].into(),
        };
        assert_eq!(config.scylla.replication(), expected);
        let simple = r#"scylla.replication = { strategy = "SimpleStrategy", factor = 2 }"#;
        let config: Config = messenger_platform::config::parse(simple).unwrap();
        assert_eq!(config.scylla.replication(), messenger_platform::cql::Replication::SimpleStrategy { factor: 2 });
        let mixed = r#"scylla.replication = { strategy = "SimpleStrategy", factor = 2, datacenters = { dc1 = 3 } }"#;
        assert!(messenger_platform::config::parse::<Config>(mixed).is_err(), "a mixed table is refused");
        let unset: Config = messenger_platform::config::parse("").unwrap();
        assert_eq!(unset.scylla.replication(), messenger_platform::cql::Replication::SimpleStrategy { factor: 1 });
    }

    #[test]
    fn zero_limits_are_refused() {
        let mut config = Config::default();
        config.gateway.session_queue_depth = 0;
        assert!(config.validate().unwrap_err().contains("gateway.session_queue_depth"));
    }
}
