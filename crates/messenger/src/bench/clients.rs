//! Fleets of SDK clients, send-time stamps in message bodies, and latency
//! histograms.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use hdrhistogram::Histogram;
use messenger_client::{Client, Event, Events, Options};
use messenger_platform::auth::{AuthOptions, mint_hs256};

/// Connections per loopback source address before moving to the next one,
/// below one address's ephemeral port range.
pub const PER_SOURCE_ADDRESS: usize = 20_000;

static BASE: OnceLock<Instant> = OnceLock::new();

fn base() -> Instant {
    *BASE.get_or_init(Instant::now)
}

/// A body of `size` bytes whose first 20 carry the send time.
pub fn stamped_body(size: usize) -> String {
    let mut body = format!("{:020}", base().elapsed().as_nanos());
    if body.len() < size {
        body.push_str(&"x".repeat(size - body.len()));
    }
    body
}

/// Time since the stamp in `body` was made.
pub fn latency(body: &str) -> Option<Duration> {
    let sent: u64 = body.get(..20)?.parse().ok()?;
    Some(base().elapsed().saturating_sub(Duration::from_nanos(sent)))
}

/// Microsecond histogram from 1 us to 10 minutes.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

pub fn millis(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    histogram.value_at_quantile(quantile) as f64 / 1000.0
}

/// Connects `users` (one device each), `concurrency` at a time, spreading
/// connections over loopback source addresses when there are many.
pub async fn connect_all(
    endpoint: &str,
    auth: &AuthOptions,
    users: &[String],
    concurrency: usize,
) -> anyhow::Result<Vec<(Client, Events)>> {
    let done = AtomicU64::new(0);
    let started = Instant::now();
    let total = users.len();
    let results: Vec<anyhow::Result<(Client, Events)>> = stream::iter(users.iter().enumerate())
        .map(|(index, user)| {
            let done = &done;
            async move {
                let token = mint_hs256(auth, user, Duration::from_secs(24 * 3600))?;
                let mut options = Options::new(endpoint, token, "bench-device");
                if total > PER_SOURCE_ADDRESS {
                    let octet = 1 + (index / PER_SOURCE_ADDRESS) as u8;
                    options.local_address = Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, octet)));
                }
                options.event_buffer = 1024;
                options.connect_timeout = Duration::from_secs(30);
                let connected = Client::connect(options).await?;
                let count = done.fetch_add(1, Ordering::Relaxed) + 1;
                if count.is_multiple_of(5_000) {
                    eprintln!(
                        "bench:   {count}/{total} connected ({:.0}/s)",
                        count as f64 / started.elapsed().as_secs_f64()
                    );
                }
                Ok(connected)
            }
        })
        // `buffered` keeps the order of `users`, which callers rely on.
        .buffered(concurrency)
        .collect()
        .await;
    results.into_iter().collect()
}

/// (conversation, seq) -> (deliveries, slowest delivery in microseconds).
pub type PerMessage = std::collections::HashMap<(String, u64), (u32, u64)>;

/// What a receiver saw: how many messages, and their send-to-deliver latency.
#[derive(Clone)]
pub struct Recorder {
    pub received: Arc<AtomicU64>,
    pub latencies: Arc<Mutex<Histogram<u64>>>,
    /// Per (conversation, seq): deliveries and the slowest one, in microseconds.
    pub per_message: Option<Arc<Mutex<PerMessage>>>,
}

impl Recorder {
    pub fn new(per_message: bool) -> Self {
        Self {
            received: Arc::default(),
            latencies: Arc::new(Mutex::new(histogram())),
            per_message: per_message.then(Arc::default),
        }
    }

    /// Consumes `events` in the background, recording stamped messages.
    ///
    /// Straight into the shared histogram: a record is a few nanoseconds under
    /// an uncontended lock, while merging per-receiver histograms costs a pass
    /// over every bucket (tens of thousands) per receiver and flush, which with
    /// a thousand receivers took a third of the load generator's CPU.
    pub fn spawn(&self, mut events: Events) {
        let recorder = self.clone();
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                if let Event::Message(message) = event {
                    recorder.record(&message.conversation_id, message.seq, &message.body);
                }
            }
        });
    }

    /// One delivered message; only stamped bodies count.
    pub fn record(&self, conversation_id: &str, seq: u64, body: &str) {
        let Some(latency) = latency(body) else { return };
        let micros = (latency.as_micros() as u64).max(1);
        let _ = self.latencies.lock().unwrap_or_else(|e| e.into_inner()).record(micros);
        self.received.fetch_add(1, Ordering::Relaxed);
        if let Some(per_message) = &self.per_message {
            let mut map = per_message.lock().unwrap_or_else(|e| e.into_inner());
            let entry = map.entry((conversation_id.to_owned(), seq)).or_default();
            entry.0 += 1;
            entry.1 = entry.1.max(micros);
        }
    }

    /// Starts a new measurement: clears counts and latencies.
    pub fn reset(&self) {
        self.received.store(0, Ordering::Relaxed);
        self.latencies.lock().unwrap_or_else(|e| e.into_inner()).reset();
        if let Some(per_message) = &self.per_message {
            per_message.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    pub fn count(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// What every receiver recorded so far.
    pub async fn settle(&self) -> Histogram<u64> {
        // Let receivers finish recording what they are holding.
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.latencies.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Reads and drops every event, so a client that is not measured keeps acking.
pub fn drain(mut events: Events) {
    tokio::spawn(async move { while events.next().await.is_some() {} });
}

/// Issues `rate` operations per second for `duration` on a fixed schedule,
/// not waiting for answers (so latency includes queueing). Beyond
/// `max_inflight` unanswered operations, scheduled ones are skipped and counted.
pub async fn open_loop<F>(rate: u32, duration: Duration, max_inflight: usize, operation: F) -> OpenLoop
where
    F: Fn(u64) -> futures::future::BoxFuture<'static, bool>,
{
    let total = (rate as f64 * duration.as_secs_f64()).round() as u64;
    let permits = Arc::new(tokio::sync::Semaphore::new(max_inflight));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let (mut issued, mut skipped) = (0u64, 0u64);
    while issued < total {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while issued < due {
            match permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    let work = operation(issued);
                    let failed = failed.clone();
                    tokio::spawn(async move {
                        if !work.await {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        drop(permit);
                    });
                }
                Err(_) => skipped += 1,
            }
            issued += 1;
        }
    }
    OpenLoop { issued: issued - skipped, skipped, failed, permits, max_inflight }
}

pub struct OpenLoop {
    pub issued: u64,
    pub skipped: u64,
    failed: Arc<AtomicU64>,
    permits: Arc<tokio::sync::Semaphore>,
    max_inflight: usize,
}

impl OpenLoop {
    /// Waits (bounded) for every issued operation to be answered; returns failures.
    pub async fn finish(&self, within: Duration) -> u64 {
        let _ = tokio::time::timeout(within, self.permits.acquire_many(self.max_inflight as u32)).await;
        self.failed.load(Ordering::Relaxed)
    }
}
