//! The client's frames: sends, delivered acks, read marks, typing, pings.

use futures::{FutureExt, future::BoxFuture, stream::FuturesUnordered};
use messenger_platform::trace;
use messenger_proto::v1::{
    self as pb, ClientFrame, ServerFrame, client_frame::Frame as In, server_frame::Frame as Out,
};
use tonic::{Code, Status};
use tracing::Instrument as _;

use super::{End, MAX_READ_MARKS, Session};

pub(super) enum Completion {
    Frame(Box<ServerFrame>),
    Nothing,
}

pub(super) fn error_frame(
    code: Code,
    message: impl Into<String>,
    client_msg_id: &str,
    conversation_id: &str,
) -> ServerFrame {
    ServerFrame {
        frame: Some(Out::Error(pb::Error {
            code: code as i32,
            message: message.into(),
            client_msg_id: client_msg_id.to_owned(),
            conversation_id: conversation_id.to_owned(),
            retry_after_ms: 0,
        })),
    }
}

/// The Error frame for a refused call: its code and message, and the wait
/// its `google.rpc.RetryInfo` names (a rate limit's) as `retry_after_ms`.
pub(crate) fn status_frame(status: &Status, client_msg_id: &str, conversation_id: &str) -> ServerFrame {
    use tonic_types::StatusExt as _;
    let mut frame = error_frame(status.code(), status.message(), client_msg_id, conversation_id);
    if let Some(Out::Error(error)) = &mut frame.frame
        && let Some(wait) = status.get_details_retry_info().and_then(|info| info.retry_delay)
    {
        error.retry_after_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
    }
    frame
}

/// Nothing on success; an Error frame (stream stays open) on failure.
fn answer_or_error<T>(result: Result<T, Status>, conversation_id: &str) -> Completion {
    match result {
        Ok(_) => Completion::Nothing,
        Err(status) => Completion::Frame(Box::new(status_frame(&status, "", conversation_id))),
    }
}

impl Session {
    pub(super) async fn handle(
        &mut self,
        frame: ClientFrame,
        inflight: &mut FuturesUnordered<BoxFuture<'static, Completion>>,
    ) -> Result<(), End> {
        match frame.frame {
            Some(In::Send(send)) => {
                if let Err(status) = self.context.limits.sends.check(&self.user) {
                    let frame = status_frame(&status, &send.client_msg_id, &send.conversation_id);
                    return self.emit(frame).await;
                }
                // The app's trace, when it sent one (`Client::send_traced`).
                let span = trace::frame_span(
                    "messenger.v1.GatewayService/Connect Send",
                    "messenger.v1.GatewayService",
                    "Connect",
                    &frame.trace_context,
                );
                let context = self.context.clone();
                let request = pb::SendRequest {
                    sender_id: self.user.clone(),
                    device_id: self.device.clone(),
                    conversation_id: send.conversation_id.clone(),
                    client_msg_id: send.client_msg_id.clone(),
                    body: send.body,
                    reply_to_seq: send.reply_to_seq,
                    media_ids: send.media_ids,
                };
                inflight.push(
                    async move {
                        let sent = context.sends.send(request).await;
                        let code = sent.as_ref().map_or_else(Status::code, |_| Code::Ok);
                        trace::finish(&tracing::Span::current(), code, true);
                        let frame = match sent {
                            Ok(response) => match response.ack {
                                Some(ack) => ServerFrame { frame: Some(Out::SendAck(ack)) },
                                None => error_frame(
                                    Code::Internal,
                                    "missing ack",
                                    &send.client_msg_id,
                                    &send.conversation_id,
                                ),
                            },
                            Err(status) => status_frame(&status, &send.client_msg_id, &send.conversation_id),
                        };
                        Completion::Frame(Box::new(frame))
                    }
                    .instrument(span)
                    .boxed(),
                );
                Ok(())
            }
            Some(In::Ack(ack)) => {
                if messenger_platform::ids::parse(&ack.conversation_id).is_none() {
                    return self
                        .emit(error_frame(Code::InvalidArgument, "ack conversation_id must be a UUID", "", ""))
                        .await;
                }
                if !self.context.acks.add(&self.user, &self.device, ack.conversation_id, ack.seq) {
                    return self
                        .emit(error_frame(
                            Code::ResourceExhausted,
                            "too many acked conversations at once; retry",
                            "",
                            "",
                        ))
                        .await;
                }
                Ok(())
            }
            Some(In::Read(read)) => {
                if self.read_marks.get(&read.conversation_id).is_some_and(|&marked| read.seq <= marked) {
                    return Ok(());
                }
                if let Err(status) = self.context.limits.reads.check(&self.user) {
                    return self.emit(status_frame(&status, "", &read.conversation_id)).await;
                }
                if self.read_marks.len() < MAX_READ_MARKS || self.read_marks.contains_key(&read.conversation_id) {
                    self.read_marks.insert(read.conversation_id.clone(), read.seq);
                }
                let mut client = self.context.message.clone();
                let conversation_id = read.conversation_id.clone();
                let request = pb::MarkReadRequest {
                    user_id: self.user.clone(),
                    conversation_id: read.conversation_id,
                    seq: read.seq,
                };
                inflight
                    .push(async move { answer_or_error(client.mark_read(request).await, &conversation_id) }.boxed());
                Ok(())
            }
            Some(In::Typing(typing)) => {
                if self.context.limits.typing.wait(&self.user).is_ok() {
                    let mut client = self.context.message.clone();
                    let conversation_id = typing.conversation_id.clone();
                    let request = pb::NotifyTypingRequest {
                        user_id: self.user.clone(),
                        conversation_id: typing.conversation_id,
                        typing: typing.typing,
                    };
                    inflight.push(
                        async move { answer_or_error(client.notify_typing(request).await, &conversation_id) }.boxed(),
                    );
                }
                Ok(())
            }
            Some(In::Ping(ping)) => {
                self.emit(ServerFrame { frame: Some(Out::Pong(pb::Pong { nonce: ping.nonce })) }).await
            }
            Some(In::Hello(_)) => {
                self.emit(error_frame(Code::FailedPrecondition, "Hello was already received", "", "")).await
            }
            None => self.emit(error_frame(Code::InvalidArgument, "empty frame", "", "")).await,
        }
    }

    pub(super) async fn complete(&mut self, done: Completion) -> Result<(), End> {
        match done {
            Completion::Frame(frame) => self.emit(*frame).await,
            Completion::Nothing => Ok(()),
        }
    }
}
