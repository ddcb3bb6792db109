//! Delivered acks of every session on this gateway, merged and sent to the
//! message service in one `AckDeliveredRequest` per interval instead of one
//! call per session per ack. Acks are resume hints: one lost in a crash costs
//! the device a few duplicates, which the SDK drops.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use messenger_platform::discovery::RoleChannel;
use messenger_proto::v1::{self as pb, message_service_client::MessageServiceClient};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Bound on one device's acks waiting for a flush (memory per device).
const MAX_CONVERSATIONS_PER_DEVICE: usize = 1024;

/// (user, device) -> conversation -> highest acked seq.
type Pending = HashMap<(String, String), HashMap<String, u64>>;

#[derive(Default)]
pub(crate) struct AckBatcher {
    pending: Mutex<Pending>,
}

impl AckBatcher {
    /// Records an ack; false when this device already has
    /// `MAX_CONVERSATIONS_PER_DEVICE` conversations waiting for the next flush.
    pub fn add(&self, user: &str, device: &str, conversation_id: String, seq: u64) -> bool {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let cursors = pending.entry((user.to_owned(), device.to_owned())).or_default();
        if cursors.len() >= MAX_CONVERSATIONS_PER_DEVICE && !cursors.contains_key(&conversation_id) {
            return false;
        }
        let cursor = cursors.entry(conversation_id).or_insert(0);
        *cursor = (*cursor).max(seq);
        true
    }

    /// Sends one device's pending acks now: a session that ends flushes its
    /// own, so a device that closes and reconnects at once is not re-sent
    /// what it already acked.
    pub async fn flush_device(&self, message: &MessageServiceClient<RoleChannel>, user: &str, device: &str) {
        let key = (user.to_owned(), device.to_owned());
        let Some(cursors) = self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&key) else { return };
        let request = pb::AckDeliveredRequest {
            user_id: key.0,
            device_id: key.1,
            cursors: cursors
                .into_iter()
                .map(|(conversation_id, seq)| pb::DeliveredCursor { conversation_id, seq })
                .collect(),
            devices: Vec::new(),
        };
        if let Err(status) = message.clone().ack_delivered(request).await {
            warn!(code = ?status.code(), message = status.message(), "final ack flush failed; the device may see duplicates");
        }
    }

    fn take(&self) -> Pending {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Flushes every `interval` until `shutdown`, then once more.
    pub async fn run(
        self: Arc<Self>,
        mut message: MessageServiceClient<RoleChannel>,
        interval: Duration,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopping = tokio::select! {
                _ = tick.tick() => false,
                () = shutdown.cancelled() => true,
            };
            let pending = self.take();
            if !pending.is_empty() {
                let devices = pending
                    .into_iter()
                    .map(|((user_id, device_id), cursors)| pb::DeviceAck {
                        user_id,
                        device_id,
                        cursors: cursors
                            .into_iter()
                            .map(|(conversation_id, seq)| pb::DeliveredCursor { conversation_id, seq })
                            .collect(),
                    })
                    .collect();
                let request = pb::AckDeliveredRequest { devices, ..Default::default() };
                if let Err(status) = message.ack_delivered(request).await {
                    warn!(code = ?status.code(), message = status.message(), "ack flush failed; devices may see duplicates");
                }
            }
            if stopping {
                return;
            }
        }
    }
}
