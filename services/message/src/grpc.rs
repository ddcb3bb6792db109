//! The tonic adapter: converts requests and errors, holds no logic.

use std::sync::Arc;

use messenger_proto::v1::{self as pb, message_service_server::MessageService};
use tonic::{Request, Response, Status};

use crate::{
    fanout::to_proto,
    service::{SendInput, Service},
    store::{Conversation, ConversationKind, HistoryRange},
};

pub struct Adapter {
    pub service: Arc<Service>,
}

pub(crate) fn conversation_to_proto(conversation: Conversation) -> pb::Conversation {
    pb::Conversation {
        conversation_id: conversation.id.to_string(),
        kind: match conversation.kind {
            ConversationKind::Direct => pb::ConversationKind::Direct,
            ConversationKind::Group => pb::ConversationKind::Group,
        } as i32,
        title: conversation.title,
        member_ids: conversation.members,
        last_seq: conversation.last_seq,
        created_at_ms: conversation.created_at_ms,
        last_activity_ms: conversation.last_activity_ms,
    }
}

#[tonic::async_trait]
impl MessageService for Adapter {
    async fn send(&self, request: Request<pb::SendRequest>) -> Result<Response<pb::SendResponse>, Status> {
        let request = request.into_inner();
        let (message, created) = self
            .service
            .send(SendInput {
                sender: &request.sender_id,
                conversation_id: &request.conversation_id,
                client_msg_id: &request.client_msg_id,
                body: request.body,
            })
            .await?;
        Ok(Response::new(pb::SendResponse {
            ack: Some(pb::SendAck {
                conversation_id: message.conversation_id.to_string(),
                client_msg_id: message.client_msg_id,
                seq: message.seq,
                message_id: message.message_id.to_string(),
                server_time_ms: message.sent_at_ms,
            }),
            created,
        }))
    }

    async fn get_or_create_direct(
        &self,
        request: Request<pb::MessageGetOrCreateDirectRequest>,
    ) -> Result<Response<pb::MessageGetOrCreateDirectResponse>, Status> {
        let request = request.into_inner();
        let conversation = self.service.get_or_create_direct(&request.user_id, &request.peer_id).await?;
        Ok(Response::new(pb::MessageGetOrCreateDirectResponse {
            conversation: Some(conversation_to_proto(conversation)),
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
            conversations: conversations.into_iter().map(conversation_to_proto).collect(),
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
        let cursors = request.cursors.into_iter().map(|c| (c.conversation_id, c.seq)).collect();
        let stored = self.service.ack_delivered(&request.user_id, &request.device_id, cursors).await?;
        Ok(Response::new(pb::AckDeliveredResponse {
            cursors: stored
                .into_iter()
                .map(|(id, seq)| pb::DeliveredCursor { conversation_id: id.to_string(), seq })
                .collect(),
        }))
    }
}
