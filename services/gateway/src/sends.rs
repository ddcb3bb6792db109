//! Sends to the message service, over one long-lived `SendStream` per
//! message-service instance instead of a unary call per message: a send is
//! then one DATA frame each way, with no HTTP/2 stream, headers, trailers or
//! per-call task of its own, on either side.
//!
//! Each instance gets a *pipe*: a task that owns the stream, numbers the
//! requests it writes and hands each answer to whoever is waiting for its
//! number. Sends are routed like every other call for their conversation
//! ([`RoleChannel::pick`]). A pipe opens its stream when the first send comes,
//! and again after the stream breaks; a break fails every send waiting on it
//! with UNAVAILABLE (its fate is unknown), which the session's one retry with
//! the same `client_msg_id` resolves.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use messenger_platform::{
    discovery::{Channel, Role, RoleChannel, timed_out, transport_status},
    supervise::Supervisor,
};
use messenger_proto::v1::{self as pb, message_service_client::MessageServiceClient, send_stream_response};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};
use tracing::warn;

type Reply = oneshot::Sender<Result<pb::SendResponse, Status>>;

struct Pending {
    request: pb::SendRequest,
    /// The sending frame's trace context (the stream carries it per send).
    trace: messenger_platform::trace::Carrier,
    reply: Reply,
}

pub(crate) struct Sends {
    channel: RoleChannel,
    pipes: Mutex<HashMap<String, mpsc::Sender<Pending>>>,
    max_inflight: usize,
    timeout: Duration,
    max_message_bytes: usize,
    /// Runs the pipes; a pipe's panic stops the process.
    supervisor: Supervisor,
}

impl Sends {
    pub fn new(
        channel: RoleChannel,
        max_inflight: usize,
        timeout: Duration,
        max_message_bytes: usize,
        supervisor: Supervisor,
    ) -> Self {
        Self { channel, pipes: Mutex::default(), max_inflight, timeout, max_message_bytes, supervisor }
    }

    /// Sends, trying a second time if its instance could not be reached (the
    /// channel then passes that instance over). The same `client_msg_id`
    /// makes the retry return the original if the first attempt did commit:
    /// one seq, never two.
    pub async fn send(&self, request: pb::SendRequest) -> Result<pb::SendResponse, Status> {
        match self.once(request.clone()).await {
            Err(status) if status.code() == Code::Unavailable => {
                warn!(message = status.message(), "send could not reach its message-service instance; retrying once");
                self.once(request).await
            }
            answered => answered,
        }
    }

    async fn once(&self, request: pb::SendRequest) -> Result<pb::SendResponse, Status> {
        let address = self
            .channel
            .pick(Some(request.conversation_id.as_bytes()))
            .map_err(|error| Status::unavailable(error.to_string()))?;
        let pipe = self.pipe(&address)?;
        let (reply, answer) = oneshot::channel();
        let waited = tokio::time::timeout(self.timeout, async {
            pipe.send(Pending { request, trace: messenger_platform::trace::current(), reply })
                .await
                .map_err(|_| closed(&address))?;
            answer.await.map_err(|_| closed(&address))?
        })
        .await;
        waited.unwrap_or_else(|_| {
            let waited = format!("no answer to a send within {:?}", self.timeout);
            Err(transport_status(Role::Message, &address, &waited, true))
        })
    }

    /// The pipe to `address`, started on first use.
    fn pipe(&self, address: &str) -> Result<mpsc::Sender<Pending>, Status> {
        let mut pipes = self.pipes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pipe) = pipes.get(address) {
            return Ok(pipe.clone());
        }
        let channel =
            self.channel.instance(address).map_err(|error| transport_status(Role::Message, address, &error, false))?;
        // Pipes of instances that left discovery go (their tasks end once
        // their last sends are answered).
        let known = self.channel.instances();
        pipes.retain(|address, _| known.contains(address));
        let (pipe, queue) = mpsc::channel(self.max_inflight);
        let client = MessageServiceClient::new(channel).max_decoding_message_size(self.max_message_bytes);
        let run =
            Pipe { address: address.to_owned(), role: self.channel.clone(), client, max_inflight: self.max_inflight };
        self.supervisor.spawn("send pipe", run.run(queue));
        pipes.insert(address.to_owned(), pipe.clone());
        Ok(pipe)
    }
}

