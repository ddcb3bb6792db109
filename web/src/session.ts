// What survives a reload: who is signed in, the token, this browser's device
// id and the sends still waiting for their ack. All in localStorage; when
// storage is unavailable (a locked-down browser) the app still works for the
// life of the page.

import type { PendingSend } from "./model";

const USER = "messenger.user";
const TOKEN = "messenger.token";
const DEVICE = "messenger.device";
const OUTBOX = "messenger.outbox.";

const memory = new Map<string, string>();

function read(key: string): string | null {
  try {
    return localStorage.getItem(key);
  } catch {
    return memory.get(key) ?? null;
  }
}

function write(key: string, value: string | null): void {
  try {
    if (value === null) localStorage.removeItem(key);
    else localStorage.setItem(key, value);
  } catch {
    if (value === null) memory.delete(key);
    else memory.set(key, value);
  }
}

/** A random UUID (v4). crypto.randomUUID exists only in secure contexts, so
 * a dev server reached over plain http on a LAN address would lack it. */
export function randomId(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = (bytes[6]! & 0x0f) | 0x40;
  bytes[8] = (bytes[8]! & 0x3f) | 0x80;
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** Stable per browser: the server keeps this device's delivered cursors
 * under it, which is where a reconnect resumes. */
export function deviceId(): string {
  let id = read(DEVICE);
  if (!id) {
    id = `web-${randomId()}`;
    write(DEVICE, id);
  }
  return id;
}

export interface Credentials {
  userId: string;
  token: string;
}

export function loadCredentials(): Credentials | undefined {
  const userId = read(USER);
  const token = read(TOKEN);
  return userId && token ? { userId, token } : undefined;
}

export function saveCredentials(credentials: Credentials): void {
  write(USER, credentials.userId);
  write(TOKEN, credentials.token);
}

/** Signs out but keeps the user id to prefill the sign-in form. */
export function forgetToken(): void {
  write(TOKEN, null);
}

export function lastUserId(): string {
  return read(USER) ?? "";
}

export function loadOutbox(userId: string): PendingSend[] {
  try {
    const parsed: unknown = JSON.parse(read(OUTBOX + userId) ?? "[]");
    return Array.isArray(parsed) ? (parsed as PendingSend[]) : [];
  } catch {
    return [];
  }
}

export function saveOutbox(userId: string, pending: PendingSend[]): void {
  write(OUTBOX + userId, pending.length ? JSON.stringify(pending) : null);
}

/** The `sub` of a pasted JWT, to name the user before the stream's Ready. */
export function tokenSubject(token: string): string {
  try {
    const payload = token.split(".")[1] ?? "";
    const json = atob(payload.replace(/-/g, "+").replace(/_/g, "/"));
    const sub: unknown = JSON.parse(json).sub;
    return typeof sub === "string" ? sub : "";
  } catch {
    return "";
  }
}
