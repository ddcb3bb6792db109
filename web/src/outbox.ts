// Sends waiting for their SendAck. Each keeps its client_msg_id for every
// retry, so the server stores it once whatever happens to the connection;
// the list is saved, so even a reload loses nothing.

import type { PendingSend } from "./model";
import { loadOutbox, saveOutbox } from "./session";

// google.rpc.Code values a send's Error frame may carry.
const DEADLINE_EXCEEDED = 4;
const RESOURCE_EXHAUSTED = 8;
const INTERNAL = 13;
const UNAVAILABLE = 14;
/** Its fate is unknown or it was only refused for now: send it again. */
const RETRY = new Set([DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL, UNAVAILABLE]);
const RETRY_MAX_MS = 30_000;

export class Outbox {
  private pending: PendingSend[];
  /** Retries so far per client_msg_id, for the backoff (not saved). */
  private retries = new Map<string, number>();
  private timers = new Map<string, ReturnType<typeof setTimeout>>();

  constructor(
    private readonly userId: string,
    /** Writes the send frame; false when the stream is not ready (it is then sent on the next Ready). */
    private readonly transmit: (send: PendingSend) => boolean,
    private readonly changed: (conversationId: string) => void,
  ) {
    this.pending = loadOutbox(userId);
  }

  of(conversationId: string): PendingSend[] {
    return this.pending.filter((send) => send.conversationId === conversationId);
  }

  get(clientMsgId: string): PendingSend | undefined {
    return this.pending.find((send) => send.clientMsgId === clientMsgId);
  }

  add(send: PendingSend): void {
    this.pending.push(send);
    this.save(send.conversationId);
    this.transmit(send);
  }

  /** After every Ready: what was in flight when the connection went may or
   * may not be stored; sending it again with the same id settles it. */
  resendAll(): void {
    for (const send of this.pending) if (!send.failed) this.transmit(send);
  }

  /** The send is durable: forget it and hand it back to be shown as sent. */
  acked(clientMsgId: string): PendingSend | undefined {
    const send = this.get(clientMsgId);
    if (!send) return undefined;
    this.forget(send);
    return send;
  }

  /** A send's Error frame: retry later, or give up and say why. */
  failed(clientMsgId: string, code: number, reason: string, retryAfterMs: number): void {
    const send = this.get(clientMsgId);
    if (!send) return;
    if (RETRY.has(code)) {
      const retries = (this.retries.get(clientMsgId) ?? 0) + 1;
      this.retries.set(clientMsgId, retries);
      const backoff = Math.min(RETRY_MAX_MS, 500 * 2 ** retries) * (0.5 + Math.random() / 2);
      clearTimeout(this.timers.get(clientMsgId));
      this.timers.set(
        clientMsgId,
        setTimeout(() => this.transmit(send), Math.max(retryAfterMs, backoff)),
      );
      return;
    }
    send.failed = reason;
    this.save(send.conversationId);
  }

  /** The person dismissed a send that failed for good. */
  discard(clientMsgId: string): void {
    const send = this.get(clientMsgId);
    if (send) this.forget(send);
  }

  private forget(send: PendingSend): void {
    clearTimeout(this.timers.get(send.clientMsgId));
    this.timers.delete(send.clientMsgId);
    this.retries.delete(send.clientMsgId);
    this.pending = this.pending.filter((other) => other !== send);
    this.save(send.conversationId);
  }

  private save(conversationId: string): void {
    saveOutbox(this.userId, this.pending);
    this.changed(conversationId);
  }
}
