//! `ScyllaOptions` (`message.scylla`): the limits of the message store's
//! send path on the cluster `[scylla]` names ([`Cluster`]).

use std::time::Duration;

use messenger_platform::cql::Cluster;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScyllaOptions {
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
    /// Most roster members of conversation heads kept in memory (each head
    /// counts its members plus one); 0 keeps none. A kept head saves a send
    /// batch its serial head read and a delivered ack its head and member
    /// reads (`scylla/head.rs` says why a stale one is harmless).
    pub head_cache_members: u64,
}

impl Default for ScyllaOptions {
    fn default() -> Self {
        Self {
            lwt_max_retries: 20,
            max_reservation: 256,
            dedupe_ttl: Duration::from_secs(7 * 24 * 3600),
            lock_timeout: Duration::from_secs(15),
            batch_max_bytes: 40 * 1024,
            head_cache_members: 200_000,
        }
    }
}

/// Scylla's longest TTL (20 years).
const MAX_TTL_SECONDS: u64 = 630_720_000;

impl ScyllaOptions {
    /// Checked against the cluster's `request_timeout`, which a writer's
    /// budget must hold.
    pub fn validate(&self, cluster: &Cluster) -> Result<(), String> {
        for (key, value) in [("dedupe_ttl", self.dedupe_ttl), ("lock_timeout", self.lock_timeout)] {
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
        if self.lock_timeout < cluster.request_timeout * 6 {
            return Err(format!(
                "message.scylla.lock_timeout ({:?}) must be at least 6 x scylla.request_timeout ({:?}): a \
                 writer's row writes (three attempts) must end within half of it",
                self.lock_timeout, cluster.request_timeout
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

    pub(super) fn dedupe_ttl_seconds(&self) -> i32 {
        self.dedupe_ttl.as_secs().min(MAX_TTL_SECONDS) as i32
    }
}
