//! Firebase Cloud Messaging, HTTP v1 API: `POST
//! /v1/projects/{project}/messages:send` with an OAuth 2.0 access token.
//! The token comes from the service account's JWT grant (RFC 7523): an
//! RS256 assertion (`iss` = the account, `scope` = firebase.messaging,
//! `aud` = the token URI, one hour) posted to the account's `token_uri`;
//! it is reused until five minutes before it expires, or dropped at once
//! when FCM answers 401.
//!
//! A notification's Android part has the conversation as `collapse_key`
//! and `tag` (a newer one replaces the shown one) and the badge as
//! `notification_count`; a retraction is a data-only message with the same
//! collapse key, which the app handles by clearing the conversation's
//! notification. FCM's UNREGISTERED error removes the registration.

use std::{
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Mutex;

use super::{Apps, Outcome, Provider, Push, classify, transport_failure};
use crate::{
    guard::bounded_body,
    store::{Device, JobKind},
};

const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// An access token is replaced this long before Google says it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(5 * 60);
/// FCM's limit on a message's payload.
pub const MAX_PAYLOAD_BYTES: usize = 4096;

/// `notify.fcm`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FcmOptions {
    /// `https://fcm.googleapis.com`.
    pub endpoint: String,
    /// The Firebase projects pushed to, by project id (a device's `app_id`).
    /// None: FCM devices go to the log provider.
    pub apps: Vec<FcmApp>,
    /// A root certificate (PEM) trusted for the endpoint and the token URI
    /// besides the public ones (a relay inside the cluster; tests).
    pub ca_file: Option<PathBuf>,
    /// How long FCM keeps an undelivered message (`android.ttl`).
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
}

