//! Hands the notify service what it pushes: after fan-out located the
//! members, the entries that should notify with each recipient's online
//! devices; and every read mark (which cancels or retracts pushes).
//!
//! One task sends them in order (a read never overtakes the entry it
//! reads), each call retried with backoff while notify is unavailable. The
//! queue is bounded: when it is full, what does not fit is dropped and
//! counted (`messenger.message.push.dropped`), and sends never wait on it.
//! An entry dropped here, or lost with this process between commit and
//! handoff, is not pushed; the device still syncs it when the app opens.

use std::{sync::OnceLock, time::Duration};

use backon::{ExponentialBuilder, Retryable as _};
use messenger_platform::{discovery::RoleChannel, metrics, supervise::Supervisor, trace};
use messenger_proto::v1::{self as pb, notify_service_client::NotifyServiceClient};
use tokio::sync::mpsc;
use tonic::Code;
use tracing::{Instrument as _, debug, info, warn};

use crate::options::PushOptions;

enum Item {
    Entries(Vec<pb::PushEntry>),
    Read(pb::NotifyReadRequest),
}

fn dropped() -> &'static metrics::Counter<u64> {
    static DROPPED: OnceLock<metrics::Counter<u64>> = OnceLock::new();
    DROPPED.get_or_init(|| {
        metrics::meter()
            .u64_counter("messenger.message.push.dropped")
            .with_description("Entries and read marks not handed to notify (queue full or notify unavailable)")
            .build()
    })
}

/// The handle fan-out and read marks use; a disabled one drops everything.
///
/// Each item carries its caller's trace context, not the caller's span: a
/// span held here would keep the fan-out (and the send above it) open
/// until notify answered, retries included.
#[derive(Clone)]
pub struct Pushes {
    queue: Option<mpsc::Sender<(Item, trace::Carrier)>>,
}

impl Pushes {
    pub fn disabled() -> Self {
        Self { queue: None }
    }

    pub fn start(options: &PushOptions, notify: RoleChannel, supervisor: &Supervisor) -> Self {
        let (tx, rx) = mpsc::channel(options.queue_depth);
        let client = NotifyServiceClient::new(notify);
        supervisor.spawn("push handoff", run(client, options.max_attempts, rx));
        info!("push notifications: entries and read marks go to the notify service");
        Self { queue: Some(tx) }
    }

    fn queue(&self, item: Item, what: usize) {
        let Some(queue) = &self.queue else { return };
        if queue.try_send((item, trace::current())).is_err() {
            dropped().add(what as u64, &[]);
            debug!(what, "push handoff queue full; dropped");
        }
    }

    pub fn entries(&self, entries: Vec<pb::PushEntry>) {
        if !entries.is_empty() {
            let count = entries.len();
            self.queue(Item::Entries(entries), count);
        }
    }

    pub fn read(&self, user_id: &str, conversation_id: &str, read_seq: u64) {
        let request = pb::NotifyReadRequest {
            user_id: user_id.to_owned(),
            conversation_id: conversation_id.to_owned(),
            read_seq,
        };
        self.queue(Item::Read(request), 1);
    }
}

fn retryable(status: &tonic::Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Unknown)
}

async fn run(
    client: NotifyServiceClient<RoleChannel>,
    max_attempts: u32,
    mut queue: mpsc::Receiver<(Item, trace::Carrier)>,
) {
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(max_attempts.saturating_sub(1) as usize)
        .with_jitter();
    while let Some((item, carrier)) = queue.recv().await {
        // In the caller's trace when it has one; never a trace of its own.
        let span = if carrier.is_empty() { tracing::Span::none() } else { trace::remote("push handoff", &carrier) };
        let (result, what) = match &item {
            Item::Entries(entries) => {
                let call = || {
                    let mut client = client.clone();
                    let request = pb::EnqueueRequest { entries: entries.clone() };
                    async move { client.enqueue(request).await.map(drop) }
                };
                (call.retry(backoff).when(retryable).instrument(span).await, entries.len())
            }
            Item::Read(read) => {
                let call = || {
                    let mut client = client.clone();
                    let request = read.clone();
                    async move { client.read(request).await.map(drop) }
                };
                (call.retry(backoff).when(retryable).instrument(span).await, 1)
            }
        };
        if let Err(status) = result {
            dropped().add(what as u64, &[]);
            warn!(code = ?status.code(), message = status.message(), what, "notify did not take pushes; dropped");
        }
    }
}
