//! The core contracts: live delivery, durable ack, backlog, idempotency,
//! dense seqs, authentication, isolation, limits, restart, reconnect.

use std::time::Duration;

use futures::{FutureExt, StreamExt, future::join_all};
use messenger_client::{Client, Error, Event};
use messenger_platform::auth;
use tonic::Code;

use crate::support::*;

#[tokio::test]
async fn live_message_reaches_peer_and_ack_follows_commit() {
    let system = TestSystem::start().await;
    let (alice, _alice_events) = system.connect("alice", "alice-phone").await;
    let (bob, mut bob_events) = system.connect("bob", "bob-phone").await;
    let conversation = alice.direct("bob").await.unwrap();
    assert_eq!(bob.direct("alice").await.unwrap().conversation_id, conversation.conversation_id);

    let ack = alice.send(&conversation.conversation_id, "hi bob").await.unwrap();
    assert_eq!(ack.seq, 1);
    assert_eq!(
        committed_body(&system.config, &conversation.conversation_id, ack.seq).await.as_deref(),
        Some("hi bob"),
        "SendAck arrived before the row was committed"
    );
    let received = next_message(&mut bob_events).await;
    assert_eq!((received.seq, received.body.as_str(), received.sender_id.as_str()), (1, "hi bob", "alice"));
    assert_eq!(received.message_id, ack.message_id);
    assert_quiet(&mut bob_events).await;
}

/// A lone message is fanned out at once: only a batch already forming (more
/// than one item waiting) lingers for more.
#[tokio::test]
async fn a_lone_message_does_not_wait_for_the_fanout_linger() {
    let system = TestSystem::start_with(|config| config.message.fanout.linger = Duration::from_secs(10)).await;
    let (alice, _alice_events) = system.connect("alice", "alice-phone").await;
    let (_bob, mut bob_events) = system.connect("bob", "bob-phone").await;
    let conversation = alice.direct("bob").await.unwrap().conversation_id;
    let started = std::time::Instant::now();
    alice.send(&conversation, "no waiting").await.unwrap();
    assert_eq!(next_message(&mut bob_events).await.body, "no waiting");
    assert!(started.elapsed() < Duration::from_secs(5), "held for the linger: {:?}", started.elapsed());
}

/// A `Deliver` that fails (the link to the gateway broke for a moment) is
/// sent again: the last message of a conversation reaches an online device
/// without a later message or a reconnect.
#[tokio::test]
async fn a_failed_delivery_is_sent_again_once_the_gateway_answers() {
    let link = DeliveryLink::bind().await;
    let system = TestSystem::start_with(|config| link.route(config)).await;
    link.lead_to(&system);
    let (alice, _alice_events) = system.connect("alice", "alice-phone").await;
    let (_bob, mut bob_events) = system.connect("bob", "bob-phone").await;
    let conversation = alice.direct("bob").await.unwrap().conversation_id;
    alice.send(&conversation, "before").await.unwrap();
    assert_eq!(next_message(&mut bob_events).await.body, "before");

    link.set_cut(true);
    alice.send(&conversation, "while cut").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    link.set_cut(false);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, bob_events.next()).await.expect("the failed delivery never came") {
            Some(Event::Message(message)) => {
                assert_eq!((message.seq, message.body.as_str()), (2, "while cut"));
                break;
            }
            Some(Event::Disconnected { reason, .. }) => panic!("bob reconnected to catch up: {reason}"),
            Some(_) => {}
            None => panic!("event stream ended"),
        }
    }
}

