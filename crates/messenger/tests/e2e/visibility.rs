//! Visibility by seq (DESIGN section 4): a member sees exactly the entries
//! inside its membership, in every read and every delivery. Each test here
//! is one way the rule was broken once.

use std::time::Duration;

use messenger_client::{Events, MessageKind};
use tonic::Code;

use crate::support::*;

/// Every message event until `stop` holds for one, within the wait.
async fn messages_until(events: &mut Events, mut stop: impl FnMut(&messenger_client::Message) -> bool) -> Vec<String> {
    let mut bodies = Vec::new();
    loop {
        let message = next_message(events).await;
        bodies.push(message.body.clone());
        if stop(&message) {
            return bodies;
        }
    }
}

#[tokio::test]
async fn a_new_member_sees_nothing_from_before_joining_in_previews_or_edits() {
    let system = TestSystem::start().await;
    let (alice, _a) = system.connect("alice", "phone").await;
    let group = alice.create_group("before bob", &["carol"]).await.unwrap();
    let id = group.conversation_id.as_str();
    let secret = alice.send(id, "the old secret").await.unwrap().seq;
    alice.react(id, secret, "🤫").await.unwrap();
    alice.add_members(id, &["bob"]).await.unwrap();

    let (bob, mut bob_events) = system.connect("bob", "phone").await;
    let listed = bob.conversations("", 10).await.unwrap().conversations;
    let preview = listed.iter().find(|c| c.conversation_id == id).unwrap().last_message.clone();
    assert!(preview.is_none(), "the inbox previews a message from before bob joined: {preview:?}");
    let fetched = bob.get_conversation(id).await.unwrap();
    assert!(fetched.last_message.is_none(), "GetConversation previews it: {:?}", fetched.last_message);
    assert_eq!(fetched.unread_count, 0);

    // Edited and reacted to after bob joined: bob gets the entries (seqs stay
    // dense), never their content, live or from history.
    alice.edit(id, secret, "the old secret, edited").await.unwrap();
    alice.react(id, secret, "🔥").await.unwrap();
    let last = alice.send(id, "welcome bob").await.unwrap().seq;
    let live = messages_until(&mut bob_events, |m| m.seq == last).await;
    assert!(live.iter().all(|body| !body.contains("secret")), "bob's stream carried old content: {live:?}");
    let history = bob.history(id, 0, 50).await.unwrap().messages;
    assert!(history.first().is_some_and(|m| m.kind == MessageKind::MembersAdded as i32), "{history:?}");
    for message in &history {
        assert!(!message.body.contains("secret"), "history shows old content: {message:?}");
        if message.target_seq == secret {
            assert!(message.reaction.is_empty(), "history shows a reaction to an unseen message: {message:?}");
        }
    }
    let state = bob.conversation_state(id).unwrap();
    assert!(!state.messages.contains_key(&secret), "bob's model holds a message from before he joined");

    // The latest message before the join stays invisible once newer ones exist too.
    let preview = bob.get_conversation(id).await.unwrap().last_message.unwrap();
    assert_eq!(preview.body, "welcome bob");
    // And carol, there from the start, sees the edit.
    let carol_history = alice.history(id, 0, 50).await.unwrap().messages;
    assert!(carol_history.iter().any(|m| m.body == "the old secret, edited"));
}

#[tokio::test]
async fn a_removed_member_never_receives_what_was_sent_while_out() {
    // A fan-out that lingers long enough for the re-add to commit first:
    // it must decide by the entry's seq, not by the roster it reads later.
    let linger = Duration::from_millis(if on_scylla() { 400 } else { 60 });
    let system = TestSystem::start_with(|config| {
        config.message.fanout.linger = linger;
        config.gateway.rate_limits.group_changes = messenger_gateway::Rate { per_second: 1000, burst: 1000 };
    })
    .await;
    let (alice, _a) = system.connect("alice", "phone").await;
    let (bob, mut bob_events) = system.connect("bob", "phone").await;
    let group = alice.create_group("revolving door", &["bob", "carol"]).await.unwrap();
    let id = group.conversation_id.as_str();
    let trials = if on_scylla() { 4 } else { 12 };
    for trial in 0..trials {
        alice.remove_member(id, "bob").await.unwrap();
        alice.send(id, &format!("while bob is out {trial}")).await.unwrap();
        alice.add_members(id, &["bob"]).await.unwrap();
        let back = alice.send(id, &format!("bob is back {trial}")).await.unwrap().seq;
        let seen = messages_until(&mut bob_events, |m| m.seq == back).await;
        assert!(
            seen.iter().all(|body| !body.starts_with("while bob is out")),
            "trial {trial}: bob received what was sent while he was out: {seen:?}"
        );
    }
    let history = bob.history(id, 0, 100).await.unwrap().messages;
    assert!(history.iter().all(|m| !m.body.starts_with("while bob is out")), "{history:?}");
    let state = bob.conversation_state(id).unwrap();
    assert!(state.messages.values().all(|m| !m.body.starts_with("while bob is out")));
}

