//! Conversations as users know them: groups, roles, receipts, typing,
//! multi-device, edits, deletes, reactions and replies.

use std::time::Duration;

use futures::future::join_all;
use messenger_client::{Client, Event, Events, MessageKind, Role};
use tonic::Code;

use crate::support::*;

/// Polls until `check` holds or the wait runs out.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test]
async fn group_of_fifty_reaches_every_device_and_receipts_converge() {
    let system = TestSystem::start().await;
    let users: Vec<String> = (0..50).map(|i| format!("user{i:02}")).collect();
    let (owner, _owner_events) = system.connect(&users[0], "phone").await;
    // 30 members online now, 19 connect later.
    let online = join_all(users[1..31].iter().map(|u| system.connect(u, "phone"))).await;
    let others: Vec<&str> = users[1..].iter().map(String::as_str).collect();
    let group = owner.create_group("fifty", &others).await.unwrap();
    let id = group.conversation_id.clone();
    let ack = owner.send(&id, "hello everyone").await.unwrap();
    assert_eq!(ack.seq, 2, "creation is entry 1");

    let mut online_events: Vec<(Client, Events)> = online;
    let received = join_all(online_events.iter_mut().map(|(_, events)| messages(events, 2))).await;
    for entries in &received {
        assert_eq!(entries[0].kind, MessageKind::GroupCreated as i32);
        assert_eq!(entries[1].body, "hello everyone");
    }
    let late = join_all(users[31..].iter().map(|u| system.connect(u, "phone"))).await;
    let mut late_events = late;
    let caught_up = join_all(late_events.iter_mut().map(|(_, events)| messages(events, 2))).await;
    assert!(caught_up.iter().all(|entries| entries.iter().map(|m| m.seq).eq([1, 2])));

    // Everyone reads it; the sender can ask who has it and sees it live in its model.
    for (client, _) in online_events.iter().chain(late_events.iter()) {
        client.mark_read(&id, ack.seq).await.unwrap();
    }
    eventually("every member has received and read the message", async || {
        let receipts = owner.receipts(&id, ack.seq).await.unwrap();
        receipts.delivered_to.len() == 49 && receipts.read_by.len() == 49
    })
    .await;
    eventually("the sender's model shows 49 readers", async || {
        owner.conversation_state(&id).is_some_and(|state| state.read_by(ack.seq).len() == 49)
    })
    .await;
    let state = owner.conversation_state(&id).unwrap();
    assert_eq!(state.members.len(), 50);
    assert_eq!(state.members[&users[0]], Role::Owner);
}

#[tokio::test]
async fn authorization_holds_at_every_edge() {
    let system = TestSystem::start_with(|config| config.message.max_group_size = 5).await;
    let (owner, _o) = system.connect("owner", "phone").await;
    let (admin, _a) = system.connect("admin", "phone").await;
    let (member, _m) = system.connect("member", "phone").await;
    let (outsider, _x) = system.connect("outsider", "phone").await;

    let over = owner.create_group("big", &["a", "b", "c", "d", "e"]).await.unwrap_err();
    assert_eq!(over.code(), Code::FailedPrecondition, "{over:?}");
    assert!(over.to_string().contains("6 members; the limit is 5"), "{over}");

    let group = owner.create_group("team", &["admin", "member", "other"]).await.unwrap();
    let id = group.conversation_id.as_str();
    owner.set_role(id, "admin", Role::Admin).await.unwrap();
    let denied = member.remove_member(id, "admin").await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let denied = admin.remove_member(id, "owner").await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let denied = member.add_members(id, &["friend"]).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let denied = admin.set_role(id, "member", Role::Admin).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    admin.add_members(id, &["fifth"]).await.unwrap();
    let full = admin.add_members(id, &["sixth"]).await.unwrap_err();
    assert_eq!(full.code(), Code::FailedPrecondition, "{full:?}");

    let message = owner.send(id, "owner's words").await.unwrap();
    let denied = member.edit(id, message.seq, "not mine").await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let denied = member.delete(id, message.seq).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

    // A non-member learns nothing, not even that the conversation exists.
    for error in [
        outsider.react(id, message.seq, "👍").await.unwrap_err(),
        outsider.receipts(id, message.seq).await.map(|_| ()).unwrap_err(),
        outsider.get_conversation(id).await.map(|_| ()).unwrap_err(),
        outsider.history(id, 0, 10).await.map(|_| ()).unwrap_err(),
        outsider.send(id, "hi").await.map(|_| ()).unwrap_err(),
        outsider.rename(id, "mine").await.map(|_| ()).unwrap_err(),
    ] {
        assert_eq!(error.code(), Code::NotFound, "{error:?}");
    }

    // A removed member stops receiving and keeps only what it was allowed to see.
    admin.remove_member(id, "member").await.unwrap();
    let after = owner.send(id, "after removal").await.unwrap();
    let seen = member.history(id, 0, 50).await.unwrap();
    assert!(seen.messages.iter().all(|m| m.seq < after.seq), "a removed member read on");
    assert_eq!(seen.messages.last().unwrap().kind, MessageKind::MemberRemoved as i32);
    let refused = member.send(id, "still here?").await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    eventually("the removed member's model knows", async || {
        member.conversation_state(id).is_some_and(|state| state.removed)
    })
    .await;
    let state = member.conversation_state(id).unwrap();
    assert!(!state.messages.contains_key(&after.seq), "a removed member received later messages");
}

