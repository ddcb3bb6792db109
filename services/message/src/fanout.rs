//! Fan-out of committed entries, receipts and typing indicators to the
//! devices that are online.
//!
//! Each item goes to a worker chosen by its conversation, so a conversation's
//! entries leave in seq order. A worker takes whatever is queued, asks
//! presence where all its recipients are in one `Locate`, and sends one
//! `Deliver` per gateway. An entry goes to its audience, decided by the
//! write that appended it (`visibility::audience`): never to a roster read
//! later, which a removal or a re-add may have changed since. Receipts and
//! typing go to the conversation's active members, read once per batch. A failed Deliver loses
//! nothing: its messages and receipts are sent again (`redeliver.rs`), and a
//! device catches up from its delivered cursor anyway (gap fill in the
//! gateway, or sync on reconnect). Typing and presence are live-only hints.

use std::{
    collections::{HashMap, HashSet},
    hash::{Hash, Hasher},
    sync::Arc,
};

use async_trait::async_trait;
use messenger_platform::{supervise::Supervisor, trace};
use messenger_proto::v1::{self as pb, Delivery, delivery};
use tokio::sync::mpsc;
use tracing::{Instrument as _, debug, warn};
use uuid::Uuid;

mod redeliver;

/// Where users' devices are connected: presence's `Locate` (`grpc.rs` in
/// production, a fake in the tests).
#[async_trait]
pub(crate) trait Locate: Send + Sync {
    /// The live sessions of `user_ids`.
    async fn locate(&self, user_ids: Vec<String>) -> Result<Vec<pb::Session>, tonic::Status>;
}

/// The gateways' `Deliver`, by the address a session names.
#[async_trait]
pub(crate) trait Gateways: Send + Sync {
    /// Hands `deliveries` to the gateway at `address`; how many of the
    /// sessions they name it no longer holds.
    async fn deliver(&self, address: &str, deliveries: Vec<Delivery>) -> Result<u32, tonic::Status>;
}

use crate::{
    convert,
    options::FanoutOptions,
    ports::{Deliveries, Hint, Receipt, Typing},
    push::Pushes,
    store::{Appended, Kind, MessageStore, StoredMessage},
    visibility,
};

/// Something to push to online devices.
#[derive(Clone, Debug)]
enum Outgoing {
    Entry(Appended),
    Hint(Hint),
}

impl Outgoing {
    /// The conversation whose active members receive it (None: explicit recipients).
    fn conversation_id(&self) -> Option<Uuid> {
        match self {
            Outgoing::Entry(appended) => Some(appended.entry.conversation_id),
            Outgoing::Hint(Hint::Receipt(receipt)) => Some(receipt.conversation_id),
            Outgoing::Hint(Hint::Typing(typing)) => Some(typing.conversation_id),
            Outgoing::Hint(Hint::Presence(..)) => None,
        }
    }

    /// What picks the worker: items of one conversation (or user) stay in order.
    fn worker_key(&self) -> u64 {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        match self {
            Outgoing::Hint(Hint::Presence(_, update)) => update.user_id.hash(&mut hasher),
            _ => self.conversation_id().hash(&mut hasher),
        }
        hasher.finish()
    }
}

/// What SREs watch of the fan-out.
struct FanoutMetrics {
    /// Entries per fan-out batch (one Locate, one Deliver per gateway).
    batch_size: messenger_platform::metrics::Histogram<u64>,
    /// Live deliveries dropped because their gateway could not take them
    /// (their devices catch up by gap fill or sync).
    dropped: messenger_platform::metrics::Counter<u64>,
    /// Deliveries a gateway took when sent again after a failed call.
    redelivered: messenger_platform::metrics::Counter<u64>,
    /// Entries and hints waiting in a worker's queue when one is added.
    queue_depth: messenger_platform::metrics::Histogram<u64>,
}

fn fanout_metrics() -> &'static FanoutMetrics {
    static METRICS: std::sync::OnceLock<FanoutMetrics> = std::sync::OnceLock::new();
    METRICS.get_or_init(|| {
        let meter = messenger_platform::metrics::meter();
        FanoutMetrics {
            batch_size: meter
                .u64_histogram("messenger.message.fanout.batch_size")
                .with_description("Entries per fan-out batch")
                .with_boundaries(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0])
                .build(),
            dropped: meter
                .u64_counter("messenger.message.fanout.deliveries_dropped")
                .with_description("Live deliveries a gateway did not take (devices catch up by sync)")
                .build(),
            redelivered: meter
                .u64_counter("messenger.message.fanout.deliveries_redelivered")
                .with_description("Live deliveries a gateway took when sent again after a failed call")
                .build(),
            queue_depth: meter
                .u64_histogram("messenger.message.fanout.queue_depth")
                .with_description("Items already waiting in the fan-out worker's queue when an entry is added")
                .with_boundaries(vec![0.0, 1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0])
                .build(),
        }
    })
}

