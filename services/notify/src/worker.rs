//! Delivery from the outbox: claim what is due, send it through its
//! device's provider, record what happened.
//!
//! A claim holds jobs for `claim_lease`; a process that dies holding them
//! leaves them to the next claim after that (or at once, on SQLite, when it
//! restarts). Of several due pushes for one device and conversation only
//! the latest leaves (it replaces the earlier ones on the device anyway);
//! the rest collapse into it. Failures retry with exponential backoff and
//! jitter, never before the provider's Retry-After, and are dead-lettered
//! after `max_attempts`.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{Arc, OnceLock},
    time::Duration,
};

use futures::{StreamExt as _, stream::FuturesUnordered};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter, clock::Clock as _};
use messenger_platform::{ids::now_ms, metrics};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, warn};
use uuid::Uuid;

use crate::{
    breaker::{Breakers, endpoint_of},
    options::Options,
    providers::{Outcome, Providers, Push},
    store::{Job, JobKind, JobState, PushStore},
};

/// How often the per-device push limiter drops devices it no longer limits.
const LIMITER_PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// What SREs watch of the outbox.
struct PushMetrics {
    /// Push attempts by provider and outcome (sent, retried, dead_lettered,
    /// token_gone), and pushes that did not leave (cancelled, collapsed).
    pushes: metrics::Counter<u64>,
    /// From the entry's commit to the provider's acceptance of its push.
    commit_to_push: metrics::Histogram<f64>,
    /// Jobs in the outbox by state (queued, dead), as of the last look.
    outbox: metrics::Gauge<u64>,
    /// Finished jobs forgotten after their retention.
    purged: metrics::Counter<u64>,
}

fn push_metrics() -> &'static PushMetrics {
    static METRICS: OnceLock<PushMetrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let meter = metrics::meter();
        PushMetrics {
            pushes: meter
                .u64_counter("messenger.notify.pushes")
                .with_description("Push attempts and skipped pushes, by provider, kind and outcome")
                .build(),
            commit_to_push: meter
                .f64_histogram("messenger.notify.commit_to_push")
                .with_unit("s")
                .with_description("From an entry's commit to the provider accepting its push")
                .with_boundaries(vec![0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0])
                .build(),
            outbox: meter
                .u64_gauge("messenger.notify.outbox")
                .with_description("Push jobs queued and dead-lettered (waiting for an operator)")
                .build(),
            purged: meter
                .u64_counter("messenger.notify.purged")
                .with_description("Finished push jobs and unread marks forgotten after their retention")
                .build(),
        }
    })
}

fn count(provider: &'static str, kind: JobKind, outcome: &'static str) {
    let kind = match kind {
        JobKind::Notify => "notify",
        JobKind::Retract => "retract",
    };
    push_metrics().pushes.add(
        1,
        &[
            metrics::KeyValue::new("provider", provider),
            metrics::KeyValue::new("kind", kind),
            metrics::KeyValue::new("outcome", outcome),
        ],
    );
}

/// Most due times [`Wake`] remembers; later ones are found by the poll.
const MAX_DUE_TIMES: usize = 4096;

/// When the worker looks for due jobs next: at once when jobs are stored
/// that are due now, at the due time this process gave a job (a read grace,
/// a retry's backoff, a rate limit's or a circuit's wait), and otherwise
/// after `notify.poll_interval` (jobs of other instances: their leases, or
/// their queue when they stopped). An idle worker sleeps.
#[derive(Default)]
pub struct Wake {
    notify: Notify,
    /// Due times (ms) of jobs this process stored, earliest first.
    due: std::sync::Mutex<std::collections::BTreeSet<i64>>,
}

impl Wake {
    /// Jobs due now were stored.
    pub fn now(&self) {
        self.notify.notify_one();
    }

    /// A job this process stored is due at `due_ms`.
    pub fn at(&self, due_ms: i64) {
        let mut due = self.due.lock().unwrap_or_else(|e| e.into_inner());
        due.insert(due_ms);
        if due.len() > MAX_DUE_TIMES {
            due.pop_last();
        }
        drop(due);
        // The worker may be asleep until a later time.
        self.notify.notify_one();
    }

    /// The due time to wake at after a claim: `Some(at)` for a claim at `at`
    /// that answered (it took every job due by then, so earlier times are
    /// forgotten), `None` when no claim ran (no free slot) or it failed. Then
    /// nothing is forgotten and no time is given: a time already past would
    /// wake the worker at once, again and again, with nothing it can do.
    fn next(&self, claimed_at_ms: Option<i64>) -> Option<i64> {
        let claimed_at_ms = claimed_at_ms?;
        let mut due = self.due.lock().unwrap_or_else(|e| e.into_inner());
        while due.first().is_some_and(|first| *first <= claimed_at_ms) {
            due.pop_first();
        }
        due.first().copied()
    }
}