impl Default for FcmOptions {
    fn default() -> Self {
        Self {
            endpoint: "https://fcm.googleapis.com".into(),
            apps: Vec::new(),
            ca_file: None,
            ttl: Duration::from_secs(24 * 3600),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FcmApp {
    pub project_id: String,
    /// The service account's JSON key file. Reloaded on change.
    pub service_account_file: PathBuf,
}

impl super::App for FcmApp {
    type Loaded = FcmAccount;

    fn id(&self) -> &str {
        &self.project_id
    }

    fn file(&self) -> &PathBuf {
        &self.service_account_file
    }

    fn parse(&self, text: &str) -> Result<FcmAccount, String> {
        FcmAccount::parse(self, text)
    }
}

/// The fields of a service account key file that the grant uses.
#[derive(Deserialize)]
struct ServiceAccountFile {
    client_email: String,
    private_key: String,
    #[serde(default)]
    private_key_id: String,
    token_uri: String,
}

/// One project's account and the access token it holds.
pub struct FcmAccount {
    project_id: String,
    client_email: String,
    key_id: String,
    key: EncodingKey,
    token_uri: String,
    token: Mutex<Option<(String, Instant)>>,
}

impl FcmAccount {
    pub fn parse(app: &FcmApp, json: &str) -> Result<Self, String> {
        let file: ServiceAccountFile =
            serde_json::from_str(json).map_err(|error| format!("not a service account key file: {error}"))?;
        let key = EncodingKey::from_rsa_pem(file.private_key.as_bytes())
            .map_err(|error| format!("the service account's private_key is not an RSA key: {error}"))?;
        Ok(Self {
            project_id: app.project_id.clone(),
            client_email: file.client_email,
            key_id: file.private_key_id,
            key,
            token_uri: file.token_uri,
            token: Mutex::new(None),
        })
    }

    /// The signed grant assertion.
    fn assertion(&self) -> Result<String, String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let claims = json!({
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": now,
            "exp": now + 3600,
        });
        let mut header = Header::new(Algorithm::RS256);
        if !self.key_id.is_empty() {
            header.kid = Some(self.key_id.clone());
        }
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(|error| error.to_string())
    }

    /// A live access token, fetched when there is none (one fetch at a time).
    async fn access_token(&self, client: &reqwest::Client, max_response_bytes: usize) -> Result<String, Outcome> {
        let mut cached = self.token.lock().await;
        if let Some((token, until)) = cached.as_ref()
            && Instant::now() < *until
        {
            return Ok(token.clone());
        }
        let assertion = self.assertion().map_err(Outcome::Refused)?;
        let form = [("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"), ("assertion", assertion.as_str())];
        let response =
            client.post(&self.token_uri).form(&form).send().await.map_err(|error| transport_failure(&error))?;
        let (status, headers) = (response.status(), response.headers().clone());
        let body = bounded_body(response, max_response_bytes).await;
        if !status.is_success() {
            // A refused grant (a revoked key) does not heal by retrying soon,
            // but a reloaded key file may fix it: retried on the backoff.
            return Err(match classify(status, &headers, &[]) {
                Outcome::Retry { after, .. } => {
                    Outcome::Retry { after, reason: format!("token endpoint: HTTP {status}") }
                }
                _ => Outcome::Retry { after: None, reason: format!("token grant refused: HTTP {status}") },
            });
        }
        #[derive(Deserialize)]
        struct Granted {
            access_token: String,
            expires_in: u64,
        }
        let granted: Granted = serde_json::from_slice(&body)
            .map_err(|_| Outcome::Retry { after: None, reason: "token endpoint: unreadable answer".into() })?;
        let lifetime = Duration::from_secs(granted.expires_in).saturating_sub(TOKEN_MARGIN);
        *cached = Some((granted.access_token.clone(), Instant::now() + lifetime));
        Ok(granted.access_token)
    }

    async fn forget_token(&self) {
        *self.token.lock().await = None;
    }
}

/// The `message` FCM sends to the device `token`.
pub fn message(token: &str, push: &Push, ttl: Duration) -> serde_json::Value {
    let conversation = push.conversation_id.to_string();
    let kind = match push.kind {
        JobKind::Notify => "message",
        JobKind::Retract => "read",
    };
    // Data values must be strings.
    let data = json!({ "type": kind, "conversation_id": conversation, "seq": push.seq.to_string(), "badge": push.badge.to_string() });
    let ttl = format!("{}s", ttl.as_secs());
    match push.kind {
        JobKind::Notify => {
            let (title, body) = match &push.preview {
                Some(preview) if preview.title.is_empty() => (preview.sender_id.clone(), preview.body.clone()),
                Some(preview) => (preview.title.clone(), format!("{}: {}", preview.sender_id, preview.body)),
                None => ("New message".to_owned(), String::new()),
            };
            let mut notification = json!({ "title": title });
            if !body.is_empty() {
                notification["body"] = json!(body);
            }
            json!({ "message": {
                "token": token,
                "notification": notification,
                "data": data,
                "android": {
                    "collapse_key": conversation,
                    "priority": "high",
                    "ttl": ttl,
                    "notification": { "tag": conversation, "notification_count": push.badge },
                },
            }})
        }
        JobKind::Retract => json!({ "message": {
            "token": token,
            "data": data,
            "android": { "collapse_key": conversation, "priority": "normal", "ttl": ttl },
        }}),
    }
}

pub struct Fcm {
    client: reqwest::Client,
    endpoint: String,
    ttl: Duration,
    accounts: Apps<FcmAccount>,
    max_response_bytes: usize,
}

impl Fcm {
    pub fn new(
        client: reqwest::Client,
        options: &FcmOptions,
        accounts: Apps<FcmAccount>,
        max_response_bytes: usize,
    ) -> Self {
        Self {
            client,
            endpoint: options.endpoint.trim_end_matches('/').to_owned(),
            ttl: options.ttl,
            accounts,
            max_response_bytes,
        }
    }
}

/// What FCM says went wrong: `error.status` and the FcmError detail's `errorCode`.
fn error_codes(body: &[u8]) -> (String, String) {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let status = value["error"]["status"].as_str().unwrap_or_default().to_owned();
    let code = value["error"]["details"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|detail| detail["errorCode"].as_str())
        .unwrap_or_default()
        .to_owned();
    (status, code)
}

#[async_trait]
impl Provider for Fcm {
    fn name(&self) -> &'static str {
        "fcm"
    }

    async fn send(&self, device: &Device, push: &Push) -> Outcome {
        let Some(accounts) = self.accounts.get() else {
            return Outcome::Retry { after: None, reason: "no FCM service account loaded".into() };
        };
        let Some(account) = super::app_entry(&accounts, &device.app_id) else {
            return Outcome::Refused(format!("no FCM credentials for project {:?}", device.app_id));
        };
        let body = message(&device.token, push, self.ttl);
        let size = body.to_string().len();
        if size > MAX_PAYLOAD_BYTES {
            return Outcome::Refused(format!("a message of {size} bytes is over FCM's limit"));
        }
        let token = match account.access_token(&self.client, self.max_response_bytes).await {
            Ok(token) => token,
            Err(outcome) => return outcome,
        };
        let url = format!("{}/v1/projects/{}/messages:send", self.endpoint, account.project_id);
        let response = match self.client.post(url).bearer_auth(token).json(&body).send().await {
            Ok(response) => response,
            Err(error) => return transport_failure(&error),
        };
        let (status, headers) = (response.status(), response.headers().clone());
        if status.is_success() {
            bounded_body(response, self.max_response_bytes).await;
            return Outcome::Delivered;
        }
        let (error_status, code) = error_codes(&bounded_body(response, self.max_response_bytes).await);
        let reason = format!("HTTP {} {error_status} {code}", status.as_u16()).trim_end().to_owned();
        // Only FCM's own verdict removes a registration: a 404 without it
        // (a wrong project or endpoint) is the operator's to fix.
        if code == "UNREGISTERED" {
            return Outcome::Gone(reason);
        }
        if status == StatusCode::UNAUTHORIZED {
            account.forget_token().await;
            return Outcome::Retry { after: None, reason };
        }
        match classify(status, &headers, &[]) {
            Outcome::Retry { after, .. } => Outcome::Retry { after, reason },
            Outcome::Refused(_) => Outcome::Refused(reason),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unregistered_is_read_from_the_error_details() {
        let body = br#"{"error":{"code":404,"status":"NOT_FOUND","details":[
            {"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#;
        assert_eq!(error_codes(body), ("NOT_FOUND".into(), "UNREGISTERED".into()));
        assert_eq!(error_codes(b"<html>"), (String::new(), String::new()));
    }

    #[test]
    fn a_retraction_is_data_only_with_the_conversation_as_collapse_key() {
        let push = Push {
            id: uuid::Uuid::now_v7(),
            kind: JobKind::Retract,
            conversation_id: uuid::Uuid::now_v7(),
            seq: 9,
            preview: None,
            badge: 0,
        };
        let message = message("tok", &push, Duration::from_secs(60));
        assert!(message["message"].get("notification").is_none());
        assert_eq!(message["message"]["data"]["seq"], "9");
        assert_eq!(message["message"]["android"]["collapse_key"], push.conversation_id.to_string());
        assert_eq!(message["message"]["android"]["ttl"], "60s");
    }
}
