//! The contract every `MessageStore` must meet, written once and run against
//! each backend. `run_all` returns how many cases ran.

use futures::future::join_all;
use uuid::Uuid;

use super::*;
use crate::error::Error;

pub(crate) async fn send(
    store: &dyn MessageStore,
    conversation: Uuid,
    sender: &str,
    client_msg_id: &str,
    body: &str,
) -> Result<SendOutcome> {
    store
        .send(NewMessage {
            conversation_id: conversation,
            message_id: Uuid::now_v7(),
            sender: sender.into(),
            client_msg_id: client_msg_id.into(),
            body: body.into(),
            sent_at_ms: messenger_platform::ids::now_ms(),
        })
        .await
}

async fn direct(store: &dyn MessageStore, a: &str, b: &str) -> Conversation {
    store.get_or_create_direct(a, b, Uuid::now_v7(), messenger_platform::ids::now_ms()).await.unwrap()
}

/// Users unique to one run, so cases never see each other's data.
fn users(case: &str) -> (String, String, String) {
    let run = Uuid::now_v7().simple().to_string();
    (format!("{case}-a-{run}"), format!("{case}-b-{run}"), format!("{case}-c-{run}"))
}

type Case<'a> = (&'static str, std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>>);

pub(crate) async fn run_all(store: &dyn MessageStore) -> usize {
    let cases: Vec<Case<'_>> = vec![
        ("direct_is_created_once", Box::pin(direct_is_created_once(store))),
        ("send_assigns_dense_seq", Box::pin(send_assigns_dense_seq(store))),
        ("retried_send_returns_original", Box::pin(retried_send_returns_original(store))),
        ("non_member_cannot_send_or_read", Box::pin(non_member_cannot_send_or_read(store))),
        ("concurrent_sends_are_dense", Box::pin(concurrent_sends_are_dense(store))),
        ("history_pages_both_ways", Box::pin(history_pages_both_ways(store))),
        ("inbox_orders_by_activity", Box::pin(inbox_orders_by_activity(store))),
        ("cursors_only_move_forward", Box::pin(cursors_only_move_forward(store))),
        ("sync_returns_unacked_in_order", Box::pin(sync_returns_unacked_in_order(store))),
    ];
    let count = cases.len();
    for (name, case) in cases {
        eprintln!("contract case: {name}");
        case.await;
    }
    count
}

async fn direct_is_created_once(store: &dyn MessageStore) {
    let (a, b, c) = users("direct");
    let first = direct(store, &a, &b).await;
    let again = direct(store, &b, &a).await;
    assert_eq!(first.id, again.id);
    assert_eq!(first.kind, ConversationKind::Direct);
    let mut members = vec![a.clone(), b.clone()];
    members.sort();
    assert_eq!(first.members, members);
    assert_ne!(direct(store, &a, &c).await.id, first.id);
    // Concurrent creation still yields one conversation.
    let (x, y, _) = users("direct-race");
    let ids: Vec<Uuid> = join_all((0..8).map(|_| direct(store, &x, &y))).await.into_iter().map(|c| c.id).collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
}

async fn send_assigns_dense_seq(store: &dyn MessageStore) {
    let (a, b, _) = users("dense");
    let conversation = direct(store, &a, &b).await;
    for expected in 1..=5u64 {
        let sender = if expected % 2 == 0 { &a } else { &b };
        let outcome = send(store, conversation.id, sender, &format!("m{expected}"), "hi").await.unwrap();
        assert!(matches!(outcome, SendOutcome::Created(_)));
        assert_eq!(outcome.message().seq, expected);
    }
    let reloaded = store.conversation_for_member(conversation.id, &a).await.unwrap().unwrap();
    assert_eq!(reloaded.last_seq, 5);
}

async fn retried_send_returns_original(store: &dyn MessageStore) {
    let (a, b, _) = users("retry");
    let conversation = direct(store, &a, &b).await;
    let first = send(store, conversation.id, &a, "same", "original body").await.unwrap();
    let retry = send(store, conversation.id, &a, "same", "a different body").await.unwrap();
    let SendOutcome::Duplicate(original) = retry else { panic!("expected duplicate, got {retry:?}") };
    assert_eq!(&original, first.message());
    assert_eq!(original.body, "original body");
    // The same client id from another sender is a different message.
    let other = send(store, conversation.id, &b, "same", "bob").await.unwrap();
    assert_eq!(other.message().seq, 2);
    let history = store.history(conversation.id, HistoryRange::Before(None), 10).await.unwrap();
    assert_eq!(history.len(), 2);
}

async fn non_member_cannot_send_or_read(store: &dyn MessageStore) {
    let (a, b, c) = users("isolation");
    let conversation = direct(store, &a, &b).await;
    let refused = send(store, conversation.id, &c, "x", "intruder").await;
    assert!(matches!(refused, Err(Error::ConversationNotFound)), "{refused:?}");
    assert!(store.conversation_for_member(conversation.id, &c).await.unwrap().is_none());
    let missing = send(store, Uuid::now_v7(), &a, "x", "nowhere").await;
    assert!(matches!(missing, Err(Error::ConversationNotFound)), "{missing:?}");
    let history = store.history(conversation.id, HistoryRange::Before(None), 10).await.unwrap();
    assert!(history.is_empty(), "a refused send stored nothing");
}

