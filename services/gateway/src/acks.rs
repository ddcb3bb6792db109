//! Delivered acks of every session on this gateway, merged and sent to the
//! message service in one `AckDeliveredRequest` per interval instead of one
//! call per session per ack. Acks are resume hints: one lost in a crash costs
//! the device a few duplicates, which the SDK drops. The flusher sleeps
//! while no ack waits: an idle gateway has no timer running for it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use messenger_platform::discovery::RoleChannel;
use messenger_proto::v1::{self as pb, message_service_client::MessageServiceClient};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Bound on one device's acks waiting for a flush (memory per device).
const MAX_CONVERSATIONS_PER_DEVICE: usize = 1024;

/// (user, device) -> conversation -> highest acked seq.
type Pending = HashMap<(String, String), HashMap<String, u64>>;

#[derive(Default)]
pub(crate) struct AckBatcher {
    pending: Mutex<Pending>,
    /// Told when the first ack arrives after a flush.
    arrived: Notify,
    /// Tests: flushes so far (each a wake-up of the flusher).
    #[cfg(test)]
    flushes: std::sync::atomic::AtomicU64,
}

impl AckBatcher {
    /// Records an ack; false when this device already has
    /// `MAX_CONVERSATIONS_PER_DEVICE` conversations waiting for the next flush.
    pub fn add(&self, user: &str, device: &str, conversation_id: String, seq: u64) -> bool {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let first = pending.is_empty();
        let cursors = pending.entry((user.to_owned(), device.to_owned())).or_default();
        if cursors.len() >= MAX_CONVERSATIONS_PER_DEVICE && !cursors.contains_key(&conversation_id) {
            return false;
        }
        let cursor = cursors.entry(conversation_id).or_insert(0);
        *cursor = (*cursor).max(seq);
        if first {
            // A permit is kept if the flusher is busy: it flushes again after.
            self.arrived.notify_one();
        }
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

    /// Sends the acks to the message service until `shutdown` (see [`Self::flush_with`]).
    pub async fn run(
        self: Arc<Self>,
        message: MessageServiceClient<RoleChannel>,
        interval: Duration,
        max_cursors: usize,
        shutdown: CancellationToken,
    ) {
        let send = move |request| {
            let mut message = message.clone();
            async move { message.ack_delivered(request).await.map(drop) }
        };
        self.flush_with(send, interval, max_cursors, shutdown).await;
    }

    /// Waits for an ack, then for `interval` since the last flush (acks that
    /// arrive meanwhile go along), and flushes; at `shutdown`, flushes once
    /// more. A flush goes out in requests of at most `max_cursors` cursors
    /// each, so a gateway holding many devices never builds one request
    /// beyond the message service's size limit (nor one huge write).
    async fn flush_with<F, Fut>(
        self: Arc<Self>,
        mut send: F,
        interval: Duration,
        max_cursors: usize,
        shutdown: CancellationToken,
    ) where
        F: FnMut(pb::AckDeliveredRequest) -> Fut,
        Fut: Future<Output = Result<(), tonic::Status>>,
    {
        let mut last = tokio::time::Instant::now();
        loop {
            let mut stopping = tokio::select! {
                () = self.arrived.notified() => false,
                () = shutdown.cancelled() => true,
            };
            if !stopping {
                tokio::select! {
                    () = tokio::time::sleep_until(last + interval) => {}
                    () = shutdown.cancelled() => stopping = true,
                }
            }
            last = tokio::time::Instant::now();
            #[cfg(test)]
            self.flushes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            for request in requests(self.take(), max_cursors) {
                if let Err(status) = send(request).await {
                    warn!(code = ?status.code(), message = status.message(), "ack flush failed; devices may see duplicates");
                }
            }
            if stopping {
                return;
            }
        }
    }
}

/// `pending` as requests of at most `max_cursors` cursors each; a device
/// with more than that is split across requests (cursors only move forward,
/// so the parts commute).
fn requests(pending: Pending, max_cursors: usize) -> Vec<pb::AckDeliveredRequest> {
    let max_cursors = max_cursors.max(1);
    let mut requests = Vec::new();
    let mut current = pb::AckDeliveredRequest::default();
    let mut in_current = 0;
    for ((user_id, device_id), cursors) in pending {
        let mut cursors: Vec<pb::DeliveredCursor> =
            cursors.into_iter().map(|(conversation_id, seq)| pb::DeliveredCursor { conversation_id, seq }).collect();
        while !cursors.is_empty() {
            if in_current == max_cursors {
                requests.push(std::mem::take(&mut current));
                in_current = 0;
            }
            let take = cursors.len().min(max_cursors - in_current);
            let rest = cursors.split_off(take);
            in_current += cursors.len();
            current.devices.push(pb::DeviceAck { user_id: user_id.clone(), device_id: device_id.clone(), cursors });
            cursors = rest;
        }
    }
    if in_current > 0 {
        requests.push(current);
    }
    requests
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(devices: usize, per_device: usize) -> Pending {
        (0..devices)
            .map(|d| {
                let cursors = (0..per_device).map(|c| (format!("conversation-{c}"), (c + 1) as u64)).collect();
                ((format!("user-{d}"), format!("device-{d}")), cursors)
            })
            .collect()
    }

    fn cursors(requests: &[pb::AckDeliveredRequest]) -> usize {
        requests.iter().flat_map(|r| &r.devices).map(|d| d.cursors.len()).sum()
    }

    /// No ack, no wake-up; the first ack goes out within the interval, with
    /// the ones that came along; the rest go out at shutdown.
    #[tokio::test]
    async fn the_flusher_sleeps_until_an_ack_arrives() {
        use std::sync::atomic::Ordering;
        let batcher = Arc::new(AckBatcher::default());
        let sent = Arc::new(Mutex::new(Vec::<pb::AckDeliveredRequest>::new()));
        let shutdown = CancellationToken::new();
        let record = {
            let sent = sent.clone();
            move |request| {
                sent.lock().unwrap().push(request);
                async { Ok(()) }
            }
        };
        let interval = Duration::from_millis(20);
        let flusher = tokio::spawn(batcher.clone().flush_with(record, interval, 100, shutdown.clone()));
        // A ticking flusher would have woken 15 times by now.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(batcher.flushes.load(Ordering::Relaxed), 0, "an idle flusher woke up");
        assert!(batcher.add("u", "d", "c1".into(), 1));
        assert!(batcher.add("u", "d", "c2".into(), 5));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(batcher.flushes.load(Ordering::Relaxed), 1);
        let requests = std::mem::take(&mut *sent.lock().unwrap());
        assert_eq!(requests.len(), 1, "acks that arrived together go in one request");
        assert_eq!(requests[0].devices[0].cursors.len(), 2);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(batcher.flushes.load(Ordering::Relaxed), 1, "the flusher woke up with nothing to send");
        assert!(batcher.add("u", "d", "c1".into(), 2));
        shutdown.cancel();
        flusher.await.unwrap();
        let requests = std::mem::take(&mut *sent.lock().unwrap());
        assert_eq!(requests.len(), 1, "shutdown flushes what waits");
        assert_eq!(requests[0].devices[0].cursors[0].seq, 2);
    }

    #[test]
    fn a_flush_splits_at_the_cursor_limit_and_loses_nothing() {
        let requests = requests(pending(7, 1), 3);
        let sizes: Vec<usize> = requests.iter().map(|r| cursors(std::slice::from_ref(r))).collect();
        assert_eq!(sizes, [3, 3, 1]);
        // One device with more cursors than a request holds is split too.
        let requests = super::requests(pending(1, 5), 2);
        assert_eq!(requests.iter().map(|r| r.devices[0].cursors.len()).collect::<Vec<_>>(), [2, 2, 1]);
        assert!(super::requests(Pending::new(), 3).is_empty());
    }

    #[test]
    fn three_hundred_thousand_devices_fit_the_internal_message_limit() {
        use prost::Message as _;
        let requests = requests(pending(300_000, 1), crate::Options::default().ack_flush_max_cursors);
        assert_eq!(cursors(&requests), 300_000, "every device's ack is sent");
        let limit = messenger_platform::server::ServerOptions::default().internal_max_message_bytes;
        let largest = requests.iter().map(|r| r.encoded_len()).max().unwrap();
        assert!(largest < limit / 16, "a request of {largest} bytes is too close to the {limit}-byte limit");
    }
}
