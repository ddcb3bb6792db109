//! Push notifications end to end: devices registered through the SDK, a
//! webhook receiver on loopback that checks each request's Standard
//! Webhooks signature as an integration would, and the outbox's rules
//! (offline devices only, the read grace, retraction, retries, dead tokens,
//! mutes, no internal URLs).

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::IntoResponse,
};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use hmac::{Hmac, Mac};
use messenger_client::{PushDevice, PushPlatform};
use serde_json::Value;
use sha2::Sha256;
use tonic::Code;

use crate::support::*;

/// One request the receiver accepted as signed.
#[derive(Clone, Debug)]
pub(crate) struct Received {
    pub(crate) device: String,
    pub(crate) webhook_id: String,
    at: Instant,
    body: Value,
}

#[derive(Default)]
pub(crate) struct Hooks {
    /// Device -> the secret its registration answered.
    secrets: Mutex<std::collections::HashMap<String, String>>,
    received: Mutex<Vec<Received>>,
    /// Answers to give, in order, before 204s (status, Retry-After).
    script: Mutex<VecDeque<(StatusCode, Option<&'static str>)>>,
    unsigned: Mutex<u32>,
}

/// Verifies like the Standard Webhooks libraries do: HMAC-SHA256 over
/// "id.timestamp.body" with the base64 key after "whsec_", a fresh timestamp.
fn verified(secret: &str, headers: &HeaderMap, body: &[u8]) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let (id, timestamp, signature) = (header("webhook-id"), header("webhook-timestamp"), header("webhook-signature"));
    let Ok(seconds) = timestamp.parse::<u64>() else { return false };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    if now.abs_diff(seconds) > 300 {
        return false;
    }
    let key = STANDARD.decode(secret.trim_start_matches("whsec_")).unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    signature.split(' ').any(|candidate| candidate == expected)
}

