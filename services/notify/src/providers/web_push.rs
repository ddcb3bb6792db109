//! Web Push (RFC 8030) to a browser's subscription: the payload encrypted
//! with RFC 8291 `aes128gcm` for the subscription's keys, the sender
//! identified with VAPID (RFC 8292: an ES256 JWT for the endpoint's origin
//! and the public key in `Authorization: vapid t=..., k=...`), `TTL`,
//! `Urgency`, and `Topic` per conversation so a newer push replaces an
//! undelivered older one. Endpoints are user-supplied: requests go through
//! the egress [`Guard`].
//!
//! The encryption is written here on RustCrypto (P-256 ECDH, HKDF-SHA-256,
//! AES-128-GCM): the `ece` crate needs OpenSSL, which nothing else in the
//! build does. A test decrypts our output with an independent implementation
//! (Python's `http_ece`, the one `pywebpush` uses).

use std::{path::PathBuf, sync::Arc, time::Duration};

use aes_gcm::{Aes128Gcm, KeyInit as _, Nonce, aead::Aead as _};
use async_trait::async_trait;
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use hkdf::Hkdf;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::{
    PublicKey, SecretKey,
    elliptic_curve::sec1::ToEncodedPoint as _,
    pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _},
};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::Sha256;

use super::{Outcome, Provider, Push, send_for_status};
use crate::{
    guard::{EgressOptions, Guard},
    store::{Device, JobKind},
};

/// The record size we declare; one record carries the whole payload.
const RECORD_SIZE: u32 = 4096;
/// Bytes of the `aes128gcm` header: salt, record size, key id length, key.
const HEADER_BYTES: usize = 16 + 4 + 1 + 65;
/// The largest plaintext one 4096-byte record holds: the record minus the
/// header, the 16-byte tag and the padding delimiter.
pub const MAX_PLAINTEXT: usize = RECORD_SIZE as usize - HEADER_BYTES - 16 - 1;

/// `notify.web_push`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebPushOptions {
    /// The VAPID private key: a PKCS#8 PEM file, or a file holding the raw
    /// 32-byte key in base64url (what `web-push generate-vapid-keys` prints).
    /// Unset: Web Push devices go to the log provider. Reloaded on change.
    pub vapid_key_file: Option<PathBuf>,
    /// Who runs this sender (the JWT's `sub`): a `mailto:` or `https:` URL.
    pub subject: String,
    /// How long a push service keeps an undelivered push (`TTL`).
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
}

impl Default for WebPushOptions {
    fn default() -> Self {
        Self { vapid_key_file: None, subject: String::new(), ttl: Duration::from_secs(24 * 3600) }
    }
}

/// A VAPID key, ready to sign.
pub struct VapidKey {
    signing: EncodingKey,
    /// The uncompressed public point, base64url (the `k` parameter).
    public: String,
}

impl VapidKey {
    /// Reads either form `vapid_key_file` may hold.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let secret = if text.starts_with("-----BEGIN") {
            SecretKey::from_pkcs8_pem(text)
                .or_else(|_| SecretKey::from_sec1_pem(text))
                .map_err(|error| format!("not a P-256 private key: {error}"))?
        } else {
            let bytes = URL_SAFE_NO_PAD
                .decode(text.trim_end_matches('='))
                .map_err(|_| "neither PEM nor base64url".to_owned())?;
            SecretKey::from_slice(&bytes).map_err(|_| "not a 32-byte P-256 private key".to_owned())?
        };
        let der = secret.to_pkcs8_der().map_err(|error| error.to_string())?;
        let public = secret.public_key().to_encoded_point(false);
        Ok(Self {
            signing: EncodingKey::from_ec_der(der.as_bytes()),
            public: URL_SAFE_NO_PAD.encode(public.as_bytes()),
        })
    }

    /// The public key browsers subscribe with (`applicationServerKey`).
    pub fn public_key(&self) -> &str {
        &self.public
    }

    /// `Authorization` for a push to `endpoint`: a JWT for its origin,
    /// valid for 12 hours (at most 24 are allowed).
    pub fn authorization(&self, endpoint: &url::Url, subject: &str) -> Result<String, String> {
        let audience = endpoint.origin().ascii_serialization();
        let expires = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default()
            + Duration::from_secs(12 * 3600);
        let claims = json!({ "aud": audience, "exp": expires.as_secs(), "sub": subject });
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some("JWT".into());
        let token = jsonwebtoken::encode(&header, &claims, &self.signing).map_err(|error| error.to_string())?;
        Ok(format!("vapid t={token}, k={}", self.public))
    }
}

