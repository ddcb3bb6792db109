//! The tonic adapters, in (`MessageService`) and out (the media port):
//! they convert requests and errors and hold no logic.

use std::sync::Arc;

use async_trait::async_trait;
use futures::{StreamExt, stream::FuturesUnordered};
use messenger_platform::discovery::ChannelPool;
use messenger_platform::{discovery::RoleChannel, trace};
use messenger_proto::v1::{
    self as pb, gateway_internal_service_client::GatewayInternalServiceClient,
    media_service_client::MediaServiceClient, message_service_server::MessageService, modify_message_request,
    presence_service_client::PresenceServiceClient, update_group_request,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument as _, debug};

use crate::{
    convert::{self, conversation_to_proto, presence_from_proto, role_from_proto, to_proto},
    error::{Error, MediaRefusal},
    fanout::{Gateways, Locate},
    ports::{Media, MediaToAttach},
    service::{SendInput, Service},
    store::{Attachment, Change, HistoryRange},
};

pub struct Adapter {
    pub service: Arc<Service>,
    /// `message.send_stream_max_inflight`.
    pub send_stream_max_inflight: usize,
    /// Cancelled when the server starts draining: send streams then end.
    pub shutdown: CancellationToken,
}

/// One send, as `Send` answers it.
async fn sent(service: &Service, request: pb::SendRequest) -> Result<pb::SendResponse, Status> {
    let (message, created) = service
        .send(SendInput {
            sender: &request.sender_id,
            conversation_id: &request.conversation_id,
            client_msg_id: &request.client_msg_id,
            body: request.body,
            reply_to_seq: request.reply_to_seq,
            media_ids: request.media_ids,
        })
        .await?;
    Ok(pb::SendResponse {
        ack: Some(pb::SendAck {
            conversation_id: message.conversation_id.to_string(),
            client_msg_id: message.client_msg_id,
            seq: message.seq,
            message_id: message.message_id.to_string(),
            server_time_ms: message.sent_at_ms,
        }),
        created,
    })
}

/// Answers a `SendStream`: up to `max_inflight` sends at once, each answered
/// with its request's id as soon as it is done. When the caller goes away,
/// sends already started still commit and fan out (`Service::send` runs
/// them detached); the caller learns their fate by retrying with the same
/// `client_msg_id`. When the server starts draining, the stream reads no
/// more, answers what it started and ends, so the drain does not wait for
/// the caller (whose unanswered sends fail over to another instance).
fn send_stream(
    service: Arc<Service>,
    mut incoming: Streaming<pb::SendStreamRequest>,
    max_inflight: usize,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<pb::SendStreamResponse, Status>> {
    let (answers, stream) = mpsc::channel(max_inflight);
    tokio::spawn(async move {
        let mut inflight = FuturesUnordered::new();
        let mut open = true;
        loop {
            tokio::select! {
                () = shutdown.cancelled(), if open => open = false,
                next = incoming.message(), if open && inflight.len() < max_inflight => match next {
                    Ok(Some(request)) => {
                        let service = service.clone();
                        // Each send on the stream is its own span, in its caller's trace.
                        let span = trace::frame_span(
                            "messenger.v1.MessageService/SendStream Send",
                            "messenger.v1.MessageService",
                            "SendStream",
                            &request.trace_context,
                        );
                        inflight.push(async move {
                            let result = match request.send {
                                Some(send) => sent(&service, send).await,
                                None => Err(Status::invalid_argument("send is required")),
                            };
                            let code = result.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok);
                            trace::finish(&tracing::Span::current(), code, true);
                            let result = match result {
                                Ok(sent) => pb::send_stream_response::Result::Sent(sent),
                                Err(status) => pb::send_stream_response::Result::Error(pb::CallError {
                                    code: status.code() as i32,
                                    message: status.message().to_owned(),
                                }),
                            };
                            pb::SendStreamResponse { id: request.id, result: Some(result) }
                        }.instrument(span));
                    }
                    Ok(None) => open = false,
                    Err(status) => {
                        debug!(code = ?status.code(), message = status.message(), "send stream ended by its caller");
                        open = false;
                    }
                },
                Some(answer) = inflight.next(), if !inflight.is_empty() => {
                    if answers.send(Ok(answer)).await.is_err() {
                        return;
                    }
                }
                else => return,
            }
        }
    });
    ReceiverStream::new(stream)
}

fn inner<T>(request: Option<T>) -> Result<T, Status> {
    request.ok_or_else(|| Status::invalid_argument("request is required"))
}