#[tokio::test]
async fn offline_recipient_receives_backlog_once_in_order() {
    let system = TestSystem::start().await;
    let (alice, _alice_events) = system.connect("alice", "alice-phone").await;
    let conversation = alice.direct("bob").await.unwrap();
    for body in ["one", "two", "three"] {
        alice.send(&conversation.conversation_id, body).await.unwrap();
    }
    let (bob, mut bob_events) = system.connect("bob", "bob-phone").await;
    let received = messages(&mut bob_events, 3).await;
    assert_eq!(received.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(), ["one", "two", "three"]);
    assert_eq!(received.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert_quiet(&mut bob_events).await;
    bob.close().await;
    drop(bob);

    // The same device comes back: everything was acked, nothing is shown again.
    let (_bob, mut bob_events) = system.connect("bob", "bob-phone").await;
    alice.send(&conversation.conversation_id, "four").await.unwrap();
    let next = next_message(&mut bob_events).await;
    assert_eq!((next.seq, next.body.as_str()), (4, "four"));
    assert_quiet(&mut bob_events).await;
    // A different device of Bob's has its own cursor and gets all four.
    let (_tablet, mut tablet_events) = system.connect("bob", "bob-tablet").await;
    let all = messages(&mut tablet_events, 4).await;
    assert_eq!(all.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
}

#[tokio::test]
async fn retried_send_returns_original_seq() {
    let system = TestSystem::start().await;
    let (alice, _alice_events) = system.connect("alice", "alice-phone").await;
    let (_bob, mut bob_events) = system.connect("bob", "bob-phone").await;
    let conversation = alice.direct("bob").await.unwrap();
    let id = conversation.conversation_id.as_str();
    let first = alice.send_with_id(id, "client-id-1", "original").await.unwrap();
    let retry = alice.send_with_id(id, "client-id-1", "a different body").await.unwrap();
    assert_eq!((retry.seq, &retry.message_id), (first.seq, &first.message_id));
    let history = alice.history(id, 0, 50).await.unwrap();
    assert_eq!(history.messages.len(), 1, "one stored row");
    assert_eq!(history.messages[0].body, "original");
    let received = next_message(&mut bob_events).await;
    assert_eq!(received.body, "original");
    assert_quiet(&mut bob_events).await;
}

#[tokio::test]
async fn concurrent_senders_get_dense_seqs() {
    let system = TestSystem::start().await;
    let (alice, _a) = system.connect("alice", "alice-phone").await;
    let (bob, _b) = system.connect("bob", "bob-phone").await;
    let conversation = alice.direct("bob").await.unwrap();
    let id = conversation.conversation_id.clone();
    let per_sender = 150;
    let sends = (0..per_sender).flat_map(|i| {
        let (alice, bob, id) = (alice.clone(), bob.clone(), id.clone());
        [
            Box::pin(async move { alice.send(&id, &format!("a{i}")).await.unwrap().seq })
                as std::pin::Pin<Box<dyn std::future::Future<Output = u64>>>,
            Box::pin({
                let id = conversation.conversation_id.clone();
                async move { bob.send(&id, &format!("b{i}")).await.unwrap().seq }
            }),
        ]
    });
    let mut seqs = join_all(sends).await;
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=2 * per_sender as u64).collect::<Vec<_>>());
}

#[tokio::test]
async fn bad_tokens_are_unauthenticated() {
    let system = TestSystem::start().await;
    let expired = {
        let options = auth::AuthOptions::default();
        let claims = auth::Claims {
            sub: "alice".into(),
            exp: (messenger_platform::ids::now_ms() / 1000 - 3600) as u64,
            iat: None,
            iss: None,
            aud: None,
        };
        expired_token(&options, &claims)
    };
    let other_secret = auth::AuthOptions { hs256_secret: Some("not the server's".into()), ..Default::default() };
    let forged = auth::mint_hs256(&other_secret, "alice", Duration::from_secs(60)).unwrap();
    for (name, token) in
        [("empty", String::new()), ("garbage", "abc.def.ghi".into()), ("expired", expired), ("forged", forged)]
    {
        let mut options = system.options("alice", "phone");
        options.token = token;
        let result = Client::connect(options).await;
        match result {
            Err(Error::Unauthenticated(_)) => {}
            Err(other) => panic!("{name}: expected UNAUTHENTICATED, got {other:?}"),
            Ok(_) => panic!("{name}: connected with a bad token"),
        }
    }
    // Unary calls are guarded too.
    let mut raw = RawClient::new(system.raw_channel().await);
    let status = raw.list_conversations(messenger_proto::v1::ListConversationsRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

/// A token signed with the server's own secret that expired an hour ago.
fn expired_token(options: &auth::AuthOptions, claims: &auth::Claims) -> String {
    let secret = options.hs256_secret.as_deref().unwrap_or(auth::DEV_SECRET);
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), claims, &key).unwrap()
}

