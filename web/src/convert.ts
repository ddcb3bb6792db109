// Every wire <-> app conversion in one place, so no other file depends on
// the generated types' shapes (bigint seqs, numeric enums, optional fields).

import {
  ConversationKind,
  MessageKind,
  Role as WireRole,
  type Attachment as WireAttachment,
  type Conversation as WireConversation,
  type Member as WireMember,
  type Message as WireMessage,
} from "../gen/messenger/v1/common_pb";
import type { Attachment, Conversation, Entry, EntryKind, Member, Role } from "./model";

const kinds: Record<number, EntryKind> = {
  [MessageKind.TEXT]: "text",
  [MessageKind.EDIT]: "edit",
  [MessageKind.DELETE]: "delete",
  [MessageKind.REACTION]: "reaction",
  [MessageKind.GROUP_CREATED]: "group_created",
  [MessageKind.MEMBERS_ADDED]: "members_added",
  [MessageKind.MEMBER_REMOVED]: "member_removed",
  [MessageKind.MEMBER_LEFT]: "member_left",
  [MessageKind.RENAMED]: "renamed",
  [MessageKind.ROLE_CHANGED]: "role_changed",
};

function role(value: WireRole): Role {
  switch (value) {
    case WireRole.MEMBER:
      return "member";
    case WireRole.ADMIN:
      return "admin";
    case WireRole.OWNER:
      return "owner";
    default:
      return "unknown";
  }
}

export function attachment(wire: WireAttachment): Attachment {
  return {
    mediaId: wire.mediaId,
    mimeType: wire.mimeType,
    size: Number(wire.size),
    fileName: wire.fileName,
    width: wire.width,
    height: wire.height,
    hasThumbnail: wire.hasThumbnail,
  };
}

export function entry(wire: WireMessage): Entry {
  return {
    conversationId: wire.conversationId,
    seq: Number(wire.seq),
    messageId: wire.messageId,
    senderId: wire.senderId,
    clientMsgId: wire.clientMsgId,
    body: wire.body,
    sentAtMs: Number(wire.sentAtMs),
    // UNSPECIFIED reads as text, as the terminal client (chat.rs) reads it.
    kind: wire.kind === MessageKind.UNSPECIFIED ? "text" : (kinds[wire.kind] ?? "unknown"),
    replyToSeq: Number(wire.replyToSeq),
    targetSeq: Number(wire.targetSeq),
    reaction: wire.reaction,
    memberIds: [...wire.memberIds],
    title: wire.title,
    role: role(wire.role),
    editedAtMs: Number(wire.editedAtMs),
    deleted: wire.deleted,
    attachments: wire.attachments.map(attachment),
    withheld: wire.withheld,
  };
}

export function member(wire: WireMember): Member {
  return {
    userId: wire.userId,
    role: role(wire.role),
    readSeq: Number(wire.readSeq),
    deliveredSeq: Number(wire.deliveredSeq),
    joinedSeq: Number(wire.joinedSeq),
  };
}

export function conversation(wire: WireConversation): Conversation {
  return {
    id: wire.conversationId,
    isGroup: wire.kind === ConversationKind.GROUP,
    title: wire.title,
    memberIds: [...wire.memberIds],
    lastSeq: Number(wire.lastSeq),
    lastActivityMs: Number(wire.lastActivityMs),
    unreadCount: Number(wire.unreadCount),
    lastMessage: wire.lastMessage ? entry(wire.lastMessage) : undefined,
    readSeq: Number(wire.readSeq),
  };
}

/** The members GetConversation lists (empty in inbox listings). */
export function members(wire: WireConversation): Member[] {
  return wire.members.map(member);
}