/// The send's fate is unknown: its retry with the same `client_msg_id` settles it.
fn closed(address: &str) -> Status {
    transport_status(Role::Message, address, &"the send stream closed before the send was answered", false)
}

/// The task behind one instance's pipe.
struct Pipe {
    address: String,
    role: RoleChannel,
    client: MessageServiceClient<Channel>,
    max_inflight: usize,
}

impl Pipe {
    /// Runs until every sender of `queue` is gone (the gateway stopped).
    async fn run(mut self, mut queue: mpsc::Receiver<Pending>) {
        // An idle pipe holds no stream: it opens one for the first send.
        while let Some(first) = queue.recv().await {
            let mut waiting = HashMap::new();
            let (requests, outgoing) = mpsc::channel(self.max_inflight);
            let mut next_id = 0u64;
            let mut write = |pending: Pending, waiting: &mut HashMap<u64, Reply>| {
                next_id += 1;
                // Never full: at most `max_inflight` are waiting, and the
                // channel holds as many.
                match requests.try_send(pb::SendStreamRequest {
                    id: next_id,
                    send: Some(pending.request),
                    trace_context: pending.trace,
                }) {
                    Ok(()) => drop(waiting.insert(next_id, pending.reply)),
                    Err(_) => drop(pending.reply.send(Err(closed(&self.address)))),
                }
            };
            write(first, &mut waiting);
            let mut answers = match self.client.send_stream(ReceiverStream::new(outgoing)).await {
                Ok(response) => response.into_inner(),
                Err(status) => {
                    // As `RoleChannel` does for unary calls: slow is not gone
                    // (DEADLINE_EXCEEDED); anything else means this instance
                    // cannot take sends now (refused, reset, going away, or
                    // not serving the stream): UNAVAILABLE, passed over for a
                    // while, so the session's retry goes elsewhere. Whether
                    // the first send arrived is unknown; its retry is safe.
                    let slow = timed_out(&status);
                    if !slow {
                        self.role.mark_unhealthy(self.address.clone());
                    }
                    let what = format!("cannot open a send stream: {status}");
                    let status = transport_status(Role::Message, &self.address, &what, slow);
                    fail_all(&mut waiting, || status.clone());
                    continue;
                }
            };
            // Once the gateway stops, only answers are awaited.
            let mut closing = false;
            loop {
                tokio::select! {
                    pending = queue.recv(), if !closing && waiting.len() < self.max_inflight => match pending {
                        Some(pending) => write(pending, &mut waiting),
                        None => closing = true,
                    },
                    answer = answers.message() => match answer {
                        Ok(Some(answer)) => {
                            let Some(reply) = waiting.remove(&answer.id) else { continue };
                            let result = match answer.result {
                                Some(send_stream_response::Result::Sent(sent)) => Ok(sent),
                                Some(send_stream_response::Result::Error(error)) => {
                                    Err(Status::new(Code::from(error.code), error.message))
                                }
                                None => Err(Status::internal("empty send answer")),
                            };
                            let _ = reply.send(result);
                        }
                        // The instance ended the stream: it is draining.
                        // Its unanswered sends (none, unless they crossed the
                        // end) and the next ones go elsewhere.
                        Ok(None) => {
                            self.role.mark_unhealthy(self.address.clone());
                            break;
                        }
                        Err(status) => {
                            warn!(address = %self.address, code = ?status.code(), message = status.message(), "send stream broke");
                            self.role.mark_unhealthy(self.address.clone());
                            break;
                        }
                    },
                }
                if closing && waiting.is_empty() {
                    break;
                }
            }
            fail_all(&mut waiting, || closed(&self.address));
        }
    }
}

fn fail_all(waiting: &mut HashMap<u64, Reply>, failure: impl Fn() -> Status) {
    for (_, reply) in waiting.drain() {
        let _ = reply.send(Err(failure()));
    }
}
