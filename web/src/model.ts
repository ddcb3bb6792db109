// The app's own types. Only convert.ts knows the wire types; everything else
// reads these, with seqs as plain numbers (they stay far below 2^53).

export type EntryKind =
  | "text"
  | "edit"
  | "delete"
  | "reaction"
  | "group_created"
  | "members_added"
  | "member_removed"
  | "member_left"
  | "renamed"
  | "role_changed"
  | "unknown";

export type Role = "member" | "admin" | "owner" | "unknown";

export interface Attachment {
  mediaId: string;
  mimeType: string;
  size: number;
  fileName: string;
  width: number;
  height: number;
  hasThumbnail: boolean;
}

/** One seq'd entry of a conversation: a text message or a change. */
export interface Entry {
  conversationId: string;
  seq: number;
  messageId: string;
  senderId: string;
  clientMsgId: string;
  body: string;
  sentAtMs: number;
  kind: EntryKind;
  replyToSeq: number;
  targetSeq: number;
  reaction: string;
  memberIds: string[];
  title: string;
  role: Role;
  editedAtMs: number;
  deleted: boolean;
  attachments: Attachment[];
  /** Shown without content: from someone you blocked in a group, edited when you were not a member, or a change of what you cannot see. */
  withheld: boolean;
}

export interface Member {
  userId: string;
  role: Role;
  readSeq: number;
  deliveredSeq: number;
  joinedSeq: number;
}

export interface Conversation {
  id: string;
  isGroup: boolean;
  title: string;
  memberIds: string[];
  lastSeq: number;
  lastActivityMs: number;
  unreadCount: number;
  lastMessage: Entry | undefined;
  /** The caller's read cursor. */
  readSeq: number;
}

/** A send waiting for its SendAck (or given up, with the reason). */
export interface PendingSend {
  conversationId: string;
  clientMsgId: string;
  body: string;
  replyToSeq: number;
  mediaIds: string[];
  /** What CompleteUpload answered, to draw the photo before the ack. */
  attachments: Attachment[];
  createdAtMs: number;
  failed: string;
}

export type Tick = "pending" | "sent" | "delivered" | "read";