pub struct Worker {
    pub store: Arc<dyn PushStore>,
    pub providers: Arc<Providers>,
    pub options: Options,
    /// Tells the worker when to look for due jobs.
    pub wake: Arc<Wake>,
    /// Endpoints that failed again and again get no pushes for a while.
    pub breakers: Breakers,
}

/// The delay before attempt `attempts + 1`: doubling from `initial`, capped
/// at `max`, with "equal jitter" (half fixed, half random), and never
/// shorter than what the provider asked for.
pub fn backoff(options: &Options, attempts: u32, asked: Option<Duration>) -> Duration {
    let doubling = 2u32.saturating_pow(attempts.saturating_sub(1).min(30));
    let base = options.retry_initial_delay.saturating_mul(doubling).min(options.retry_max_delay);
    let jittered = base / 2 + base.mul_f64(rand::random::<f64>() / 2.0);
    jittered.max(asked.unwrap_or_default())
}

/// The most a badge shows.
const BADGE_CAP: u32 = 9_999;

impl Worker {
    /// Every `maintenance_interval`: the outbox gauges, and the purge of
    /// what is past its retention.
    pub async fn maintain(store: Arc<dyn PushStore>, options: Options, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(options.maintenance_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let metrics = push_metrics();
            match store.outbox().await {
                Ok(size) => {
                    metrics.outbox.record(size.queued, &[metrics::KeyValue::new("state", "queued")]);
                    metrics.outbox.record(size.dead, &[metrics::KeyValue::new("state", "dead")]);
                }
                Err(error) => warn!(%error, "outbox count failed"),
            }
            let now = now_ms();
            let finished_before = now - options.finished_retention.as_millis() as i64;
            let dead_before = now - options.dead_letter_retention.as_millis() as i64;
            match store.purge(finished_before, dead_before).await {
                Ok(removed) => metrics.purged.add(removed, &[]),
                Err(error) => warn!(%error, "outbox purge failed; tried again next time"),
            }
        }
    }

    /// Claims due jobs while it has free slots and pushes each on its own:
    /// at most `max_in_flight` at once, a claim taking only as many jobs as
    /// slots are free. A hanging endpoint holds one slot until its request
    /// timeout; every other device's pushes go on around it (a worker that
    /// waited for its whole claimed batch stalled them all).
    pub async fn run(self, shutdown: CancellationToken) {
        let per_minute = NonZeroU32::new(self.options.pushes_per_device_per_minute).unwrap_or(NonZeroU32::MIN);
        let limiter = Arc::new(RateLimiter::keyed(Quota::per_minute(per_minute)));
        let this = Arc::new(self);
        let lease = this.options.claim_lease.as_millis() as i64;
        let mut in_flight = FuturesUnordered::new();
        let mut pruned_at = tokio::time::Instant::now();
        while !shutdown.is_cancelled() {
            let free = this.options.max_in_flight.saturating_sub(in_flight.len());
            let claimed_at = now_ms();
            // Whether a claim at `claimed_at` answered: then it took every job due by then.
            let mut answered = false;
            if free > 0 {
                let claimed = match this.store.claim(claimed_at, lease, free.min(this.options.claim_batch)).await {
                    Ok(claimed) => {
                        answered = true;
                        claimed
                    }
                    Err(error) => {
                        warn!(%error, "outbox claim failed; retrying");
                        Vec::new()
                    }
                };
                if !claimed.is_empty() {
                    for (job, collapsed) in collapse(claimed) {
                        let (this, limiter) = (this.clone(), limiter.clone());
                        in_flight.push(async move { this.deliver(job, collapsed, &limiter).await });
                    }
                    continue;
                }
            }
            // The per-device limiter forgets devices whose share is whole again.
            if pruned_at.elapsed() >= LIMITER_PRUNE_INTERVAL {
                limiter.retain_recent();
                limiter.shrink_to_fit();
                pruned_at = tokio::time::Instant::now();
            }
            // With no free slot a completion wakes the worker, and after a
            // failed claim the poll does; what is due stays remembered (a due
            // time already past would otherwise spin the loop).
            let poll = tokio::time::Instant::now() + this.options.poll_interval;
            let next = match this.wake.next(answered.then_some(claimed_at)) {
                Some(due) => {
                    poll.min(tokio::time::Instant::now() + Duration::from_millis((due - now_ms()).max(0) as u64))
                }
                None => poll,
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                _ = this.wake.notify.notified() => {}
                _ = tokio::time::sleep_until(next) => {}
            }
        }
        // Pushes under way finish (each within the request timeout); their
        // outcome is recorded, so none is sent twice after a restart.
        while in_flight.next().await.is_some() {}
    }