async fn concurrent_sends_are_dense(store: &dyn MessageStore) {
    let (a, b, _) = users("concurrent");
    let conversation = direct(store, &a, &b).await;
    let sends = (0..200).map(|i| {
        let sender = if i % 2 == 0 { a.clone() } else { b.clone() };
        async move { send(store, conversation.id, &sender, &format!("c{i}"), "x").await.unwrap() }
    });
    let mut seqs: Vec<u64> = join_all(sends).await.iter().map(|o| o.message().seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
}

async fn history_pages_both_ways(store: &dyn MessageStore) {
    let (a, b, _) = users("history");
    let conversation = direct(store, &a, &b).await;
    for i in 1..=25 {
        send(store, conversation.id, &a, &format!("h{i}"), &format!("body {i}")).await.unwrap();
    }
    let newest = store.history(conversation.id, HistoryRange::Before(None), 10).await.unwrap();
    assert_eq!(newest.iter().map(|m| m.seq).collect::<Vec<_>>(), (16..=25).collect::<Vec<_>>());
    assert_eq!(newest[0].body, "body 16");
    let older = store.history(conversation.id, HistoryRange::Before(Some(16)), 10).await.unwrap();
    assert_eq!(older.iter().map(|m| m.seq).collect::<Vec<_>>(), (6..=15).collect::<Vec<_>>());
    let oldest = store.history(conversation.id, HistoryRange::Before(Some(6)), 10).await.unwrap();
    assert_eq!(oldest.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=5).collect::<Vec<_>>());
    let forward = store.history(conversation.id, HistoryRange::After(20), 3).await.unwrap();
    assert_eq!(forward.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![21, 22, 23]);
    assert!(store.history(conversation.id, HistoryRange::After(25), 3).await.unwrap().is_empty());
}

async fn inbox_orders_by_activity(store: &dyn MessageStore) {
    let (a, b, c) = users("inbox");
    let with_b = direct(store, &a, &b).await;
    let with_c = direct(store, &a, &c).await;
    send(store, with_b.id, &b, "1", "first").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    send(store, with_c.id, &c, "1", "second").await.unwrap();
    let inbox = store.list_conversations(&a, None, 10).await.unwrap();
    assert_eq!(inbox.iter().map(|c| c.id).collect::<Vec<_>>(), vec![with_c.id, with_b.id]);
    let first_page = store.list_conversations(&a, None, 1).await.unwrap();
    let cursor = InboxCursor { last_activity_ms: first_page[0].last_activity_ms, conversation_id: first_page[0].id };
    let second_page = store.list_conversations(&a, Some(cursor), 10).await.unwrap();
    assert_eq!(second_page.iter().map(|c| c.id).collect::<Vec<_>>(), vec![with_b.id]);
    assert_eq!(store.list_conversations(&b, None, 10).await.unwrap().len(), 1);
}

async fn cursors_only_move_forward(store: &dyn MessageStore) {
    let (a, b, c) = users("cursor");
    let conversation = direct(store, &a, &b).await;
    for i in 0..5 {
        send(store, conversation.id, &a, &format!("k{i}"), "x").await.unwrap();
    }
    let stored = store.ack_delivered(&b, "phone", vec![(conversation.id, 3)]).await.unwrap();
    assert_eq!(stored, vec![(conversation.id, 3)]);
    let stored = store.ack_delivered(&b, "phone", vec![(conversation.id, 2)]).await.unwrap();
    assert_eq!(stored, vec![(conversation.id, 3)], "cursor moved back");
    let stored = store.ack_delivered(&b, "phone", vec![(conversation.id, 99)]).await.unwrap();
    assert_eq!(stored, vec![(conversation.id, 5)], "cursor passed the head");
    let stored = store.ack_delivered(&c, "phone", vec![(conversation.id, 3)]).await.unwrap();
    assert!(stored.is_empty(), "non-member cursor stored");
}

async fn sync_returns_unacked_in_order(store: &dyn MessageStore) {
    let (a, b, c) = users("sync");
    let with_a = direct(store, &b, &a).await;
    let with_c = direct(store, &b, &c).await;
    for i in 1..=3 {
        send(store, with_a.id, &a, &format!("a{i}"), "x").await.unwrap();
        send(store, with_c.id, &c, &format!("c{i}"), "x").await.unwrap();
    }
    let all = store.sync(&b, "phone", None, None, 100).await.unwrap();
    assert_eq!(all.len(), 6);
    let mut expected: Vec<(Uuid, u64)> =
        [with_a.id, with_c.id].iter().flat_map(|id| (1..=3).map(move |s| (*id, s))).collect();
    expected.sort();
    assert_eq!(all.iter().map(|m| (m.conversation_id, m.seq)).collect::<Vec<_>>(), expected);
    // Paging continues strictly after the cursor.
    let page = store.sync(&b, "phone", None, None, 4).await.unwrap();
    let cursor = SyncCursor { conversation_id: page[3].conversation_id, seq: page[3].seq };
    let rest = store.sync(&b, "phone", None, Some(cursor), 100).await.unwrap();
    assert_eq!(page.len() + rest.len(), 6);
    assert_eq!(rest.iter().map(|m| (m.conversation_id, m.seq)).collect::<Vec<_>>(), expected[4..].to_vec());
    // Acked messages are not synced again; other devices keep their own cursor.
    store.ack_delivered(&b, "phone", vec![(with_a.id, 2)]).await.unwrap();
    let after_ack = store.sync(&b, "phone", Some(with_a.id), None, 100).await.unwrap();
    assert_eq!(after_ack.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3]);
    assert_eq!(store.sync(&b, "laptop", Some(with_a.id), None, 100).await.unwrap().len(), 3);
    // Nothing of other users' conversations leaks into a sync.
    assert!(store.sync(&a, "phone", None, None, 100).await.unwrap().iter().all(|m| m.conversation_id == with_a.id));
}
