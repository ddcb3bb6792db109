// Connects the live stream to the store and the outbox: entries in (acked
// back in batches), sends out (retried with their client_msg_id until
// acked), read marks, typing hints, receipts and presence.

import { describeCode } from "./api";
import { entry as toEntry } from "./convert";
import type { Entry, PendingSend } from "./model";
import { Outbox } from "./outbox";
import { randomId } from "./session";
import type { Store } from "./store";
import type { Stream } from "./stream";
import type { ServerFrame } from "../gen/messenger/v1/gateway_pb";

/** Acks go out in batches: one frame per conversation per interval. */
const ACK_EVERY_MS = 50;

export interface SyncEvents {
  /** Entries new to this page arrived on the stream. */
  arrived(conversationId: string, entries: Entry[]): void;
  /** An entry of a conversation the inbox does not list yet. */
  unknownConversation(conversationId: string): void;
  /** A send was added, acked, retried or given up. */
  pendingChanged(conversationId: string): void;
  /** A failure worth telling the person about. */
  error(text: string): void;
}

export class Sync {
  readonly outbox: Outbox;
  /** conversation -> highest seq received and not acked yet. */
  private readonly acks = new Map<string, number>();
  private ackTimer: ReturnType<typeof setTimeout> | undefined;

  constructor(
    userId: string,
    private readonly store: Store,
    private readonly stream: Stream,
    private readonly events: SyncEvents,
  ) {
    this.outbox = new Outbox(
      userId,
      (send) => this.transmit(send),
      (conversationId) => this.events.pendingChanged(conversationId),
    );
  }

  /** Every (re)connect: whatever was in flight may or may not be stored. */
  ready(): void {
    this.outbox.resendAll();
  }

  send(conversationId: string, body: string, replyToSeq: number, pending: Pick<PendingSend, "mediaIds" | "attachments"> = { mediaIds: [], attachments: [] }): void {
    this.outbox.add({
      conversationId,
      clientMsgId: randomId(),
      body,
      replyToSeq,
      mediaIds: pending.mediaIds,
      attachments: pending.attachments,
      createdAtMs: Date.now(),
      failed: "",
    });
  }

  private transmit(send: PendingSend): boolean {
    return this.stream.send({
      frame: {
        case: "send",
        value: {
          conversationId: send.conversationId,
          clientMsgId: send.clientMsgId,
          body: send.body,
          replyToSeq: BigInt(send.replyToSeq),
          mediaIds: send.mediaIds,
        },
      },
    });
  }

  /** Marks everything up to `seq` read; false when the stream is down (try again on Ready). */
  markRead(conversationId: string, seq: number): boolean {
    if (!this.stream.send({ frame: { case: "read", value: { conversationId, seq: BigInt(seq) } } })) return false;
    this.store.markedRead(conversationId, seq);
    return true;
  }

  typing(conversationId: string, typing: boolean): void {
    this.stream.send({ frame: { case: "typing", value: { conversationId, typing } } });
  }

  frame(frame: ServerFrame): void {
    const store = this.store;
    switch (frame.frame.case) {
      case "message": {
        const entry = toEntry(frame.frame.value);
        const id = entry.conversationId;
        if (!store.conversations.has(id)) this.events.unknownConversation(id);
        const added = store.addEntries(id, [entry], "stream");
        this.ack(id, entry.seq);
        if (entry.kind === "text") store.stopTyping(id, entry.senderId);
        if (added.length) this.events.arrived(id, [entry]);
        return;
      }
      case "sendAck": {
        const ack = frame.frame.value;
        const send = this.outbox.acked(ack.clientMsgId);
        if (!send) return;
        // Shown as sent at once; the stream's copy of it replaces this one.
        const seq = Number(ack.seq);
        store.addEntries(ack.conversationId, [provisional(send, seq, ack.messageId, store.me, Number(ack.serverTimeMs))], "provisional");
        store.markedRead(ack.conversationId, seq);
        return;
      }
      case "error": {
        const error = frame.frame.value;
        if (error.clientMsgId) {
          this.outbox.failed(error.clientMsgId, error.code, describeCode(error.code, error.message), Number(error.retryAfterMs));
        } else if (!error.conversationId) {
          this.events.error(describeCode(error.code, error.message));
        }
        // An error naming only a conversation answers a read, typing hint or
        // ack: a hint not taken; the next read mark or reconnect settles it.
        return;
      }
      case "receipt": {
        const receipt = frame.frame.value;
        store.receipt(receipt.conversationId, receipt.userId, Number(receipt.readSeq), Number(receipt.deliveredSeq));
        return;
      }
      case "typing": {
        const typing = frame.frame.value;
        store.typing(typing.conversationId, typing.userId, typing.typing, typing.expiresInMs);
        return;
      }
      case "presence": {
        const presence = frame.frame.value;
        store.setPresence(presence.userId, presence.online, Number(presence.lastSeenMs));
        return;
      }
    }
  }

  /** Acks move this device's delivered cursor: where a reconnect resumes. */
  private ack(conversationId: string, seq: number): void {
    this.acks.set(conversationId, Math.max(seq, this.acks.get(conversationId) ?? 0));
    this.ackTimer ??= setTimeout(() => {
      this.ackTimer = undefined;
      for (const [id, highest] of this.acks) {
        // Not sent while disconnected: the server then replays from the
        // older cursor, and the store drops what it already has.
        this.stream.send({ frame: { case: "ack", value: { conversationId: id, seq: BigInt(highest) } } });
      }
      this.acks.clear();
    }, ACK_EVERY_MS);
  }
}

function provisional(send: PendingSend, seq: number, messageId: string, me: string, sentAtMs: number): Entry {
  return {
    conversationId: send.conversationId,
    seq,
    messageId,
    senderId: me,
    clientMsgId: send.clientMsgId,
    body: send.body,
    sentAtMs: sentAtMs || Date.now(),
    kind: "text",
    replyToSeq: send.replyToSeq,
    targetSeq: 0,
    reaction: "",
    memberIds: [],
    title: "",
    role: "unknown",
    editedAtMs: 0,
    deleted: false,
    attachments: send.attachments,
    withheld: false,
  };
}
