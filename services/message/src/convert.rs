//! Proto <-> domain conversion for the message service, in one place: the
//! gRPC adapter (`grpc.rs`), fan-out (`fanout.rs`) and the ports' gRPC
//! implementations (`ports.rs`) use it; the domain (`service.rs`) does not.

use messenger_proto::v1 as pb;
use tonic::Status;

use crate::{
    ports::{Presence, Receipt, Typing},
    store::{Attachment, Conversation, ConversationKind, Kind, Member, Role, StoredMessage},
};

fn role_to_proto(role: Role) -> pb::Role {
    match role {
        Role::Member => pb::Role::Member,
        Role::Admin => pb::Role::Admin,
        Role::Owner => pb::Role::Owner,
    }
}

pub(crate) fn kind_to_proto(kind: Kind) -> pb::MessageKind {
    match kind {
        Kind::Text => pb::MessageKind::Text,
        Kind::Edit => pb::MessageKind::Edit,
        Kind::Delete => pb::MessageKind::Delete,
        Kind::Reaction => pb::MessageKind::Reaction,
        Kind::GroupCreated => pb::MessageKind::GroupCreated,
        Kind::MembersAdded => pb::MessageKind::MembersAdded,
        Kind::MemberRemoved => pb::MessageKind::MemberRemoved,
        Kind::MemberLeft => pb::MessageKind::MemberLeft,
        Kind::Renamed => pb::MessageKind::Renamed,
        Kind::RoleChanged => pb::MessageKind::RoleChanged,
    }
}

pub(crate) fn role_code(role: Role) -> i32 {
    role_to_proto(role) as i32
}

pub(crate) fn attachment_to_proto(attachment: &Attachment) -> pb::Attachment {
    pb::Attachment {
        media_id: attachment.media_id.clone(),
        mime_type: attachment.mime_type.clone(),
        size: attachment.size,
        file_name: attachment.file_name.clone(),
        width: attachment.width,
        height: attachment.height,
        blurhash: attachment.blurhash.clone(),
        has_thumbnail: attachment.has_thumbnail,
    }
}

pub(crate) fn attachment_from_proto(attachment: pb::Attachment) -> Attachment {
    Attachment {
        media_id: attachment.media_id,
        mime_type: attachment.mime_type,
        size: attachment.size,
        file_name: attachment.file_name,
        width: attachment.width,
        height: attachment.height,
        blurhash: attachment.blurhash,
        has_thumbnail: attachment.has_thumbnail,
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
        kind: kind_to_proto(message.kind) as i32,
        reply_to_seq: message.reply_to_seq,
        target_seq: message.target_seq,
        reaction: message.reaction.clone(),
        member_ids: message.member_ids.clone(),
        title: message.title.clone(),
        role: message.role.map_or(0, role_code),
        edited_at_ms: message.edited_at_ms,
        deleted: message.deleted,
        attachments: message.attachments.iter().map(attachment_to_proto).collect(),
        withheld: message.withheld,
    }
}

pub(crate) fn conversation_to_proto(conversation: Conversation, members: Vec<Member>) -> pb::Conversation {
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
        members: members
            .into_iter()
            .map(|m| pb::Member {
                user_id: m.user_id,
                role: role_code(m.role),
                read_seq: m.read_seq,
                delivered_seq: m.delivered_seq,
                joined_seq: m.joined_seq,
            })
            .collect(),
        unread_count: conversation.unread_count,
        last_message: conversation.last_message.as_ref().map(to_proto),
        read_seq: conversation.read_seq,
    }
}

pub(crate) fn role_from_proto(code: i32) -> Result<Role, Status> {
    match pb::Role::try_from(code) {
        Ok(pb::Role::Member) => Ok(Role::Member),
        Ok(pb::Role::Admin) => Ok(Role::Admin),
        Ok(pb::Role::Owner) => Ok(Role::Owner),
        _ => Err(Status::invalid_argument("role must be MEMBER, ADMIN or OWNER")),
    }
}

pub(crate) fn receipt_to_proto(receipt: &Receipt) -> pb::Receipt {
    pb::Receipt {
        conversation_id: receipt.conversation_id.to_string(),
        user_id: receipt.user_id.clone(),
        read_seq: receipt.read_seq,
        delivered_seq: receipt.delivered_seq,
    }
}

pub(crate) fn typing_to_proto(typing: &Typing) -> pb::Typing {
    pb::Typing {
        conversation_id: typing.conversation_id.to_string(),
        user_id: typing.user_id.clone(),
        typing: typing.typing,
        expires_in_ms: typing.expires_in_ms,
    }
}

pub(crate) fn presence_to_proto(presence: &Presence) -> pb::PresenceUpdate {
    pb::PresenceUpdate {
        user_id: presence.user_id.clone(),
        online: presence.online,
        last_seen_ms: presence.last_seen_ms,
    }
}

pub(crate) fn presence_from_proto(update: pb::PresenceUpdate) -> Presence {
    Presence { user_id: update.user_id, online: update.online, last_seen_ms: update.last_seen_ms }
}
