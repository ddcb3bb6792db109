// What the app knows: the conversation list, each conversation's entries
// folded in seq order (the rules are in fold.ts), members' cursors (for
// ticks), typing and presence. Views read it and re-render on the changes
// it announces.
//
// Invariant: an entry is applied once per (conversation_id, seq); a seq seen
// again (a replayed backlog, History overlapping the stream, a retried send's
// echo) is dropped, except a provisional entry (drawn from a SendAck before
// its echo arrived), which the server's copy replaces.

import { adoptOrphans, fold, newThread, SHOWN, summarize, type Thread } from "./fold";
import type { Conversation, Entry, Member, Tick } from "./model";

export type Change =
  | { kind: "conversations" }
  /** Timeline items (text messages and group events) to draw again. */
  | { kind: "entries"; conversationId: string; seqs: number[] }
  /** Members, their roles or cursors changed: ticks and the header. */
  | { kind: "members"; conversationId: string }
  | { kind: "typing"; conversationId: string }
  | { kind: "presence"; userId: string };

export class Store {
  me = "";
  readonly conversations = new Map<string, Conversation>();
  readonly presence = new Map<string, { online: boolean; lastSeenMs: number }>();
  private readonly threads = new Map<string, Thread>();
  private readonly listeners: ((change: Change) => void)[] = [];

  subscribe(listener: (change: Change) => void): void {
    this.listeners.push(listener);
  }

  private emit(change: Change): void {
    for (const listener of this.listeners) listener(change);
  }

  private thread(conversationId: string): Thread {
    let thread = this.threads.get(conversationId);
    if (!thread) this.threads.set(conversationId, (thread = newThread()));
    return thread;
  }

  /** The inbox as ListConversations answered it (the whole list). */
  setConversations(list: Conversation[]): void {
    this.conversations.clear();
    for (const conversation of list) {
      this.conversations.set(conversation.id, conversation);
      // Stream entries that arrived while the listing was on its way are
      // newer than it: count them in (preview, unread, order).
      const newer = [...(this.threads.get(conversation.id)?.entries.values() ?? [])].filter((e) => e.seq > conversation.lastSeq);
      for (const entry of newer.sort((a, b) => a.seq - b.seq)) summarize(conversation, entry, true, this.me);
    }
    this.emit({ kind: "conversations" });
  }

  /**
   * One conversation as a call answered it (GetConversation, a new chat):
   * its name and members replace ours; its counters only ever move forward,
   * since the stream may have taught us newer ones meanwhile.
   */
  putConversation(conversation: Conversation): void {
    const known = this.conversations.get(conversation.id);
    if (!known) {
      this.conversations.set(conversation.id, conversation);
    } else {
      known.title = conversation.title;
      known.isGroup = conversation.isGroup;
      known.memberIds = conversation.memberIds;
      known.readSeq = Math.max(known.readSeq, conversation.readSeq);
      if (conversation.lastSeq > known.lastSeq) {
        known.lastSeq = conversation.lastSeq;
        known.lastActivityMs = Math.max(known.lastActivityMs, conversation.lastActivityMs);
        known.lastMessage = conversation.lastMessage ?? known.lastMessage;
      }
    }
    this.emit({ kind: "conversations" });
  }

  /** The caller left: the inbox no longer lists it. */
  removeConversation(conversationId: string): void {
    if (this.conversations.delete(conversationId)) this.emit({ kind: "conversations" });
  }

  /** Conversations, most recent activity first. */
  sortedConversations(): Conversation[] {
    return [...this.conversations.values()].sort((a, b) => b.lastActivityMs - a.lastActivityMs);
  }

  /**
   * Applies entries in seq order and answers the seqs that were new.
   * `source` says where they came from: a History page's bodies are current
   * as of (at least) its newest seq, so only later edits apply to them; a
   * stream entry newer than the inbox counts as unread.
   */
  addEntries(conversationId: string, entries: Entry[], source: "history" | "stream" | "provisional"): number[] {
    const thread = this.thread(conversationId);
    const conversation = this.conversations.get(conversationId);
    const sorted = [...entries].sort((a, b) => a.seq - b.seq);
    const asOf = sorted.at(-1)?.seq ?? 0;
    const added: number[] = [];
    const redraw = new Set<number>();
    for (const entry of sorted) {
      const replacing = thread.provisional.has(entry.seq);
      if (thread.entries.has(entry.seq) && !(replacing && source !== "provisional")) continue;
      thread.entries.set(entry.seq, entry);
      if (source === "provisional") thread.provisional.add(entry.seq);
      else thread.provisional.delete(entry.seq);
      if (!replacing) added.push(entry.seq);
      if (entry.kind === "text") {
        thread.bodyAsOf.set(entry.seq, source === "history" ? asOf : entry.seq);
        adoptOrphans(thread, entry.seq, this.me);
      }
      if (SHOWN.has(entry.kind)) redraw.add(entry.seq);
      const target = fold(thread, entry, this.me);
      if (target) redraw.add(target);
      if (!replacing && conversation) summarize(conversation, entry, source === "stream", this.me);
    }
    if (added.length && conversation) this.emit({ kind: "conversations" });
    if (redraw.size) this.emit({ kind: "entries", conversationId, seqs: [...redraw] });
    return added;
  }

  setHistoryPage(conversationId: string, hasMore: boolean, first: boolean): void {
    const thread = this.thread(conversationId);
    thread.historyLoaded = true;
    // Only the oldest page loaded says whether anything older exists.
    if (first || thread.hasMore) thread.hasMore = hasMore;
  }

  setMembers(conversationId: string, members: Member[]): void {
    this.thread(conversationId).members = members;
    this.emit({ kind: "members", conversationId });
  }

