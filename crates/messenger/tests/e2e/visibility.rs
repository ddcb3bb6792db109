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
