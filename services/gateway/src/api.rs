//! `GatewayService`: the client-facing API. Authentication happens in the
//! interceptor before these handlers run; each handler passes the verified
//! user id to the internal service that owns the data.

use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use messenger_platform::{
    auth::{TokenExpiry, Verifier, caller},
    discovery::routed,
};
use messenger_proto::v1::{self as pb, ClientFrame, ServerFrame, gateway_service_server::GatewayService};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::{Context, session};

pub(crate) struct Adapter {
    pub context: Arc<Context>,
}

/// What runs before every public call's handler, on both ports: the
/// per-address call limit, then the token (the caller and its expiry go
/// into the request's extensions). A flood from one address is refused
/// before its tokens cost a signature check each.
pub(crate) fn interceptor(
    context: &Arc<Context>,
    verifier: &Verifier,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + use<> {
    let (context, mut verify) = (context.clone(), verifier.interceptor());
    move |request: Request<()>| {
        if let Some(address) = request.remote_addr() {
            context.limits.calls_per_address.check(&address.ip().to_string())?;
        }
        verify(request)
    }
}

#[tonic::async_trait]
impl GatewayService for Adapter {
    type ConnectStream =
        futures::stream::Map<ReceiverStream<session::Outbound>, fn(session::Outbound) -> Result<ServerFrame, Status>>;

    async fn connect(&self, request: Request<Streaming<ClientFrame>>) -> Result<Response<Self::ConnectStream>, Status> {
        let user = caller(&request)?.0.clone();
        let expiry = request.extensions().get::<TokenExpiry>().copied();
        // Without a peer address (only in-process transports) the IP limits have no key.
        let address = request.remote_addr().map(|address| address.ip());
        // tonic reports a frame over the decoding limit as OUT_OF_RANGE; any
        // other read error is a broken connection.
        let inbound = request.into_inner().map_err(|status| match status.code() {
            Code::OutOfRange => session::Unreadable::TooLarge(status.message().to_owned()),
            _ => session::Unreadable::Gone,
        });
        let frames = session::open(&self.context, user, expiry, address, inbound.boxed())?;
        let unbox: fn(session::Outbound) -> Result<ServerFrame, Status> = |item| item.map(|f| *f).map_err(|s| *s);
        Ok(Response::new(ReceiverStream::new(frames).map(unbox)))
    }

    async fn get_or_create_direct(
        &self,
        request: Request<pb::GetOrCreateDirectRequest>,
    ) -> Result<Response<pb::GetOrCreateDirectResponse>, Status> {
        let user = caller(&request)?.0.clone();
        self.context.limits.direct_conversations.check(&user)?;
        let peer_id = request.into_inner().peer_id;
        let response = self
            .context
            .message
            .clone()
            .get_or_create_direct(pb::MessageGetOrCreateDirectRequest { user_id: user, peer_id })
            .await?
            .into_inner();
        Ok(Response::new(pb::GetOrCreateDirectResponse { conversation: response.conversation }))
    }

    async fn history(&self, request: Request<pb::HistoryRequest>) -> Result<Response<pb::HistoryResponse>, Status> {
        let user = caller(&request)?.0.clone();
        self.context.limits.queries.check(&user)?;
        let request = request.into_inner();
        let response = self
            .context
            .message
            .clone()
            .history(routed(
                &request.conversation_id.clone(),
                pb::MessageHistoryRequest {
                    user_id: user,
                    conversation_id: request.conversation_id,
                    before_seq: request.before_seq,
                    after_seq: None,
                    limit: request.limit,
                },
            ))
            .await?
            .into_inner();
        Ok(Response::new(pb::HistoryResponse { messages: response.messages, has_more: response.has_more }))
    }

    async fn list_conversations(
        &self,
        request: Request<pb::ListConversationsRequest>,
    ) -> Result<Response<pb::ListConversationsResponse>, Status> {
        let user = caller(&request)?.0.clone();
        self.context.limits.queries.check(&user)?;
        let request = request.into_inner();
        let response = self
            .context
            .message
            .clone()
            .list_conversations(pb::MessageListConversationsRequest {
                user_id: user,
                page_token: request.page_token,
                limit: request.limit,
            })
            .await?
            .into_inner();
        Ok(Response::new(pb::ListConversationsResponse {
            conversations: response.conversations,
            next_page_token: response.next_page_token,
        }))
    }

    async fn get_conversation(
        &self,
        request: Request<pb::GetConversationRequest>,
    ) -> Result<Response<pb::GetConversationResponse>, Status> {
        let (user_id, request) = authenticated(request)?;
        self.context.limits.queries.check(&user_id)?;
        let request = routed(
            &request.conversation_id.clone(),
            pb::MessageGetConversationRequest { user_id, request: Some(request) },
        );
        Ok(Response::new(self.context.message.clone().get_conversation(request).await?.into_inner()))
    }

    async fn get_conversations(
        &self,
        request: Request<pb::GetConversationsRequest>,
    ) -> Result<Response<pb::GetConversationsResponse>, Status> {
        let (user_id, request) = authenticated(request)?;
        // One query per conversation asked for, as that many GetConversation calls.
        let asked = u32::try_from(request.conversation_ids.len()).unwrap_or(u32::MAX);
        self.context.limits.queries.check_n(&user_id, asked)?;
        // Any instance answers correctly; the first id's keeps caches warm.
        let key = request.conversation_ids.first().cloned().unwrap_or_default();
        let request = routed(&key, pb::MessageGetConversationsRequest { user_id, request: Some(request) });
        Ok(Response::new(self.context.message.clone().get_conversations(request).await?.into_inner()))
    }

    async fn get_receipts(
        &self,
        request: Request<pb::GetReceiptsRequest>,
    ) -> Result<Response<pb::GetReceiptsResponse>, Status> {
        let (user_id, request) = authenticated(request)?;
        self.context.limits.queries.check(&user_id)?;
        let request =
            routed(&request.conversation_id.clone(), pb::MessageGetReceiptsRequest { user_id, request: Some(request) });
        Ok(Response::new(self.context.message.clone().get_receipts(request).await?.into_inner()))
    }

    async fn create_group(
        &self,
        request: Request<pb::CreateGroupRequest>,
    ) -> Result<Response<pb::CreateGroupResponse>, Status> {
        let (user_id, request) = authenticated(request)?;
        self.context.limits.group_changes.check(&user_id)?;
        let request = pb::MessageCreateGroupRequest { user_id, request: Some(request) };
        Ok(Response::new(self.context.message.clone().create_group(request).await?.into_inner()))
    }

    async fn update_group(
        &self,
        request: Request<pb::UpdateGroupRequest>,
    ) -> Result<Response<pb::UpdateGroupResponse>, Status> {
        let (user_id, request) = authenticated(request)?;
        self.context.limits.group_changes.check(&user_id)?;
        let request =
            routed(&request.conversation_id.clone(), pb::MessageUpdateGroupRequest { user_id, request: Some(request) });
        Ok(Response::new(self.context.message.clone().update_group(request).await?.into_inner()))
    }

    async fn modify_message(
        &self,
        request: Request<pb::ModifyMessageRequest>,
    ) -> Result<Response<pb::ModifyMessageResponse>, Status> {
        let (user_id, request) = authenticated(request)?;
        self.context.limits.modifications.check(&user_id)?;
        let request = routed(
            &request.conversation_id.clone(),
            pb::MessageModifyMessageRequest { user_id, request: Some(request) },
        );
        Ok(Response::new(self.context.message.clone().modify_message(request).await?.into_inner()))
    }

    async fn block_user(
        &self,
        request: Request<pb::BlockUserRequest>,
    ) -> Result<Response<pb::BlockUserResponse>, Status> {
        let (user_id, request) = authenticated(request)?;
        self.context.limits.blocks.check(&user_id)?;
        let request = pb::MessageBlockUserRequest { user_id, request: Some(request) };
        Ok(Response::new(self.context.message.clone().block_user(request).await?.into_inner()))
    }

    async fn unblock_user(
        &self,
        request: Request<pb::UnblockUserRequest>,
    ) -> Result<Response<pb::UnblockUserResponse>, Status> {
        let (user_id, request) = authenticated(request)?;
        self.context.limits.blocks.check(&user_id)?;
        let request = pb::MessageUnblockUserRequest { user_id, request: Some(request) };
        Ok(Response::new(self.context.message.clone().unblock_user(request).await?.into_inner()))
    }

    async fn list_blocked_users(
        &self,
        request: Request<pb::ListBlockedUsersRequest>,
    ) -> Result<Response<pb::ListBlockedUsersResponse>, Status> {
        let (user_id, _) = authenticated(request)?;
        self.context.limits.queries.check(&user_id)?;
        let request = pb::MessageListBlockedUsersRequest { user_id };
        Ok(Response::new(self.context.message.clone().list_blocked_users(request).await?.into_inner()))
    }

    async fn create_upload(
        &self,
        request: Request<pb::CreateUploadRequest>,
    ) -> Result<Response<pb::CreateUploadResponse>, Status> {
        let user_id = self.media_caller(&request)?;
        let upload = Some(request.into_inner());
        let request = pb::MediaCreateUploadRequest { user_id, upload };
        Ok(Response::new(self.context.media.clone().create_upload(request).await?.into_inner()))
    }

    async fn get_upload(
        &self,
        request: Request<pb::GetUploadRequest>,
    ) -> Result<Response<pb::CreateUploadResponse>, Status> {
        let user_id = self.media_caller(&request)?;
        let request = pb::MediaGetUploadRequest { user_id, media_id: request.into_inner().media_id };
        Ok(Response::new(self.context.media.clone().get_upload(request).await?.into_inner()))
    }

    async fn complete_upload(
        &self,
        request: Request<pb::CompleteUploadRequest>,
    ) -> Result<Response<pb::CompleteUploadResponse>, Status> {
        let user_id = self.media_caller(&request)?;
        let request = pb::MediaCompleteUploadRequest { user_id, media_id: request.into_inner().media_id };
        Ok(Response::new(self.context.media.clone().complete_upload(request).await?.into_inner()))
    }

    async fn get_media_url(
        &self,
        request: Request<pb::GetMediaUrlRequest>,
    ) -> Result<Response<pb::GetMediaUrlResponse>, Status> {
        let user_id = self.media_caller(&request)?;
        let request = pb::MediaGetMediaUrlRequest { user_id, request: Some(request.into_inner()) };
        Ok(Response::new(self.context.media.clone().get_media_url(request).await?.into_inner()))
    }

    async fn register_push_device(
        &self,
        request: Request<pb::RegisterPushDeviceRequest>,
    ) -> Result<Response<pb::RegisterPushDeviceResponse>, Status> {
        let user_id = self.push_caller(&request)?;
        let request = pb::NotifyRegisterDeviceRequest { user_id, device: request.into_inner().device };
        Ok(Response::new(self.context.notify.clone().register_device(request).await?.into_inner()))
    }

    async fn unregister_push_device(
        &self,
        request: Request<pb::UnregisterPushDeviceRequest>,
    ) -> Result<Response<pb::UnregisterPushDeviceResponse>, Status> {
        let user_id = self.push_caller(&request)?;
        let request = pb::NotifyUnregisterDeviceRequest { user_id, device_id: request.into_inner().device_id };
        Ok(Response::new(self.context.notify.clone().unregister_device(request).await?.into_inner()))
    }

    async fn list_push_devices(
        &self,
        request: Request<pb::ListPushDevicesRequest>,
    ) -> Result<Response<pb::ListPushDevicesResponse>, Status> {
        let user_id = self.push_caller(&request)?;
        let request = pb::NotifyListDevicesRequest { user_id };
        Ok(Response::new(self.context.notify.clone().list_devices(request).await?.into_inner()))
    }

    async fn mute_conversation(
        &self,
        request: Request<pb::MuteConversationRequest>,
    ) -> Result<Response<pb::MuteConversationResponse>, Status> {
        let user_id = self.push_caller(&request)?;
        let request = request.into_inner();
        // Only a member mutes a conversation: anyone else gets NOT_FOUND, as
        // for every other call naming a conversation it cannot see.
        let membership = routed(
            &request.conversation_id,
            pb::MessageGetConversationRequest {
                user_id: user_id.clone(),
                request: Some(pb::GetConversationRequest { conversation_id: request.conversation_id.clone() }),
            },
        );
        self.context.message.clone().get_conversation(membership).await?;
        let request = pb::NotifyMuteRequest {
            user_id,
            conversation_id: request.conversation_id,
            muted_until_ms: request.muted_until_ms,
            mentions_only: request.mentions_only,
        };
        Ok(Response::new(self.context.notify.clone().mute_conversation(request).await?.into_inner()))
    }
}

impl Adapter {
    /// The caller, within the media calls' rate limit.
    fn media_caller<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let user = caller(request)?.0.clone();
        self.context.limits.media.check(&user)?;
        Ok(user)
    }

    /// The caller, within the push settings calls' rate limit.
    fn push_caller<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let user = caller(request)?.0.clone();
        self.context.limits.push_settings.check(&user)?;
        Ok(user)
    }
}

/// One of the gateway's `max_sessions` stream slots, given back on drop.
/// The verified caller and the request body.
fn authenticated<T>(request: Request<T>) -> Result<(String, T), Status> {
    let user = caller(&request)?.0.clone();
    Ok((user, request.into_inner()))
}
