//! A fake FCM HTTP v1 API and its OAuth 2.0 token endpoint, over TLS. The
//! token endpoint grants an access token only for a JWT-bearer assertion
//! that verifies with the service account's public key and names the
//! account, the messaging scope and the token URI as audience, for at most
//! an hour. The send endpoint takes only a token it granted, for the
//! project, and refuses what FCM refuses (a missing token, non-string data
//! values, an oversized message). Tokens marked gone answer UNREGISTERED.

use std::{
    collections::{HashSet, VecDeque},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use axum::{
    Form, Json,
    extract::{Path as UrlPath, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::tls::{Protocols, serve};

pub const PROJECT: &str = "chat-example";
const CLIENT_EMAIL: &str = "push@chat-example.iam.gserviceaccount.com";
const PRIVATE_KEY: &str = include_str!("../../../../crates/platform/src/auth/testdata/rs256_private.pem");
const PUBLIC_KEY: &str = include_str!("../../../../crates/platform/src/auth/testdata/rs256_public.pem");

#[derive(Default)]
struct Shared {
    token_uri: Mutex<String>,
    granted: Mutex<HashSet<String>>,
    grants: Mutex<u32>,
    accepted: Mutex<Vec<Value>>,
    refused: Mutex<Vec<String>>,
    script: Mutex<VecDeque<(StatusCode, &'static str)>>,
    gone: Mutex<HashSet<String>>,
}

pub struct FakeFcm {
    pub url: String,
    pub ca_file: PathBuf,
    shared: Arc<Shared>,
}

fn error(shared: &Shared, status: StatusCode, code: &str, fcm_code: Option<&str>) -> Response {
    shared.refused.lock().unwrap().push(format!("{code} {}", fcm_code.unwrap_or_default()).trim().to_owned());
    let details: Vec<Value> = fcm_code
        .map(|code| json!({ "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code }))
        .into_iter()
        .collect();
    let body = json!({ "error": { "code": status.as_u16(), "message": code, "status": code, "details": details } });
    (status, Json(body)).into_response()
}

#[derive(Deserialize)]
struct Grant {
    grant_type: String,
    assertion: String,
}

async fn token(State(shared): State<Arc<Shared>>, Form(grant): Form<Grant>) -> Response {
    let refuse = |reason: &str| {
        shared.refused.lock().unwrap().push(reason.to_owned());
        (StatusCode::BAD_REQUEST, Json(json!({ "error": "invalid_grant", "error_description": reason })))
            .into_response()
    };
    if grant.grant_type != "urn:ietf:params:oauth:grant-type:jwt-bearer" {
        return refuse("unsupported grant type");
    }
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[shared.token_uri.lock().unwrap().clone()]);
    validation.set_issuer(&[CLIENT_EMAIL]);
    validation.set_required_spec_claims(&["exp", "iat", "aud", "iss"]);
    let key = DecodingKey::from_rsa_pem(PUBLIC_KEY.as_bytes()).unwrap();
    let claims = match jsonwebtoken::decode::<Value>(&grant.assertion, &key, &validation) {
        Ok(data) => data.claims,
        Err(error) => return refuse(&format!("assertion: {error}")),
    };
    if claims["scope"] != "https://www.googleapis.com/auth/firebase.messaging" {
        return refuse("scope");
    }
    let (issued, expires) = (claims["iat"].as_u64().unwrap_or(0), claims["exp"].as_u64().unwrap_or(u64::MAX));
    if expires.saturating_sub(issued) > 3600 {
        return refuse("an assertion lives an hour at most");
    }
    let access = format!("ya29.{}", uuid::Uuid::now_v7().simple());
    shared.granted.lock().unwrap().insert(access.clone());
    *shared.grants.lock().unwrap() += 1;
    Json(json!({ "access_token": access, "expires_in": 3599, "token_type": "Bearer" })).into_response()
}

async fn send(
    State(shared): State<Arc<Shared>>,
    UrlPath((project, method)): UrlPath<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if !bearer.is_some_and(|token| shared.granted.lock().unwrap().contains(token)) {
        return error(&shared, StatusCode::UNAUTHORIZED, "UNAUTHENTICATED", None);
    }
    if method != "messages:send" {
        return error(&shared, StatusCode::NOT_FOUND, "NOT_FOUND", None);
    }
    if project != PROJECT {
        return error(&shared, StatusCode::FORBIDDEN, "PERMISSION_DENIED", Some("SENDER_ID_MISMATCH"));
    }
    let message = &body["message"];
    let Some(token) = message["token"].as_str() else {
        return error(&shared, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", Some("INVALID_ARGUMENT"));
    };
    let strings = message["data"].as_object().is_none_or(|data| data.values().all(Value::is_string));
    if !strings || body.to_string().len() > 4096 {
        return error(&shared, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", Some("INVALID_ARGUMENT"));
    }
    if shared.gone.lock().unwrap().contains(token) {
        return error(&shared, StatusCode::NOT_FOUND, "NOT_FOUND", Some("UNREGISTERED"));
    }
    shared.accepted.lock().unwrap().push(body.clone());
    if let Some((status, code)) = shared.script.lock().unwrap().pop_front() {
        return error(&shared, status, code, None);
    }
    Json(json!({ "name": format!("projects/{PROJECT}/messages/{}", uuid::Uuid::now_v7().simple()) })).into_response()
}

impl FakeFcm {
    /// Starts the fake; the service account's key file is written into `dir`.
    pub async fn start(dir: &Path) -> (Self, PathBuf) {
        let shared = Arc::new(Shared::default());
        let app = axum::Router::new()
            .route("/token", axum::routing::post(token))
            // "messages:send" is one segment.
            .route("/v1/projects/{project}/{method}", axum::routing::post(send))
            .with_state(shared.clone());
        let (address, ca_file) = serve(app, Protocols::Any, dir).await;
        let url = format!("https://localhost:{}", address.port());
        *shared.token_uri.lock().unwrap() = format!("{url}/token");
        let account = json!({
            "type": "service_account",
            "project_id": PROJECT,
            "private_key_id": "0123456789abcdef",
            "private_key": PRIVATE_KEY,
            "client_email": CLIENT_EMAIL,
            "token_uri": format!("{url}/token"),
        });
        let file = dir.join("service-account.json");
        std::fs::write(&file, account.to_string()).unwrap();
        (Self { url, ca_file, shared }, file)
    }

    pub fn accepted(&self) -> Vec<Value> {
        self.shared.accepted.lock().unwrap().clone()
    }

    pub fn refused(&self) -> Vec<String> {
        self.shared.refused.lock().unwrap().clone()
    }

    pub fn grants(&self) -> u32 {
        *self.shared.grants.lock().unwrap()
    }

    /// Forgets every access token granted (as if they expired early).
    pub fn revoke_tokens(&self) {
        self.shared.granted.lock().unwrap().clear();
    }

    pub fn script(&self, answers: &[(StatusCode, &'static str)]) {
        self.shared.script.lock().unwrap().extend(answers.iter().copied());
    }

    pub fn unregister(&self, token: &str) {
        self.shared.gone.lock().unwrap().insert(token.to_owned());
    }
}