#[tokio::test]
async fn a_blocked_user_cannot_put_the_blocker_in_a_group() {
    let system = TestSystem::start().await;
    let (alice, _a) = system.connect("alice", "phone").await;
    let (bob, mut bob_events) = system.connect("bob", "phone").await;
    assert!(bob.block("alice").await.unwrap());

    // As for a direct conversation: the blocker does not exist for alice.
    let refused = alice.create_group("with bob", &["bob", "carol"]).await.unwrap_err();
    assert_eq!(refused.code(), Code::NotFound, "{refused:?}");
    let group = alice.create_group("without bob", &["carol"]).await.unwrap();
    let refused = alice.add_members(&group.conversation_id, &["bob"]).await.unwrap_err();
    assert_eq!(refused.code(), Code::NotFound, "{refused:?}");
    assert!(bob.conversations("", 10).await.unwrap().conversations.is_empty());
    assert_quiet(&mut bob_events).await;
}

#[tokio::test]
async fn a_blocked_users_group_messages_reach_the_blocker_withheld() {
    let system = TestSystem::start().await;
    let (alice, _a) = system.connect("alice", "phone").await;
    let (bob, mut bob_events) = system.connect("bob", "phone").await;
    let (carol, mut carol_events) = system.connect("carol", "phone").await;
    let group = alice.create_group("shared", &["bob", "carol"]).await.unwrap();
    let id = group.conversation_id.as_str();
    let before = alice.send(id, "before the block").await.unwrap().seq;
    messages_until(&mut bob_events, |m| m.seq == before).await;
    assert!(bob.block("alice").await.unwrap());

    // Alice still talks in the group; carol hears her, bob is given the
    // entries (seqs stay dense) but nothing of what she said.
    let said = alice.send(id, "alice talks").await.unwrap().seq;
    alice.react(id, before, "🔥").await.unwrap();
    alice.edit(id, before, "alice edits").await.unwrap();
    let last = carol.send(id, "carol talks").await.unwrap().seq;
    let carol_saw = messages_until(&mut carol_events, |m| m.seq == last).await;
    assert!(carol_saw.iter().any(|body| body == "alice talks"), "{carol_saw:?}");
    let mut live = Vec::new();
    loop {
        let message = next_message(&mut bob_events).await;
        live.push(message.clone());
        if message.seq == last {
            break;
        }
    }
    for message in &live {
        assert!(
            message.sender_id != "alice"
                || (message.withheld && message.body.is_empty() && message.reaction.is_empty()),
            "bob's stream carried alice's words: {message:?}"
        );
    }
    let history = bob.history(id, 0, 50).await.unwrap().messages;
    let entry = history.iter().find(|m| m.seq == said).expect("the seq stays in bob's history");
    assert!(entry.withheld && entry.body.is_empty(), "{entry:?}");
    assert!(
        history.iter().filter(|m| m.sender_id == "alice" && m.seq > before).all(|m| m.withheld && m.body.is_empty())
    );
    assert!(history.iter().any(|m| m.body == "carol talks"));
    let state = bob.conversation_state(id).unwrap();
    assert!(state.messages[&said].withheld && state.messages[&said].body.is_empty(), "{:?}", state.messages[&said]);
    assert!(state.messages.values().all(|m| !m.body.starts_with("alice")), "{:?}", state.messages);

    // The inbox preview withholds her too; her events still reach bob.
    alice.send(id, "alice has the last word").await.unwrap();
    let preview = bob.get_conversation(id).await.unwrap().last_message.unwrap();
    assert!(preview.withheld && preview.body.is_empty(), "{preview:?}");
    let listed = bob.conversations("", 10).await.unwrap().conversations;
    let preview = listed.iter().find(|c| c.conversation_id == id).unwrap().last_message.clone().unwrap();
    assert!(preview.withheld && preview.body.is_empty(), "{preview:?}");
    let renamed = alice.rename(id, "renamed by alice").await.unwrap().unwrap().seq;
    let event = messages_until(&mut bob_events, |m| m.seq == renamed).await;
    assert!(event.iter().all(|body| !body.starts_with("alice")), "{event:?}");

    // Her typing reaches carol, not bob.
    alice.typing(id, true).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), carol_events.next()).await.expect("carol saw no typing") {
            Some(messenger_client::Event::Typing(typing)) if typing.user_id == "alice" => break,
            Some(_) => continue,
            None => panic!("carol's events ended"),
        }
    }
    let marker = carol.send(id, "after the typing").await.unwrap().seq;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), bob_events.next()).await.expect("bob saw no marker") {
            Some(messenger_client::Event::Typing(typing)) => panic!("bob was told {typing:?}"),
            Some(messenger_client::Event::Message(message)) if message.seq == marker => break,
            Some(_) => continue,
            None => panic!("bob's events ended"),
        }
    }

    // Unblocked, bob reads her in full again.
    assert!(bob.unblock("alice").await.unwrap());
    let history = bob.history(id, 0, 50).await.unwrap().messages;
    assert!(history.iter().any(|m| m.seq == said && m.body == "alice talks" && !m.withheld), "{history:?}");
}

