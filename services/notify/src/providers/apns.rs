//! Apple Push Notification service over HTTP/2, authenticated with a
//! provider token: an ES256 JWT (`kid` = key id, `iss` = team id, `iat`)
//! signed with the app's `.p8` key, made again before it is 50 minutes old
//! (Apple refuses tokens older than an hour and more than one new token
//! every 20 minutes), or at once when APNs answers that it expired.
//!
//! Each push carries `apns-id` (the job id: APNs reports it back, and a
//! retry is the same notification), `apns-topic` (the bundle id),
//! `apns-push-type`, `apns-priority`, `apns-expiration` and
//! `apns-collapse-id` (the conversation: a newer push replaces the shown one);
//! `thread-id` groups a conversation's notifications. A retraction is a
//! background push with the same collapse id that carries the new badge.

use std::{
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Apps, Outcome, Provider, Push, classify, transport_failure};
use crate::{
    guard::bounded_body,
    store::{Device, JobKind},
};

/// Apple's limit on a notification's JSON.
pub const MAX_PAYLOAD_BYTES: usize = 4096;
/// A provider token is made again when it is this old.
const TOKEN_REFRESH: Duration = Duration::from_secs(50 * 60);

/// `notify.apns`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApnsOptions {
    /// `https://api.push.apple.com`, or `https://api.sandbox.push.apple.com`
    /// for development builds of the apps.
    pub endpoint: String,
    /// The apps pushed to, by bundle id (a device's `app_id`). None: APNs
    /// devices go to the log provider.
    pub apps: Vec<ApnsApp>,
    /// A root certificate (PEM) trusted for the endpoint besides the public
    /// ones (a relay inside the cluster; tests).
    pub ca_file: Option<PathBuf>,
    /// How long APNs keeps trying to reach an offline device (`apns-expiration`).
    #[serde(with = "humantime_serde")]
    pub expiration: Duration,
}

impl Default for ApnsOptions {
    fn default() -> Self {
        Self {
            endpoint: "https://api.push.apple.com".into(),
            apps: Vec::new(),
            ca_file: None,
            expiration: Duration::from_secs(24 * 3600),
        }
    }
}

/// One app's token-based credentials.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApnsApp {
    pub bundle_id: String,
    pub team_id: String,
    pub key_id: String,
    /// The `AuthKey_<key id>.p8` file (PKCS#8 PEM). Reloaded on change.
    pub key_file: PathBuf,
}

impl super::App for ApnsApp {
    type Loaded = ApnsKey;

    fn id(&self) -> &str {
        &self.bundle_id
    }

    fn file(&self) -> &PathBuf {
        &self.key_file
    }

    fn parse(&self, text: &str) -> Result<ApnsKey, String> {
        ApnsKey::parse(self, text)
    }
}

/// An app's signing key and the provider token made with it.
pub struct ApnsKey {
    app: ApnsApp,
    key: EncodingKey,
    token: Mutex<Option<(String, Instant)>>,
}

impl ApnsKey {
    pub fn parse(app: &ApnsApp, pem: &str) -> Result<Self, String> {
        let key = EncodingKey::from_ec_pem(pem.as_bytes()).map_err(|error| format!("not an ES256 key: {error}"))?;
        Ok(Self { app: app.clone(), key, token: Mutex::new(None) })
    }

    /// The current provider token, made anew when it is due.
    fn token(&self) -> Result<String, String> {
        let mut cached = self.token.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((token, made)) = cached.as_ref()
            && made.elapsed() < TOKEN_REFRESH
        {
            return Ok(token.clone());
        }
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.app.key_id.clone());
        let issued_at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let claims = json!({ "iss": self.app.team_id, "iat": issued_at });
        let token = jsonwebtoken::encode(&header, &claims, &self.key).map_err(|error| error.to_string())?;
        *cached = Some((token.clone(), Instant::now()));
        Ok(token)
    }

    /// APNs said the token expired or is invalid: the next push makes one.
    fn forget_token(&self) {
        *self.token.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
    }
}

/// The notification's JSON: content-free unless the push has a preview.
pub fn payload(push: &Push) -> serde_json::Value {
    let conversation = push.conversation_id.to_string();
    let aps = match (push.kind, &push.preview) {
        (JobKind::Notify, None) => json!({
            "alert": { "title": "New message" },
            "badge": push.badge,
            "sound": "default",
            "thread-id": conversation,
            "mutable-content": 1,
        }),
        (JobKind::Notify, Some(preview)) => {
            let title = if preview.title.is_empty() { preview.sender_id.clone() } else { preview.title.clone() };
            json!({
                "alert": { "title": title, "subtitle": preview.sender_id, "body": preview.body },
                "badge": push.badge,
                "sound": "default",
                "thread-id": conversation,
                "mutable-content": 1,
            })
        }
        (JobKind::Retract, _) => json!({ "content-available": 1, "badge": push.badge }),
    };
    let kind = match push.kind {
        JobKind::Notify => "message",
        JobKind::Retract => "read",
    };
    json!({ "aps": aps, "type": kind, "conversation_id": conversation, "seq": push.seq })
}

