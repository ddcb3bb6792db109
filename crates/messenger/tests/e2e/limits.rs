//! Rate limits of the public API at their configured edges, through real
//! sockets: RESOURCE_EXHAUSTED with RetryInfo, and read marks that move
//! nothing cost nothing.

use std::time::Duration;

use messenger_client::Event;
use messenger_gateway::Rate;
use messenger_proto::v1::{self as pb, client_frame::Frame};
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::{RawClient, TestSystem, next_message};

/// Asserts `status` is RESOURCE_EXHAUSTED with a retry delay a client can honour.
fn assert_exhausted_with_retry_info(status: &tonic::Status, what: &str) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{what}: {status:?}");
    let retry = status.get_details_retry_info().unwrap_or_else(|| panic!("{what}: no RetryInfo in {status:?}"));
    let delay = retry.retry_delay.expect("a retry delay");
    assert!(delay > Duration::ZERO && delay <= Duration::from_secs(2), "{what}: retry in {delay:?}");
}

#[tokio::test]
async fn a_thousand_identical_read_marks_cost_one_write_and_one_receipt() {
    let system = TestSystem::start().await;
    let (bob, mut bob_events) = system.connect("bob", "phone").await;
    let direct = bob.direct("alice").await.unwrap().conversation_id;
    bob.send(&direct, "read me").await.unwrap();
    let (frames, mut stream) = system.raw_stream(system.raw_channel().await, "alice", "raw").await;
    for _ in 0..1000 {
        let read = pb::Read { conversation_id: direct.clone(), seq: 1 };
        frames
            .send(pb::ClientFrame { trace_context: Default::default(), frame: Some(Frame::Read(read)) })
            .await
            .unwrap();
    }
    let mut receipts = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(event) = tokio::time::timeout_at(deadline, bob_events.next()).await {
        if let Some(Event::Receipt(receipt)) = event
            && receipt.user_id == "alice"
            && receipt.read_seq == 1
        {
            receipts += 1;
        }
    }
    assert_eq!(receipts, 1, "one read mark, one receipt");
    // None of the repeats was answered with an error (they cost nothing).
    drop(frames);
    while let Ok(Some(frame)) = stream.message().await {
        if let Some(pb::server_frame::Frame::Error(error)) = frame.frame {
            panic!("a repeated read mark was answered: {error:?}");
        }
    }
    let state = bob.receipts(&direct, 1).await.unwrap();
    assert!(state.read_by.iter().any(|user| user == "alice"), "{state:?}");
}

#[tokio::test]
async fn reactions_group_changes_and_direct_creation_stop_at_their_edges_with_retry_info() {
    let system = TestSystem::start_with(|config| {
        let limits = &mut config.gateway.rate_limits;
        limits.modifications = Rate { per_second: 1, burst: 3 };
        limits.group_changes = Rate { per_second: 1, burst: 2 };
        limits.direct_conversations = Rate { per_second: 1, burst: 2 };
    })
    .await;
    let mut raw = RawClient::new(system.raw_channel().await);
    let direct = |peer: &str| system.authorized("alice", pb::GetOrCreateDirectRequest { peer_id: peer.into() });
    raw.get_or_create_direct(direct("bob")).await.unwrap();
    raw.get_or_create_direct(direct("carol")).await.unwrap();
    let status = raw.get_or_create_direct(direct("dave")).await.unwrap_err();
    assert_exhausted_with_retry_info(&status, "third direct conversation");

    let create = pb::CreateGroupRequest { title: "team".into(), member_ids: vec!["bob".into()] };
    let group = raw.create_group(system.authorized("alice", create)).await.unwrap().into_inner();
    let group = group.conversation.unwrap().conversation_id;
    let rename = |title: &str| {
        let change = pb::update_group_request::Change::Rename(title.into());
        system.authorized("alice", pb::UpdateGroupRequest { conversation_id: group.clone(), change: Some(change) })
    };
    raw.update_group(rename("team 2")).await.unwrap();
    let status = raw.update_group(rename("team 3")).await.unwrap_err();
    assert_exhausted_with_retry_info(&status, "third group change");
    // Another user's budget is their own.
    let bob_group = pb::CreateGroupRequest { title: "bob's".into(), member_ids: Vec::new() };
    raw.create_group(system.authorized("bob", bob_group)).await.unwrap();

    let (alice, mut alice_events) = system.connect("alice", "phone").await;
    let seq = alice.send(&group, "react to me").await.unwrap().seq;
    next_message(&mut alice_events).await;
    let toggle = |emoji: &str| {
        let change = pb::modify_message_request::Change::React(emoji.into());
        let request =
            pb::ModifyMessageRequest { conversation_id: group.clone(), target_seq: seq, change: Some(change) };
        system.authorized("alice", request)
    };
    for emoji in ["👍", "", "👍"] {
        raw.modify_message(toggle(emoji)).await.unwrap();
    }
    let status = raw.modify_message(toggle("")).await.unwrap_err();
    assert_exhausted_with_retry_info(&status, "fourth reaction toggle");
    // The budget refills at its sustained rate.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    raw.modify_message(toggle("")).await.unwrap();
}

