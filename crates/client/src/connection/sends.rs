//! Sends awaiting their ack, across reconnects.
//!
//! Each keeps the order the app made it in and goes again, same
//! `client_msg_id`, after a reconnect (the server answers the original if
//! it stored it). A send the server could not finish for now (UNAVAILABLE,
//! DEADLINE_EXCEEDED, ABORTED) goes again alone on the same stream after a
//! backoff, or the wait the server named; the stream and the other sends
//! are left alone.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use messenger_proto::v1::{self as pb, ClientFrame, client_frame::Frame as OutFrame};
use tokio::sync::oneshot;

use crate::Error;

/// The first wait before a send the server could not finish goes again;
/// doubled per try up to [`SEND_RETRY_MAX`].
const SEND_RETRY_FIRST: Duration = Duration::from_millis(50);
const SEND_RETRY_MAX: Duration = Duration::from_secs(2);

pub(super) type Reply = oneshot::Sender<Result<pb::SendAck, Error>>;

struct Pending {
    frame: pb::SendRequestFrame,
    trace: crate::TraceContext,
    reply: Reply,
}

impl Pending {
    fn frame(&self) -> ClientFrame {
        send_frame(self.frame.clone(), self.trace.clone())
    }
}

/// A send as it goes on the stream, with the app's trace context.
fn send_frame(frame: pb::SendRequestFrame, trace: crate::TraceContext) -> ClientFrame {
    ClientFrame { frame: Some(OutFrame::Send(frame)), trace_context: trace }
}

#[derive(Default)]
pub(super) struct Sends {
    /// In the order the app made them (resent in that order).
    pending: BTreeMap<u64, Pending>,
    order_of: HashMap<String, u64>,
    next_order: u64,
    /// Due to go again on this stream: (when, client_msg_id).
    retries: Vec<(tokio::time::Instant, String)>,
    /// How many times each was tried again, for its backoff.
    retried: HashMap<String, u32>,
}

impl Sends {
    /// Keeps a send until its answer; returns its frame. A retry of an id
    /// still pending replaces the older request in place.
    pub(super) fn add(&mut self, frame: pb::SendRequestFrame, trace: crate::TraceContext, reply: Reply) -> ClientFrame {
        let order = match self.order_of.get(&frame.client_msg_id) {
            Some(order) => *order,
            None => {
                self.next_order += 1;
                self.order_of.insert(frame.client_msg_id.clone(), self.next_order);
                self.next_order
            }
        };
        let pending = Pending { frame, trace, reply };
        let on_the_wire = pending.frame();
        self.pending.insert(order, pending);
        on_the_wire
    }

    /// Answers the send `client_msg_id` (if still waiting) and forgets it.
    pub(super) fn answer(&mut self, client_msg_id: &str, answer: Result<pb::SendAck, Error>) {
        self.retried.remove(client_msg_id);
        if let Some(order) = self.order_of.remove(client_msg_id)
            && let Some(pending) = self.pending.remove(&order)
        {
            let _ = pending.reply.send(answer);
        }
    }

    /// Answers every send with `error` (the client cannot go on).
    pub(super) fn fail_all(&mut self, error: &Error) {
        self.order_of.clear();
        self.retries.clear();
        for (_, pending) in std::mem::take(&mut self.pending) {
            let _ = pending.reply.send(Err(error.clone()));
        }
    }

    /// A send the server could not finish for now: due again after a
    /// backoff, doubled per try, or after `retry_after_ms` if longer.
    pub(super) fn retry_later(&mut self, client_msg_id: &str, retry_after_ms: u64) {
        if !self.order_of.contains_key(client_msg_id) {
            return;
        }
        let tries = self.retried.entry(client_msg_id.to_owned()).or_insert(0);
        *tries += 1;
        let backoff = SEND_RETRY_FIRST.saturating_mul(1 << (*tries - 1).min(16)).min(SEND_RETRY_MAX);
        let wait = backoff.max(Duration::from_millis(retry_after_ms));
        self.retries.push((tokio::time::Instant::now() + wait, client_msg_id.to_owned()));
    }

