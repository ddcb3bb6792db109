// Unary calls: gRPC-Web on the page's own origin with the bearer token, the
// development sign-in, and errors turned into sentences for the UI.

import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { GatewayService } from "../gen/messenger/v1/gateway_pb";

export type Gateway = Client<typeof GatewayService>;

/** A unary call that takes longer has most likely lost its connection. */
const CALL_TIMEOUT_MS = 20_000;

/**
 * The gateway client. `token` is read at each call, so a refreshed token is
 * used at once; `unauthenticated` hears of every UNAUTHENTICATED answer.
 */
export function gateway(token: () => string, unauthenticated: () => void): Gateway {
  const bearer: Interceptor = (next) => async (request) => {
    request.header.set("authorization", `Bearer ${token()}`);
    try {
      return await next(request);
    } catch (error) {
      if (ConnectError.from(error).code === Code.Unauthenticated) unauthenticated();
      throw error;
    }
  };
  const transport = createGrpcWebTransport({
    baseUrl: location.origin,
    interceptors: [bearer],
    defaultTimeoutMs: CALL_TIMEOUT_MS,
  });
  return createClient(GatewayService, transport);
}

const TRANSIENT = new Set([Code.Unavailable, Code.DeadlineExceeded, Code.ResourceExhausted, Code.Unknown]);

/**
 * Runs an idempotent call, retrying transient failures a few times with
 * growing waits. Only for reads and for calls the server makes idempotent
 * (CompleteUpload, GetUpload): a retried write could apply twice.
 */
export async function retried<T>(call: () => Promise<T>, attempts = 4): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await call();
    } catch (error) {
      const code = ConnectError.from(error).code;
      if (attempt >= attempts || !TRANSIENT.has(code)) throw error;
      await sleep(250 * 2 ** attempt * (0.5 + Math.random()));
    }
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * Asks a development server for a token. Undefined when the server has no
 * such endpoint (404: production), so the UI offers to paste a token.
 */
export async function devToken(userId: string): Promise<string | undefined> {
  const response = await fetch("/v1/dev-token", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ user_id: userId }),
  });
  if (response.status === 404) return undefined;
  if (!response.ok) {
    const text = (await response.text()).slice(0, 200);
    throw new Error(`sign-in failed (${response.status})${text ? `: ${text}` : ""}`);
  }
  const json: unknown = await response.json();
  const token = (json as { token?: unknown }).token;
  if (typeof token !== "string" || !token) throw new Error("sign-in failed: no token in the answer");
  return token;
}

// What each gRPC status means to the person using the app.
const meaning: Partial<Record<Code, string>> = {
  [Code.Canceled]: "Cancelled",
  [Code.Unknown]: "Network error",
  [Code.InvalidArgument]: "Not accepted",
  [Code.DeadlineExceeded]: "The server took too long; try again",
  [Code.NotFound]: "Not found",
  [Code.PermissionDenied]: "Not allowed",
  [Code.ResourceExhausted]: "Too many requests or over a limit; wait a moment",
  [Code.FailedPrecondition]: "Not possible now",
  [Code.OutOfRange]: "Too large",
  [Code.Internal]: "Server error",
  [Code.Unavailable]: "The server is unavailable; try again",
  [Code.Unauthenticated]: "Your session ended; sign in again",
};

/** A status code (gRPC numbering, as stream Error frames carry it) and the
 * server's message as one readable line. */
export function describeCode(code: number, message: string): string {
  const label = meaning[code as Code] ?? `Error ${code}`;
  return message ? `${label} (${message})` : label;
}

export function describeError(error: unknown): string {
  if (error instanceof ConnectError) return describeCode(error.code, error.rawMessage);
  if (error instanceof Error) return error.message;
  return String(error);
}

export function errorCode(error: unknown): Code {
  return ConnectError.from(error).code;
}