#[tokio::test]
async fn every_device_gets_everything_and_reading_anywhere_clears_unread() {
    let system = TestSystem::start_with(|config| {
        config.message.typing_ttl = Duration::from_millis(300);
        config.gateway.typing_per_second = 1;
    })
    .await;
    let (alice_phone, mut alice_phone_events) = system.connect("alice", "phone").await;
    let (alice_laptop, mut alice_laptop_events) = system.connect("alice", "laptop").await;
    let (bob_phone, mut bob_phone_events) = system.connect("bob", "phone").await;
    let (bob_tablet, _bob_tablet_events) = system.connect("bob", "tablet").await;
    let id = alice_phone.direct("bob").await.unwrap().conversation_id;

    let sent = alice_phone.send(&id, "from my phone").await.unwrap();
    for events in [&mut alice_phone_events, &mut alice_laptop_events, &mut bob_phone_events] {
        assert_eq!(next_message(events).await.seq, sent.seq);
    }
    eventually("the laptop shows the phone's message as its own", async || {
        alice_laptop.conversation_state(&id).is_some_and(|s| s.messages.get(&sent.seq).is_some_and(|m| m.own))
    })
    .await;
    eventually("both of bob's devices count it unread", async || {
        [&bob_phone, &bob_tablet].iter().all(|c| c.conversation_state(&id).is_some_and(|s| s.unread_count("bob") == 1))
    })
    .await;
    bob_phone.mark_read(&id, sent.seq).await.unwrap();
    eventually("reading on the phone clears the tablet", async || {
        bob_tablet.conversation_state(&id).is_some_and(|s| s.unread_count("bob") == 0)
    })
    .await;
    eventually("alice sees bob read it", async || {
        alice_laptop.conversation_state(&id).is_some_and(|s| s.read_by(sent.seq) == ["bob"])
    })
    .await;
    let inbox = bob_tablet.conversations("", 10).await.unwrap();
    assert_eq!(inbox.conversations[0].unread_count, 0);

    // Typing reaches the other side, is rate limited, and expires by itself.
    for _ in 0..6 {
        bob_phone.typing(&id, true).await.unwrap();
    }
    let mut typing_events = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(700);
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, alice_phone_events.next()).await {
        if let Event::Typing(typing) = event {
            assert_eq!((typing.user_id.as_str(), typing.typing), ("bob", true));
            typing_events += 1;
        }
    }
    assert!((1..=2).contains(&typing_events), "{typing_events} typing events passed a 1/s limit (burst 2)");
    assert!(alice_phone.typing_in(&id).is_empty(), "the indicator did not expire");
}