async fn hook(
    State(hooks): State<Arc<Hooks>>,
    Path(device): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> impl IntoResponse {
    let secret = hooks.secrets.lock().unwrap().get(&device).cloned().unwrap_or_default();
    if secret.is_empty() || !verified(&secret, &headers, &body) {
        *hooks.unsigned.lock().unwrap() += 1;
        return (StatusCode::UNAUTHORIZED, HeaderMap::new());
    }
    let webhook_id = headers["webhook-id"].to_str().unwrap().to_owned();
    let body: Value = serde_json::from_slice(&body).unwrap();
    hooks.received.lock().unwrap().push(Received { device, webhook_id, at: Instant::now(), body });
    let mut answer = HeaderMap::new();
    match hooks.script.lock().unwrap().pop_front() {
        Some((status, retry_after)) => {
            if let Some(after) = retry_after {
                answer.insert("retry-after", after.parse().unwrap());
            }
            (status, answer)
        }
        None => (StatusCode::NO_CONTENT, answer),
    }
}

/// The receiver's base URL and what it saw.
pub(crate) async fn receiver() -> (String, Arc<Hooks>) {
    let hooks = Arc::new(Hooks::default());
    let app = axum::Router::new().route("/hook/{device}", axum::routing::post(hook)).with_state(hooks.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{address}/hook"), hooks)
}

impl Hooks {
    pub(crate) fn all(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub(crate) fn of(&self, device: &str) -> Vec<Received> {
        self.received.lock().unwrap().iter().filter(|r| r.device == device).cloned().collect()
    }

    /// Waits until `device` got `count` requests; then no more may come for a while.
    async fn expect(&self, device: &str, count: usize) -> Vec<Received> {
        let deadline = Instant::now() + WAIT;
        while self.of(device).len() < count {
            assert!(Instant::now() < deadline, "{device}: {} of {count} pushes", self.of(device).len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        let got = self.of(device);
        assert_eq!(got.len(), count, "{device}: more pushes than expected: {got:#?}");
        assert_eq!(*self.unsigned.lock().unwrap(), 0, "every request was signed");
        got
    }
}

/// A system whose notify may call the loopback receiver, with a short grace.
async fn system(grace: Duration) -> TestSystem {
    TestSystem::start_with(|config| {
        config.notify.read_grace = grace;
        config.notify.retry_initial_delay = Duration::from_millis(100);
        config.notify.poll_interval = Duration::from_millis(20);
        config.notify.egress.allow_http = true;
        config.notify.egress.allow_addresses = vec!["127.0.0.0/8".parse().unwrap()];
    })
    .await
}

/// Registers `user`'s `device` as a webhook to the receiver, then leaves it offline.
async fn offline_device(system: &TestSystem, base: &str, hooks: &Hooks, user: &str, device: &str) {
    let (client, _events) = system.connect(user, device).await;
    register(&client, base, hooks, device).await;
    client.close().await;
}

pub(crate) async fn register(client: &messenger_client::Client, base: &str, hooks: &Hooks, device: &str) {
    let registration = PushDevice {
        platform: PushPlatform::Webhook as i32,
        token: format!("{base}/{device}"),
        app_id: "integration".into(),
        ..Default::default()
    };
    let answer = client.register_push_device(registration).await.unwrap();
    assert!(answer.webhook_secret.starts_with("whsec_"));
    assert_eq!(answer.device.unwrap().token, "", "tokens are not echoed");
    hooks.secrets.lock().unwrap().insert(device.to_owned(), answer.webhook_secret);
}

/// Bob's phone offline with a webhook, his desktop and Alice online, and
/// their direct conversation.
struct Scene {
    desktop: messenger_client::Client,
    _desktop_events: messenger_client::Events,
    alice: messenger_client::Client,
    _alice_events: messenger_client::Events,
    conversation: String,
}

async fn scene(system: &TestSystem, base: &str, hooks: &Hooks) -> Scene {
    offline_device(system, base, hooks, "bob", "phone").await;
    let (desktop, _desktop_events) = system.connect("bob", "desktop").await;
    let (alice, _alice_events) = system.connect("alice", "laptop").await;
    let conversation = alice.direct("bob").await.unwrap().conversation_id;
    settle().await;
    Scene { desktop, _desktop_events, alice, _alice_events, conversation }
}

/// Lets presence drop the sessions of devices just closed.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn an_offline_device_gets_one_content_free_push_then_its_retraction_and_an_online_one_none() {
    let system = system(Duration::from_millis(200)).await;
    let (base, hooks) = receiver().await;
    offline_device(&system, &base, &hooks, "bob", "phone").await;
    let (desktop, mut desktop_events) = system.connect("bob", "desktop").await;
    register(&desktop, &base, &hooks, "desktop").await;
    let (alice, _alice_events) = system.connect("alice", "laptop").await;
    let conversation = alice.direct("bob").await.unwrap().conversation_id;
    settle().await;

    let sent_at = Instant::now();
    let ack = alice.send(&conversation, "the body stays on the server").await.unwrap();
    let pushes = hooks.expect("phone", 1).await;
    let push = &pushes[0];
    assert!(push.at - sent_at >= Duration::from_millis(200), "not before the read grace");
    assert_eq!(push.body["type"], "message.created");
    assert_eq!(push.body["data"]["conversation_id"], conversation.as_str());
    assert_eq!(push.body["data"]["seq"], ack.seq);
    assert_eq!(push.body["data"]["push_id"], push.webhook_id.as_str(), "the idempotency key is the webhook id");
    assert_eq!(push.body["data"]["badge"], 1, "one unread entry");
    let text = push.body.to_string();
    assert!(!text.contains("the body stays") && push.body["data"].get("sender_id").is_none(), "no content: {text}");
    assert!(hooks.of("desktop").is_empty(), "the online device got it on its stream instead");
    assert_eq!(next_message(&mut desktop_events).await.seq, ack.seq);

    desktop.mark_read(&conversation, ack.seq).await.unwrap();
    let pushes = hooks.expect("phone", 2).await;
    assert_eq!(pushes[1].body["type"], "message.read", "read elsewhere: the phone's notification is taken back");
    assert_eq!(pushes[1].body["data"]["seq"], ack.seq);
    assert_eq!(pushes[1].body["data"]["conversation_id"], conversation.as_str());
    assert_eq!(pushes[1].body["data"]["badge"], 0, "read: nothing unread");
    assert_ne!(pushes[1].webhook_id, pushes[0].webhook_id);
    assert!(hooks.of("desktop").is_empty());
}

#[tokio::test]
async fn a_read_within_the_grace_cancels_the_push_and_previews_go_only_where_allowed() {
    let system = system(Duration::from_millis(1500)).await;
    let (base, hooks) = receiver().await;
    let Scene { desktop, _desktop_events, alice, _alice_events, conversation } = scene(&system, &base, &hooks).await;

    let ack = alice.send(&conversation, "seen on the desktop").await.unwrap();
    desktop.mark_read(&conversation, ack.seq).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(hooks.of("phone").is_empty(), "read within the grace: nothing buzzes");

    // A device that allows previews gets the sender and the body.
    let (tablet, _tablet_events) = system.connect("bob", "tablet").await;
    let registration = PushDevice {
        platform: PushPlatform::Webhook as i32,
        token: format!("{base}/tablet"),
        previews: true,
        ..Default::default()
    };
    let secret = tablet.register_push_device(registration).await.unwrap().webhook_secret;
    hooks.secrets.lock().unwrap().insert("tablet".into(), secret);
    tablet.close().await;
    settle().await;
    alice.send(&conversation, "with a preview").await.unwrap();
    let pushes = hooks.expect("tablet", 1).await;
    assert_eq!(pushes[0].body["data"]["body"], "with a preview");
    assert_eq!(pushes[0].body["data"]["sender_id"], "alice");
    let phone = hooks.expect("phone", 1).await;
    assert!(phone[0].body["data"].get("body").is_none(), "the phone did not allow previews");
}

#[tokio::test]
async fn a_failing_webhook_is_retried_after_its_retry_after_and_delivered_once() {
    let system = system(Duration::from_millis(50)).await;
    let (base, hooks) = receiver().await;
    hooks
        .script
        .lock()
        .unwrap()
        .extend([(StatusCode::INTERNAL_SERVER_ERROR, None), (StatusCode::TOO_MANY_REQUESTS, Some("2"))]);
    offline_device(&system, &base, &hooks, "bob", "phone").await;
    let (alice, _alice_events) = system.connect("alice", "laptop").await;
    let conversation = alice.direct("bob").await.unwrap().conversation_id;
    settle().await;

    alice.send(&conversation, "eventually").await.unwrap();
    let attempts = hooks.expect("phone", 3).await;
    assert!(attempts.iter().all(|a| a.webhook_id == attempts[0].webhook_id), "one idempotency key for every attempt");
    let waited = attempts[2].at - attempts[1].at;
    assert!(waited >= Duration::from_secs(2), "Retry-After honoured: {waited:?}");
    assert!(attempts[1].at - attempts[0].at < Duration::from_secs(2), "the 500 retried on the backoff");
}

#[tokio::test]
async fn a_gone_webhook_loses_its_registration_and_a_muted_conversation_pushes_nothing() {
    let system = system(Duration::from_millis(50)).await;
    let (base, hooks) = receiver().await;
    let Scene { desktop, _desktop_events, alice, _alice_events, conversation } = scene(&system, &base, &hooks).await;

    desktop.mute(&conversation, messenger_platform::ids::now_ms() + 3_600_000).await.unwrap();
    alice.send(&conversation, "muted").await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(hooks.of("phone").is_empty(), "muted on every device");
    desktop.mute(&conversation, 0).await.unwrap();
    // Only a member mutes: a stranger learns nothing, not even that it exists.
    let (stranger, _stranger_events) = system.connect("mallory", "phone").await;
    let refused = stranger.mute(&conversation, messenger_platform::ids::now_ms() + 60_000).await.unwrap_err();
    assert_eq!(refused.code(), Code::NotFound, "{refused:?}");

    hooks.script.lock().unwrap().push_back((StatusCode::GONE, None));
    alice.send(&conversation, "to a dead hook").await.unwrap();
    hooks.expect("phone", 1).await;
    let devices = desktop.push_devices().await.unwrap();
    assert!(devices.iter().all(|d| d.device_id != "phone"), "410: the registration is gone: {devices:?}");
    alice.send(&conversation, "nowhere to go").await.unwrap();
    hooks.expect("phone", 1).await;
}

#[tokio::test]
async fn registrations_are_checked_and_internal_urls_refused_unless_allow_listed() {
    let system = TestSystem::start_with(|config| {
        config.notify.egress.allow_http = true;
        config.notify.max_devices_per_user = 2;
    })
    .await;
    let (bob, _events) = system.connect("bob", "phone").await;
    let webhook =
        |url: &str| PushDevice { platform: PushPlatform::Webhook as i32, token: url.to_owned(), ..Default::default() };
    for url in
        ["http://127.0.0.1:9/hook", "http://169.254.169.254/latest/meta-data/", "http://localhost:9/", "http://[::1]/"]
    {
        let error = bob.register_push_device(webhook(url)).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{url}: {error}");
        assert!(error.to_string().contains("not a public address"), "{url}: {error}");
    }
    let error = bob.register_push_device(webhook("ftp://hooks.example.com/")).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);

    let apns =
        |token: &str| PushDevice { platform: PushPlatform::Apns as i32, token: token.to_owned(), ..Default::default() };
    let error = bob.register_push_device(apns("not-hex")).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error}");
    bob.register_push_device(apns(&"ab".repeat(32))).await.unwrap();
    let error = bob.register_push_device(PushDevice::default()).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "a platform is required");

    // The device limit, at its edge: a second device fits, a third does not,
    // and registering a known device again is not a new one.
    let (tablet, _tablet_events) = system.connect("bob", "tablet").await;
    tablet.register_push_device(apns(&"cd".repeat(32))).await.unwrap();
    let (watch, _watch_events) = system.connect("bob", "watch").await;
    let error = watch.register_push_device(apns(&"ef".repeat(32))).await.unwrap_err();
    assert_eq!(error.code(), Code::ResourceExhausted, "{error}");
    tablet.register_push_device(apns(&"01".repeat(32))).await.unwrap();
    let devices = bob.push_devices().await.unwrap();
    assert_eq!(devices.iter().map(|d| d.device_id.as_str()).collect::<Vec<_>>(), ["phone", "tablet"]);
    assert!(devices.iter().all(|d| d.token.is_empty()));
    assert!(bob.unregister_push_device("tablet").await.unwrap());
    assert!(!bob.unregister_push_device("tablet").await.unwrap());
    watch.register_push_device(apns(&"ef".repeat(32))).await.unwrap();
}

#[tokio::test]
async fn a_group_muted_except_mentions_pushes_only_what_mentions_the_user() {
    let system = system(Duration::from_millis(50)).await;
    let (base, hooks) = receiver().await;
    offline_device(&system, &base, &hooks, "bob", "phone").await;
    let (desktop, _desktop_events) = system.connect("bob", "desktop").await;
    let (alice, _alice_events) = system.connect("alice", "laptop").await;
    let group = alice.create_group("launch", &["bob", "carol"]).await.unwrap().conversation_id;
    desktop.mute_except_mentions(&group, messenger_platform::ids::now_ms() + 3_600_000).await.unwrap();
    settle().await;
    let pushes_before = hooks.of("phone").len();

    alice.send(&group, "status update for everyone").await.unwrap();
    alice.send(&group, "@bobby is someone else").await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(hooks.of("phone").len(), pushes_before, "muted: no push without a mention");
    let ack = alice.send(&group, "@bob can you look?").await.unwrap();
    let pushes = hooks.expect("phone", pushes_before + 1).await;
    assert_eq!(pushes.last().unwrap().body["data"]["seq"], ack.seq, "the mention is pushed");
}

/// A webhook that never answers holds one push slot until its request
/// timeout; another device's push still leaves at once.
#[tokio::test]
async fn a_hanging_webhook_does_not_delay_another_devices_push() {
    let system = TestSystem::start_with(|config| {
        config.notify.read_grace = Duration::from_millis(50);
        config.notify.poll_interval = Duration::from_millis(20);
        config.notify.egress.allow_http = true;
        config.notify.egress.allow_addresses = vec!["127.0.0.0/8".parse().unwrap()];
        config.notify.egress.request_timeout = Duration::from_secs(20);
        config.notify.claim_lease = Duration::from_secs(60);
    })
    .await;
    let (base, hooks) = receiver().await;
    // An endpoint that accepts the connection and never answers.
    let hanging = axum::Router::new().route(
        "/hook/{device}",
        axum::routing::post(|| async {
            tokio::time::sleep(Duration::from_secs(600)).await;
            StatusCode::NO_CONTENT
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hanging_base = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, hanging).await.unwrap() });
    offline_device(&system, &hanging_base, &hooks, "bob", "stuck").await;
    offline_device(&system, &base, &hooks, "carol", "fine").await;
    let (alice, _alice_events) = system.connect("alice", "laptop").await;
    let (to_bob, to_carol) = (alice.direct("bob").await.unwrap(), alice.direct("carol").await.unwrap());
    settle().await;

    alice.send(&to_bob.conversation_id, "into the void").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent_at = Instant::now();
    alice.send(&to_carol.conversation_id, "right away").await.unwrap();
    let push = hooks.expect("fine", 1).await;
    let delay = push[0].at - sent_at;
    assert!(delay < Duration::from_secs(1), "carol's push waited {delay:?} behind a hanging endpoint");
}

#[tokio::test]
async fn a_host_that_keeps_failing_gets_no_pushes_while_its_circuit_is_open() {
    let system = TestSystem::start_with(|config| {
        config.notify.read_grace = Duration::from_millis(50);
        config.notify.retry_initial_delay = Duration::from_millis(50);
        config.notify.poll_interval = Duration::from_millis(20);
        config.notify.egress.allow_http = true;
        config.notify.egress.allow_addresses = vec!["127.0.0.0/8".parse().unwrap()];
        config.notify.circuit_failures = 2;
        config.notify.circuit_open = Duration::from_secs(60);
    })
    .await;
    let (base, hooks) = receiver().await;
    // A host whose every answer is 503: it counts the requests it got.
    let failing_requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = failing_requests.clone();
    let failing = axum::Router::new().route(
        "/hook/{device}",
        axum::routing::post(move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { StatusCode::SERVICE_UNAVAILABLE }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let failing_base = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, failing).await.unwrap() });
    let down = ["bob", "dave", "erin"];
    for user in down {
        offline_device(&system, &failing_base, &hooks, user, &format!("{user}-phone")).await;
    }
    offline_device(&system, &base, &hooks, "carol", "fine").await;
    let (alice, _alice_events) = system.connect("alice", "laptop").await;
    let mut directs = Vec::new();
    for user in down {
        directs.push(alice.direct(user).await.unwrap().conversation_id);
    }
    let to_carol = alice.direct("carol").await.unwrap().conversation_id;
    settle().await;

    // Bob's push fails, and its retry (50 ms later): two in a row open the circuit.
    alice.send(&directs[0], "to a dead host").await.unwrap();
    let deadline = Instant::now() + WAIT;
    while failing_requests.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "the failing host was not tried twice");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // More pushes to that host wait, and so do bob's retries; another host is not affected.
    for conversation in &directs[1..] {
        alice.send(conversation, "also to the dead host").await.unwrap();
    }
    alice.send(&to_carol, "to a live host").await.unwrap();
    hooks.expect("fine", 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(failing_requests.load(std::sync::atomic::Ordering::SeqCst), 2, "pushes went to an open circuit");
}
