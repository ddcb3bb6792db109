//! `ScyllaOptions`: where the cluster is, how the keyspace is replicated,
//! consistency levels, timeouts and the limits of the send path.

use std::time::Duration;

use messenger_platform::{
    cql::{Cluster, ConsistencyLevel, Replication, SerialLevel, valid_datacenter, valid_identifier},
    tls::BackendTls,
};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScyllaOptions {
    /// Contact points, `host:port`.
    pub nodes: Vec<String>,
    pub keyspace: String,
    /// Used by `migrate` when it creates the keyspace; unset means
    /// `SimpleStrategy` with one replica (development). Not a default value:
    /// the layers below a file would merge into a file's table, so a file's
    /// `NetworkTopologyStrategy` would carry the default's `factor`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replication: Option<Replication>,
    /// Prefer (and stay in) this datacenter; None treats every node as local.
    pub local_datacenter: Option<String>,
    pub consistency: ConsistencyLevel,
    /// Paxos consistency of LWTs and of the reads policy decisions use.
    pub serial_consistency: SerialLevel,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Create the keyspace and tables at start (also `messenger migrate`).
    pub migrate_on_start: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    /// TLS to the nodes: on when `tls.ca_file` is set. The driver checks each
    /// node's certificate for the node's IP address (the address it
    /// connects to), or for `tls.server_name` when set.
    pub tls: BackendTls,
    /// Conflicting head LWTs one batch retries before answering UNAVAILABLE.
    pub lwt_max_retries: u32,
    /// Most seqs reserved by one LWT (most sends batched together).
    pub max_reservation: usize,
    /// How long a send's dedupe claim is kept.
    #[serde(with = "humantime_serde")]
    pub dedupe_ttl: Duration,
    /// A writer's budget: a send reserves its seqs within half of it, writes
    /// no row once half of it has passed since the reservation, and
    /// acknowledges no row written after all of it. Another instance takes
    /// over a send claim, or a conversation's apply lock, only after twice it
    /// (its holder can then no longer succeed), and forward reads declare a
    /// missing seq lost only when the next present row is older than twice
    /// it. Rows are stamped at their reservation on the writer's clock and
    /// judged on the reader's, so the instances' clocks must agree within
    /// `lock_timeout / 8` (NTP keeps them within milliseconds): a reader ahead
    /// by more could declare lost a seq whose writer may still acknowledge it
    /// (the derivation is in `scylla.rs`). Changes recorded in the head are
    /// never skipped, however old.
    #[serde(with = "humantime_serde")]
    pub lock_timeout: Duration,
    /// Most bytes of messages one batch of sends writes (bodies plus
    /// a fixed allowance per row). Keep it under the cluster's
    /// `batch_size_fail_threshold`: Cassandra refuses batches past 50 KiB by
    /// default, ScyllaDB past 1 MiB. A single larger message goes alone.
    pub batch_max_bytes: usize,
}

impl Default for ScyllaOptions {
    fn default() -> Self {
        Self {
            nodes: vec!["127.0.0.1:9042".into()],
            keyspace: "messenger".into(),
            replication: None,
            local_datacenter: None,
            consistency: ConsistencyLevel::LocalQuorum,
            serial_consistency: SerialLevel::LocalSerial,
            request_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(5),
            migrate_on_start: false,
            username: None,
            password: None,
            tls: BackendTls::default(),
            lwt_max_retries: 20,
            max_reservation: 256,
            dedupe_ttl: Duration::from_secs(7 * 24 * 3600),
            lock_timeout: Duration::from_secs(15),
            batch_max_bytes: 40 * 1024,
        }
    }
}

/// Scylla's longest TTL (20 years).
const MAX_TTL_SECONDS: u64 = 630_720_000;

