//! A fake push service (RFC 8030) with browsers' subscriptions behind it:
//! it accepts a push only with a VAPID `Authorization` whose JWT verifies
//! with the key in `k`, is for this origin and expires within 24 hours, and
//! with `TTL`, `Urgency` and `Topic` as RFC 8030 allows them. Each body is
//! decrypted (RFC 8291 `aes128gcm`) with the subscription's private key, as
//! the browser would; the raw body is kept for an independent decryption.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
};

use aes_gcm::{Aes128Gcm, KeyInit as _, Nonce, aead::Aead as _};
use axum::{
    body::Bytes,
    extract::{Path as UrlPath, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use hkdf::Hkdf;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use messenger_proto::v1 as pb;
use p256::{PublicKey, SecretKey, elliptic_curve::sec1::ToEncodedPoint as _};
use serde_json::Value;
use sha2::Sha256;

/// A browser's subscription: what it registers, and its private half.
#[derive(Clone)]
pub struct Browser {
    pub subscription: pb::WebPushSubscription,
    pub private: SecretKey,
    pub auth: [u8; 16],
}

/// One push the service accepted, decrypted.
#[derive(Clone, Debug)]
pub struct Delivered {
    pub browser: String,
    pub headers: HashMap<String, String>,
    pub payload: Value,
    pub raw: Vec<u8>,
    pub at: std::time::Instant,
}

#[derive(Default)]
struct Shared {
    origin: Mutex<String>,
    vapid_public: Mutex<String>,
    browsers: Mutex<HashMap<String, Browser>>,
    delivered: Mutex<Vec<Delivered>>,
    refused: Mutex<Vec<String>>,
    script: Mutex<VecDeque<(StatusCode, Option<&'static str>)>>,
    gone: Mutex<HashSet<String>>,
}

pub struct FakeWebPush {
    pub base: String,
    shared: Arc<Shared>,
}

/// RFC 8291 decryption, as a browser does it.
pub fn decrypt(browser: &Browser, body: &[u8]) -> Result<Vec<u8>, String> {
    if body.len() < 21 {
        return Err("short body".into());
    }
    let (salt, rest) = body.split_at(16);
    let key_length = rest[4] as usize;
    let (sender, ciphertext) = rest[5..].split_at(key_length);
    let sender = PublicKey::from_sec1_bytes(sender).map_err(|_| "key id is not a P-256 point")?;
    let shared = p256::ecdh::diffie_hellman(browser.private.to_nonzero_scalar(), sender.as_affine());
    let receiver_public = browser.private.public_key().to_encoded_point(false);
    let mut info = b"WebPush: info\0".to_vec();
    info.extend_from_slice(receiver_public.as_bytes());
    info.extend_from_slice(sender.to_encoded_point(false).as_bytes());
    let mut ikm = [0u8; 32];
    Hkdf::<Sha256>::new(Some(&browser.auth), shared.raw_secret_bytes()).expand(&info, &mut ikm).unwrap();
    let prk = Hkdf::<Sha256>::new(Some(salt), &ikm);
    let (mut key, mut nonce) = ([0u8; 16], [0u8; 12]);
    prk.expand(b"Content-Encoding: aes128gcm\0", &mut key).unwrap();
    prk.expand(b"Content-Encoding: nonce\0", &mut nonce).unwrap();
    let mut plain = Aes128Gcm::new_from_slice(&key)
        .unwrap()
        .decrypt(&Nonce::from(nonce), ciphertext)
        .map_err(|_| "does not decrypt")?;
    while plain.last() == Some(&0) {
        plain.pop();
    }
    if plain.pop() != Some(2) {
        return Err("not a last record (delimiter 2)".into());
    }
    Ok(plain)
}

fn vapid_error(shared: &Shared, authorization: &str) -> Option<String> {
    let rest = authorization.strip_prefix("vapid ")?;
    let mut parts = HashMap::new();
    for part in rest.split(',') {
        let (name, value) = part.trim().split_once('=')?;
        parts.insert(name, value);
    }
    let (token, key) = (parts.get("t")?, parts.get("k")?);
    if *key != shared.vapid_public.lock().unwrap().as_str() {
        return Some("k is not the application server key".into());
    }
    let point = URL_SAFE_NO_PAD.decode(key).ok()?;
    if point.len() != 65 {
        return Some("k is not an uncompressed point".into());
    }
    let (x, y) = (URL_SAFE_NO_PAD.encode(&point[1..33]), URL_SAFE_NO_PAD.encode(&point[33..]));
    let decoding = DecodingKey::from_ec_components(&x, &y).ok()?;
    let mut validation = Validation::new(Algorithm::ES256);
    validation.set_audience(&[shared.origin.lock().unwrap().clone()]);
    validation.set_required_spec_claims(&["exp", "aud", "sub"]);
    let claims = match jsonwebtoken::decode::<Value>(token, &decoding, &validation) {
        Ok(data) => data.claims,
        Err(error) => return Some(format!("JWT: {error}")),
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    if claims["exp"].as_u64().unwrap_or(u64::MAX) > now + 24 * 3600 {
        return Some("exp more than 24 hours ahead".into());
    }
    let subject = claims["sub"].as_str().unwrap_or_default();
    if !(subject.starts_with("mailto:") || subject.starts_with("https:")) {
        return Some("sub is not a contact URL".into());
    }
    None
}

async fn receive(
    State(shared): State<Arc<Shared>>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let headers: HashMap<String, String> = headers
        .iter()
        .map(|(name, value)| (name.as_str().to_owned(), value.to_str().unwrap_or_default().to_owned()))
        .collect();
    let header = |name: &str| headers.get(name).cloned().unwrap_or_default();
    let refuse = |status: StatusCode, reason: String| {
        shared.refused.lock().unwrap().push(reason);
        status.into_response()
    };
    if let Some(reason) = vapid_error(&shared, &header("authorization")) {
        return refuse(StatusCode::FORBIDDEN, reason);
    }
    if header("authorization").is_empty() {
        return refuse(StatusCode::UNAUTHORIZED, "no VAPID authorization".into());
    }
    if header("content-encoding") != "aes128gcm" || header("ttl").parse::<u64>().is_err() {
        return refuse(StatusCode::BAD_REQUEST, "content-encoding or TTL".into());
    }
    if !matches!(header("urgency").as_str(), "" | "very-low" | "low" | "normal" | "high") {
        return refuse(StatusCode::BAD_REQUEST, "urgency".into());
    }
    let topic = header("topic");
    if topic.len() > 32 || !topic.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return refuse(StatusCode::BAD_REQUEST, "topic".into());
    }
    if body.len() > 4096 {
        return refuse(StatusCode::PAYLOAD_TOO_LARGE, "over 4096 bytes".into());
    }
    if shared.gone.lock().unwrap().contains(&id) {
        return refuse(StatusCode::GONE, "subscription expired".into());
    }
    let Some(browser) = shared.browsers.lock().unwrap().get(&id).cloned() else {
        return refuse(StatusCode::NOT_FOUND, "no such subscription".into());
    };
    let plain = match decrypt(&browser, &body) {
        Ok(plain) => plain,
        Err(error) => return refuse(StatusCode::BAD_REQUEST, error),
    };
    let payload: Value = serde_json::from_slice(&plain).unwrap();
    shared.delivered.lock().unwrap().push(Delivered {
        browser: id,
        headers: headers.clone(),
        payload,
        raw: body.to_vec(),
        at: std::time::Instant::now(),
    });
    if let Some((status, retry_after)) = shared.script.lock().unwrap().pop_front() {
        let mut response = status.into_response();
        if let Some(after) = retry_after {
            response.headers_mut().insert("retry-after", after.parse().unwrap());
        }
        return response;
    }
    (StatusCode::CREATED, [("location", format!("{}/message/{}", shared.origin.lock().unwrap(), uuid::Uuid::now_v7()))])
        .into_response()
}

impl FakeWebPush {
    /// Starts the push service; pushes must carry `vapid_public` (base64url).
    pub async fn start(vapid_public: &str) -> Self {
        let shared = Arc::new(Shared::default());
        *shared.vapid_public.lock().unwrap() = vapid_public.to_owned();
        let app = axum::Router::new().route("/push/{id}", axum::routing::post(receive)).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let origin = format!("http://{address}");
        *shared.origin.lock().unwrap() = origin.clone();
        Self { base: origin, shared }
    }

    /// A new browser subscribed at this service.
    pub fn subscribe(&self, name: &str) -> Browser {
        let private = loop {
            if let Ok(key) = SecretKey::from_slice(&rand::random::<[u8; 32]>()) {
                break key;
            }
        };
        let auth: [u8; 16] = rand::random();
        let subscription = pb::WebPushSubscription {
            endpoint: format!("{}/push/{name}", self.base),
            p256dh: URL_SAFE_NO_PAD.encode(private.public_key().to_encoded_point(false).as_bytes()),
            auth: URL_SAFE_NO_PAD.encode(auth),
        };
        let browser = Browser { subscription, private, auth };
        self.shared.browsers.lock().unwrap().insert(name.to_owned(), browser.clone());
        browser
    }

    pub fn delivered(&self) -> Vec<Delivered> {
        self.shared.delivered.lock().unwrap().clone()
    }

    pub fn refused(&self) -> Vec<String> {
        self.shared.refused.lock().unwrap().clone()
    }

    pub fn script(&self, answers: &[(StatusCode, Option<&'static str>)]) {
        self.shared.script.lock().unwrap().extend(answers.iter().copied());
    }

    pub fn expire(&self, name: &str) {
        self.shared.gone.lock().unwrap().insert(name.to_owned());
    }
}
