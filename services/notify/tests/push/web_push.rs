//! Web Push: VAPID and RFC 8291 payloads a browser (and Python's
//! `http_ece`) can read, previews only where allowed, Retry-After, an
//! expired subscription.

use std::{path::Path, process::Stdio, time::Duration};

use axum::http::StatusCode;
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use messenger_notify::providers::web_push::{VapidKey, WebPushOptions};
use messenger_proto::v1 as pb;
use p256::pkcs8::EncodePrivateKey as _;
use tokio::io::AsyncWriteExt as _;

use crate::{conversation, eventually, fake_web_push::FakeWebPush, options, start};

async fn setup(dir: &Path) -> (FakeWebPush, crate::Notify) {
    setup_with(dir, options()).await
}

async fn setup_with(dir: &Path, base: messenger_notify::Options) -> (FakeWebPush, crate::Notify) {
    let (private, _) = crate::tls::p256_key();
    let key_file = dir.join("vapid.pem");
    std::fs::write(&key_file, &private).unwrap();
    let public = VapidKey::parse(&private).unwrap().public_key().to_owned();
    let fake = FakeWebPush::start(&public).await;
    let mut options = messenger_notify::Options {
        web_push: WebPushOptions {
            vapid_key_file: Some(key_file),
            subject: "mailto:ops@example.com".into(),
            ..WebPushOptions::default()
        },
        ..base
    };
    options.egress.allow_http = true;
    options.egress.allow_addresses = vec!["127.0.0.0/8".parse().unwrap()];
    (fake, start(options, dir).await)
}

fn device(id: &str, subscription: pb::WebPushSubscription, previews: bool) -> pb::PushDevice {
    pb::PushDevice {
        device_id: id.into(),
        platform: pb::PushPlatform::WebPush as i32,
        web_push: Some(subscription),
        previews,
        ..Default::default()
    }
}

/// What Python's http_ece decrypts of `body` (and whether the VAPID JWT verifies there).
async fn python_check(
    browser: &crate::fake_web_push::Browser,
    body: &[u8],
    authorization: &str,
    audience: &str,
) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let venv = std::process::Command::new("bash")
        .args(["scripts/python-venv.sh", "push", "services/notify/tests/push/requirements.txt"])
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(venv.status.success(), "{}", String::from_utf8_lossy(&venv.stderr));
    let python = Path::new(String::from_utf8(venv.stdout).unwrap().trim()).join("bin/python");
    let input = serde_json::json!({
        "body": URL_SAFE_NO_PAD.encode(body),
        "private_pem": browser.private.to_pkcs8_pem(Default::default()).unwrap().as_str(),
        "auth": URL_SAFE_NO_PAD.encode(browser.auth),
        "authorization": authorization,
        "audience": audience,
    });
    let mut child = tokio::process::Command::new(python)
        .arg(root.join("services/notify/tests/push/web_push_check.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.to_string().as_bytes()).await.unwrap();
    let output = child.wait_with_output().await.unwrap();
    assert!(output.status.success(), "http_ece: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn the_browser_and_python_http_ece_decrypt_the_push_and_previews_go_only_where_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, notify) = setup(dir.path()).await;
    let (laptop, phone) = (fake.subscribe("laptop"), fake.subscribe("phone"));
    notify.register("bob", device("laptop", laptop.subscription.clone(), true)).await;
    notify.register("bob", device("phone", phone.subscription.clone(), false)).await;
    let chat = conversation();
    notify.message("bob", &chat, 1, "héllo from alice").await;
    eventually("two pushes", || fake.delivered().len() == 2).await;
    let delivered = fake.delivered();
    let on = |name: &str| delivered.iter().find(|d| d.browser == name).unwrap().clone();
    let (shown, bare) = (on("laptop"), on("phone"));
    assert_eq!(shown.payload["body"], "héllo from alice");
    assert_eq!(shown.payload["sender_id"], "alice");
    assert_eq!(shown.payload["badge"], 1);
    assert!(bare.payload.get("body").is_none() && bare.payload.get("sender_id").is_none(), "{}", bare.payload);
    assert_eq!(bare.payload["conversation_id"], chat.as_str());
    for push in [&shown, &bare] {
        assert_eq!(push.headers["topic"], uuid::Uuid::parse_str(&chat).unwrap().simple().to_string());
        assert_eq!(push.headers["urgency"], "high");
        assert_eq!(push.headers["ttl"], "86400");
    }
    let independent = python_check(&laptop, &shown.raw, &shown.headers["authorization"], &fake.base).await;
    assert_eq!(serde_json::from_str::<serde_json::Value>(&independent).unwrap(), shown.payload);

    notify.read("bob", &chat, 1).await;
    eventually("two retractions", || fake.delivered().len() == 4).await;
    for retraction in &fake.delivered()[2..] {
        assert_eq!(retraction.payload["type"], "read", "the service worker closes the notification");
        assert_eq!(retraction.headers["topic"], shown.headers["topic"]);
    }
    assert!(fake.refused().is_empty(), "{:?}", fake.refused());
}

/// A worker looks for due jobs when one it stored is due (after the read
/// grace, after a retry's wait), not at its next poll: with a poll a minute
/// apart, both pushes leave on time.
#[tokio::test]
async fn a_push_leaves_when_it_is_due_not_at_the_next_poll() {
    let dir = tempfile::tempdir().unwrap();
    let grace = Duration::from_millis(300);
    let base = messenger_notify::Options { poll_interval: Duration::from_secs(60), read_grace: grace, ..options() };
    let (fake, notify) = setup_with(dir.path(), base).await;
    let browser = fake.subscribe("laptop");
    notify.register("bob", device("laptop", browser.subscription, false)).await;
    fake.script(&[(StatusCode::TOO_MANY_REQUESTS, Some("1"))]);
    let enqueued = std::time::Instant::now();
    notify.message("bob", &conversation(), 1, "x").await;
    eventually("the push after the read grace", || !fake.delivered().is_empty()).await;
    assert!(enqueued.elapsed() >= grace, "left before the read grace");
    eventually("its retry after Retry-After", || fake.delivered().len() == 2).await;
}

#[tokio::test]
async fn retry_after_is_honoured_and_an_expired_subscription_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, notify) = setup(dir.path()).await;
    let browser = fake.subscribe("laptop");
    notify.register("bob", device("laptop", browser.subscription, false)).await;
    fake.script(&[(StatusCode::TOO_MANY_REQUESTS, Some("1"))]);
    notify.message("bob", &conversation(), 1, "x").await;
    eventually("a retried push", || fake.delivered().len() == 2).await;
    let attempts = fake.delivered();
    assert!(attempts[1].at - attempts[0].at >= Duration::from_secs(1), "Retry-After: 1 honoured");
    fake.expire("laptop");
    notify.message("bob", &conversation(), 1, "y").await;
    eventually("410", || fake.refused().len() == 1).await;
    for _ in 0..50 {
        if notify.devices("bob").await.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the expired subscription is still registered");
}
