//! A failed `Deliver`, sent again.
//!
//! A gateway that did not answer (the link broke, it was restarting its
//! listener) gets the messages and receipts of the failed call again after
//! `redeliver_backoff`, then twice that, and so on for `redeliver_attempts`
//! tries. Gateway sessions skip what they already pushed and fill any gap
//! first, so a copy that arrives late or twice changes nothing; typing and
//! presence are moments, not state, and are not sent again. Without this,
//! a conversation's last entry would wait for the next one, or for the
//! device to reconnect.
//!
//! Memory is bounded: at most `redeliver_max_pending` deliveries wait,
//! across workers; past that a failed delivery is dropped and counted.

use std::{sync::Arc, time::Duration};

use messenger_proto::v1::{Delivery, delivery};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::{Gateways, fanout_metrics};
use crate::options::FanoutOptions;

#[derive(Clone)]
pub(super) struct Redeliver {
    attempts: u32,
    backoff: Duration,
    /// One permit per delivery that may wait to be sent again.
    pending: Arc<Semaphore>,
}

impl Redeliver {
    pub(super) fn new(options: &FanoutOptions) -> Self {
        Self {
            attempts: options.redeliver_attempts,
            backoff: options.redeliver_backoff,
            pending: Arc::new(Semaphore::new(options.redeliver_max_pending)),
        }
    }

    /// What of `deliveries` would be sent again if their call fails: the
    /// messages and receipts (None when redelivery is off or nothing qualifies).
    pub(super) fn keep(&self, deliveries: &[Delivery]) -> Option<Vec<Delivery>> {
        if self.attempts == 0 {
            return None;
        }
        let kept: Vec<Delivery> = deliveries
            .iter()
            .filter(|delivery| {
                matches!(delivery.event, Some(delivery::Event::Message(_)) | Some(delivery::Event::Receipt(_)))
            })
            .cloned()
            .collect();
        (!kept.is_empty()).then_some(kept)
    }

    /// Sends `deliveries` to `address` again in the background; false when
    /// too many already wait (then they are dropped, and counted).
    pub(super) fn later(&self, gateways: Arc<dyn Gateways>, address: String, deliveries: Vec<Delivery>) -> bool {
        let count = deliveries.len();
        let Ok(permits) = self.pending.clone().try_acquire_many_owned(count as u32) else {
            fanout_metrics().dropped.add(count as u64, &[]);
            warn!(gateway = address, count, "deliver failed and too many wait to be sent again; dropped");
            return false;
        };
        let (attempts, mut wait) = (self.attempts, self.backoff);
        tokio::spawn(async move {
            let _permits = permits;
            for attempt in 1..=attempts {
                tokio::time::sleep(wait).await;
                wait = wait.saturating_mul(2);
                match gateways.deliver(&address, deliveries.clone()).await {
                    Ok(_) => {
                        fanout_metrics().redelivered.add(count as u64, &[]);
                        debug!(gateway = address, count, attempt, "delivered again");
                        return;
                    }
                    Err(status) => debug!(gateway = address, attempt, code = ?status.code(), "deliver failed again"),
                }
            }
            fanout_metrics().dropped.add(count as u64, &[]);
            warn!(
                gateway = address,
                count,
                attempts,
                "deliver failed every time; dropped, the devices catch up at the next entry or reconnect"
            );
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use messenger_proto::v1::Receipt;

    use super::*;

    /// A gateway that never answers.
    struct Gone;

    #[async_trait::async_trait]
    impl Gateways for Gone {
        async fn deliver(&self, _: &str, _: Vec<Delivery>) -> Result<u32, tonic::Status> {
            Err(tonic::Status::unavailable("gone"))
        }
    }

    fn receipts(count: usize) -> Vec<Delivery> {
        let event = delivery::Event::Receipt(Receipt::default());
        (0..count).map(|_| Delivery { event: Some(event.clone()), ..Default::default() }).collect()
    }

    #[tokio::test]
    async fn at_most_redeliver_max_pending_deliveries_wait() {
        let options = FanoutOptions {
            redeliver_attempts: 1,
            redeliver_backoff: Duration::from_secs(3600),
            redeliver_max_pending: 3,
            ..FanoutOptions::default()
        };
        let redeliver = Redeliver::new(&options);
        let pool: Arc<dyn Gateways> = Arc::new(Gone);
        let gateway = "127.0.0.1:9".to_owned();
        assert!(redeliver.later(pool.clone(), gateway.clone(), receipts(2)));
        assert!(!redeliver.later(pool.clone(), gateway.clone(), receipts(2)), "4 would wait, over the limit of 3");
        assert!(redeliver.later(pool.clone(), gateway.clone(), receipts(1)), "exactly at the limit");
        assert!(!redeliver.later(pool, gateway, receipts(1)));
    }

    #[test]
    fn only_messages_and_receipts_are_kept_and_nothing_when_off() {
        let typing = Delivery { event: Some(delivery::Event::Typing(Default::default())), ..Default::default() };
        let mut deliveries = receipts(1);
        deliveries.push(typing.clone());
        let on = Redeliver::new(&FanoutOptions::default());
        assert_eq!(on.keep(&deliveries).map(|kept| kept.len()), Some(1));
        assert_eq!(on.keep(&[typing]), None);
        let off = Redeliver::new(&FanoutOptions { redeliver_attempts: 0, ..FanoutOptions::default() });
        assert_eq!(off.keep(&deliveries), None);
    }
}