fn event_response<T>(
    event: Option<crate::store::StoredMessage>,
    wrap: impl FnOnce(Option<pb::Message>) -> T,
) -> Response<T> {
    Response::new(wrap(event.as_ref().map(to_proto)))
}

#[tonic::async_trait]
impl MessageService for Adapter {
    async fn send(&self, request: Request<pb::SendRequest>) -> Result<Response<pb::SendResponse>, Status> {
        sent(&self.service, request.into_inner()).await.map(Response::new)
    }

    type SendStreamStream = ReceiverStream<Result<pb::SendStreamResponse, Status>>;

    async fn send_stream(
        &self,
        request: Request<Streaming<pb::SendStreamRequest>>,
    ) -> Result<Response<Self::SendStreamStream>, Status> {
        let (service, max_inflight) = (self.service.clone(), self.send_stream_max_inflight);
        Ok(Response::new(send_stream(service, request.into_inner(), max_inflight, self.shutdown.clone())))
    }

    async fn get_or_create_direct(
        &self,
        request: Request<pb::MessageGetOrCreateDirectRequest>,
    ) -> Result<Response<pb::MessageGetOrCreateDirectResponse>, Status> {
        let request = request.into_inner();
        let conversation = self.service.get_or_create_direct(&request.user_id, &request.peer_id).await?;
        Ok(Response::new(pb::MessageGetOrCreateDirectResponse {
            conversation: Some(conversation_to_proto(conversation, Vec::new())),
        }))
    }

    async fn history(
        &self,
        request: Request<pb::MessageHistoryRequest>,
    ) -> Result<Response<pb::MessageHistoryResponse>, Status> {
        let request = request.into_inner();
        let range = match request.after_seq {
            Some(after) => HistoryRange::After(after),
            None => HistoryRange::Before((request.before_seq > 0).then_some(request.before_seq)),
        };
        let page = self.service.history(&request.user_id, &request.conversation_id, range, request.limit).await?;
        Ok(Response::new(pb::MessageHistoryResponse {
            messages: page.messages.iter().map(to_proto).collect(),
            has_more: page.has_more,
        }))
    }