  /** A cursor moved (Receipt frame). Cursors never move back. */
  receipt(conversationId: string, userId: string, readSeq: number, deliveredSeq: number): void {
    const member = this.threads.get(conversationId)?.members?.find((m) => m.userId === userId);
    if (member) {
      member.readSeq = Math.max(member.readSeq, readSeq);
      member.deliveredSeq = Math.max(member.deliveredSeq, deliveredSeq, readSeq);
      this.emit({ kind: "members", conversationId });
    }
    if (userId === this.me && readSeq) this.markedRead(conversationId, readSeq);
  }

  /** The caller's read cursor moved (here or on another device). */
  markedRead(conversationId: string, readSeq: number): void {
    const conversation = this.conversations.get(conversationId);
    if (!conversation || readSeq <= conversation.readSeq) return;
    conversation.readSeq = readSeq;
    conversation.unreadCount = this.unreadAfter(conversationId, readSeq, conversation.unreadCount);
    this.emit({ kind: "conversations" });
  }

  /** Messages from others after `readSeq`, counted when everything after it
   * is loaded (loaded entries always reach the newest); else the old count
   * stands until the inbox is listed again. */
  private unreadAfter(conversationId: string, readSeq: number, previous: number): number {
    const conversation = this.conversations.get(conversationId);
    if (conversation && readSeq >= conversation.lastSeq) return 0;
    const thread = this.thread(conversationId);
    if (!thread.entries.has(readSeq + 1)) return previous;
    let count = 0;
    for (const entry of thread.entries.values()) {
      if (entry.seq > readSeq && entry.kind === "text" && entry.senderId !== this.me && !entry.deleted) count += 1;
    }
    return count;
  }

  typing(conversationId: string, userId: string, typing: boolean, expiresInMs: number): void {
    if (userId === this.me) return;
    const thread = this.thread(conversationId);
    if (typing) thread.typing.set(userId, Date.now() + (expiresInMs || 5000));
    else thread.typing.delete(userId);
    this.expireTyping(conversationId);
  }

  /** Drops hints that ran out and wakes up when the next one does. */
  private expireTyping(conversationId: string): void {
    const thread = this.thread(conversationId);
    clearTimeout(thread.typingTimer);
    const now = Date.now();
    for (const [user, until] of thread.typing) if (until <= now) thread.typing.delete(user);
    if (thread.typing.size) {
      const next = Math.min(...thread.typing.values());
      thread.typingTimer = setTimeout(() => this.expireTyping(conversationId), next - now + 10);
    }
    this.emit({ kind: "typing", conversationId });
  }

  /** A message from someone ends their typing hint. */
  stopTyping(conversationId: string, userId: string): void {
    const thread = this.threads.get(conversationId);
    if (thread?.typing.delete(userId)) this.expireTyping(conversationId);
  }

  setPresence(userId: string, online: boolean, lastSeenMs: number): void {
    this.presence.set(userId, { online, lastSeenMs });
    this.emit({ kind: "presence", userId });
  }

  // Queries.

  entry(conversationId: string, seq: number): Entry | undefined {
    return this.threads.get(conversationId)?.entries.get(seq);
  }

  /** Timeline items in seq order. */
  timeline(conversationId: string): Entry[] {
    const entries = [...(this.threads.get(conversationId)?.entries.values() ?? [])];
    return entries.filter((entry) => SHOWN.has(entry.kind)).sort((a, b) => a.seq - b.seq);
  }

  isShown(entry: Entry): boolean {
    return SHOWN.has(entry.kind);
  }

  newestSeq(conversationId: string): number {
    let newest = 0;
    for (const seq of this.threads.get(conversationId)?.entries.keys() ?? []) newest = Math.max(newest, seq);
    return newest;
  }

  oldestSeq(conversationId: string): number {
    let oldest = Infinity;
    for (const seq of this.threads.get(conversationId)?.entries.keys() ?? []) oldest = Math.min(oldest, seq);
    return oldest === Infinity ? 0 : oldest;
  }

  /** Emoji -> who reacted with it, for one message. */
  reactions(conversationId: string, seq: number): Map<string, string[]> {
    const byEmoji = new Map<string, string[]>();
    for (const [user, reaction] of this.threads.get(conversationId)?.reactions.get(seq) ?? []) {
      if (reaction.emoji) byEmoji.set(reaction.emoji, [...(byEmoji.get(reaction.emoji) ?? []), user]);
    }
    return byEmoji;
  }

  myReaction(conversationId: string, seq: number): string {
    return this.threads.get(conversationId)?.reactions.get(seq)?.get(this.me)?.emoji ?? "";
  }

  /**
   * The tick of one of the caller's messages: read (or delivered) once every
   * other member who could see it has read (or received) it.
   */
  tick(entry: Entry): Tick {
    const members = this.threads.get(entry.conversationId)?.members;
    const others = (members ?? []).filter((m) => m.userId !== this.me && m.joinedSeq <= entry.seq);
    if (!others.length) return "sent";
    if (others.every((m) => m.readSeq >= entry.seq)) return "read";
    if (others.every((m) => m.deliveredSeq >= entry.seq)) return "delivered";
    return "sent";
  }

  historyLoaded(conversationId: string): boolean {
    return this.threads.get(conversationId)?.historyLoaded ?? false;
  }

  hasMore(conversationId: string): boolean {
    return this.threads.get(conversationId)?.hasMore ?? false;
  }

  /** The caller left or was removed (seen in this session). */
  hasLeft(conversationId: string): boolean {
    return this.threads.get(conversationId)?.left ?? false;
  }

  members(conversationId: string): Member[] | undefined {
    return this.threads.get(conversationId)?.members;
  }

  typists(conversationId: string): string[] {
    return [...(this.threads.get(conversationId)?.typing.keys() ?? [])];
  }
}
