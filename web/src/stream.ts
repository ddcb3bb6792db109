// The live stream: one WebSocket at /v1/stream carrying one protobuf
// ClientFrame or ServerFrame per binary message. This file owns the socket's
// life: Hello, pings, telling a dead connection, and reconnecting with
// backoff. Resuming is the server's (it replays everything after this
// device's delivered cursors); what to do with frames is the caller's.

import { create, fromBinary, toBinary, type MessageInitShape } from "@bufbuild/protobuf";
import { ClientFrameSchema, ServerFrameSchema, type ServerFrame } from "../gen/messenger/v1/gateway_pb";

export type ClientFrameInit = MessageInitShape<typeof ClientFrameSchema>;
export type ConnectionState = "connecting" | "connected" | "reconnecting" | "stopped";

export interface StreamEvents {
  /** The session is registered (after every (re)connect); the backlog follows. */
  ready(userId: string): void;
  /** Every frame but Ready and Pong. */
  frame(frame: ServerFrame): void;
  /** `detail` says why, for the status line. */
  state(state: ConnectionState, detail: string): void;
  /** The server refused the token (close 4016): get a new one, then `restart()`. */
  unauthenticated(): void;
}

const PING_EVERY_MS = 25_000;
const PONG_WITHIN_MS = 10_000;
/** From opening the socket to Ready; covers a connect that hangs. */
const READY_WITHIN_MS = 15_000;
const BACKOFF_BASE_MS = 500;
const BACKOFF_MAX_MS = 30_000;
/** Close codes 4000 + a gRPC status code end a stream for that status. */
const CLOSE_STATUS_BASE = 4000;
const UNAUTHENTICATED = 16;

export class Stream {
  private socket: WebSocket | undefined;
  private isReady = false;
  private stopped = true;
  /** Failed attempts since the last Ready; the backoff grows with it. */
  private attempt = 0;
  /** A wait the server asked for (Error.retry_after_ms) before the next attempt. */
  private retryAfterMs = 0;
  private nonce = 0n;
  private retryTimer: ReturnType<typeof setTimeout> | undefined;
  /** Ends the window's online and offline listeners. */
  private connectivity: AbortController | undefined;
  private pingTimer: ReturnType<typeof setInterval> | undefined;
  private deadlineTimer: ReturnType<typeof setTimeout> | undefined;

  constructor(
    private readonly deviceId: string,
    private readonly token: () => string,
    private readonly events: StreamEvents,
  ) {}

  get ready(): boolean {
    return this.isReady;
  }

  start(): void {
    this.stopped = false;
    // Coming back online: try at once rather than at the end of a long backoff.
    this.connectivity ??= new AbortController();
    addEventListener(
      "online",
      () => {
        if (!this.isReady) this.restart();
      },
      { signal: this.connectivity.signal },
    );
    // Gone offline: the socket may stay open but carry nothing, which pings
    // would tell only after up to PING_EVERY_MS + PONG_WITHIN_MS. Drop it now
    // and show it; "online" reconnects.
    addEventListener(
      "offline",
      () => {
        if (this.socket) this.dropped("offline");
      },
      { signal: this.connectivity.signal },
    );
    if (!this.socket) this.open();
  }

  /** Drops any connection and connects again now (e.g. with a new token). */
  restart(): void {
    this.stopped = false;
    this.attempt = 0;
    this.abandon();
    this.open();
  }

  stop(): void {
    this.stopped = true;
    this.connectivity?.abort();
    this.connectivity = undefined;
    this.abandon();
    this.events.state("stopped", "");
  }

  /** Sends a frame when the session is ready; false (nothing sent) otherwise. */
  send(frame: ClientFrameInit): boolean {
    if (!this.isReady || !this.socket) return false;
    this.socket.send(toBinary(ClientFrameSchema, create(ClientFrameSchema, frame)));
    return true;
  }