#[tokio::test]
async fn edits_reactions_replies_and_deletes_replay_on_sync() {
    let system = TestSystem::start().await;
    let (alice, _a) = system.connect("alice", "phone").await;
    let (carol, _c) = system.connect("carol", "phone").await;
    let group = alice.create_group("trio", &["bob", "carol"]).await.unwrap();
    let id = group.conversation_id.as_str();
    let first = alice.send(id, "first draft").await.unwrap().seq;
    let doomed = alice.send(id, "regrettable").await.unwrap().seq;
    let reply = carol.reply(id, first, "nice").await.unwrap().seq;
    alice.edit(id, first, "final text").await.unwrap();
    carol.react(id, first, "👍").await.unwrap();
    alice.react(id, first, "🎉").await.unwrap();
    alice.react(id, first, "").await.unwrap();
    assert!(carol.react(id, first, "👍").await.unwrap().is_none(), "same reaction twice made an entry");
    alice.react(id, doomed, "😬").await.unwrap();
    alice.delete(id, doomed).await.unwrap();
    alice.rename(id, "renamed trio").await.unwrap();

    // Bob was offline for all of it; his device replays it into the same state.
    let (bob, mut bob_events) = system.connect("bob", "phone").await;
    let head = alice.get_conversation(id).await.unwrap().last_seq;
    let replayed = messages(&mut bob_events, head as usize).await;
    assert!(replayed.iter().map(|m| m.seq).eq(1..=head));
    let state = bob.conversation_state(id).unwrap();
    assert_eq!(state.title, "renamed trio");
    let first_state = &state.messages[&first];
    assert_eq!((first_state.body.as_str(), first_state.edited), ("final text", true));
    assert_eq!(
        first_state.reactions.iter().map(|(u, e)| (u.as_str(), e.as_str())).collect::<Vec<_>>(),
        [("carol", "👍")]
    );
    let doomed_state = &state.messages[&doomed];
    assert!(doomed_state.deleted && doomed_state.body.is_empty() && doomed_state.reactions.is_empty());
    assert_eq!(state.messages[&reply].reply_to_seq, first);
    // The deleted body is gone from the server too.
    let history = bob.history(id, 0, 50).await.unwrap();
    assert!(history.messages.iter().all(|m| m.body != "regrettable"));
    let edit_error = alice.edit(id, doomed, "resurrect").await.unwrap_err();
    assert_eq!(edit_error.code(), Code::FailedPrecondition, "{edit_error:?}");
}

#[tokio::test]
async fn presence_updates_reach_only_contacts_in_small_conversations() {
    let system = TestSystem::start_with(|config| config.message.presence_updates_max_members = 2).await;
    let (alice, mut alice_events) = system.connect("alice", "alice-phone").await;
    let (_carol, mut carol_events) = system.connect("carol", "carol-phone").await;
    let (_erin, mut erin_events) = system.connect("erin", "erin-phone").await;
    let direct = alice.direct("bob").await.unwrap().conversation_id;
    // Three members: over the limit of two, so erin is no contact of bob's.
    let big = alice.create_group("big", &["bob", "erin"]).await.unwrap().conversation_id;
    // Bob answers in both: his presence goes only where he took part.
    let (bob_tablet, _bob_tablet_events) = system.connect("bob", "bob-tablet").await;
    bob_tablet.send(&direct, "hi alice").await.unwrap();
    bob_tablet.send(&big, "hi all").await.unwrap();
    bob_tablet.close().await;
    let offline = presence_update(&mut alice_events).await.expect("alice was not told bob's tablet left");
    assert_eq!((offline.user_id.as_str(), offline.online), ("bob", false));

    let (bob_phone, _bob_phone_events) = system.connect("bob", "bob-phone").await;
    let online = presence_update(&mut alice_events).await.expect("alice was not told bob came online");
    assert_eq!((online.user_id.as_str(), online.online), ("bob", true));
    assert!(alice.presence("bob").unwrap().online);
    assert!(presence_update(&mut carol_events).await.is_none(), "carol shares no conversation with bob");
    assert!(presence_update(&mut erin_events).await.is_none(), "erin shares only a group over the limit");

    // A second device is no news; only the last one leaving is.
    let (bob_laptop, _bob_laptop_events) = system.connect("bob", "bob-laptop").await;
    assert!(presence_update(&mut alice_events).await.is_none(), "a second device announced bob again");
    bob_laptop.close().await;
    assert!(presence_update(&mut alice_events).await.is_none(), "bob went offline with a device still connected");
    bob_phone.close().await;
    let offline = presence_update(&mut alice_events).await.expect("alice was not told bob went offline");
    assert_eq!((offline.user_id.as_str(), offline.online), ("bob", false));
    assert!(offline.last_seen_ms >= online.last_seen_ms);
    assert!(!alice.presence("bob").unwrap().online);
}