#[derive(Clone)]
pub struct Fanout {
    workers: Arc<Vec<mpsc::Sender<Queued>>>,
    pushes: Pushes,
}

/// An item waiting for its worker, with its fan-out span (disabled for
/// live-only hints and when untraced): from queueing to the last `Deliver`.
struct Queued {
    item: Outgoing,
    span: tracing::Span,
}

struct Worker {
    store: Arc<dyn MessageStore>,
    presence: Arc<dyn Locate>,
    gateways: Arc<dyn Gateways>,
    max_batch: usize,
    linger: std::time::Duration,
    delivered_receipts_max_members: usize,
    locate_max_users: usize,
    pushes: Pushes,
    redeliver: redeliver::Redeliver,
}

impl Fanout {
    pub fn start(
        options: &FanoutOptions,
        delivered_receipts_max_members: usize,
        store: Arc<dyn MessageStore>,
        presence: Arc<dyn Locate>,
        gateways: Arc<dyn Gateways>,
        pushes: Pushes,
        supervisor: &Supervisor,
    ) -> Self {
        let redeliver = redeliver::Redeliver::new(options);
        let workers = (0..options.workers)
            .map(|_| {
                let (tx, rx) = mpsc::channel(options.queue_depth);
                let worker = Worker {
                    store: store.clone(),
                    presence: presence.clone(),
                    gateways: gateways.clone(),
                    max_batch: options.max_batch,
                    linger: options.linger,
                    delivered_receipts_max_members,
                    locate_max_users: options.locate_max_users.max(1),
                    pushes: pushes.clone(),
                    redeliver: redeliver.clone(),
                };
                supervisor.spawn("fan-out worker", worker.run(rx));
                tx
            })
            .collect();
        Self { workers: Arc::new(workers), pushes }
    }

    fn worker(&self, item: &Outgoing) -> &mpsc::Sender<Queued> {
        &self.workers[(item.worker_key() % self.workers.len() as u64) as usize]
    }
}

#[async_trait]
impl Deliveries for Fanout {
    /// Queues a committed entry, and its copy without content for those it
    /// is withheld from (the same worker, so in order); waits when the
    /// worker's queue is full (backpressure).
    async fn entry(&self, mut appended: Appended) {
        let withheld = (!appended.withheld_from.is_empty()).then(|| Appended {
            entry: visibility::redacted(appended.entry.clone()),
            audience: std::mem::take(&mut appended.withheld_from),
            withheld_from: Arc::default(),
        });
        let span = trace::internal("fan-out");
        for item in std::iter::once(appended).chain(withheld).map(Outgoing::Entry) {
            let worker = self.worker(&item);
            fanout_metrics().queue_depth.record((worker.max_capacity() - worker.capacity()) as u64, &[]);
            if worker.send(Queued { item, span: span.clone() }).await.is_err() {
                warn!("fan-out worker stopped; devices will catch up by sync");
            }
        }
    }

    /// Queues a live-only hint; dropped when the worker is saturated.
    fn hint(&self, hint: Hint) {
        let item = Outgoing::Hint(hint);
        if self.worker(&item).try_send(Queued { item, span: tracing::Span::none() }).is_err() {
            debug!("fan-out saturated; live hint dropped");
        }
    }

    /// Notify cancels or retracts the reader's pushes.
    fn read_marked(&self, user_id: &str, conversation_id: Uuid, read_seq: u64) {
        self.pushes.read(user_id, &conversation_id.to_string(), read_seq);
    }
}