#[tokio::test]
async fn non_members_get_not_found_and_the_stream_survives() {
    let system = TestSystem::start().await;
    let (alice, _a) = system.connect("alice", "alice-phone").await;
    let (carol, mut carol_events) = system.connect("carol", "carol-phone").await;
    let private = alice.direct("bob").await.unwrap();
    alice.send(&private.conversation_id, "secret").await.unwrap();

    let history = carol.history(&private.conversation_id, 0, 10).await.unwrap_err();
    assert_eq!(history.code(), Code::NotFound, "{history:?}");
    let send = carol.send(&private.conversation_id, "let me in").await.unwrap_err();
    assert_eq!(send.code(), Code::NotFound, "{send:?}");
    // A conversation id that does not exist looks exactly the same.
    let unknown = carol.history(&uuid_like(), 0, 10).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let malformed = carol.history("not-a-uuid", 0, 10).await.unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument);
    assert!(carol.conversations("", 10).await.unwrap().conversations.is_empty());

    // The same stream still works for Carol's own conversations.
    let own = carol.direct("alice").await.unwrap();
    assert_eq!(carol.send(&own.conversation_id, "hello alice").await.unwrap().seq, 1);
    let echo = next_message(&mut carol_events).await;
    assert_eq!(echo.body, "hello alice", "a sender's devices receive its own messages");
    let alice_history = alice.history(&private.conversation_id, 0, 10).await.unwrap();
    assert_eq!(alice_history.messages.len(), 1, "the refused send stored nothing");
}

fn uuid_like() -> String {
    "0190b3a0-0000-7000-8000-000000000000".into()
}

#[tokio::test]
async fn body_limit_is_enforced_at_its_edge_and_the_stream_survives() {
    let system = TestSystem::start().await;
    let limit = system.config.message.max_body_bytes;
    let (alice, _a) = system.connect("alice", "alice-phone").await;
    let (_bob, mut bob_events) = system.connect("bob", "bob-phone").await;
    let conversation = alice.direct("bob").await.unwrap();
    let id = conversation.conversation_id.as_str();

    let at_limit = "x".repeat(limit);
    assert_eq!(alice.send(id, &at_limit).await.unwrap().seq, 1);
    let over = alice.send(id, &"x".repeat(limit + 1)).await.unwrap_err();
    assert_eq!(over.code(), Code::InvalidArgument, "{over:?}");
    assert!(over.to_string().contains(&format!("limit is {limit} bytes")), "{over}");
    // Multi-byte characters count in bytes.
    let over_utf8 = alice.send(id, &"é".repeat(limit / 2 + 1)).await.unwrap_err();
    assert_eq!(over_utf8.code(), Code::InvalidArgument);
    let empty = alice.send(id, "   ").await.unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);

    assert_eq!(alice.send(id, "still here").await.unwrap().seq, 2);
    let received = messages(&mut bob_events, 2).await;
    assert_eq!(received[0].body.len(), limit);
    assert_eq!(received[1].body, "still here");
}

#[tokio::test]
async fn frames_over_the_message_size_limit_are_refused() {
    let system = TestSystem::start_with(|config| {
        config.server.max_message_bytes = 4096;
        config.message.max_body_bytes = 64 * 1024;
    })
    .await;
    let (alice, _a) = system.connect("alice", "alice-phone").await;
    let conversation = alice.direct("bob").await.unwrap();
    // The unary API refuses an oversized request outright.
    let error = alice.history(&"x".repeat(8192), 0, 1).await.unwrap_err();
    assert_eq!(error.code(), Code::OutOfRange, "{error:?}");
    assert!(error.to_string().contains("the limit is: 4096 bytes"), "{error}");

    // The SDK refuses a send frame over its limit before it can cost the stream.
    let mut options = system.options("bob", "bob-phone");
    options.max_frame_bytes = 4096;
    let (bob, _b) = Client::connect(options).await.unwrap();
    let local = bob.send(&conversation.conversation_id, &"x".repeat(5000)).await.unwrap_err();
    assert_eq!(local.code(), Code::InvalidArgument, "{local:?}");

    // A raw client that ignores the limit loses only its own stream.
    use messenger_proto::v1::{self as pb, client_frame::Frame};
    let mut raw = RawClient::new(system.raw_channel().await);
    let oversized = pb::ClientFrame {
        trace_context: Default::default(),
        frame: Some(Frame::Send(pb::SendRequestFrame {
            conversation_id: conversation.conversation_id.clone(),
            client_msg_id: "too-big".into(),
            body: "x".repeat(8192),
            reply_to_seq: 0,
            media_ids: Vec::new(),
        })),
    };
    let frames = futures::stream::iter([hello("raw"), oversized]).chain(futures::stream::pending());
    let mut stream = raw.connect(system.authorized("alice", frames)).await.unwrap().into_inner();
    let outcome = tokio::time::timeout(WAIT, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream carrying the oversized frame stayed open");
    // With the reason, not OK and no reason.
    let status = outcome.expect_err("the stream ended with OK");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("server.max_message_bytes") && status.message().contains("4096"), "{status:?}");

    // Everyone else carries on; nothing oversized was stored.
    let after = alice.send(&conversation.conversation_id, "small").await.unwrap();
    assert_eq!(after.seq, 1, "the oversized frame was never stored");
}