    async fn deliver(&self, job: Job, collapsed: Vec<Uuid>, limiter: &DefaultKeyedRateLimiter<String>) {
        let store = &self.store;
        let device = match store.device(&job.user_id, &job.device_id).await {
            Ok(Some(device)) => device,
            Ok(None) => {
                for id in collapsed.iter().chain([&job.id]) {
                    self.settle(store.finish(*id, JobState::Cancelled, job.attempts, "device unregistered").await);
                }
                return;
            }
            Err(error) => {
                warn!(%error, "device lookup failed; the job is claimed again after its lease");
                return;
            }
        };
        // Before the device's rate limit: a push held back here uses none of it.
        let provider = self.providers.for_platform(device.platform);
        let url = device.web_push.as_ref().map_or(device.token.as_str(), |keys| keys.endpoint.as_str());
        let endpoint = endpoint_of(url, provider.name());
        if let Some(wait) = self.breakers.check(&endpoint) {
            // Not an attempt: the endpoint failed its last pushes; one push
            // tries it again once the circuit's wait is over. A job that has
            // waited as long as all its attempts could take is given up.
            let given_up = (now_ms() - job.created_at_ms).max(0) as u128
                > self.options.retry_max_delay.saturating_mul(self.options.max_attempts).as_millis();
            if given_up {
                count(provider.name(), job.kind, "dead_lettered");
                warn!(push_id = %job.id, provider = provider.name(), %endpoint, "push dead-lettered: its endpoint kept failing");
                self.settle(store.finish(job.id, JobState::Dead, job.attempts, "endpoint circuit open too long").await);
                for id in collapsed {
                    self.settle(store.finish(id, JobState::Cancelled, 0, "collapsed into a dead push").await);
                }
                return;
            }
            count(provider.name(), job.kind, "circuit_open");
            let due = now_ms() + wait.as_millis() as i64 + 1;
            for id in collapsed.iter().chain([&job.id]) {
                self.settle(store.reschedule(*id, due, job.attempts, "endpoint circuit open").await);
            }
            self.wake.at(due);
            return;
        }
        if let Err(not_until) = limiter.check_key(&format!("{}\n{}", job.user_id, job.device_id)) {
            // Not an attempt: the device had its share of pushes this minute.
            let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
            let due = now_ms() + wait.as_millis() as i64 + 1;
            self.settle(store.reschedule(job.id, due, job.attempts, "device rate limit").await);
            for id in collapsed {
                self.settle(store.reschedule(id, due, job.attempts, "device rate limit").await);
            }
            self.wake.at(due);
            return;
        }
        let badge = match store.unread(&job.user_id, BADGE_CAP).await {
            Ok(badge) => badge,
            Err(error) => {
                warn!(%error, "unread count failed; the job is claimed again after its lease");
                return;
            }
        };
        let push = Push {
            id: job.id,
            kind: job.kind,
            conversation_id: job.conversation_id,
            seq: job.seq,
            preview: job.preview.clone().filter(|_| device.previews),
            badge,
        };
        // In the message's trace, when the call that queued it had one.
        let span = if job.trace_context.is_empty() {
            tracing::Span::none()
        } else {
            let carrier = [("traceparent".to_owned(), job.trace_context.clone())].into();
            messenger_platform::trace::remote("push", &carrier)
        };
        let outcome = provider.send(&device, &push).instrument(span).await;
        match outcome {
            Outcome::Retry { .. } => self.breakers.failed(&endpoint),
            Outcome::Delivered | Outcome::Refused(_) | Outcome::Gone(_) => self.breakers.answered(&endpoint),
        }
        let attempts = job.attempts + 1;
        match outcome {
            Outcome::Delivered => {
                count(provider.name(), job.kind, "sent");
                if job.kind == JobKind::Notify {
                    let latency = (now_ms() - job.created_at_ms).max(0) as f64 / 1000.0;
                    push_metrics().commit_to_push.record(latency, &[]);
                }
                self.settle(store.finish(job.id, JobState::Sent, attempts, "").await);
                for id in collapsed {
                    count(provider.name(), job.kind, "collapsed");
                    self.settle(store.finish(id, JobState::Cancelled, 0, "collapsed into a later push").await);
                }
                debug!(push_id = %job.id, provider = provider.name(), "pushed");
            }
            Outcome::Retry { after, reason } if attempts < self.options.max_attempts => {
                count(provider.name(), job.kind, "retried");
                let due = now_ms() + backoff(&self.options, attempts, after).as_millis() as i64;
                self.settle(store.reschedule(job.id, due, attempts, &reason).await);
                for id in collapsed {
                    self.settle(store.reschedule(id, due, 0, "waits for a later push").await);
                }
                self.wake.at(due);
                debug!(push_id = %job.id, provider = provider.name(), %reason, attempts, "push retried");
            }
            Outcome::Retry { reason, .. } | Outcome::Refused(reason) => {
                count(provider.name(), job.kind, "dead_lettered");
                warn!(push_id = %job.id, provider = provider.name(), %reason, attempts, "push dead-lettered");
                self.settle(store.finish(job.id, JobState::Dead, attempts, &reason).await);
                for id in collapsed {
                    self.settle(store.finish(id, JobState::Cancelled, 0, "collapsed into a dead push").await);
                }
            }
            Outcome::Gone(reason) => {
                count(provider.name(), job.kind, "token_gone");
                let removed = store.remove_device_if(&device.user_id, &device.device_id, device.registration).await;
                if matches!(removed, Ok(true)) {
                    warn!(push_id = %job.id, provider = provider.name(), %reason, "dead token: registration removed");
                }
                self.settle(removed.map(drop));
                for id in collapsed.iter().chain([&job.id]) {
                    self.settle(store.finish(*id, JobState::Cancelled, attempts, &reason).await);
                }
            }
        }
    }