impl ScyllaOptions {
    pub fn validate(&self) -> Result<(), String> {
        if self.nodes.is_empty() || self.nodes.iter().any(|node| node.trim().is_empty()) {
            return Err("message.scylla.nodes must list at least one non-empty host:port".into());
        }
        if !valid_identifier(&self.keyspace) {
            return Err(format!("message.scylla.keyspace {:?} must match [a-z_][a-z0-9_]{{0,47}}", self.keyspace));
        }
        match &self.replication() {
            Replication::SimpleStrategy { factor } if *factor == 0 => {
                return Err("message.scylla.replication.factor must be positive".into());
            }
            Replication::NetworkTopologyStrategy { datacenters } => {
                if datacenters.is_empty() {
                    return Err("message.scylla.replication.datacenters must name at least one datacenter".into());
                }
                for (datacenter, factor) in datacenters {
                    if !valid_datacenter(datacenter) {
                        return Err(format!("message.scylla.replication: bad datacenter name {datacenter:?}"));
                    }
                    if *factor == 0 {
                        return Err(format!("message.scylla.replication: datacenter {datacenter} has factor 0"));
                    }
                }
            }
            Replication::SimpleStrategy { .. } => {}
        }
        if let Some(datacenter) = &self.local_datacenter
            && !valid_datacenter(datacenter)
        {
            return Err(format!("message.scylla.local_datacenter: bad datacenter name {datacenter:?}"));
        }
        if self.username.is_some() != self.password.is_some() {
            return Err("message.scylla.username and message.scylla.password go together".into());
        }
        self.tls.validate("message.scylla.tls")?;
        let durations = [
            ("request_timeout", self.request_timeout),
            ("connect_timeout", self.connect_timeout),
            ("dedupe_ttl", self.dedupe_ttl),
            ("lock_timeout", self.lock_timeout),
        ];
        for (key, value) in durations {
            if value.is_zero() {
                return Err(format!("message.scylla.{key} must be positive"));
            }
        }
        if self.dedupe_ttl.as_secs() < 1 || self.dedupe_ttl.as_secs() > MAX_TTL_SECONDS {
            return Err(format!("message.scylla.dedupe_ttl must be between 1 s and {MAX_TTL_SECONDS} s"));
        }
        if self.lwt_max_retries == 0 {
            return Err("message.scylla.lwt_max_retries must be positive".into());
        }
        // A writer reserves within `lock_timeout / 2`, then writes its rows
        // (up to three attempts of `request_timeout`) within the other half:
        // others treat its claims and locks as abandoned only after that.
        if self.lock_timeout < self.request_timeout * 6 {
            return Err(format!(
                "message.scylla.lock_timeout ({:?}) must be at least 6 x request_timeout ({:?}): a writer's \
                 row writes (three attempts) must end within half of it",
                self.lock_timeout, self.request_timeout
            ));
        }
        if self.batch_max_bytes < 1024 {
            return Err("message.scylla.batch_max_bytes must be at least 1024".into());
        }
        if self.max_reservation == 0 || self.max_reservation > 4096 {
            return Err("message.scylla.max_reservation must be between 1 and 4096".into());
        }
        Ok(())
    }

    /// The keyspace's replication: the configured one, else one replica.
    pub fn replication(&self) -> Replication {
        self.replication.clone().unwrap_or(Replication::SimpleStrategy { factor: 1 })
    }

    /// The connection settings every CQL store of this cluster uses (the
    /// media store too, when `media.store = "scylla"`).
    pub fn cluster(&self) -> Cluster {
        Cluster {
            nodes: self.nodes.clone(),
            keyspace: self.keyspace.clone(),
            replication: self.replication(),
            migrate_on_start: self.migrate_on_start,
            local_datacenter: self.local_datacenter.clone(),
            consistency: self.consistency,
            serial_consistency: self.serial_consistency,
            request_timeout: self.request_timeout,
            connect_timeout: self.connect_timeout,
            credentials: self.username.clone().zip(self.password.clone()),
            tls: self.tls.clone(),
        }
    }

    pub(super) fn dedupe_ttl_seconds(&self) -> i32 {
        self.dedupe_ttl.as_secs().min(MAX_TTL_SECONDS) as i32
    }
}
