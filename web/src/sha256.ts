// SHA-256 of upload bytes, which CreateUpload declares (the whole file's,
// and each part's for a multipart upload) and storage checks.
// crypto.subtle exists only in secure contexts (https, localhost); a dev
// server reached over plain http on a LAN address hashes with @noble/hashes.

import { sha256 as nobleSha256 } from "@noble/hashes/sha2.js";

export async function sha256(bytes: Uint8Array): Promise<Uint8Array> {
  if (globalThis.crypto?.subtle) {
    return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes as Uint8Array<ArrayBuffer>));
  }
  return nobleSha256(bytes);
}
