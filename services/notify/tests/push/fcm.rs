//! FCM: the service account's OAuth grant, notification and data-only
//! retraction, a token FCM stopped taking, UNREGISTERED.

use std::time::Duration;

use axum::http::StatusCode;

use messenger_notify::providers::fcm::{FcmApp, FcmOptions};
use messenger_proto::v1 as pb;

use crate::{
    conversation, eventually,
    fake_fcm::{FakeFcm, PROJECT},
    options, start,
};

async fn setup(dir: &std::path::Path) -> (FakeFcm, crate::Notify) {
    let (fake, account) = FakeFcm::start(dir).await;
    let options = messenger_notify::Options {
        fcm: FcmOptions {
            endpoint: fake.url.clone(),
            ca_file: Some(fake.ca_file.clone()),
            apps: vec![FcmApp { project_id: PROJECT.into(), service_account_file: account }],
            ..FcmOptions::default()
        },
        ..options()
    };
    let notify = start(options, dir).await;
    let device = pb::PushDevice {
        device_id: "pixel".into(),
        platform: pb::PushPlatform::Fcm as i32,
        token: "fcm-registration-token-1".into(),
        app_id: PROJECT.into(),
        ..Default::default()
    };
    notify.register("bob", device).await;
    (fake, notify)
}

#[tokio::test]
async fn a_notification_collapses_per_conversation_and_a_read_sends_a_data_only_retraction() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, notify) = setup(dir.path()).await;
    let chat = conversation();
    notify.message("bob", &chat, 1, "private").await;
    eventually("a notification", || fake.accepted().len() == 1).await;
    let message = &fake.accepted()[0]["message"];
    assert_eq!(message["token"], "fcm-registration-token-1");
    assert_eq!(message["notification"], serde_json::json!({ "title": "New message" }), "no content by default");
    assert_eq!(message["android"]["collapse_key"], chat.as_str());
    assert_eq!(message["android"]["notification"]["tag"], chat.as_str());
    assert_eq!(message["android"]["notification"]["notification_count"], 1, "the badge");
    assert_eq!(message["data"]["seq"], "1");

    notify.read("bob", &chat, 1).await;
    eventually("a retraction", || fake.accepted().len() == 2).await;
    let retraction = &fake.accepted()[1]["message"];
    assert!(retraction.get("notification").is_none(), "data only: the app clears the notification");
    assert_eq!(retraction["data"]["type"], "read");
    assert_eq!(retraction["data"]["badge"], "0");
    assert_eq!(retraction["android"]["collapse_key"], chat.as_str());
    assert_eq!(fake.grants(), 1, "the access token is reused");
    assert!(fake.refused().is_empty(), "{:?}", fake.refused());
}

#[tokio::test]
async fn a_token_fcm_stopped_taking_is_granted_again_and_unregistered_removes_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, notify) = setup(dir.path()).await;
    fake.script(&[(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE")]);
    notify.message("bob", &conversation(), 1, "x").await;
    eventually("a push retried after a 503", || fake.accepted().len() == 2).await;
    fake.revoke_tokens();
    notify.message("bob", &conversation(), 1, "y").await;
    eventually("a push after a new grant", || fake.accepted().len() == 3).await;
    assert_eq!(fake.grants(), 2);
    assert_eq!(fake.refused(), ["UNAVAILABLE", "UNAUTHENTICATED"]);

    fake.unregister("fcm-registration-token-1");
    notify.message("bob", &conversation(), 1, "z").await;
    eventually("UNREGISTERED", || fake.refused().len() == 3).await;
    for _ in 0..50 {
        if notify.devices("bob").await.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the registration survived UNREGISTERED");
}