impl Worker {
    async fn run(mut self, mut queue: mpsc::Receiver<Queued>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        while queue.recv_many(&mut batch, self.max_batch).await > 0 {
            // A batch already forming (items arrived while the last one went
            // out) lingers for more, so a busy system shares one Locate and one
            // Deliver per gateway among many items. A lone item goes at once:
            // a quiet system pays neither a timer nor the delay.
            if !self.linger.is_zero() && batch.len() > 1 && batch.len() < self.max_batch {
                tokio::time::sleep(self.linger).await;
                while batch.len() < self.max_batch {
                    match queue.try_recv() {
                        Ok(item) => batch.push(item),
                        Err(_) => break,
                    }
                }
            }
            let (items, spans): (Vec<Outgoing>, Vec<tracing::Span>) =
                batch.drain(..).map(|queued| (queued.item, queued.span)).unzip();
            // The batch's calls (Locate, Deliver) go in the first sampled
            // item's trace; each delivery carries its own item's context.
            // A sampled one, so a sampled message's calls are exported; else
            // any traced one, so they do not start traces of their own.
            let calls = spans
                .iter()
                .find(|span| trace::sampled(span))
                .or_else(|| spans.iter().find(|span| !span.is_disabled()))
                .cloned()
                .unwrap_or_else(tracing::Span::none);
            self.fan_out(&items, &spans).instrument(calls).await;
        }
    }

    /// Who should get a receipt or typing hint, given the conversation's active members.
    fn hint_recipients<'a>(&self, item: &'a Outgoing, active: &'a [String]) -> Vec<&'a str> {
        let mut users: Vec<&str> = active.iter().map(String::as_str).collect();
        match item {
            Outgoing::Entry(_) | Outgoing::Hint(Hint::Presence(..)) => {}
            Outgoing::Hint(Hint::Receipt(receipt)) => {
                if receipt.read_seq == 0 && active.len() > self.delivered_receipts_max_members {
                    return Vec::new();
                }
            }
            Outgoing::Hint(Hint::Typing(typing)) => {
                users.retain(|u| *u != typing.user_id && !typing.hidden_from.iter().any(|hidden| hidden == u))
            }
        }
        users
    }

    async fn fan_out(&mut self, batch: &[Outgoing], spans: &[tracing::Span]) {
        fanout_metrics().batch_size.record(batch.len() as u64, &[]);
        let mut active: HashMap<Uuid, Arc<Vec<String>>> = HashMap::new();
        for item in batch {
            let id = match item {
                Outgoing::Hint(Hint::Receipt(Receipt { conversation_id, .. }))
                | Outgoing::Hint(Hint::Typing(Typing { conversation_id, .. })) => *conversation_id,
                _ => continue,
            };
            if active.contains_key(&id) {
                continue;
            }
            match self.store.active_member_ids(id).await {
                Ok(members) => {
                    active.insert(id, members);
                }
                Err(error) => warn!(%error, conversation_id = %id, "fan-out skipped: members unavailable"),
            }
        }
        let recipients: Vec<Vec<&str>> = batch
            .iter()
            .map(|item| match item {
                Outgoing::Hint(Hint::Presence(users, _)) => users.iter().map(String::as_str).collect(),
                Outgoing::Entry(appended) => appended.audience.iter().map(String::as_str).collect(),
                _ => item
                    .conversation_id()
                    .and_then(|id| active.get(&id))
                    .map(|members| self.hint_recipients(item, members))
                    .unwrap_or_default(),
            })
            .collect();
        let users: HashSet<&str> = recipients.iter().flatten().copied().collect();
        if users.is_empty() {
            return;
        }
        // Presence answers at most `max_users_per_call` users a call: a batch
        // with more recipients (11 groups of 1,000, say) is located in parts,
        // concurrently; a part that fails skips only its users (they catch up
        // by gap fill or sync).
        let users: Vec<String> = users.into_iter().map(str::to_owned).collect();
        let parts = users.chunks(self.locate_max_users).map(|part| self.presence.locate(part.to_vec()));
        let mut sessions = Vec::new();
        for answer in futures::future::join_all(parts).await {
            match answer {
                Ok(found) => sessions.extend(found),
                Err(status) => {
                    warn!(code = ?status.code(), message = status.message(), "fan-out skipped some users: presence unavailable")
                }
            }
        }
        let mut by_user: HashMap<&str, Vec<&pb::Session>> = HashMap::new();
        for session in &sessions {
            by_user.entry(session.user_id.as_str()).or_default().push(session);
        }
        self.pushes.entries(push_entries(batch, &recipients, &by_user));
        if sessions.is_empty() {
            return;
        }
        let mut by_gateway: HashMap<&str, Vec<Delivery>> = HashMap::new();
        for ((item, users), span) in batch.iter().zip(&recipients).zip(spans) {
            let mut per_gateway: HashMap<&str, Vec<String>> = HashMap::new();
            for user in users {
                for session in by_user.get(user).into_iter().flatten() {
                    per_gateway.entry(session.gateway_addr.as_str()).or_default().push(session.session_id.clone());
                }
            }
            if per_gateway.is_empty() {
                continue;
            }
            let event = match item {
                Outgoing::Entry(appended) => delivery::Event::Message(convert::to_proto(&appended.entry)),
                Outgoing::Hint(Hint::Receipt(receipt)) => delivery::Event::Receipt(convert::receipt_to_proto(receipt)),
                Outgoing::Hint(Hint::Typing(typing)) => delivery::Event::Typing(convert::typing_to_proto(typing)),
                Outgoing::Hint(Hint::Presence(_, update)) => {
                    delivery::Event::Presence(convert::presence_to_proto(update))
                }
            };
            for (gateway, session_ids) in per_gateway {
                by_gateway.entry(gateway).or_default().push(Delivery {
                    event: Some(event.clone()),
                    session_ids,
                    trace_context: trace::inject(span),
                });
            }
        }
        let calls = by_gateway.into_iter().map(|(address, deliveries)| {
            let gateways = self.gateways.clone();
            let redeliver = self.redeliver.clone();
            async move {
                let count = deliveries.len();
                // A dead gateway's devices reconnect elsewhere and resume from
                // their cursors; one that answers again gets the copy.
                let again = redeliver.keep(&deliveries);
                match gateways.deliver(address, deliveries).await {
                    Ok(missing) => debug!(gateway = address, count, missing, "delivered"),
                    Err(status) => {
                        debug!(gateway = address, count, code = ?status.code(), message = status.message(), "deliver failed");
                        let kept = again.as_ref().map_or(0, Vec::len);
                        if kept < count {
                            fanout_metrics().dropped.add((count - kept) as u64, &[]);
                        }
                        // A malformed address never answers: not worth a retry.
                        match again {
                            Some(again) if status.code() != tonic::Code::InvalidArgument => {
                                redeliver.later(gateways, address.to_owned(), again);
                            }
                            Some(again) => fanout_metrics().dropped.add(again.len() as u64, &[]),
                            None => {}
                        }
                    }
                }
            }
        });
        futures::future::join_all(calls.map(|call| call.in_current_span())).await;
    }
}