    async fn list_conversations(
        &self,
        request: Request<pb::MessageListConversationsRequest>,
    ) -> Result<Response<pb::MessageListConversationsResponse>, Status> {
        let request = request.into_inner();
        let (conversations, next) =
            self.service.list_conversations(&request.user_id, &request.page_token, request.limit).await?;
        Ok(Response::new(pb::MessageListConversationsResponse {
            conversations: conversations.into_iter().map(|c| conversation_to_proto(c, Vec::new())).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn sync(&self, request: Request<pb::SyncRequest>) -> Result<Response<pb::SyncResponse>, Status> {
        let request = request.into_inner();
        let (messages, next) = self
            .service
            .sync(&request.user_id, &request.device_id, &request.conversation_id, &request.page_token, request.limit)
            .await?;
        Ok(Response::new(pb::SyncResponse {
            messages: messages.iter().map(to_proto).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn ack_delivered(
        &self,
        request: Request<pb::AckDeliveredRequest>,
    ) -> Result<Response<pb::AckDeliveredResponse>, Status> {
        let request = request.into_inner();
        let cursors = |list: Vec<pb::DeliveredCursor>| list.into_iter().map(|c| (c.conversation_id, c.seq)).collect();
        let mut acks = Vec::with_capacity(request.devices.len() + 1);
        if !request.user_id.is_empty() || !request.cursors.is_empty() {
            acks.push((request.user_id, request.device_id, cursors(request.cursors)));
        }
        for device in request.devices {
            acks.push((device.user_id, device.device_id, cursors(device.cursors)));
        }
        let stored = self.service.ack_delivered(acks).await?;
        Ok(Response::new(pb::AckDeliveredResponse {
            devices: stored
                .into_iter()
                .map(|device| pb::DeviceAck {
                    user_id: device.user,
                    device_id: device.device,
                    cursors: device
                        .cursors
                        .into_iter()
                        .map(|(id, seq)| pb::DeliveredCursor { conversation_id: id.to_string(), seq })
                        .collect(),
                })
                .collect(),
        }))
    }

    async fn mark_read(&self, request: Request<pb::MarkReadRequest>) -> Result<Response<pb::MarkReadResponse>, Status> {
        let request = request.into_inner();
        let read_seq = self.service.mark_read(&request.user_id, &request.conversation_id, request.seq).await?;
        Ok(Response::new(pb::MarkReadResponse { read_seq }))
    }

    async fn notify_typing(
        &self,
        request: Request<pb::NotifyTypingRequest>,
    ) -> Result<Response<pb::NotifyTypingResponse>, Status> {
        let request = request.into_inner();
        self.service.notify_typing(&request.user_id, &request.conversation_id, request.typing).await?;
        Ok(Response::new(pb::NotifyTypingResponse {}))
    }

    async fn presence_changed(
        &self,
        request: Request<pb::PresenceChangedRequest>,
    ) -> Result<Response<pb::PresenceChangedResponse>, Status> {
        let update = request.into_inner().update.ok_or_else(|| Status::invalid_argument("update is required"))?;
        self.service.presence_changed(presence_from_proto(update)).await?;
        Ok(Response::new(pb::PresenceChangedResponse {}))
    }

    async fn get_conversation(
        &self,
        request: Request<pb::MessageGetConversationRequest>,
    ) -> Result<Response<pb::GetConversationResponse>, Status> {
        let request = request.into_inner();
        let inner = inner(request.request)?;
        let (conversation, members) = self.service.get_conversation(&request.user_id, &inner.conversation_id).await?;
        Ok(Response::new(pb::GetConversationResponse {
            conversation: Some(conversation_to_proto(conversation, members)),
        }))
    }

    async fn get_conversations(
        &self,
        request: Request<pb::MessageGetConversationsRequest>,
    ) -> Result<Response<pb::GetConversationsResponse>, Status> {
        let request = request.into_inner();
        let inner = inner(request.request)?;
        let found = self.service.get_conversations(&request.user_id, &inner.conversation_ids).await?;
        let conversations =
            found.into_iter().map(|(conversation, members)| conversation_to_proto(conversation, members)).collect();
        Ok(Response::new(pb::GetConversationsResponse { conversations }))
    }

    async fn get_receipts(
        &self,
        request: Request<pb::MessageGetReceiptsRequest>,
    ) -> Result<Response<pb::GetReceiptsResponse>, Status> {
        let request = request.into_inner();
        let inner = inner(request.request)?;
        let receipts = self.service.get_receipts(&request.user_id, &inner.conversation_id, inner.seq).await?;
        Ok(Response::new(pb::GetReceiptsResponse { delivered_to: receipts.delivered_to, read_by: receipts.read_by }))
    }

    async fn create_group(
        &self,
        request: Request<pb::MessageCreateGroupRequest>,
    ) -> Result<Response<pb::CreateGroupResponse>, Status> {
        let request = request.into_inner();
        let inner = inner(request.request)?;
        let conversation = self.service.create_group(&request.user_id, &inner.title, inner.member_ids).await?;
        Ok(Response::new(pb::CreateGroupResponse {
            conversation: Some(conversation_to_proto(conversation, Vec::new())),
        }))
    }

    async fn update_group(
        &self,
        request: Request<pb::MessageUpdateGroupRequest>,
    ) -> Result<Response<pb::UpdateGroupResponse>, Status> {
        let request = request.into_inner();
        let inner = inner(request.request)?;
        let change = match inner.change {
            Some(update_group_request::Change::AddMembers(list)) => Change::AddMembers(list.user_ids),
            Some(update_group_request::Change::RemoveMember(user)) => Change::RemoveMember(user),
            Some(update_group_request::Change::Leave(true)) => Change::Leave,
            Some(update_group_request::Change::Rename(title)) => Change::Rename(title),
            Some(update_group_request::Change::SetRole(change)) => {
                Change::SetRole(change.user_id, role_from_proto(change.role)?)
            }
            Some(update_group_request::Change::Leave(false)) | None => {
                return Err(Status::invalid_argument("change is required"));
            }
        };
        let event = self.service.update_group(&request.user_id, &inner.conversation_id, change).await?;
        Ok(event_response(event, |event| pb::UpdateGroupResponse { event }))
    }

    async fn modify_message(
        &self,
        request: Request<pb::MessageModifyMessageRequest>,
    ) -> Result<Response<pb::ModifyMessageResponse>, Status> {
        let request = request.into_inner();
        let inner = inner(request.request)?;
        let target_seq = inner.target_seq;
        let change = match inner.change {
            Some(modify_message_request::Change::Edit(body)) => Change::Edit { target_seq, body },
            Some(modify_message_request::Change::Delete(true)) => Change::Delete { target_seq },
            Some(modify_message_request::Change::React(emoji)) => Change::React { target_seq, emoji },
            Some(modify_message_request::Change::Delete(false)) | None => {
                return Err(Status::invalid_argument("change is required"));
            }
        };
        let event = self.service.modify_message(&request.user_id, &inner.conversation_id, change).await?;
        Ok(event_response(event, |event| pb::ModifyMessageResponse { event }))
    }

    async fn block_user(
        &self,
        request: Request<pb::MessageBlockUserRequest>,
    ) -> Result<Response<pb::BlockUserResponse>, Status> {
        let request = request.into_inner();
        let changed = self.service.block(&request.user_id, &inner(request.request)?.user_id).await?;
        Ok(Response::new(pb::BlockUserResponse { changed }))
    }

    async fn unblock_user(
        &self,
        request: Request<pb::MessageUnblockUserRequest>,
    ) -> Result<Response<pb::UnblockUserResponse>, Status> {
        let request = request.into_inner();
        let changed = self.service.unblock(&request.user_id, &inner(request.request)?.user_id).await?;
        Ok(Response::new(pb::UnblockUserResponse { changed }))
    }

    async fn list_blocked_users(
        &self,
        request: Request<pb::MessageListBlockedUsersRequest>,
    ) -> Result<Response<pb::ListBlockedUsersResponse>, Status> {
        let users = self.service.blocked_users(&request.into_inner().user_id).await?;
        let users = users
            .into_iter()
            .map(|entry| pb::BlockedUser { user_id: entry.user_id, blocked_at_ms: entry.blocked_at_ms })
            .collect();
        Ok(Response::new(pb::ListBlockedUsersResponse { users }))
    }

    async fn check_access(
        &self,
        request: Request<pb::CheckAccessRequest>,
    ) -> Result<Response<pb::CheckAccessResponse>, Status> {
        let request = request.into_inner();
        self.service.check_access(&request.user_id, &request.conversation_id, request.seq, &request.media_id).await?;
        Ok(Response::new(pb::CheckAccessResponse {}))
    }
}

/// [`Media`] over gRPC.
pub struct GrpcMedia(MediaServiceClient<RoleChannel>);

impl GrpcMedia {
    pub fn new(channel: RoleChannel) -> Self {
        GrpcMedia(MediaServiceClient::new(channel))
    }
}

#[async_trait]
impl Media for GrpcMedia {
    async fn describe(&self, request: MediaToAttach) -> crate::error::Result<Vec<Attachment>> {
        let request = pb::DescribeMediaRequest {
            sender_id: request.sender,
            conversation_id: request.conversation_id,
            media_ids: request.media_ids,
            client_msg_id: request.client_msg_id,
        };
        let described = self.0.clone().describe_media(request).await.map_err(|status| {
            let refusal = match status.code() {
                tonic::Code::NotFound => MediaRefusal::NotFound,
                tonic::Code::FailedPrecondition => MediaRefusal::FailedPrecondition,
                tonic::Code::InvalidArgument => MediaRefusal::InvalidArgument,
                _ => return Error::Unavailable(format!("media service: {status}")),
            };
            Error::Media(refusal, status.message().to_owned())
        })?;
        Ok(described.into_inner().attachments.into_iter().map(convert::attachment_from_proto).collect())
    }

    async fn delete(&self, conversation_id: &str, media_ids: Vec<String>) -> crate::error::Result<()> {
        let request = pb::DeleteMediaRequest { conversation_id: conversation_id.to_owned(), media_ids };
        self.0
            .clone()
            .delete_media(request)
            .await
            .map_err(|status| Error::Unavailable(format!("media service: {status}")))?;
        Ok(())
    }
}

/// Fan-out's view of presence: `Locate` over gRPC.
pub struct GrpcPresence(pub PresenceServiceClient<RoleChannel>);

#[async_trait]
impl Locate for GrpcPresence {
    async fn locate(&self, user_ids: Vec<String>) -> Result<Vec<pb::Session>, Status> {
        let response = self.0.clone().locate(pb::LocateRequest { user_ids }).await?;
        Ok(response.into_inner().sessions)
    }
}

/// Fan-out's view of the gateways: `Deliver` over gRPC, one channel per address.
pub struct GrpcGateways(pub ChannelPool);

#[async_trait]
impl Gateways for GrpcGateways {
    async fn deliver(&self, address: &str, deliveries: Vec<pb::Delivery>) -> Result<u32, Status> {
        let channel = self.0.get(address).map_err(|error| Status::invalid_argument(error.to_string()))?;
        let response = GatewayInternalServiceClient::new(channel).deliver(pb::DeliverRequest { deliveries }).await?;
        Ok(response.into_inner().missing_sessions)
    }
}
