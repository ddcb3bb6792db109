//! A fake APNs: HTTP/2 only, over TLS, refusing what Apple refuses: a
//! provider token that does not verify with the team's key (ES256, `kid`,
//! `iss`, an `iat` within the hour), a wrong topic, a push type or priority
//! that do not go together, a malformed `apns-id` or collapse id, a payload
//! over 4 KiB. Tokens marked gone answer 410 Unregistered.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use axum::{
    body::to_bytes,
    extract::{Path as UrlPath, Request, State},
    http::{StatusCode, Version},
    response::{IntoResponse, Response},
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

use crate::tls::{Protocols, serve};

pub const TEAM: &str = "TEAM123456";
pub const KEY_ID: &str = "KEY1234567";
pub const BUNDLE: &str = "com.example.chat";

/// One push APNs accepted.
#[derive(Clone, Debug)]
pub struct Accepted {
    pub device_token: String,
    pub headers: HashMap<String, String>,
    pub body: Value,
}

#[derive(Default)]
struct Shared {
    /// The team key's public half (SPKI PEM): what provider tokens must verify with.
    public_key: Mutex<String>,
    accepted: Mutex<Vec<Accepted>>,
    /// Why requests were refused, in order.
    refused: Mutex<Vec<String>>,
    /// Answers to give before accepting (status, reason).
    script: Mutex<VecDeque<(StatusCode, &'static str)>>,
    gone: Mutex<HashSet<String>>,
}

pub struct FakeApns {
    pub url: String,
    pub ca_file: PathBuf,
    shared: Arc<Shared>,
}

fn refuse(shared: &Shared, status: StatusCode, reason: &str) -> Response {
    shared.refused.lock().unwrap().push(reason.to_owned());
    (status, axum::Json(json!({ "reason": reason }))).into_response()
}

/// What APNs checks of the provider token.
fn token_error(shared: &Shared, authorization: &str) -> Option<&'static str> {
    let token = authorization.strip_prefix("bearer ")?;
    let header = jsonwebtoken::decode_header(token).ok()?;
    if header.alg != Algorithm::ES256 || header.kid.as_deref() != Some(KEY_ID) {
        return Some("InvalidProviderToken");
    }
    let key = DecodingKey::from_ec_pem(shared.public_key.lock().unwrap().as_bytes()).unwrap();
    let mut validation = Validation::new(Algorithm::ES256);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    let Ok(claims) = jsonwebtoken::decode::<Value>(token, &key, &validation) else {
        return Some("InvalidProviderToken");
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let issued = claims.claims["iat"].as_u64().unwrap_or(0);
    if claims.claims["iss"] != TEAM {
        return Some("InvalidProviderToken");
    }
    if issued + 3600 < now || issued > now + 60 {
        return Some("ExpiredProviderToken");
    }
    None
}

async fn push(State(shared): State<Arc<Shared>>, UrlPath(device_token): UrlPath<String>, request: Request) -> Response {
    if request.version() != Version::HTTP_2 {
        return refuse(&shared, StatusCode::HTTP_VERSION_NOT_SUPPORTED, "HTTP/2 only");
    }
    let headers: HashMap<String, String> = request
        .headers()
        .iter()
        .map(|(name, value)| (name.as_str().to_owned(), value.to_str().unwrap_or_default().to_owned()))
        .collect();
    let header = |name: &str| headers.get(name).cloned().unwrap_or_default();
    match token_error(&shared, &header("authorization")) {
        None => {}
        Some(reason) if header("authorization").starts_with("bearer ") => {
            return refuse(&shared, StatusCode::FORBIDDEN, reason);
        }
        Some(_) => return refuse(&shared, StatusCode::FORBIDDEN, "MissingProviderToken"),
    }
    if header("apns-topic") != BUNDLE {
        return refuse(&shared, StatusCode::BAD_REQUEST, "BadTopic");
    }
    let canonical = uuid::Uuid::parse_str(&header("apns-id")).map(|id| id.hyphenated().to_string());
    if canonical.ok().as_deref() != Some(header("apns-id").as_str()) {
        return refuse(&shared, StatusCode::BAD_REQUEST, "BadMessageId");
    }
    if header("apns-collapse-id").len() > 64 {
        return refuse(&shared, StatusCode::BAD_REQUEST, "BadCollapseId");
    }
    if header("apns-expiration").parse::<u64>().is_err() {
        return refuse(&shared, StatusCode::BAD_REQUEST, "BadExpirationDate");
    }
    let body = to_bytes(request.into_body(), 64 * 1024).await.unwrap();
    if body.len() > 4096 {
        return refuse(&shared, StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge");
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return refuse(&shared, StatusCode::BAD_REQUEST, "BadPayload");
    };
    let background = body["aps"]["content-available"] == 1 && body["aps"].get("alert").is_none();
    match (header("apns-push-type").as_str(), header("apns-priority").as_str()) {
        ("alert", "10" | "5") if body["aps"].get("alert").is_some() => {}
        ("background", "5") if background => {}
        _ => return refuse(&shared, StatusCode::BAD_REQUEST, "InvalidPushType"),
    }
    if !(device_token.len() == 64 && device_token.chars().all(|c| c.is_ascii_hexdigit())) {
        return refuse(&shared, StatusCode::BAD_REQUEST, "BadDeviceToken");
    }
    if shared.gone.lock().unwrap().contains(&device_token) {
        return refuse(&shared, StatusCode::GONE, "Unregistered");
    }
    let scripted = shared.script.lock().unwrap().pop_front();
    shared.accepted.lock().unwrap().push(Accepted { device_token, headers: headers.clone(), body });
    if let Some((status, reason)) = scripted {
        // Counted as received (a retry will come), answered with the failure.
        return (status, axum::Json(json!({ "reason": reason }))).into_response();
    }
    (StatusCode::OK, [("apns-id", header("apns-id"))]).into_response()
}

impl FakeApns {
    /// Starts the fake; the team key's private half is written to `key_file`.
    pub async fn start(dir: &Path) -> (Self, PathBuf) {
        let (private, public) = crate::tls::p256_key();
        let key_file = dir.join(format!("AuthKey_{KEY_ID}.p8"));
        std::fs::write(&key_file, private).unwrap();
        let shared = Arc::new(Shared { public_key: Mutex::new(public), ..Shared::default() });
        let app = axum::Router::new().route("/3/device/{token}", axum::routing::post(push)).with_state(shared.clone());
        let (address, ca_file) = serve(app, Protocols::Http2, dir).await;
        (Self { url: format!("https://localhost:{}", address.port()), ca_file, shared }, key_file)
    }

    /// The team's key was replaced: tokens must verify with `public` now.
    pub fn rotate_key(&self, public: String) {
        *self.shared.public_key.lock().unwrap() = public;
    }

    pub fn accepted(&self) -> Vec<Accepted> {
        self.shared.accepted.lock().unwrap().clone()
    }

    pub fn refused(&self) -> Vec<String> {
        self.shared.refused.lock().unwrap().clone()
    }

    pub fn script(&self, answers: &[(StatusCode, &'static str)]) {
        self.shared.script.lock().unwrap().extend(answers.iter().copied());
    }

    pub fn unregister(&self, device_token: &str) {
        self.shared.gone.lock().unwrap().insert(device_token.to_owned());
    }
}
