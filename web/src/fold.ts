// How one entry changes what is shown: the rules for folding a
// conversation's entries in seq order (docs/clients.md, "What a member
// sees"). Pure functions over a conversation's state; store.ts owns the
// state and tells the views.

import type { Conversation, Entry, Member } from "./model";

interface Reaction {
  emoji: string;
  seq: number;
}

/** One conversation's loaded entries and what was folded from them. */
export interface Thread {
  entries: Map<number, Entry>;
  /** Seqs drawn from a SendAck before the stream's copy arrived. */
  provisional: Set<number>;
  /** Target seq -> sender -> their latest reaction entry (empty emoji: removed). */
  reactions: Map<number, Map<string, Reaction>>;
  /** Text seq -> the highest seq its body already reflects, so an older
   * EDIT is never applied over a newer body (History answers current bodies). */
  bodyAsOf: Map<number, number>;
  members: Member[] | undefined;
  historyLoaded: boolean;
  hasMore: boolean;
  /** user -> when their typing hint runs out. */
  typing: Map<string, number>;
  typingTimer: ReturnType<typeof setTimeout> | undefined;
  /** Edits and deletes that arrived before their target: a History answer
   * on its way may predate them (target seq -> the changes, in seq order). */
  orphans: Map<number, Entry[]>;
  /** The caller left or was removed. */
  left: boolean;
}

export function newThread(): Thread {
  return {
    entries: new Map(),
    provisional: new Set(),
    reactions: new Map(),
    bodyAsOf: new Map(),
    members: undefined,
    historyLoaded: false,
    hasMore: false,
    typing: new Map(),
    typingTimer: undefined,
    orphans: new Map(),
    left: false,
  };
}

/** Entry kinds drawn as timeline items; the others change an item. */
export const SHOWN = new Set(["text", "group_created", "members_added", "member_removed", "member_left", "renamed", "role_changed"]);

/**
 * Applies a change entry (edit, delete, reaction, leaving) to what it
 * changes; answers the seq of the item to draw again. An edit or delete of a
 * message not loaded is kept until it loads (adoptOrphans).
 */
export function fold(thread: Thread, entry: Entry, me: string): number | undefined {
  const target = thread.entries.get(entry.targetSeq);
  if (!target && (entry.kind === "edit" || entry.kind === "delete")) {
    thread.orphans.set(entry.targetSeq, [...(thread.orphans.get(entry.targetSeq) ?? []), entry]);
  }
  switch (entry.kind) {
    case "edit":
      if (!target || target.deleted || entry.seq <= (thread.bodyAsOf.get(entry.targetSeq) ?? 0)) return undefined;
      target.body = entry.body;
      target.editedAtMs = entry.sentAtMs;
      // A withheld edit carries no text: what it changed is withheld too.
      if (entry.withheld) {
        target.withheld = true;
        target.attachments = [];
      }
      thread.bodyAsOf.set(entry.targetSeq, entry.seq);
      return entry.targetSeq;
    case "delete":
      thread.reactions.delete(entry.targetSeq);
      if (!target) return undefined;
      target.deleted = true;
      target.body = "";
      target.attachments = [];
      return entry.targetSeq;
    case "reaction": {
      // Kept even when the target is not loaded yet: text entries do not
      // carry their reactions, so a later History page needs these.
      if (target?.deleted) return undefined;
      let bySender = thread.reactions.get(entry.targetSeq);
      if (!bySender) thread.reactions.set(entry.targetSeq, (bySender = new Map()));
      const previous = bySender.get(entry.senderId);
      if (!previous || previous.seq < entry.seq) bySender.set(entry.senderId, { emoji: entry.reaction, seq: entry.seq });
      return target ? entry.targetSeq : undefined;
    }
    case "member_left":
      if (entry.senderId === me) thread.left = true;
      return undefined;
    case "member_removed":
      if (entry.memberIds.includes(me)) thread.left = true;
      return undefined;
    default:
      return undefined;
  }
}

/** A text message loaded: applies the changes to it that came before it. */
export function adoptOrphans(thread: Thread, seq: number, me: string): void {
  const changes = thread.orphans.get(seq);
  if (!changes) return;
  thread.orphans.delete(seq);
  for (const change of changes.sort((a, b) => a.seq - b.seq)) fold(thread, change, me);
}

/**
 * Keeps the inbox row current: preview, order, title, members, and the
 * unread count for entries that arrived live (`live`); ListConversations
 * already counted everything up to its last_seq.
 */
export function summarize(conversation: Conversation, entry: Entry, live: boolean, me: string): void {
  const isNew = entry.seq > conversation.lastSeq;
  conversation.lastSeq = Math.max(conversation.lastSeq, entry.seq);
  conversation.lastActivityMs = Math.max(conversation.lastActivityMs, entry.sentAtMs);
  if (entry.kind === "text" && entry.seq >= (conversation.lastMessage?.seq ?? 0)) conversation.lastMessage = entry;
  if (!isNew) return;
  if (live && entry.kind === "text" && entry.senderId !== me && entry.seq > conversation.readSeq) conversation.unreadCount += 1;
  switch (entry.kind) {
    case "renamed":
      conversation.title = entry.title;
      break;
    case "group_created":
    case "members_added":
      conversation.memberIds = [...new Set([...conversation.memberIds, ...entry.memberIds])];
      break;
    case "member_removed":
      conversation.memberIds = conversation.memberIds.filter((id) => !entry.memberIds.includes(id));
      break;
    case "member_left":
      conversation.memberIds = conversation.memberIds.filter((id) => id !== entry.senderId);
      break;
  }
}
