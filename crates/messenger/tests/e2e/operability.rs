//! The admin port: RED metrics for every RPC with their status codes,
//! liveness, and readiness that turns off when the drain starts.

use messenger_proto::v1::{self as pb, gateway_service_client::GatewayServiceClient};
use tonic::Code;

use crate::support::*;

/// The value of the `rpc_server_duration_seconds_count` series whose labels
/// include every one of `labels`, summed over the others.
fn calls(metrics: &str, labels: &[(&str, &str)]) -> u64 {
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix("rpc_server_duration_seconds_count{"))
        .filter(|line| labels.iter().all(|(name, value)| line.contains(&format!("{name}=\"{value}\""))))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

async fn get(url: &str) -> reqwest::Response {
    reqwest::Client::new().get(url).send().await.unwrap()
}

#[tokio::test]
async fn metrics_count_every_rpc_by_code_and_readiness_follows_the_drain() {
    let system = TestSystem::start().await;
    let admin = format!("http://{}", system.running.as_ref().unwrap().addresses.admin.unwrap());
    let (alice, _a) = system.connect("alice", "phone").await;
    let conversation = alice.direct("bob").await.unwrap().conversation_id;
    alice.send(&conversation, "counted").await.unwrap();
    let mut api = GatewayServiceClient::new(system.raw_channel().await);
    for _ in 0..3 {
        let request = pb::CompleteUploadRequest { media_id: uuid::Uuid::now_v7().to_string() };
        let status = api.complete_upload(system.authorized("alice", request)).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    let anonymous = tonic::Request::new(pb::CompleteUploadRequest { media_id: "x".into() });
    assert_eq!(api.complete_upload(anonymous).await.unwrap_err().code(), Code::Unauthenticated);
    // The newest page twice: read through the cache.
    for _ in 0..2 {
        alice.history(&conversation, 0, 10).await.unwrap();
    }

    let response = get(&format!("{admin}/metrics")).await;
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    let metrics = response.text().await.unwrap();
    let public = [("messenger_server", "gateway"), ("rpc_service", "messenger.v1.GatewayService")];
    let code = |code: Code| (code as i32).to_string();
    let (not_found, unauthenticated) = (code(Code::NotFound), code(Code::Unauthenticated));
    let refused = [&public[..], &[("rpc_method", "CompleteUpload"), ("rpc_grpc_status_code", &not_found)]].concat();
    assert_eq!(calls(&metrics, &refused), 3, "{metrics}");
    let anonymous =
        [&public[..], &[("rpc_method", "CompleteUpload"), ("rpc_grpc_status_code", &unauthenticated)]].concat();
    assert_eq!(calls(&metrics, &anonymous), 1, "{metrics}");
    // The hop behind it, on the message service's own port.
    let internal = [
        ("messenger_server", "message"),
        ("rpc_service", "messenger.v1.MessageService"),
        ("rpc_method", "GetOrCreateDirect"),
        ("rpc_grpc_status_code", "0"),
    ];
    assert_eq!(calls(&metrics, &internal), 1, "{metrics}");
    assert!(metrics.contains("rpc_server_duration_seconds_bucket{"), "durations come as a histogram");
    // Domain metrics: alice's session is open; a second one comes and goes.
    let gauge = |metrics: &str, name: &str| {
        metrics
            .lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.rsplit(' ').next()?.parse::<i64>().ok())
    };
    assert_eq!(gauge(&metrics, "messenger_gateway_sessions{"), Some(1), "{metrics}");
    let batches = gauge(&metrics, "messenger_message_fanout_batch_size_count{");
    assert!(batches.is_some_and(|count| count >= 1), "the send was fanned out: {metrics}");
    // The other domain metrics the runbooks name, from the same calls.
    let total = |name: &str, label: &str| -> i64 {
        metrics
            .lines()
            .filter(|line| line.starts_with(name) && line.contains(label))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as i64
    };
    assert_eq!(total("messenger_message_send_to_commit_seconds_count{", ""), 1, "one new message: {metrics}");
    assert!(total("messenger_message_fanout_queue_depth_count{", "") >= 1, "{metrics}");
    assert!(total("messenger_gateway_session_queue_depth_count{", "") >= 1, "frames queued to alice: {metrics}");
    let stored = |operation: &str| {
        total("messenger_message_store_duration_seconds_count{", &format!("operation=\"{operation}\""))
    };
    assert_eq!(stored("send"), 1, "the one send reached the store: {metrics}");
    assert_eq!(stored("get_or_create_direct"), 1, "{metrics}");
    assert!(
        total("messenger_message_cache_reads_total{", "result=\"hit\"") >= 1,
        "the second page read hit: {metrics}"
    );
    assert!(total("messenger_message_cache_reads_total{", "result=\"miss\"") >= 1, "{metrics}");
    assert_eq!(
        total("messenger_media_uploads_completed_total{", "outcome=\"invalid\""),
        3,
        "the three unknown media ids: {metrics}"
    );
    let (bob, bob_events) = system.connect("bob", "phone").await;
    let metrics = get(&format!("{admin}/metrics")).await.text().await.unwrap();
    assert_eq!(gauge(&metrics, "messenger_gateway_sessions{"), Some(2), "{metrics}");
    drop((bob, bob_events));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let metrics = get(&format!("{admin}/metrics")).await.text().await.unwrap();
        if gauge(&metrics, "messenger_gateway_sessions{") == Some(1) {
            let ended = metrics.lines().find(|l| {
                l.starts_with("messenger_gateway_sessions_ended_total{") && l.contains("reason=\"client_gone\"")
            });
            assert!(ended.is_some_and(|line| line.ends_with(" 1")), "{metrics}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "bob's session still counted: {metrics}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    assert_eq!(get(&format!("{admin}/livez")).await.status(), 200);
    assert_eq!(get(&format!("{admin}/readyz")).await.status(), 200);
    // The drain starts: not ready at once, while the port still answers.
    system.running.as_ref().unwrap().shutdown_token().cancel();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = get(&format!("{admin}/readyz")).await.status();
        if status == 503 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still {status} after the drain started");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(get(&format!("{admin}/livez")).await.status(), 200);
}

/// After a reconnect the SDK reads what changed in its conversations while it
/// was away in one `GetConversations` call per 100 of them, not one
/// `GetConversation` each.
#[tokio::test]
async fn a_reconnect_reads_its_conversations_in_one_batched_call() {
    let system = TestSystem::start_with(|config| {
        let limits = &mut config.gateway.rate_limits;
        for rate in [&mut limits.direct_conversations, &mut limits.queries] {
            (rate.per_second, rate.burst) = (10_000, 10_000);
        }
    })
    .await;
    let admin = format!("http://{}", system.running.as_ref().unwrap().addresses.admin.unwrap());
    let (alice, _events) = system.connect("alice", "phone").await;
    let mut ids = Vec::new();
    for peer in 0..30 {
        let id = alice.direct(&format!("peer-{peer}")).await.unwrap().conversation_id;
        alice.send(&id, "hi").await.unwrap();
        ids.push(id);
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while !ids.iter().all(|id| alice.conversation_state(id).is_some_and(|state| state.last_seq == 1)) {
        assert!(tokio::time::Instant::now() < deadline, "alice's device never held her 30 conversations");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let public = |method: &'static str| {
        [("messenger_server", "gateway"), ("rpc_service", "messenger.v1.GatewayService"), ("rpc_method", method)]
    };
    // Let the refreshes of the new conversations finish first.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let before = get(&format!("{admin}/metrics")).await.text().await.unwrap();
    alice.go_offline().await;
    alice.go_online().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let metrics = get(&format!("{admin}/metrics")).await.text().await.unwrap();
        if calls(&metrics, &public("GetConversations")) > calls(&before, &public("GetConversations")) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no GetConversations after the reconnect");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Anything the reconnect would still ask for one by one comes now.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let after = get(&format!("{admin}/metrics")).await.text().await.unwrap();
    let delta = |method| calls(&after, &public(method)) - calls(&before, &public(method));
    assert_eq!((delta("GetConversations"), delta("GetConversation")), (1, 0), "one batched call, no single ones");
}