    /// Whether a send waits to go again on this stream.
    pub(super) fn retrying(&self) -> bool {
        !self.retries.is_empty()
    }

    /// Resolves when the earliest send waiting to go again is due.
    pub(super) async fn retry_due(&self) {
        if let Some(at) = self.retries.iter().map(|(at, _)| *at).min() {
            tokio::time::sleep_until(at).await;
        }
    }

    /// The frames of the sends whose retry is due.
    pub(super) fn due(&mut self) -> Vec<ClientFrame> {
        let now = tokio::time::Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = self.retries.drain(..).partition(|(at, _)| *at <= now);
        self.retries = later;
        due.iter()
            .filter_map(|(_, id)| self.order_of.get(id).and_then(|order| self.pending.get(order)))
            .map(Pending::frame)
            .collect()
    }

    /// Forgets sends whose caller stopped waiting (timed out, dropped).
    pub(super) fn drop_abandoned(&mut self) {
        self.pending.retain(|_, p| !p.reply.is_closed());
        let live: std::collections::HashSet<&str> =
            self.pending.values().map(|p| p.frame.client_msg_id.as_str()).collect();
        self.order_of.retain(|id, _| live.contains(id.as_str()));
    }

    /// After a reconnect: every send still awaited, in the app's order,
    /// with no retry timers of the last stream.
    pub(super) fn resend_all(&mut self) -> Vec<ClientFrame> {
        self.drop_abandoned();
        self.retries.clear();
        self.pending.values().map(Pending::frame).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(id: &str, body: &str) -> pb::SendRequestFrame {
        pb::SendRequestFrame { client_msg_id: id.into(), body: body.into(), ..Default::default() }
    }

    fn bodies(frames: &[ClientFrame]) -> Vec<String> {
        frames
            .iter()
            .filter_map(|frame| match &frame.frame {
                Some(OutFrame::Send(send)) => Some(send.body.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_reconnect_resends_in_the_apps_order_and_a_retry_keeps_its_place() {
        let mut sends = Sends::default();
        let (a, _ra) = oneshot::channel();
        let (b, _rb) = oneshot::channel();
        let (a_again, _ra2) = oneshot::channel();
        let (gone, dropped) = oneshot::channel();
        sends.add(send("a", "first"), Default::default(), a);
        sends.add(send("b", "second"), Default::default(), b);
        sends.add(send("c", "abandoned"), Default::default(), gone);
        drop(dropped);
        sends.add(send("a", "first, again"), Default::default(), a_again);
        assert_eq!(bodies(&sends.resend_all()), ["first, again", "second"]);
    }

    #[tokio::test]
    async fn a_send_the_server_could_not_finish_goes_again_alone_after_its_backoff() {
        let mut sends = Sends::default();
        let (reply, mut answer) = oneshot::channel();
        let (other, _other) = oneshot::channel();
        sends.add(send("a", "one"), Default::default(), reply);
        sends.add(send("b", "two"), Default::default(), other);
        sends.retry_later("a", 0);
        assert!(sends.retrying() && sends.due().is_empty(), "due before its backoff");
        sends.retry_due().await;
        assert_eq!(bodies(&sends.due()), ["one"]);
        // The server's named wait wins over a shorter backoff (100 ms now).
        sends.retry_later("a", 300);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(sends.due().is_empty(), "went again before the server's wait");
        sends.retry_due().await;
        assert_eq!(bodies(&sends.due()), ["one"]);
        sends.answer("a", Err(Error::Closed));
        assert!(matches!(answer.try_recv(), Ok(Err(Error::Closed))));
        sends.retry_later("a", 0);
        assert!(!sends.retrying(), "an answered send is not tried again");
    }
}
