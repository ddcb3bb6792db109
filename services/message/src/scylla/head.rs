//! What sends, changes and reads share about a conversation's head besides
//! its row: the heads this instance last knew ([`Heads`]), the apply lock's
//! record of a change still to be written ([`Pending`]), when a lock or
//! claim is past its holder's budget, and how a lost seq is declared. Below
//! `send`, `apply` and `reads`, which all build on it.

use std::sync::Arc;

use futures::future::join_all;
use serde::{Deserialize, Serialize};
use tracing::warn;
use uuid::Uuid;

use super::{
    Inner,
    rows::{Head, bucket, bucket_span, seq_value},
};
use crate::{
    error::Result,
    store::{Role, StoredMessage},
};

/// The head of each conversation as this instance last knew it: read at
/// serial consistency or written by its own reservation. Never trusted for
/// a decision the head's LWT does not check again:
/// - a send reserves against the kept head (`IF last_seq = kept`), so a
///   stale one only costs a failed LWT and the serial read it saves;
/// - a delivered cursor at or below the kept `last_seq` of a user the kept
///   roster lists needs no clamp (a later removal ends after `last_seq`,
///   and `last_seq` only grows), so the ack reads neither head nor member.
///
/// A head holding the apply lock is never kept (its change is not written
/// yet); a change made here forgets its conversation's head. Bounded by
/// `message.scylla.head_cache_members` (each head weighs its roster plus one).
pub(crate) struct Heads {
    cache: Option<moka::sync::Cache<Uuid, Arc<Head>>>,
}

impl Heads {
    pub(super) fn new(max_members: u64) -> Heads {
        let cache = (max_members > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(max_members)
                .weigher(|_, head: &Arc<Head>| u32::try_from(head.roster.len() + 1).unwrap_or(u32::MAX))
                .build()
        });
        Heads { cache }
    }

    pub(super) fn get(&self, id: Uuid) -> Option<Arc<Head>> {
        self.cache.as_ref()?.get(&id)
    }

    /// Keeps `head` unless one with a later `last_seq` is kept already.
    pub(super) fn keep(&self, head: Head) {
        let Some(cache) = &self.cache else { return };
        if head.applying.is_some() {
            return cache.invalidate(&head.id);
        }
        let head = Arc::new(head);
        cache.entry(head.id).and_upsert_with(|kept| match kept {
            Some(kept) if kept.value().last_seq > head.last_seq => kept.into_value(),
            _ => head,
        });
    }

    pub(super) fn forget(&self, id: Uuid) {
        if let Some(cache) = &self.cache {
            cache.invalidate(&id);
        }
    }
}

/// Row changes a plan makes once its entries have seqs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) enum Effect {
    /// Starts a membership at the first entry's seq.
    Join(String, Role),
    /// Ends a membership at the first entry's seq.
    End(String),
    SetRole(String, Role),
    /// Edits the target; the first entry is the edit.
    Edit {
        target_seq: u64,
        body: String,
        now_ms: i64,
    },
    Delete {
        target_seq: u64,
        edits: Vec<u64>,
    },
    React {
        target_seq: u64,
        user: String,
        emoji: String,
    },
}

/// What a change that holds the apply lock still has to write: its entries
/// (with seqs) and row effects, recorded in the head by the lock's LWT.
#[derive(Serialize, Deserialize)]
pub(super) struct Pending {
    pub(super) entries: Vec<StoredMessage>,
    pub(super) effects: Vec<Effect>,
    pub(super) now_ms: i64,
}

impl Pending {
    pub(super) fn of(head: &Head) -> Option<Pending> {
        let text = head.pending.as_deref()?;
        match serde_json::from_str(text) {
            Ok(pending) => Some(pending),
            Err(error) => {
                warn!(%error, conversation_id = %head.id, "unreadable pending change");
                None
            }
        }
    }

    /// How many of `rows` come before the first seq this change will still
    /// write at or after `from` (`rows.len()` if none).
    pub(super) fn first_row_after(&self, rows: &[StoredMessage], from: u64) -> usize {
        let Some(first) = self.entries.iter().map(|entry| entry.seq).filter(|seq| *seq >= from).min() else {
            return rows.len();
        };
        rows.iter().position(|row| row.seq > first).unwrap_or(rows.len())
    }

    /// The seq at which this change ends `user`'s membership, if it does.
    pub(super) fn ends(&self, user: &str) -> Option<u64> {
        let ends = self.effects.iter().any(|effect| matches!(effect, Effect::End(ended) if ended == user));
        ends.then(|| self.entries.first().map(|entry| entry.seq)).flatten()
    }
}

/// How long a claim or apply lock without progress stays its holder's.
pub(super) fn takeover_after_ms(inner: &Inner) -> i64 {
    2 * inner.options.lock_timeout.as_millis() as i64
}

/// Whether the apply lock in `head` outlived its holder's budget.
pub(super) fn stale_lock(inner: &Inner, head: &Head, now_ms: i64) -> bool {
    head.applying.is_some_and(|(_, since)| now_ms.saturating_sub(since) >= takeover_after_ms(inner))
}

pub(super) fn now_micros() -> i64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since_epoch.as_micros()).unwrap_or(i64::MAX)
}

/// Declares the seqs `from..=to` lost for good: a range tombstone per bucket
/// at this instant, so rows their writers stamped earlier never appear,
/// whenever they land. Called only past every such writer's deadline.
pub(super) async fn declare_lost(inner: &Inner, id: Uuid, from: u64, to: u64) -> Result<()> {
    let now = now_micros();
    let buckets = (bucket(from)..=bucket(to)).map(|index| {
        let (low, high) = bucket_span(index, from, to);
        inner.run(&inner.statements.messages_lost, (now, id, index, seq_value(low), seq_value(high)))
    });
    join_all(buckets).await.into_iter().collect::<Result<Vec<()>>>()?;
    warn!(conversation_id = %id, from, to, "seqs declared lost (their writer stopped before its rows)");
    Ok(())
}