/// RFC 8291: `plaintext` encrypted for the subscription's public key
/// (`p256dh`, 65 bytes) and authentication secret (16 bytes), as one
/// `aes128gcm` record with its header. Fails on a key that is not a point.
pub fn encrypt(p256dh: &[u8], auth: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, String> {
    if plaintext.len() > MAX_PLAINTEXT {
        return Err(format!("a payload of {} bytes does not fit one record", plaintext.len()));
    }
    let receiver = PublicKey::from_sec1_bytes(p256dh).map_err(|_| "p256dh is not a P-256 point".to_owned())?;
    let ephemeral = random_secret();
    let sender_public = ephemeral.public_key().to_encoded_point(false);
    let shared = p256::ecdh::diffie_hellman(ephemeral.to_nonzero_scalar(), receiver.as_affine());

    // IKM = HKDF(auth, ecdh, "WebPush: info" 0 ua_public as_public, 32)
    let mut key_info = b"WebPush: info\0".to_vec();
    key_info.extend_from_slice(p256dh);
    key_info.extend_from_slice(sender_public.as_bytes());
    let mut ikm = [0u8; 32];
    Hkdf::<Sha256>::new(Some(auth), shared.raw_secret_bytes())
        .expand(&key_info, &mut ikm)
        .map_err(|error| error.to_string())?;

    let salt: [u8; 16] = rand::random();
    let content = Hkdf::<Sha256>::new(Some(&salt), &ikm);
    let (mut key, mut nonce) = ([0u8; 16], [0u8; 12]);
    content.expand(b"Content-Encoding: aes128gcm\0", &mut key).map_err(|error| error.to_string())?;
    content.expand(b"Content-Encoding: nonce\0", &mut nonce).map_err(|error| error.to_string())?;

    // One record, the last: the plaintext, then the delimiter 2, no padding.
    let mut record = plaintext.to_vec();
    record.push(2);
    let cipher = Aes128Gcm::new_from_slice(&key).map_err(|error| error.to_string())?;
    let sealed = cipher.encrypt(&Nonce::from(nonce), record.as_slice()).map_err(|error| error.to_string())?;

    let mut body = Vec::with_capacity(HEADER_BYTES + sealed.len());
    body.extend_from_slice(&salt);
    body.extend_from_slice(&RECORD_SIZE.to_be_bytes());
    body.push(sender_public.as_bytes().len() as u8);
    body.extend_from_slice(sender_public.as_bytes());
    body.extend_from_slice(&sealed);
    Ok(body)
}

/// A fresh ephemeral key (a random scalar; a zero or out-of-range draw,
/// about 2^-32 likely, is drawn again).
fn random_secret() -> SecretKey {
    loop {
        let bytes: [u8; 32] = rand::random();
        if let Ok(secret) = SecretKey::from_slice(&bytes) {
            return secret;
        }
    }
}

/// What the service worker receives (decrypted): a notification to show,
/// or `read` to close the conversation's notification.
pub fn payload(push: &Push) -> serde_json::Value {
    let mut payload = json!({
        "type": match push.kind { JobKind::Notify => "message", JobKind::Retract => "read" },
        "conversation_id": push.conversation_id.to_string(),
        "seq": push.seq,
        "badge": push.badge,
    });
    if let Some(preview) = &push.preview {
        payload["sender_id"] = json!(preview.sender_id);
        payload["title"] = json!(preview.title);
        payload["body"] = json!(preview.body);
    }
    payload
}

pub struct WebPush {
    guard: Guard,
    client: reqwest::Client,
    key: Arc<super::Credential<VapidKey>>,
    subject: String,
    ttl: Duration,
    max_response_bytes: usize,
}

impl WebPush {
    pub fn new(
        guard: Guard,
        egress: &EgressOptions,
        options: &WebPushOptions,
        key: Arc<super::Credential<VapidKey>>,
    ) -> Self {
        Self {
            client: guard.client(egress),
            guard,
            key,
            subject: options.subject.clone(),
            ttl: options.ttl,
            max_response_bytes: egress.max_response_bytes,
        }
    }
}

#[async_trait]
impl Provider for WebPush {
    fn name(&self) -> &'static str {
        "webpush"
    }

    async fn send(&self, device: &Device, push: &Push) -> Outcome {
        let Some(keys) = &device.web_push else { return Outcome::Refused("no Web Push subscription".into()) };
        let url = match self.guard.check_url(&keys.endpoint) {
            Ok(url) => url,
            Err(refused) => return Outcome::Refused(refused.to_string()),
        };
        let decode = |value: &str| URL_SAFE_NO_PAD.decode(value.trim_end_matches('=')).unwrap_or_default();
        let body = match serde_json::to_vec(&payload(push))
            .map_err(|error| error.to_string())
            .and_then(|plaintext| encrypt(&decode(&keys.p256dh), &decode(&keys.auth), &plaintext))
        {
            Ok(body) => body,
            Err(error) => return Outcome::Refused(error),
        };
        let Some(key) = self.key.get() else {
            return Outcome::Retry { after: None, reason: "no VAPID key loaded".into() };
        };
        let authorization = match key.authorization(&url, &self.subject) {
            Ok(authorization) => authorization,
            Err(error) => return Outcome::Refused(error),
        };
        // A retraction is silent and may wait; a new message should not.
        let urgency = match push.kind {
            JobKind::Notify => "high",
            JobKind::Retract => "normal",
        };
        let request = self
            .client
            .post(url)
            .header("authorization", authorization)
            .header("content-encoding", "aes128gcm")
            .header("content-type", "application/octet-stream")
            .header("ttl", self.ttl.as_secs().to_string())
            .header("urgency", urgency)
            // At most 32 base64url characters: the conversation id's hex.
            .header("topic", push.conversation_id.simple().to_string())
            .body(body);
        send_for_status(request, &[StatusCode::NOT_FOUND, StatusCode::GONE], self.max_response_bytes).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vapid_key_reads_from_pem_or_base64url_and_signs_for_the_origin() {
        let secret = random_secret();
        let raw = URL_SAFE_NO_PAD.encode(secret.to_bytes());
        let pem = secret.to_pkcs8_pem(Default::default()).unwrap();
        let (a, b) = (VapidKey::parse(&raw).unwrap(), VapidKey::parse(&pem).unwrap());
        assert_eq!(a.public_key(), b.public_key());
        assert_eq!(URL_SAFE_NO_PAD.decode(a.public_key()).unwrap().len(), 65);
        let url = url::Url::parse("https://push.example.net:8443/wpush/v2/abc?x=1").unwrap();
        let authorization = a.authorization(&url, "mailto:ops@example.com").unwrap();
        let token = authorization.strip_prefix("vapid t=").unwrap().split(',').next().unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(token.split('.').nth(1).unwrap()).unwrap()).unwrap();
        assert_eq!(claims["aud"], "https://push.example.net:8443");
        assert_eq!(claims["sub"], "mailto:ops@example.com");
        assert!(VapidKey::parse("not a key").is_err());
    }

    #[test]
    fn a_payload_too_large_for_one_record_is_refused() {
        let receiver = random_secret().public_key().to_encoded_point(false);
        let auth = [7u8; 16];
        let body = encrypt(receiver.as_bytes(), &auth, &vec![b'x'; MAX_PLAINTEXT]).unwrap();
        assert_eq!(body.len(), RECORD_SIZE as usize, "exactly one full record");
        assert!(encrypt(receiver.as_bytes(), &auth, &vec![b'x'; MAX_PLAINTEXT + 1]).is_err());
        assert!(encrypt(&[4u8; 65], &auth, b"{}").is_err(), "not a point");
    }
}
