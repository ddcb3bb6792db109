// Short-lived download URLs (GetMediaUrl), cached until shortly before they
// expire so scrolling back and forth asks the server once.

import { retried, type Gateway } from "./api";

/** A URL this close to expiry is asked for again rather than handed out. */
const MARGIN_MS = 30_000;

export class MediaUrls {
  private cache = new Map<string, { url: string; expiresAtMs: number }>();
  private inflight = new Map<string, Promise<string>>();

  constructor(private readonly api: Gateway) {}

  /** The URL of an attachment of the message at `seq`, or of its thumbnail. */
  get(conversationId: string, seq: number, mediaId: string, thumbnail: boolean): Promise<string> {
    const key = `${conversationId}/${seq}/${mediaId}/${thumbnail ? "thumbnail" : "original"}`;
    const cached = this.cache.get(key);
    if (cached && cached.expiresAtMs - MARGIN_MS > Date.now()) return Promise.resolve(cached.url);
    let pending = this.inflight.get(key);
    if (!pending) {
      pending = retried(() => this.api.getMediaUrl({ conversationId, seq: BigInt(seq), mediaId, thumbnail }))
        .then((answer) => {
          // Clocks may differ: a URL that fails early is forgotten and asked again (forget).
          this.cache.set(key, { url: answer.url, expiresAtMs: Number(answer.expiresAtMs) });
          return answer.url;
        })
        .finally(() => this.inflight.delete(key));
      this.inflight.set(key, pending);
    }
    return pending;
  }

  /** Forgets a URL that failed to load (expired early, or the message was deleted). */
  forget(conversationId: string, seq: number, mediaId: string, thumbnail: boolean): void {
    this.cache.delete(`${conversationId}/${seq}/${mediaId}/${thumbnail ? "thumbnail" : "original"}`);
  }
}