    /// A store write the worker cannot undo: logged when it fails (the job
    /// stays claimed and is retried after its lease).
    fn settle<T>(&self, result: crate::Result<T>) {
        if let Err(error) = result {
            warn!(%error, "outbox update failed; the job is retried after its lease");
        }
    }
}

/// Groups claimed jobs by device, conversation and kind: the latest seq of
/// each group is sent, the others collapse into it.
fn collapse(claimed: Vec<Job>) -> Vec<(Job, Vec<Uuid>)> {
    /// User, device, conversation, kind.
    type Key = (String, String, Uuid, JobKind);
    let mut groups: HashMap<Key, (Job, Vec<Uuid>)> = HashMap::new();
    for job in claimed {
        let key = (job.user_id.clone(), job.device_id.clone(), job.conversation_id, job.kind);
        match groups.remove(&key) {
            None => {
                groups.insert(key, (job, Vec::new()));
            }
            Some((kept, mut collapsed)) => {
                let (latest, earlier) = if job.seq > kept.seq { (job, kept) } else { (kept, job) };
                collapsed.push(earlier.id);
                groups.insert(key, (latest, collapsed));
            }
        }
    }
    groups.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract::job;

    #[test]
    fn only_a_claim_that_answered_forgets_due_times() {
        let wake = Wake::default();
        wake.at(100);
        wake.at(300);
        // No free slot, or a failed claim: nothing to wake for, nothing forgotten.
        assert_eq!(wake.next(None), None);
        assert_eq!(wake.next(Some(50)), Some(100));
        assert_eq!(wake.next(Some(200)), Some(300), "a claim at 200 took what was due at 100");
        assert_eq!(wake.next(Some(300)), None);
    }

    #[test]
    fn backoff_doubles_with_jitter_caps_and_honours_retry_after() {
        let options = Options {
            retry_initial_delay: Duration::from_secs(1),
            retry_max_delay: Duration::from_secs(60),
            ..Options::default()
        };
        for attempts in 1..=12u32 {
            let base = Duration::from_secs(1 << (attempts - 1)).min(Duration::from_secs(60));
            for _ in 0..50 {
                let delay = backoff(&options, attempts, None);
                assert!(delay >= base / 2 && delay <= base, "attempt {attempts}: {delay:?} vs {base:?}");
            }
        }
        let asked = Duration::from_secs(120);
        assert_eq!(backoff(&options, 1, Some(asked)), asked, "Retry-After beyond the backoff wins");
        assert!(backoff(&options, 40, None) <= Duration::from_secs(60), "no overflow at many attempts");
    }

    #[test]
    fn a_burst_for_one_device_and_conversation_collapses_into_its_latest() {
        let conversation = Uuid::now_v7();
        let jobs = vec![
            job(JobKind::Notify, "bob", "phone", conversation, 3, 1),
            job(JobKind::Notify, "bob", "phone", conversation, 5, 1),
            job(JobKind::Notify, "bob", "phone", conversation, 4, 1),
            job(JobKind::Notify, "bob", "tablet", conversation, 3, 1),
            job(JobKind::Retract, "bob", "phone", conversation, 2, 1),
        ];
        let mut groups = collapse(jobs.clone());
        groups.sort_by_key(|(job, _)| (job.device_id.clone(), job.kind.code()));
        let sent: Vec<(&str, u64, usize)> =
            groups.iter().map(|(job, collapsed)| (job.device_id.as_str(), job.seq, collapsed.len())).collect();
        assert_eq!(sent, [("phone", 5, 2), ("phone", 2, 0), ("tablet", 3, 0)]);
        let mut collapsed = groups[0].1.clone();
        collapsed.sort();
        let mut expected = vec![jobs[0].id, jobs[2].id];
        expected.sort();
        assert_eq!(collapsed, expected);
    }
}