#[tokio::test]
async fn an_address_that_floods_is_refused_before_its_tokens_are_verified() {
    let system = TestSystem::start_with(|config| {
        config.gateway.rate_limits.calls_per_address = Rate { per_second: 1, burst: 4 };
    })
    .await;
    let mut raw = RawClient::new(system.raw_channel().await);
    let list = || pb::ListConversationsRequest { page_token: String::new(), limit: 10 };
    let forged = || {
        let mut request = tonic::Request::new(list());
        request.metadata_mut().insert("authorization", "Bearer not.a.token".parse().unwrap());
        request
    };
    for _ in 0..3 {
        assert_eq!(raw.list_conversations(forged()).await.unwrap_err().code(), Code::Unauthenticated);
    }
    raw.list_conversations(system.authorized("alice", list())).await.unwrap();
    // The burst is spent: refused before the token is looked at, valid or not.
    let status = raw.list_conversations(forged()).await.unwrap_err();
    assert_exhausted_with_retry_info(&status, "fifth call from the address");
    let status = raw.list_conversations(system.authorized("alice", list())).await.unwrap_err();
    assert_exhausted_with_retry_info(&status, "a valid token from the same address");
    // The browser port counts the same calls: its WebSocket Hello is refused too.
    let web = system.running.as_ref().unwrap().addresses.web.unwrap();
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{web}/v1/stream")).await.unwrap();
    {
        use futures::{SinkExt, StreamExt};
        use prost::Message as _;
        let hello = pb::Hello { device_id: "d".into(), access_token: system.token("alice") };
        let frame = pb::ClientFrame { frame: Some(Frame::Hello(hello)), trace_context: Default::default() };
        socket.send(tokio_tungstenite::tungstenite::Message::Binary(frame.encode_to_vec().into())).await.unwrap();
        let mut close = None;
        while let Some(Ok(message)) = socket.next().await {
            if let tokio_tungstenite::tungstenite::Message::Close(frame) = message {
                close = frame.map(|frame| u16::from(frame.code));
                break;
            }
        }
        assert_eq!(close, Some(4000 + Code::ResourceExhausted as u16));
    }
    // It refills at its sustained rate.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    raw.list_conversations(system.authorized("alice", list())).await.unwrap();
}

#[tokio::test]
async fn one_address_holds_no_more_streams_before_hello_than_its_cap() {
    let system = TestSystem::start_with(|config| {
        config.gateway.rate_limits.max_pre_hello_streams_per_address = 2;
    })
    .await;
    let channel = system.raw_channel().await;
    let silent = || {
        let (frames, receiver) = tokio::sync::mpsc::channel::<pb::ClientFrame>(4);
        let request = system.authorized("mallory", tokio_stream::wrappers::ReceiverStream::new(receiver));
        (frames, request)
    };
    let (first_frames, first) = silent();
    let mut first = RawClient::new(channel.clone()).connect(first).await.unwrap().into_inner();
    let (_second_frames, second) = silent();
    let _second = RawClient::new(channel.clone()).connect(second).await.unwrap();
    let (_third_frames, third) = silent();
    let status = RawClient::new(channel.clone()).connect(third).await.unwrap_err();
    assert_exhausted_with_retry_info(&status, "third stream before Hello");

    // Hello frees the place.
    first_frames.send(crate::support::hello("mallory-phone")).await.unwrap();
    let ready = first.message().await.unwrap().unwrap();
    assert!(matches!(ready.frame, Some(pb::server_frame::Frame::Ready(_))), "{ready:?}");
    let (_fourth_frames, fourth) = silent();
    RawClient::new(channel).connect(fourth).await.unwrap();
}

#[tokio::test]
async fn a_fan_out_to_more_users_than_one_locate_call_takes_is_delivered_whole() {
    // Presence answers 3 users a call; fan-out asks 2 at a time.
    let system = TestSystem::start_with(|config| {
        config.presence.max_users_per_call = 3;
        config.message.fanout.locate_max_users = 2;
    })
    .await;
    let members = ["bob", "carol", "dave", "erin", "frank"];
    let (alice, _alice_events) = system.connect("alice", "phone").await;
    let group = alice.create_group("big", &members).await.unwrap().conversation_id;
    let mut devices = Vec::new();
    for member in members {
        let (client, mut events) = system.connect(member, "phone").await;
        // The group's creation entry first (synced), then live.
        next_message(&mut events).await;
        devices.push((client, events));
    }
    alice.send(&group, "to all six").await.unwrap();
    for (_, events) in &mut devices {
        assert_eq!(next_message(events).await.body, "to all six");
    }
}

/// A send refused on the stream by the rate limit says, in a field, how long
/// to wait (as RetryInfo does for unary calls), not only in its text.
#[tokio::test]
async fn a_rate_limited_send_frame_carries_its_wait_as_a_field() {
    let system = TestSystem::start_with(|config| {
        config.gateway.sends_per_second = 1;
        config.gateway.send_burst = 1;
    })
    .await;
    let (alice, _events) = system.connect("alice", "phone").await;
    let direct = alice.direct("bob").await.unwrap().conversation_id;
    let (frames, mut stream) = system.raw_stream(system.raw_channel().await, "alice", "raw").await;
    for i in 0..3 {
        let send = pb::SendRequestFrame {
            conversation_id: direct.clone(),
            client_msg_id: format!("burst-{i}"),
            body: "hi".into(),
            reply_to_seq: 0,
            media_ids: Vec::new(),
        };
        frames
            .send(pb::ClientFrame { trace_context: Default::default(), frame: Some(Frame::Send(send)) })
            .await
            .unwrap();
    }
    let refused = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(pb::server_frame::Frame::Error(error)) = stream.message().await.unwrap().unwrap().frame {
                return error;
            }
        }
    })
    .await
    .expect("no send was refused");
    assert_eq!(refused.code, Code::ResourceExhausted as i32, "{refused:?}");
    assert!(refused.client_msg_id.starts_with("burst-"), "{refused:?}");
    assert!((1..=1000).contains(&refused.retry_after_ms), "{refused:?}");
}