#[tokio::test]
async fn data_survives_a_restart() {
    let mut system = TestSystem::start().await;
    let conversation_id = {
        let (alice, _a) = system.connect("alice", "alice-phone").await;
        let conversation = alice.direct("bob").await.unwrap();
        for body in ["before 1", "before 2"] {
            alice.send(&conversation.conversation_id, body).await.unwrap();
        }
        alice.close().await;
        conversation.conversation_id
    };
    system.stop().await;
    system.start_again().await;
    let (alice, _a) = system.connect("alice", "alice-phone").await;
    let history = alice.history(&conversation_id, 0, 10).await.unwrap();
    assert_eq!(history.messages.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(), ["before 1", "before 2"]);
    assert_eq!(alice.send(&conversation_id, "after").await.unwrap().seq, 3);
    assert_eq!(alice.direct("bob").await.unwrap().conversation_id, conversation_id);
}

#[tokio::test]
async fn sdk_reconnects_resumes_and_retries_pending_sends() {
    let mut system = TestSystem::start().await;
    let (alice, mut alice_events) = system.connect("alice", "alice-phone").await;
    let (bob, mut bob_events) = system.connect("bob", "bob-phone").await;
    let conversation = alice.direct("bob").await.unwrap();
    let id = conversation.conversation_id.clone();
    alice.send(&id, "before").await.unwrap();
    assert_eq!(next_message(&mut bob_events).await.body, "before");

    system.stop().await;
    // Bob sends while the server is down; the SDK holds it and retries after reconnecting.
    let pending = {
        let (bob, id) = (bob.clone(), id.clone());
        tokio::spawn(async move { bob.send(&id, "sent while down").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    system.start_again().await;
    let ack = pending.await.unwrap().unwrap();
    assert_eq!(ack.seq, 2);
    alice.send(&id, "after").await.unwrap();

    let alice_seen = messages(&mut alice_events, 3).await;
    assert_eq!(alice_seen.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2, 3]);
    let bob_seen = messages(&mut bob_events, 2).await;
    assert_eq!(bob_seen.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(), ["sent while down", "after"]);
    assert_quiet(&mut bob_events).await;
}

#[tokio::test]
async fn slow_consumer_is_disconnected_and_resumes_without_loss() {
    let system = TestSystem::start_with(|config| {
        config.gateway.session_queue_depth = 8;
        config.gateway.slow_consumer_timeout = Duration::from_millis(300);
    })
    .await;
    let (alice, _a) = system.connect("alice", "alice-phone").await;
    let conversation = alice.direct("bob").await.unwrap();

    // Bob's device opens a raw stream and then stops reading.
    use messenger_proto::v1 as pb;
    // Small HTTP/2 windows, so transport buffers cannot hide the stall.
    let channel = tonic::transport::Endpoint::from_shared(system.endpoint.clone())
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let (frames, mut stalled) = system.raw_stream(channel, "bob", "bob-phone").await;
    assert!(matches!(stalled.message().await.unwrap().unwrap().frame, Some(pb::server_frame::Frame::Ready(_))));

    // Far more than the queue and HTTP/2 windows hold.
    let body = "y".repeat(1000);
    let total = 3000;
    let sends = (0..total).map(|_| alice.send(&conversation.conversation_id, &body));
    for result in join_all(sends).await {
        result.unwrap();
    }
    // The gateway cuts the session off once its queue stayed full for the
    // slow-consumer timeout. Reading before that would make it a healthy
    // consumer again (a fast machine finishes the sends first), so wait for it.
    let admin = format!("http://{}/metrics", system.running.as_ref().unwrap().addresses.admin.unwrap());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let metrics = reqwest::get(&admin).await.unwrap().text().await.unwrap();
        let cut_off = metrics.lines().any(|line| {
            line.starts_with("messenger_gateway_sessions_ended_total{")
                && line.contains("reason=\"slow_consumer\"")
                && line.ends_with(" 1")
        });
        if cut_off {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the stalled session was never cut off: {metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Draining now, the stalled stream ends instead of carrying all messages.
    let mut drained = 0;
    let ended = tokio::time::timeout(WAIT, async {
        while let Ok(Some(_)) = stalled.message().await {
            drained += 1;
        }
    })
    .await;
    assert!(ended.is_ok(), "the slow stream was never closed");
    assert!(drained < total, "the slow consumer received everything ({drained}); nothing bounded it");
    drop(frames);

    // The device resumes and gets every message exactly once, in order.
    let (_bob, mut bob_events) = system.connect("bob", "bob-phone").await;
    let all = messages(&mut bob_events, total).await;
    assert!(all.iter().map(|m| m.seq).eq(1..=total as u64));
    assert_quiet(&mut bob_events).await;
}

#[tokio::test]
async fn send_rate_limit_is_enforced_at_its_edge() {
    let system = TestSystem::start_with(|config| {
        config.gateway.sends_per_second = 1;
        config.gateway.send_burst = 3;
    })
    .await;
    let (alice, _a) = system.connect("alice", "alice-phone").await;
    // A second device of the same user shares the user's budget.
    let (alice_laptop, _l) = system.connect("alice", "alice-laptop").await;
    let conversation = alice.direct("bob").await.unwrap();
    let id = conversation.conversation_id.as_str();
    for _ in 0..2 {
        alice.send(id, "within burst").await.unwrap();
    }
    alice_laptop.send(id, "within burst").await.unwrap();
    let limited = alice.send(id, "over the limit").await.unwrap_err();
    assert_eq!(limited.code(), Code::ResourceExhausted, "{limited:?}");
    assert!(limited.to_string().contains("1 per second"), "{limited}");
    // The stream is intact and the budget refills.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(alice.send(id, "later").await.unwrap().seq, 4);
}

#[tokio::test]
async fn send_streams_at_one_in_flight_still_deliver_everything_in_order() {
    // Both ends of the gateway's send stream at their edge: one send in flight.
    let system = TestSystem::start_with(|config| {
        config.gateway.send_stream_max_inflight = 1;
        config.message.send_stream_max_inflight = 1;
        config.gateway.sends_per_second = 1000;
        config.gateway.send_burst = 1000;
    })
    .await;
    let (alice, _a) = system.connect("alice", "alice-phone").await;
    let (carol, _c) = system.connect("carol", "carol-phone").await;
    let (_bob, mut bob_events) = system.connect("bob", "bob-phone").await;
    let with_alice = alice.direct("bob").await.unwrap().conversation_id;
    let with_carol = carol.direct("bob").await.unwrap().conversation_id;
    let sends = (0..30).flat_map(|i| {
        let (alice, carol, with_alice, with_carol) = (&alice, &carol, &with_alice, &with_carol);
        [
            async move { alice.send(with_alice, &format!("a{i}")).await }.boxed(),
            async move { carol.send(with_carol, &format!("c{i}")).await }.boxed(),
        ]
    });
    let acks = join_all(sends).await;
    assert!(acks.iter().all(Result::is_ok), "a send failed at the in-flight limit: {acks:?}");
    let received = messages(&mut bob_events, 60).await;
    for (conversation, prefix) in [(&with_alice, "a"), (&with_carol, "c")] {
        let seqs: Vec<u64> = received.iter().filter(|m| &m.conversation_id == conversation).map(|m| m.seq).collect();
        assert_eq!(seqs, (1..=30).collect::<Vec<_>>(), "{prefix}: dense and in order");
    }
    assert_quiet(&mut bob_events).await;
}

#[tokio::test]
async fn session_limit_refuses_connects_beyond_it() {
    let system = TestSystem::start_with(|config| config.gateway.max_sessions = 2).await;
    let (first, _f) = system.connect("alice", "phone").await;
    let (_second, _s) = system.connect("bob", "phone").await;
    let refused = Client::connect(system.options("carol", "phone")).await.err().expect("third session accepted");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    first.close().await;
    drop(first);
    let mut admitted = false;
    for _ in 0..50 {
        if Client::connect(system.options("carol", "phone")).await.is_ok() {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(admitted, "a freed session slot was never reused");
}

#[tokio::test]
async fn a_stream_without_hello_is_closed() {
    let system = TestSystem::start_with(|config| config.gateway.hello_timeout = Duration::from_millis(300)).await;
    let mut raw = RawClient::new(system.raw_channel().await);
    let silent = futures::stream::pending::<messenger_proto::v1::ClientFrame>();
    let mut stream = raw.connect(system.authorized("alice", silent)).await.unwrap().into_inner();
    let status = tokio::time::timeout(WAIT, stream.message()).await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
}

#[tokio::test]
async fn health_and_reflection_are_served_on_every_port() {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let system = TestSystem::start().await;
    let addresses = &system.running.as_ref().unwrap().addresses;
    let ports = [
        (addresses.gateway.unwrap(), "messenger.v1.GatewayService"),
        (addresses.gateway_internal.unwrap(), "messenger.v1.GatewayInternalService"),
        (addresses.message.unwrap(), "messenger.v1.MessageService"),
        (addresses.presence.unwrap(), "messenger.v1.PresenceService"),
    ];
    for (address, service) in ports {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
        let status = HealthClient::new(channel.clone())
            .check(HealthCheckRequest { service: service.into() })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service}");

        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = ServerReflectionClient::new(channel)
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            responses.message().await.unwrap().unwrap().message_response
        else {
            panic!("unexpected reflection answer");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(names.iter().any(|n| n == service), "{service} missing from {names:?}");
    }
}

/// A background task's panic (the SQLite writer, a fan-out worker, a send
/// pipe) turns every port NOT_SERVING at once and the process exits with an
/// error naming the task, so the orchestrator starts a fresh one.
#[tokio::test]
async fn a_background_task_panic_turns_every_port_not_serving_and_fails_the_process() {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let mut system = TestSystem::start().await;
    let running = system.running.take().unwrap();
    let addresses = &running.addresses;
    let ports = [
        (addresses.gateway.unwrap(), "messenger.v1.GatewayService"),
        (addresses.gateway_internal.unwrap(), "messenger.v1.GatewayInternalService"),
        (addresses.message.unwrap(), "messenger.v1.MessageService"),
        (addresses.presence.unwrap(), "messenger.v1.PresenceService"),
    ];
    let mut watches = Vec::new();
    for (address, service) in ports {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
        let mut watch = HealthClient::new(channel)
            .watch(HealthCheckRequest { service: service.into() })
            .await
            .unwrap()
            .into_inner();
        let first = watch.message().await.unwrap().unwrap().status;
        assert_eq!(first, ServingStatus::Serving as i32, "{service}");
        watches.push((service, watch));
    }

    running.supervisor().spawn("injected", async { panic!("injected failure") });
    let panicked_at = std::time::Instant::now();
    for (service, mut watch) in watches {
        let next = tokio::time::timeout(Duration::from_secs(1), watch.message())
            .await
            .unwrap_or_else(|_| panic!("{service} still reported SERVING a second after the panic"));
        assert_eq!(next.unwrap().unwrap().status, ServingStatus::NotServing as i32, "{service}");
    }
    assert!(panicked_at.elapsed() < Duration::from_secs(1));
    let exit = tokio::time::timeout(WAIT, running.wait()).await.expect("the process did not stop");
    let error = exit.expect_err("the process ended successfully after a background task panicked");
    assert!(error.to_string().contains("background task injected failed: panicked: injected failure"), "{error}");
}

#[tokio::test]
async fn services_started_one_role_at_a_time_find_each_other() {
    use messenger::system;
    use messenger_platform::discovery::Role;
    let dir = tempfile::tempdir().unwrap();
    let base = messenger::Config::for_loopback(dir.path());
    // As `messenger serve --service NAME` does, one role per start, wired by static discovery.
    let presence = system::start(base.clone(), &[Role::Presence]).await.unwrap();
    let mut config = base.clone();
    config.discovery.presence = vec![presence.addresses.presence.unwrap().to_string()];
    let message = system::start(config.clone(), &[Role::Message]).await.unwrap();
    config.discovery.message = vec![message.addresses.message.unwrap().to_string()];
    let gateway = system::start(config.clone(), &[Role::Gateway]).await.unwrap();

    let token = |user: &str| auth::mint_hs256(&config.auth, user, Duration::from_secs(600)).unwrap();
    let options = |user: &str| messenger_client::Options::new(gateway.endpoint(), token(user), "phone");
    let (alice, _a) = Client::connect(options("alice")).await.unwrap();
    let (_bob, mut bob_events) = Client::connect(options("bob")).await.unwrap();
    let conversation = alice.direct("bob").await.unwrap();
    alice.send(&conversation.conversation_id, "across three servers").await.unwrap();
    assert_eq!(next_message(&mut bob_events).await.body, "across three servers");
    for running in [gateway, message, presence] {
        running.stop().await.unwrap();
    }
}

#[tokio::test]
async fn concurrent_stream_limit_holds_per_connection() {
    let system = TestSystem::start_with(|config| config.server.max_concurrent_streams = 2).await;
    // One HTTP/2 connection, shared by every call below.
    let channel = system.raw_channel().await;
    let (first_frames, mut first) = system.raw_stream(channel.clone(), "alice", "raw").await;
    let _second = system.raw_stream(channel.clone(), "bob", "raw").await;
    // A third call on the same connection waits for a free stream slot...
    let mut raw = RawClient::new(channel);
    let request = system.authorized("carol", messenger_proto::v1::ListConversationsRequest::default());
    let third = tokio::spawn(async move { raw.list_conversations(request).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!third.is_finished(), "a third stream ran beside two on a 2-stream connection");
    // ...and runs as soon as one closes (the client ends its side, the server ends its own).
    drop(first_frames);
    while let Ok(Some(_)) = first.message().await {}
    let answer = tokio::time::timeout(WAIT, third).await.expect("the waiting call never ran").unwrap();
    assert!(answer.is_ok(), "{answer:?}");
}

#[tokio::test]
async fn history_pages_are_clamped_to_the_configured_maximum() {
    let system = TestSystem::start_with(|config| {
        config.message.history_page_default = 3;
        config.message.history_page_max = 5;
    })
    .await;
    let (alice, _a) = system.connect("alice", "phone").await;
    let id = alice.direct("bob").await.unwrap().conversation_id;
    for i in 0..8 {
        alice.send(&id, &format!("m{i}")).await.unwrap();
    }
    assert_eq!(alice.history(&id, 0, 0).await.unwrap().messages.len(), 3, "default page size");
    let capped = alice.history(&id, 0, 1000).await.unwrap();
    assert_eq!(capped.messages.len(), 5, "page size above the maximum");
    assert!(capped.has_more);
    let rest = alice.history(&id, capped.messages[0].seq, 1000).await.unwrap();
    assert_eq!(rest.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(!rest.has_more);
}

#[tokio::test]
async fn a_malformed_ack_is_refused_alone() {
    let system = TestSystem::start().await;
    let (alice, _a) = system.connect("alice", "phone").await;
    let id = alice.direct("bob").await.unwrap().conversation_id;
    alice.send(&id, "one").await.unwrap();
    // Bob's raw device acks garbage first, then the real conversation.
    use messenger_proto::v1::{self as pb, client_frame::Frame};
    let (frames, mut stream) = system.raw_stream(system.raw_channel().await, "bob", "bob-phone").await;
    let mut refused = None;
    let ack = |conversation_id: &str| pb::ClientFrame {
        trace_context: Default::default(),
        frame: Some(Frame::Ack(pb::Ack { conversation_id: conversation_id.into(), seq: 1 })),
    };
    frames.send(ack("not-a-uuid")).await.unwrap();
    frames.send(ack(&id)).await.unwrap();
    while let Ok(Ok(Some(frame))) = tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
        if let Some(pb::server_frame::Frame::Error(error)) = frame.frame {
            refused = Some(error.code);
        }
    }
    assert_eq!(refused, Some(Code::InvalidArgument as i32));
    drop(frames);
    while let Ok(Some(_)) = stream.message().await {}
    // The valid ack was stored: the same device gets nothing again.
    let (_bob, mut bob_events) = system.connect("bob", "bob-phone").await;
    assert_quiet(&mut bob_events).await;
}

#[tokio::test]
async fn sdk_moves_on_to_a_fallback_gateway() {
    let system = TestSystem::start().await;
    let dead = format!("http://127.0.0.1:{}", messenger_testkit::free_port());
    let mut options = system.options("alice", "alice-phone");
    options.fallback_endpoints = vec![std::mem::replace(&mut options.endpoint, dead)];
    let (alice, _events) = messenger_client::Client::connect(options).await.expect("the fallback was not tried");
    let (_bob, mut bob_events) = system.connect("bob", "bob-phone").await;
    let conversation = alice.direct("bob").await.unwrap().conversation_id;
    alice.send(&conversation, "through the fallback").await.unwrap();
    assert_eq!(next_message(&mut bob_events).await.body, "through the fallback");
}
