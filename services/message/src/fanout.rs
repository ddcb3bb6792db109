//! Fan-out of committed messages to the devices that are online.
//!
//! Each committed message goes to a worker chosen by its conversation, so a
//! conversation's messages leave in seq order. A worker takes whatever is
//! queued, asks presence where every member is in one `Locate`, and sends one
//! `Deliver` per gateway. A failed Deliver loses nothing: the device catches
//! up from its delivered cursor (gap fill in the gateway, or sync on reconnect).

use std::{
    collections::{HashMap, HashSet},
    hash::{Hash, Hasher},
    sync::Arc,
};

use messenger_platform::discovery::ChannelPool;
use messenger_proto::v1::{
    self as pb, DeliverRequest, Delivery, LocateRequest, gateway_internal_service_client::GatewayInternalServiceClient,
    presence_service_client::PresenceServiceClient,
};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::{
    options::FanoutOptions,
    store::{MessageStore, StoredMessage},
};

#[derive(Clone)]
pub struct Fanout {
    workers: Arc<Vec<mpsc::Sender<StoredMessage>>>,
}

struct Worker {
    store: Arc<dyn MessageStore>,
    presence: PresenceServiceClient<Channel>,
    gateways: ChannelPool,
    max_batch: usize,
}

impl Fanout {
    pub fn start(
        options: &FanoutOptions,
        store: Arc<dyn MessageStore>,
        presence: PresenceServiceClient<Channel>,
        gateways: ChannelPool,
    ) -> Self {
        let workers = (0..options.workers)
            .map(|_| {
                let (tx, rx) = mpsc::channel(options.queue_depth);
                let worker = Worker {
                    store: store.clone(),
                    presence: presence.clone(),
                    gateways: gateways.clone(),
                    max_batch: options.max_batch,
                };
                tokio::spawn(worker.run(rx));
                tx
            })
            .collect();
        Self { workers: Arc::new(workers) }
    }

    /// Queues a committed message; waits when the worker's queue is full.
    pub async fn publish(&self, message: StoredMessage) {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        message.conversation_id.hash(&mut hasher);
        let index = (hasher.finish() % self.workers.len() as u64) as usize;
        if self.workers[index].send(message).await.is_err() {
            warn!("fan-out worker stopped; devices will catch up by sync");
        }
    }
}

pub(crate) fn to_proto(message: &StoredMessage) -> pb::Message {
    pb::Message {
        conversation_id: message.conversation_id.to_string(),
        seq: message.seq,
        message_id: message.message_id.to_string(),
        sender_id: message.sender.clone(),
        client_msg_id: message.client_msg_id.clone(),
        body: message.body.clone(),
        sent_at_ms: message.sent_at_ms,
    }
}

impl Worker {
    async fn run(mut self, mut queue: mpsc::Receiver<StoredMessage>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        while queue.recv_many(&mut batch, self.max_batch).await > 0 {
            self.fan_out(&batch).await;
            batch.clear();
        }
    }

    async fn fan_out(&mut self, batch: &[StoredMessage]) {
        let mut members: HashMap<Uuid, Vec<String>> = HashMap::new();
        for message in batch {
            if members.contains_key(&message.conversation_id) {
                continue;
            }
            match self.store.members(message.conversation_id).await {
                Ok(list) => {
                    members.insert(message.conversation_id, list);
                }
                Err(error) => {
                    warn!(%error, conversation_id = %message.conversation_id, "fan-out skipped: members unavailable")
                }
            }
        }
        let users: HashSet<&String> = members.values().flatten().collect();
        if users.is_empty() {
            return;
        }
        let request = LocateRequest { user_ids: users.into_iter().cloned().collect() };
        let sessions = match self.presence.locate(request).await {
            Ok(response) => response.into_inner().sessions,
            Err(status) => {
                warn!(code = ?status.code(), message = status.message(), "fan-out skipped: presence unavailable");
                return;
            }
        };
        let mut by_user: HashMap<&str, Vec<&pb::Session>> = HashMap::new();
        for session in &sessions {
            by_user.entry(session.user_id.as_str()).or_default().push(session);
        }
        let mut by_gateway: HashMap<&str, Vec<Delivery>> = HashMap::new();
        for message in batch {
            let Some(recipients) = members.get(&message.conversation_id) else {
                continue;
            };
            let mut per_gateway: HashMap<&str, Vec<String>> = HashMap::new();
            for user in recipients {
                for session in by_user.get(user.as_str()).into_iter().flatten() {
                    per_gateway.entry(session.gateway_addr.as_str()).or_default().push(session.session_id.clone());
                }
            }
            let proto = to_proto(message);
            for (gateway, session_ids) in per_gateway {
                by_gateway.entry(gateway).or_default().push(Delivery { message: Some(proto.clone()), session_ids });
            }
        }
        let calls = by_gateway.into_iter().map(|(address, deliveries)| {
            let pool = self.gateways.clone();
            async move {
                let count = deliveries.len();
                let channel = match pool.get(address) {
                    Ok(channel) => channel,
                    Err(error) => {
                        warn!(%error, gateway = address, "deliver dropped: bad gateway address");
                        return;
                    }
                };
                let mut client = GatewayInternalServiceClient::new(channel);
                match client.deliver(DeliverRequest { deliveries }).await {
                    Ok(response) => {
                        let missing = response.into_inner().missing_sessions;
                        debug!(gateway = address, count, missing, "delivered");
                    }
                    // Not retried here: the devices catch up from their cursors.
                    Err(status) => warn!(
                        gateway = address,
                        count,
                        code = ?status.code(),
                        message = status.message(),
                        "deliver failed; devices will catch up by sync"
                    ),
                }
            }
        });
        futures::future::join_all(calls).await;
    }
}
