//! Webhooks for integrations: a JSON POST to the device's https URL,
//! signed the Standard Webhooks way (`webhook-id`, `webhook-timestamp`,
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`,
//! keyed by the registration's `whsec_` secret). The id is the job id, so a
//! receiver can drop repeats.

use async_trait::async_trait;
use base64::{Engine as _, engine::general_purpose::STANDARD};
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use serde_json::json;
use sha2::Sha256;

use super::{Outcome, Provider, Push, send_for_status};
use crate::{
    guard::{EgressOptions, Guard},
    store::{Device, JobKind},
};

const SECRET_PREFIX: &str = "whsec_";

/// A new signing secret for a webhook registration.
pub fn new_secret() -> String {
    let key: [u8; 32] = rand::random();
    format!("{SECRET_PREFIX}{}", STANDARD.encode(key))
}

/// The `webhook-signature` value for this id, timestamp and body.
pub fn signature(secret: &str, id: &str, timestamp: u64, body: &[u8]) -> Result<String, String> {
    let key = STANDARD
        .decode(secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret))
        .map_err(|_| "the webhook secret is not base64".to_owned())?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|error| error.to_string())?;
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    Ok(format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes())))
}

/// The JSON a webhook receives.
pub fn body(device: &Device, push: &Push, timestamp: std::time::SystemTime) -> Vec<u8> {
    let mut data = json!({
        "push_id": push.id.to_string(),
        "user_id": device.user_id,
        "device_id": device.device_id,
        "conversation_id": push.conversation_id.to_string(),
        "seq": push.seq,
        "badge": push.badge,
    });
    if let Some(preview) = &push.preview {
        data["sender_id"] = json!(preview.sender_id);
        data["title"] = json!(preview.title);
        data["body"] = json!(preview.body);
    }
    let kind = match push.kind {
        JobKind::Notify => "message.created",
        JobKind::Retract => "message.read",
    };
    let payload = json!({
        "type": kind,
        "timestamp": humantime::format_rfc3339_millis(timestamp).to_string(),
        "data": data,
    });
    serde_json::to_vec(&payload).expect("JSON values serialize")
}

pub struct Webhook {
    guard: Guard,
    client: reqwest::Client,
    max_response_bytes: usize,
}

impl Webhook {
    pub fn new(guard: Guard, options: &EgressOptions) -> Self {
        Self { client: guard.client(options), guard, max_response_bytes: options.max_response_bytes }
    }
}

#[async_trait]
impl Provider for Webhook {
    fn name(&self) -> &'static str {
        "webhook"
    }

    async fn send(&self, device: &Device, push: &Push) -> Outcome {
        // Checked again at each send: the allow-list may have changed since
        // the registration, and literal addresses never reach the resolver.
        let url = match self.guard.check_url(&device.token) {
            Ok(url) => url,
            Err(refused) => return Outcome::Refused(refused.to_string()),
        };
        let now = std::time::SystemTime::now();
        let timestamp = now.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        let body = body(device, push, now);
        let id = push.id.to_string();
        let signature = match signature(&device.secret, &id, timestamp, &body) {
            Ok(signature) => signature,
            Err(error) => return Outcome::Refused(error),
        };
        let request = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body);
        send_for_status(request, &[StatusCode::GONE], self.max_response_bytes).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_standard_webhooks_one() {
        // The example of the Standard Webhooks specification
        // (github.com/standard-webhooks/standard-webhooks, spec/standard-webhooks.md).
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        let signed = signature(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body).unwrap();
        assert_eq!(signed, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(signature("whsec_not base64!", "id", 1, body).is_err());
    }

    #[test]
    fn a_new_secret_is_32_random_bytes() {
        let (a, b) = (new_secret(), new_secret());
        assert_ne!(a, b);
        assert_eq!(STANDARD.decode(a.strip_prefix(SECRET_PREFIX).unwrap()).unwrap().len(), 32);
    }
}