/// Who a committed entry should notify: text messages to every recipient
/// but the sender, a new group to its members, an addition to the added;
/// nobody for an entry withheld from its recipients.
fn push_recipients<'a>(entry: &'a StoredMessage, recipients: &[&'a str]) -> Vec<&'a str> {
    if entry.withheld {
        return Vec::new();
    }
    match entry.kind {
        Kind::Text | Kind::GroupCreated => recipients.iter().copied().filter(|user| *user != entry.sender).collect(),
        Kind::MembersAdded => {
            entry.member_ids.iter().map(String::as_str).filter(|user| *user != entry.sender).collect()
        }
        _ => Vec::new(),
    }
}

/// The batch's entries that should notify, each recipient with the devices
/// that have a live session now (they got it on their stream).
fn push_entries(
    batch: &[Outgoing],
    recipients: &[Vec<&str>],
    sessions: &HashMap<&str, Vec<&pb::Session>>,
) -> Vec<pb::PushEntry> {
    let mut entries = Vec::new();
    for (item, users) in batch.iter().zip(recipients) {
        let Outgoing::Entry(Appended { entry, .. }) = item else { continue };
        let users = push_recipients(entry, users);
        if users.is_empty() {
            continue;
        }
        let recipients = users
            .into_iter()
            .map(|user| pb::PushRecipient {
                user_id: user.to_owned(),
                online_device_ids: sessions
                    .get(user)
                    .into_iter()
                    .flatten()
                    .map(|session| session.device_id.clone())
                    .collect(),
            })
            .collect();
        entries.push(pb::PushEntry {
            conversation_id: entry.conversation_id.to_string(),
            seq: entry.seq,
            sender_id: entry.sender.clone(),
            kind: convert::kind_to_proto(entry.kind) as i32,
            body: entry.body.clone(),
            title: entry.title.clone(),
            sent_at_ms: entry.sent_at_ms,
            recipients,
        });
    }
    entries
}

#[cfg(test)]
mod tests;