#[tokio::test]
async fn a_re_added_member_sees_what_it_saw_before_and_nothing_from_while_out() {
    let system = TestSystem::start().await;
    let (alice, _a) = system.connect("alice", "phone").await;
    let group = alice.create_group("out and back", &["bob", "carol"]).await.unwrap(); // 1
    let id = group.conversation_id.as_str();
    let before = alice.send(id, "before").await.unwrap().seq; // 2
    alice.remove_member(id, "bob").await.unwrap(); // 3
    let out = alice.send(id, "while out").await.unwrap().seq; // 4
    alice.add_members(id, &["bob"]).await.unwrap(); // 5
    let back = alice.send(id, "back").await.unwrap().seq; // 6
    // Bob's read cursor restarts at his re-add, past what he never saw.
    let receipts = alice.receipts(id, out).await.unwrap();
    assert!(!receipts.read_by.contains(&"bob".to_owned()), "read by bob, who was out: {receipts:?}");
    assert!(alice.receipts(id, back).await.unwrap().read_by.is_empty());

    let (bob, mut bob_events) = system.connect("bob", "tablet").await;
    let synced = messages_until(&mut bob_events, |m| m.seq == back).await;
    assert!(synced.contains(&"before".to_owned()), "a new device of bob lacks what he saw before: {synced:?}");
    assert!(!synced.contains(&"while out".to_owned()), "{synced:?}");
    let seqs = |page: &messenger_client::HistoryResponse| page.messages.iter().map(|m| m.seq).collect::<Vec<_>>();
    let whole = bob.history(id, 0, 50).await.unwrap();
    assert_eq!(seqs(&whole), [1, 2, 3, 5, 6], "{whole:?}");
    // Pages cross from one range to the one before it.
    let newest = bob.history(id, 0, 2).await.unwrap();
    assert_eq!((seqs(&newest), newest.has_more), (vec![5, 6], true));
    let older = bob.history(id, 5, 2).await.unwrap();
    assert_eq!((seqs(&older), older.has_more), (vec![2, 3], true));
    let oldest = bob.history(id, 2, 2).await.unwrap();
    assert_eq!((seqs(&oldest), oldest.has_more), (vec![1], false));

    // A reaction to what bob saw before reaches him in full.
    let reaction = alice.react(id, before, "🎉").await.unwrap().unwrap().seq;
    let live = next_message(&mut bob_events).await;
    assert_eq!((live.seq, live.reaction.as_str(), live.withheld), (reaction, "🎉", false), "{live:?}");
    let state = bob.conversation_state(id).unwrap();
    assert_eq!(state.messages[&before].reactions.get("alice").map(String::as_str), Some("🎉"));
    assert!(state.messages.values().all(|m| m.body != "while out"));
}

#[tokio::test]
async fn an_edit_made_after_a_removal_never_reaches_the_removed_members_history() {
    let system = TestSystem::start().await;
    let (alice, _a) = system.connect("alice", "phone").await;
    let (bob, _b) = system.connect("bob", "phone").await;
    let group = alice.create_group("edited later", &["bob", "carol"]).await.unwrap();
    let id = group.conversation_id.as_str();
    let kept = alice.send(id, "said while bob was here").await.unwrap().seq;
    let edited = alice.send(id, "the first words").await.unwrap().seq;
    alice.remove_member(id, "bob").await.unwrap();
    alice.edit(id, edited, "words bob must not read").await.unwrap();

    let history = bob.history(id, 0, 50).await.unwrap().messages;
    assert!(
        history.iter().all(|m| !m.body.contains("must not")),
        "bob reads an edit made after his removal: {history:?}"
    );
    let message = history.iter().find(|m| m.seq == edited).expect("the seq stays");
    assert!(message.withheld && message.body.is_empty(), "{message:?}");
    assert!(history.iter().any(|m| m.seq == kept && m.body == "said while bob was here"));
    // Nor does a device of his that syncs now (the gateway's backlog and gap fill).
    let (_tablet, mut tablet_events) = system.connect("bob", "tablet").await;
    let synced = messages(&mut tablet_events, 4).await;
    assert!(synced.iter().all(|m| !m.body.contains("must not")), "bob's new device syncs the edit: {synced:?}");
    assert!(synced.iter().any(|m| m.seq == edited && m.withheld), "{synced:?}");
    // Added back, he still cannot read it: the edit was made while he was out.
    alice.add_members(id, &["bob"]).await.unwrap();
    let history = bob.history(id, 0, 50).await.unwrap().messages;
    assert!(history.iter().all(|m| !m.body.contains("must not")), "{history:?}");
    // An edit he can see shows again.
    alice.edit(id, edited, "words for everyone").await.unwrap();
    let history = bob.history(id, 0, 50).await.unwrap().messages;
    assert!(history.iter().any(|m| m.seq == edited && m.body == "words for everyone"), "{history:?}");
}