/// `GetConversations` answers each conversation the caller is in, in the
/// order asked and once, leaves the others out, and takes at most
/// `message.conversations_per_call` ids.
#[tokio::test]
async fn several_conversations_in_one_call_and_no_more_than_the_limit() {
    use messenger_proto::v1::{self as pb, gateway_service_client::GatewayServiceClient};
    let system = TestSystem::start_with(|config| config.message.conversations_per_call = 4).await;
    let (alice, _a) = system.connect("alice", "phone").await;
    let (bob, _b) = system.connect("bob", "phone").await;
    let group = alice.create_group("team", &["bob", "carol"]).await.unwrap().conversation_id;
    let direct = alice.direct("bob").await.unwrap().conversation_id;
    let not_hers = bob.direct("carol").await.unwrap().conversation_id;
    let mut api = GatewayServiceClient::new(system.raw_channel().await);
    let ask = |ids: Vec<&str>| {
        let request = pb::GetConversationsRequest { conversation_ids: ids.into_iter().map(str::to_owned).collect() };
        system.authorized("alice", request)
    };
    let answer = api.get_conversations(ask(vec![&group, &not_hers, &direct, &group])).await.unwrap().into_inner();
    let got: Vec<&str> = answer.conversations.iter().map(|c| c.conversation_id.as_str()).collect();
    assert_eq!(got, [group.as_str(), direct.as_str()], "hers, in order, once; bob and carol's left out");
    let members: Vec<&str> = answer.conversations[0].members.iter().map(|m| m.user_id.as_str()).collect();
    assert_eq!(members.len(), 3, "members as GetConversation gives them: {members:?}");
    let over = api.get_conversations(ask(vec![&group, &direct, &not_hers, &group, &direct])).await.unwrap_err();
    assert_eq!(over.code(), tonic::Code::InvalidArgument, "{over:?}");
    assert!(over.message().contains("message.conversations_per_call"), "{over:?}");
    let bad = api.get_conversations(ask(vec!["not-a-uuid"])).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");
}

/// `GetConversations` costs one query per id against the `queries` rate, as
/// that many `GetConversation` calls would.
#[tokio::test]
async fn several_conversations_cost_one_query_each() {
    use messenger_proto::v1::{self as pb, gateway_service_client::GatewayServiceClient};
    let system = TestSystem::start_with(|config| {
        (config.gateway.rate_limits.queries.per_second, config.gateway.rate_limits.queries.burst) = (1, 5);
    })
    .await;
    let mut api = GatewayServiceClient::new(system.raw_channel().await);
    let ask = |count: usize| {
        let conversation_ids = (0..count).map(|_| uuid::Uuid::now_v7().to_string()).collect();
        system.authorized("alice", pb::GetConversationsRequest { conversation_ids })
    };
    let beyond = api.get_conversations(ask(6)).await.unwrap_err();
    assert_eq!(beyond.code(), tonic::Code::ResourceExhausted, "{beyond:?}");
    assert!(api.get_conversations(ask(5)).await.unwrap().into_inner().conversations.is_empty(), "the whole burst");
    let over = api.get_conversations(ask(1)).await.unwrap_err();
    assert_eq!(over.code(), tonic::Code::ResourceExhausted, "{over:?}");
}