  private open(): void {
    clearTimeout(this.retryTimer);
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    this.events.state(this.attempt === 0 ? "connecting" : "reconnecting", "");
    let socket: WebSocket;
    try {
      socket = new WebSocket(`${scheme}//${location.host}/v1/stream`, "messenger.v1");
    } catch (error) {
      // Refused before any network (a content security policy): still retry, visibly.
      this.dropped(error instanceof Error ? error.message : "cannot open a WebSocket");
      return;
    }
    socket.binaryType = "arraybuffer";
    this.socket = socket;
    this.deadlineTimer = setTimeout(() => this.dropped("no answer from the server"), READY_WITHIN_MS);

    // Every handler checks it still belongs to the current socket: an
    // abandoned socket may still report its close much later.
    socket.onopen = () => {
      if (socket !== this.socket) return;
      const hello: ClientFrameInit = {
        frame: { case: "hello", value: { deviceId: this.deviceId, accessToken: this.token() } },
      };
      socket.send(toBinary(ClientFrameSchema, create(ClientFrameSchema, hello)));
    };
    socket.onmessage = (event: MessageEvent) => {
      if (socket !== this.socket || !(event.data instanceof ArrayBuffer)) return;
      let frame: ServerFrame;
      try {
        frame = fromBinary(ServerFrameSchema, new Uint8Array(event.data));
      } catch {
        this.dropped("the server sent a frame this app cannot read");
        return;
      }
      this.received(frame);
    };
    socket.onclose = (event: CloseEvent) => {
      if (socket !== this.socket) return;
      if (event.code === CLOSE_STATUS_BASE + UNAUTHENTICATED) {
        this.abandon();
        this.events.state("reconnecting", "signing in again");
        this.events.unauthenticated();
        return;
      }
      this.dropped(event.reason || (event.code >= CLOSE_STATUS_BASE ? `closed (${event.code})` : "connection lost"));
    };
  }

  private received(frame: ServerFrame): void {
    switch (frame.frame.case) {
      case "ready":
        clearTimeout(this.deadlineTimer);
        this.isReady = true;
        this.attempt = 0;
        this.startPings();
        this.events.state("connected", "");
        this.events.ready(frame.frame.value.userId);
        return;
      case "pong":
        clearTimeout(this.deadlineTimer);
        return;
      case "error": {
        const error = frame.frame.value;
        // An error naming no send and no conversation is the stream's own,
        // sent just before the server closes it: remember its wait.
        if (!error.clientMsgId && !error.conversationId) this.retryAfterMs = Number(error.retryAfterMs);
        break;
      }
    }
    this.events.frame(frame);
  }

  private startPings(): void {
    clearInterval(this.pingTimer);
    this.pingTimer = setInterval(() => {
      this.nonce += 1n;
      if (!this.send({ frame: { case: "ping", value: { nonce: this.nonce } } })) return;
      clearTimeout(this.deadlineTimer);
      this.deadlineTimer = setTimeout(() => this.dropped("no answer to a ping"), PONG_WITHIN_MS);
    }, PING_EVERY_MS);
  }

  /** Forgets the current socket (closing it if it is open) and its timers. */
  private abandon(): void {
    clearInterval(this.pingTimer);
    clearTimeout(this.deadlineTimer);
    clearTimeout(this.retryTimer);
    const socket = this.socket;
    this.socket = undefined;
    this.isReady = false;
    if (socket && socket.readyState <= WebSocket.OPEN) socket.close(1000);
  }

  /** The connection is gone or useless: reconnect after a backoff with full jitter. */
  private dropped(why: string): void {
    this.abandon();
    if (this.stopped) return;
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** this.attempt);
    const delay = Math.max(Math.random() * ceiling, this.retryAfterMs);
    this.retryAfterMs = 0;
    this.attempt += 1;
    this.events.state("reconnecting", `${why}; retrying in ${Math.ceil(delay / 1000)} s`);
    this.retryTimer = setTimeout(() => this.open(), delay);
  }
}
