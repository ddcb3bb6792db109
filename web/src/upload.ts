// Sending a photo or file: CreateUpload declares it (size, type, SHA-256),
// the bytes go straight to storage on the presigned URLs with XMLHttpRequest
// (fetch cannot report upload progress), CompleteUpload checks them and
// answers the attachment a message then carries. Larger files go in parts,
// as the API requires above its multipart threshold.

import { Code, ConnectError } from "@connectrpc/connect";
import type { CreateUploadResponse, UploadRequest } from "../gen/messenger/v1/gateway_pb";
import { retried, sleep, type Gateway } from "./api";
import { attachment } from "./convert";
import type { Attachment } from "./model";
import { sha256 } from "./sha256";

/** The server's default media.multipart_threshold_bytes, as the Rust SDK assumes it. */
const MULTIPART_THRESHOLD_BYTES = 16 * 1024 * 1024;
/** Within the API's 5 MiB to 64 MiB, as the Rust SDK chooses. */
const PART_BYTES = 8 * 1024 * 1024;
const TRANSFER_ATTEMPTS = 3;
const COMPLETE_TIMEOUT_MS = 120_000;

/** Headers a browser sets itself and refuses from scripts; it sends the same
 * value the URL was signed with (the body's length, the URL's host). */
const SET_BY_BROWSER = new Set(["content-length", "host", "connection"]);

export type Progress = (sentBytes: number, totalBytes: number) => void;

export async function upload(api: Gateway, conversationId: string, file: File, progress: Progress): Promise<Attachment> {
  const bytes = new Uint8Array(await file.arrayBuffer());
  const multipart = bytes.length > MULTIPART_THRESHOLD_BYTES;
  const partSha256: Uint8Array[] = [];
  if (multipart) {
    for (let offset = 0; offset < bytes.length; offset += PART_BYTES) {
      partSha256.push(await sha256(bytes.subarray(offset, offset + PART_BYTES)));
    }
  }
  let ticket = await api.createUpload({
    conversationId,
    mimeType: file.type || "application/octet-stream",
    size: BigInt(bytes.length),
    sha256: await sha256(bytes),
    fileName: file.name,
    partSize: multipart ? BigInt(PART_BYTES) : 0n,
    partSha256,
  });
  const mediaId = ticket.mediaId;
  for (let attempt = 1; ; attempt++) {
    try {
      await putAll(ticket, file, progress);
      break;
    } catch (error) {
      if (attempt >= TRANSFER_ATTEMPTS) throw error;
      await sleep(500 * 2 ** attempt);
      // Fresh URLs for what storage still lacks (only missing parts of a multipart upload).
      const fresh = await getUpload(api, mediaId);
      if (!fresh) break;
      ticket = fresh;
    }
  }
  // The server hashes and re-encodes the file before it answers.
  const completed = await retried(() => api.completeUpload({ mediaId }, { timeoutMs: COMPLETE_TIMEOUT_MS }));
  if (!completed.attachment) throw new Error("the server answered no attachment");
  return attachment(completed.attachment);
}

/** Undefined when storage already holds everything (the upload is complete). */
async function getUpload(api: Gateway, mediaId: string): Promise<CreateUploadResponse | undefined> {
  try {
    return await retried(() => api.getUpload({ mediaId }));
  } catch (error) {
    if (ConnectError.from(error).code === Code.FailedPrecondition) return undefined;
    throw error;
  }
}

async function putAll(ticket: CreateUploadResponse, file: File, progress: Progress): Promise<void> {
  const total = file.size;
  // What the requests do not cover, storage holds already.
  let sent = total - ticket.requests.reduce((sum, request) => sum + Number(request.length), 0);
  progress(sent, total);
  for (const request of ticket.requests) {
    const before = sent;
    await put(request, file, (loaded) => progress(before + loaded, total));
    sent = before + Number(request.length);
    progress(sent, total);
  }
}

function put(request: UploadRequest, file: File, loaded: (bytes: number) => void): Promise<void> {
  const start = Number(request.offset);
  const body = file.slice(start, start + Number(request.length));
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open(request.method || "PUT", request.url);
    // Exactly the headers the ticket lists: storage checks them against the signature.
    for (const header of request.headers) {
      if (!SET_BY_BROWSER.has(header.name.toLowerCase())) xhr.setRequestHeader(header.name, header.value);
    }
    xhr.upload.onprogress = (event) => loaded(event.loaded);
    xhr.onload = () =>
      xhr.status >= 200 && xhr.status < 300
        ? resolve()
        : reject(new Error(`storage refused the upload (HTTP ${xhr.status})`));
    xhr.onerror = () => reject(new Error("the upload failed: network error"));
    xhr.ontimeout = () => reject(new Error("the upload timed out"));
    xhr.send(body);
  });
}