pub struct Apns {
    client: reqwest::Client,
    endpoint: String,
    expiration: Duration,
    keys: Apps<ApnsKey>,
    max_response_bytes: usize,
}

impl Apns {
    pub fn new(client: reqwest::Client, options: &ApnsOptions, keys: Apps<ApnsKey>, max_response_bytes: usize) -> Self {
        Self {
            client,
            endpoint: options.endpoint.trim_end_matches('/').to_owned(),
            expiration: options.expiration,
            keys,
            max_response_bytes,
        }
    }
}

#[derive(Deserialize)]
struct Failure {
    #[serde(default)]
    reason: String,
}

#[async_trait]
impl Provider for Apns {
    fn name(&self) -> &'static str {
        "apns"
    }

    async fn send(&self, device: &Device, push: &Push) -> Outcome {
        let Some(keys) = self.keys.get() else {
            return Outcome::Retry { after: None, reason: "no APNs key loaded".into() };
        };
        let Some(key) = super::app_entry(&keys, &device.app_id) else {
            return Outcome::Refused(format!("no APNs credentials for app {:?}", device.app_id));
        };
        let token = match key.token() {
            Ok(token) => token,
            Err(error) => return Outcome::Refused(error),
        };
        let body = match serde_json::to_vec(&payload(push)) {
            Ok(body) if body.len() <= MAX_PAYLOAD_BYTES => body,
            Ok(body) => return Outcome::Refused(format!("a payload of {} bytes is over APNs' limit", body.len())),
            Err(error) => return Outcome::Refused(error.to_string()),
        };
        let (push_type, priority) = match push.kind {
            JobKind::Notify => ("alert", "10"),
            // Background pushes must have priority 5.
            JobKind::Retract => ("background", "5"),
        };
        let expiration = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default() + self.expiration;
        let request = self
            .client
            .post(format!("{}/3/device/{}", self.endpoint, device.token))
            .header("authorization", format!("bearer {token}"))
            .header("apns-id", push.id.hyphenated().to_string())
            .header("apns-topic", &key.app.bundle_id)
            .header("apns-push-type", push_type)
            .header("apns-priority", priority)
            .header("apns-expiration", expiration.as_secs().to_string())
            .header("apns-collapse-id", push.conversation_id.to_string())
            .header("content-type", "application/json")
            .body(body);
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => return transport_failure(&error),
        };
        let (status, headers) = (response.status(), response.headers().clone());
        if status.is_success() {
            return Outcome::Delivered;
        }
        let text = bounded_body(response, self.max_response_bytes).await;
        let reason = serde_json::from_slice::<Failure>(&text).map(|failure| failure.reason).unwrap_or_default();
        match (status, reason.as_str()) {
            (StatusCode::GONE, _) | (StatusCode::BAD_REQUEST, "BadDeviceToken" | "DeviceTokenNotForTopic") => {
                Outcome::Gone(format!("HTTP {} {reason}", status.as_u16()))
            }
            (StatusCode::FORBIDDEN, "ExpiredProviderToken" | "InvalidProviderToken") => {
                key.forget_token();
                Outcome::Retry { after: None, reason: format!("HTTP 403 {reason}") }
            }
            _ => match classify(status, &headers, &[]) {
                Outcome::Retry { after, .. } => {
                    Outcome::Retry { after, reason: format!("HTTP {} {reason}", status.as_u16()) }
                }
                Outcome::Refused(_) => Outcome::Refused(format!("HTTP {} {reason}", status.as_u16())),
                other => other,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Preview;

    fn push(kind: JobKind, preview: Option<Preview>) -> Push {
        Push { id: uuid::Uuid::now_v7(), kind, conversation_id: uuid::Uuid::now_v7(), seq: 7, preview, badge: 3 }
    }

    #[test]
    fn a_content_free_alert_names_no_sender_and_a_retraction_is_silent() {
        let alert = payload(&push(JobKind::Notify, None));
        assert_eq!(alert["aps"]["alert"], json!({ "title": "New message" }));
        assert_eq!(alert["aps"]["badge"], 3);
        assert_eq!(alert["seq"], 7);
        let preview = Preview { sender_id: "alice".into(), title: String::new(), body: "hi".into() };
        let shown = payload(&push(JobKind::Notify, Some(preview)));
        assert_eq!(shown["aps"]["alert"]["body"], "hi");
        let retraction = payload(&push(JobKind::Retract, None));
        assert_eq!(retraction["aps"], json!({ "content-available": 1, "badge": 3 }));
        assert!(retraction["aps"].get("alert").is_none() && retraction["aps"].get("sound").is_none());
    }
}
