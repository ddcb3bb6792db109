//! APNs: alerts and retractions as Apple takes them, badge and collapse,
//! retries, dead tokens, a rotated key.

use std::time::Duration;

use axum::http::StatusCode;
use messenger_notify::providers::apns::{ApnsApp, ApnsOptions};
use messenger_proto::v1 as pb;

use crate::{
    conversation, eventually,
    fake_apns::{BUNDLE, FakeApns, KEY_ID, TEAM},
    options, start,
};

const PHONE: &str = "abababababababababababababababababababababababababababababababab";
const IPAD: &str = "cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd";

fn apns_options(fake: &FakeApns, key_file: std::path::PathBuf) -> messenger_notify::Options {
    messenger_notify::Options {
        apns: ApnsOptions {
            endpoint: fake.url.clone(),
            ca_file: Some(fake.ca_file.clone()),
            apps: vec![ApnsApp { bundle_id: BUNDLE.into(), team_id: TEAM.into(), key_id: KEY_ID.into(), key_file }],
            ..ApnsOptions::default()
        },
        ..options()
    }
}

fn device(id: &str, token: &str, app_id: &str) -> pb::PushDevice {
    pb::PushDevice {
        device_id: id.into(),
        platform: pb::PushPlatform::Apns as i32,
        token: token.into(),
        app_id: app_id.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn each_offline_device_gets_one_content_free_alert_then_a_silent_retraction() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, key_file) = FakeApns::start(dir.path()).await;
    let notify = start(apns_options(&fake, key_file), dir.path()).await;
    notify.register("bob", device("phone", PHONE, BUNDLE)).await;
    // No app id: the only app configured.
    notify.register("bob", device("ipad", IPAD, "")).await;
    let chat = conversation();

    assert_eq!(notify.message("bob", &chat, 1, "the body stays on the server").await, 2);
    eventually("two alerts", || fake.accepted().len() == 2).await;
    notify.message("bob", &chat, 2, "again").await;
    eventually("four alerts", || fake.accepted().len() == 4).await;
    let alerts = fake.accepted();
    let mut tokens: Vec<&str> = alerts.iter().map(|a| a.device_token.as_str()).collect();
    tokens.sort();
    assert_eq!(tokens, [PHONE, PHONE, IPAD, IPAD]);
    for alert in &alerts {
        assert_eq!(alert.headers["apns-push-type"], "alert");
        assert_eq!(alert.headers["apns-priority"], "10");
        assert_eq!(alert.headers["apns-topic"], BUNDLE);
        assert_eq!(alert.headers["apns-collapse-id"], chat, "one visible notification per conversation");
        assert_eq!(alert.body["aps"]["thread-id"], chat.as_str());
        assert_eq!(alert.body["aps"]["alert"]["title"], "New message");
        assert!(!alert.body.to_string().contains("body stays") && !alert.body.to_string().contains("alice"));
        let expires: u64 = alert.headers["apns-expiration"].parse().unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert!(expires > now + 23 * 3600, "a day to reach the device");
    }
    let badges: Vec<u64> = alerts
        .iter()
        .map(|a| a.body["seq"].as_u64().unwrap() * 10 + a.body["aps"]["badge"].as_u64().unwrap())
        .collect();
    assert!(badges.iter().all(|b| *b == 11 || *b == 22), "the badge counts unread entries: {badges:?}");
    let ids: std::collections::HashSet<&str> = alerts.iter().map(|a| a.headers["apns-id"].as_str()).collect();
    assert_eq!(ids.len(), 4, "an apns-id per device and entry");

    let read = notify.read("bob", &chat, 2).await;
    assert_eq!((read.cancelled, read.retracted), (0, 2));
    eventually("two retractions", || fake.accepted().len() == 6).await;
    for retraction in &fake.accepted()[4..] {
        assert_eq!(retraction.headers["apns-push-type"], "background");
        assert_eq!(retraction.headers["apns-priority"], "5");
        assert_eq!(retraction.headers["apns-collapse-id"], chat, "replaces the shown notification");
        assert_eq!(retraction.body["aps"], serde_json::json!({ "content-available": 1, "badge": 0 }));
        assert_eq!(retraction.body["type"], "read");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.accepted().len(), 6, "nothing more");
    assert!(fake.refused().is_empty(), "{:?}", fake.refused());
}

#[tokio::test]
async fn failures_are_retried_with_one_apns_id_and_an_expired_token_is_made_again() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, key_file) = FakeApns::start(dir.path()).await;
    let notify = start(apns_options(&fake, key_file), dir.path()).await;
    notify.register("bob", device("phone", PHONE, BUNDLE)).await;
    fake.script(&[
        (StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError"),
        (StatusCode::TOO_MANY_REQUESTS, "TooManyRequests"),
        (StatusCode::FORBIDDEN, "ExpiredProviderToken"),
    ]);
    notify.message("bob", &conversation(), 1, "x").await;
    eventually("four attempts", || fake.accepted().len() == 4).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let attempts = fake.accepted();
    assert_eq!(attempts.len(), 4, "delivered once, then no more");
    assert!(attempts.iter().all(|a| a.headers["apns-id"] == attempts[0].headers["apns-id"]), "one notification");
}

#[tokio::test]
async fn a_dead_token_removes_its_registration_and_a_rotated_key_is_used_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, key_file) = FakeApns::start(dir.path()).await;
    let notify = start(apns_options(&fake, key_file.clone()), dir.path()).await;
    notify.register("bob", device("phone", PHONE, BUNDLE)).await;
    notify.register("bob", device("ipad", IPAD, BUNDLE)).await;
    fake.unregister(PHONE);
    notify.message("bob", &conversation(), 1, "x").await;
    eventually("the phone's registration removed", || fake.refused() == ["Unregistered"]).await;
    let mut devices = notify.devices("bob").await;
    for _ in 0..50 {
        if devices == ["ipad"] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        devices = notify.devices("bob").await;
    }
    assert_eq!(devices, ["ipad"], "410 Unregistered: the registration goes");

    let (private, public) = crate::tls::p256_key();
    std::fs::write(&key_file, private).unwrap();
    fake.rotate_key(public);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = fake.accepted().len();
    notify.message("bob", &conversation(), 2, "y").await;
    eventually("a push signed with the new key", || fake.accepted().len() == before + 1).await;
    assert_eq!(fake.refused(), ["Unregistered"], "no token made with the old key reached APNs");
}
