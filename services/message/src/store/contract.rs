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
            reply_to_seq: 0,
            sent_at_ms: messenger_platform::ids::now_ms(),
            attachments: Vec::new(),
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
        ("history_pages_across_buckets", Box::pin(history_pages_across_buckets(store))),
        ("inbox_orders_by_activity", Box::pin(inbox_orders_by_activity(store))),
        ("cursors_only_move_forward", Box::pin(cursors_only_move_forward(store))),
        ("sync_returns_unacked_in_order", Box::pin(sync_returns_unacked_in_order(store))),
        ("groups_record_membership_as_entries", Box::pin(groups_record_membership_as_entries(store))),
        ("removed_members_see_only_their_time", Box::pin(removed_members_see_only_their_time(store))),
        ("roles_are_enforced_in_the_store", Box::pin(roles_are_enforced_in_the_store(store))),
        ("edits_deletes_and_reactions", Box::pin(edits_deletes_and_reactions(store))),
        ("read_cursors_and_unread_counts", Box::pin(read_cursors_and_unread_counts(store))),
        ("replies_must_point_at_visible_messages", Box::pin(replies_must_point_at_visible_messages(store))),
        ("block_lists", Box::pin(block_lists(store))),
        ("taking_part_is_creating_or_sending", Box::pin(taking_part_is_creating_or_sending(store))),
        ("attachments_are_kept_and_go_with_delete", Box::pin(attachments_are_kept_and_go_with_delete(store))),
        ("entries_carry_their_audience", Box::pin(entries_carry_their_audience(store))),
        ("previews_start_at_joining", Box::pin(previews_start_at_joining(store))),
        ("re_added_members_see_each_of_their_ranges", Box::pin(re_added_members_see_each_of_their_ranges(store))),
        ("blocked_senders_leave_group_unread_counts", Box::pin(blocked_senders_leave_group_unread_counts(store))),
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
    let SendOutcome::Duplicate(Appended { entry: original, .. }) = retry else {
        panic!("expected duplicate, got {retry:?}")
    };
    assert_eq!(&original, first.message());
    assert_eq!(original.body, "original body");
    // The same client id from another sender is a different message.
    let other = send(store, conversation.id, &b, "same", "bob").await.unwrap();
    assert_eq!(other.message().seq, 2);
    let history = store.history(conversation.id, HistoryRange::Before(None), SeqBounds::ALL, 10).await.unwrap();
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
    let history = store.history(conversation.id, HistoryRange::Before(None), SeqBounds::ALL, 10).await.unwrap();
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
    let newest = store.history(conversation.id, HistoryRange::Before(None), SeqBounds::ALL, 10).await.unwrap();
    assert_eq!(newest.iter().map(|m| m.seq).collect::<Vec<_>>(), (16..=25).collect::<Vec<_>>());
    assert_eq!(newest[0].body, "body 16");
    let older = store.history(conversation.id, HistoryRange::Before(Some(16)), SeqBounds::ALL, 10).await.unwrap();
    assert_eq!(older.iter().map(|m| m.seq).collect::<Vec<_>>(), (6..=15).collect::<Vec<_>>());
    let oldest = store.history(conversation.id, HistoryRange::Before(Some(6)), SeqBounds::ALL, 10).await.unwrap();
    assert_eq!(oldest.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=5).collect::<Vec<_>>());
    let forward = store.history(conversation.id, HistoryRange::After(20), SeqBounds::ALL, 3).await.unwrap();
    assert_eq!(forward.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![21, 22, 23]);
    assert!(store.history(conversation.id, HistoryRange::After(25), SeqBounds::ALL, 3).await.unwrap().is_empty());
}

/// Past 4,096 entries: Scylla partitions messages by `seq >> 12`, so pages,
/// sync and the newest page must read across partitions without a seam.
async fn history_pages_across_buckets(store: &dyn MessageStore) {
    const TOTAL: u64 = 4096 + 120;
    let (a, b, _) = users("buckets");
    let conversation = direct(store, &a, &b).await;
    let a = &a;
    for chunk in (1..=TOTAL).collect::<Vec<_>>().chunks(256) {
        let sends = chunk.iter().map(|i| async move { send(store, conversation.id, a, &format!("k{i}"), "x").await });
        for outcome in join_all(sends).await {
            outcome.unwrap();
        }
    }
    let seqs = |page: Vec<StoredMessage>| page.iter().map(|m| m.seq).collect::<Vec<_>>();
    let newest = store.history(conversation.id, HistoryRange::Before(None), SeqBounds::ALL, 200).await.unwrap();
    assert_eq!(seqs(newest), ((TOTAL - 199)..=TOTAL).collect::<Vec<_>>());
    let seam = store.history(conversation.id, HistoryRange::Before(Some(4100)), SeqBounds::ALL, 10).await.unwrap();
    assert_eq!(seqs(seam), (4090..=4099).collect::<Vec<_>>());
    let forward = store.history(conversation.id, HistoryRange::After(4090), SeqBounds::ALL, 10).await.unwrap();
    assert_eq!(seqs(forward), (4091..=4100).collect::<Vec<_>>());
    let synced = store.sync(
        &b,
        "phone",
        Some(conversation.id),
        Some(SyncCursor { conversation_id: conversation.id, seq: 4093 }),
        5,
    );
    assert_eq!(seqs(synced.await.unwrap()), (4094..=4098).collect::<Vec<_>>());
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
    let stored = store.ack_delivered(&b, "tablet", vec![(conversation.id, u64::MAX)]).await.unwrap();
    assert_eq!(stored, vec![(conversation.id, 5)], "the largest seq a client can send");
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

pub(crate) const LIMITS: Limits = Limits { max_group_size: 5, edit_window_ms: 60_000 };

async fn group(store: &dyn MessageStore, creator: &str, members: &[&str]) -> Conversation {
    let new = NewGroup {
        id: Uuid::now_v7(),
        creator: creator.into(),
        title: "team".into(),
        members: members.iter().map(|m| m.to_string()).collect(),
        now_ms: messenger_platform::ids::now_ms(),
    };
    store.create_group(new, LIMITS.max_group_size).await.unwrap().0
}

async fn change(store: &dyn MessageStore, id: Uuid, actor: &str, change: Change) -> Result<Vec<StoredMessage>> {
    Ok(appended(store, id, actor, change).await?.into_iter().map(|appended| appended.entry).collect())
}

async fn appended(store: &dyn MessageStore, id: Uuid, actor: &str, change: Change) -> Result<Vec<Appended>> {
    let request = ChangeRequest {
        conversation_id: id,
        actor: actor.into(),
        change,
        now_ms: messenger_platform::ids::now_ms(),
        limits: LIMITS,
    };
    store.apply(request).await
}

fn sorted(users: &[&String]) -> Vec<String> {
    let mut users: Vec<String> = users.iter().map(|user| (*user).clone()).collect();
    users.sort();
    users
}

/// Each write names who may be shown its entries as it commits: members
/// by their ranges at the entry's seq, never by the roster of later.
async fn entries_carry_their_audience(store: &dyn MessageStore) {
    let (a, b, c) = users("audience");
    let d = format!("{c}-late");
    let created = store
        .create_group(
            NewGroup {
                id: Uuid::now_v7(),
                creator: a.clone(),
                title: "audience".into(),
                members: vec![b.clone(), c.clone()],
                now_ms: messenger_platform::ids::now_ms(),
            },
            LIMITS.max_group_size,
        )
        .await
        .unwrap();
    let id = created.0.id;
    assert_eq!(created.1.audience.to_vec(), sorted(&[&a, &b, &c]));
    let before = send(store, id, &a, "before", "before d").await.unwrap();
    let SendOutcome::Created(sent) = &before else { panic!("{before:?}") };
    assert_eq!(sent.audience.to_vec(), sorted(&[&a, &b, &c]));

    // The removal reaches the removed; what follows does not, even once re-added.
    let removal = appended(store, id, &a, Change::RemoveMember(b.clone())).await.unwrap();
    assert_eq!(removal[0].audience.to_vec(), sorted(&[&a, &b, &c]));
    let while_out = send(store, id, &a, "while-out", "b is out").await.unwrap();
    assert_eq!(while_out.message().seq, removal[0].entry.seq + 1);
    let SendOutcome::Created(out) = &while_out else { panic!("{while_out:?}") };
    assert_eq!(out.audience.to_vec(), sorted(&[&a, &c]));
    let added = appended(store, id, &a, Change::AddMembers(vec![b.clone(), d.clone()])).await.unwrap();
    assert_eq!(added[0].audience.to_vec(), sorted(&[&a, &b, &c, &d]));
    let retried = send(store, id, &a, "while-out", "b is out").await.unwrap();
    let SendOutcome::Duplicate(retried) = &retried else { panic!("{retried:?}") };
    assert_eq!(retried.audience.to_vec(), sorted(&[&a, &c]), "a retry reached those who joined after it");

    // A change of an entry from before someone joined goes to who saw that entry.
    let edit = Change::Edit { target_seq: before.message().seq, body: "edited".into() };
    let edited = appended(store, id, &a, edit).await.unwrap();
    let saw = sorted(&[&a, &b, &c]);
    assert_eq!(edited[0].audience.to_vec(), saw, "an edit reached who never saw the message, or not b, who did");
    assert_eq!(*edited[0].withheld_from, vec![d.clone()], "who sees the edit but not its message gets it withheld");
    assert!(sent.withheld_from.is_empty() && out.withheld_from.is_empty());
    let later = send(store, id, &d, "later", "hi").await.unwrap();
    let react = Change::React { target_seq: later.message().seq, emoji: "👍".into() };
    let reaction = appended(store, id, &c, react).await.unwrap();
    assert_eq!(reaction[0].audience.to_vec(), sorted(&[&a, &b, &c, &d]));

    // The leaving get their own leaving entry, not the ownership handover after it.
    let left = appended(store, id, &a, Change::Leave).await.unwrap();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left[0].audience.contains(&a) && !left[1].audience.contains(&a), "{left:?}");
}

/// A member added back sees what it saw before its removal and what
/// follows its re-adding, never what was sent while it was out.
async fn re_added_members_see_each_of_their_ranges(store: &dyn MessageStore) {
    let (a, b, _) = users("re-added");
    let id = group(store, &a, &[&b]).await.id; // 1
    send(store, id, &a, "first", "first").await.unwrap(); // 2
    change(store, id, &a, Change::RemoveMember(b.clone())).await.unwrap(); // 3
    send(store, id, &a, "out-1", "while out").await.unwrap(); // 4
    change(store, id, &a, Change::AddMembers(vec![b.clone()])).await.unwrap(); // 5
    send(store, id, &a, "back", "back").await.unwrap(); // 6

    let ranges = |member: Member| member.visible().ranges().to_vec();
    let bounds = |from: u64, to: Option<u64>| SeqBounds { from, to };
    let member = store.member(id, &b).await.unwrap().unwrap();
    assert_eq!(ranges(member), [bounds(1, Some(3)), bounds(5, None)]);
    let listed = store.members(id).await.unwrap().into_iter().find(|m| m.user_id == b).unwrap();
    assert_eq!(ranges(listed), [bounds(1, Some(3)), bounds(5, None)]);
    let seqs = |messages: Vec<StoredMessage>| messages.iter().map(|m| m.seq).collect::<Vec<_>>();
    let synced = store.sync(&b, "new-phone", None, None, 100).await.unwrap();
    assert_eq!(seqs(synced), [1, 2, 3, 5, 6], "a new device of b syncs both ranges and nothing between");
    let after = SyncCursor { conversation_id: id, seq: 2 };
    assert_eq!(seqs(store.sync(&b, "new-phone", None, Some(after), 100).await.unwrap()), [3, 5, 6]);
    assert_eq!(seqs(store.sync(&b, "new-phone", Some(id), None, 2).await.unwrap()), [1, 2], "pages hold");
    store.ack_delivered(&b, "new-phone", vec![(id, 3)]).await.unwrap();
    assert_eq!(seqs(store.sync(&b, "new-phone", None, None, 100).await.unwrap()), [5, 6]);

    // Out and back once more: three ranges, kept however often it happens.
    change(store, id, &a, Change::RemoveMember(b.clone())).await.unwrap(); // 7
    send(store, id, &a, "out-2", "out again").await.unwrap(); // 8
    change(store, id, &a, Change::AddMembers(vec![b.clone()])).await.unwrap(); // 9
    let member = store.member(id, &b).await.unwrap().unwrap();
    assert_eq!(ranges(member), [bounds(1, Some(3)), bounds(5, Some(7)), bounds(9, None)]);
    let synced = store.sync(&b, "third-phone", Some(id), None, 100).await.unwrap();
    assert_eq!(seqs(synced), [1, 2, 3, 5, 6, 7, 9]);
    // A change of an entry from an earlier range reaches b; of one from while b was out, not.
    let react = appended(store, id, &a, Change::React { target_seq: 2, emoji: "👍".into() }).await.unwrap();
    assert!(react[0].audience.contains(&b), "{react:?}");
    let react = appended(store, id, &a, Change::React { target_seq: 4, emoji: "👍".into() }).await.unwrap();
    assert!(!react[0].audience.contains(&b), "{react:?}");
}

/// In a group, what a user the reader blocked says is withheld from the
/// reader, so it counts as nothing unread; a direct conversation counts all.
async fn blocked_senders_leave_group_unread_counts(store: &dyn MessageStore) {
    let (a, b, c) = users("unread-blocked");
    let id = group(store, &a, &[&b, &c]).await.id;
    let with_a = direct(store, &a, &b).await.id;
    assert!(store.block(&b, &a, 1_000).await.unwrap());
    send(store, id, &a, "a1", "from a").await.unwrap();
    send(store, id, &a, "a2", "from a").await.unwrap();
    send(store, id, &c, "c1", "from c").await.unwrap();
    send(store, with_a, &a, "d1", "before the block, say").await.unwrap();
    let reader = b.as_str();
    let unread = |id: Uuid| async move {
        let single = store.conversation_for_member(id, reader).await.unwrap().unwrap().unread_count;
        let listed = store.list_conversations(reader, None, 10).await.unwrap();
        assert_eq!(listed.iter().find(|c| c.id == id).unwrap().unread_count, single, "inbox and conversation agree");
        single
    };
    assert_eq!(unread(id).await, 1, "a's messages counted for b, who blocked a");
    assert_eq!(unread(with_a).await, 1, "a direct conversation counts what it shows");
    assert!(store.unblock(&b, &a).await.unwrap());
    assert_eq!(unread(id).await, 3);
}

/// A member's inbox never previews what came before it joined.
async fn previews_start_at_joining(store: &dyn MessageStore) {
    let (a, b, c) = users("preview");
    let id = group(store, &a, &[&c]).await.id;
    send(store, id, &a, "old", "before b").await.unwrap();
    change(store, id, &a, Change::AddMembers(vec![b.clone()])).await.unwrap();
    let listed = store.list_conversations(&b, None, 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].last_message, None, "b's inbox previews a message from before it joined");
    let fetched = store.conversation_for_member(id, &b).await.unwrap().unwrap();
    assert_eq!(fetched.last_message, None);
    assert_eq!(fetched.unread_count, 0);
    let seen_by_c = store.conversation_for_member(id, &c).await.unwrap().unwrap();
    assert_eq!(seen_by_c.last_message.unwrap().body, "before b");
    send(store, id, &a, "new", "after b").await.unwrap();
    let fetched = store.conversation_for_member(id, &b).await.unwrap().unwrap();
    assert_eq!(fetched.last_message.unwrap().body, "after b");
    assert_eq!(fetched.unread_count, 1);
}

fn kinds(entries: &[StoredMessage]) -> Vec<Kind> {
    entries.iter().map(|e| e.kind).collect()
}

async fn groups_record_membership_as_entries(store: &dyn MessageStore) {
    let (a, b, c) = users("group");
    let conversation = group(store, &a, &[&b]).await;
    assert_eq!(conversation.kind, ConversationKind::Group);
    assert_eq!(conversation.last_seq, 1, "creation is entry 1");
    let added = change(store, conversation.id, &a, Change::AddMembers(vec![c.clone(), b.clone()])).await.unwrap();
    assert_eq!(kinds(&added), [Kind::MembersAdded]);
    assert_eq!(added[0].member_ids, vec![c.clone()], "existing members are not added again");
    let renamed = change(store, conversation.id, &a, Change::Rename("renamed".into())).await.unwrap();
    assert_eq!((renamed[0].seq, renamed[0].title.as_str()), (3, "renamed"));
    let members = store.members(conversation.id).await.unwrap();
    let c_member = members.iter().find(|m| m.user_id == c).unwrap();
    assert_eq!((c_member.role, c_member.joined_seq), (Role::Member, 2));
    // The owner leaving hands ownership to the longest-standing member.
    let left = change(store, conversation.id, &a, Change::Leave).await.unwrap();
    assert_eq!(kinds(&left), [Kind::MemberLeft, Kind::RoleChanged]);
    assert_eq!((left[1].member_ids.clone(), left[1].role), (vec![b.clone()], Some(Role::Owner)));
    assert_eq!(store.member(conversation.id, &b).await.unwrap().unwrap().role, Role::Owner);
    // Size limit counts active members.
    let too_many: Vec<String> = (0..4).map(|i| format!("{c}-extra{i}")).collect();
    let refused = change(store, conversation.id, &b, Change::AddMembers(too_many)).await;
    assert!(matches!(refused, Err(Error::FailedPrecondition(_))), "{refused:?}");
    let history = store.history(conversation.id, HistoryRange::Before(None), SeqBounds::ALL, 50).await.unwrap();
    assert_eq!(history.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5], "dense across kinds");
}

async fn removed_members_see_only_their_time(store: &dyn MessageStore) {
    let (a, b, c) = users("removed");
    let conversation = group(store, &a, &[&b]).await;
    send(store, conversation.id, &a, "before", "before c").await.unwrap(); // 2
    let sorted = |mut ids: Vec<String>| {
        ids.sort();
        ids
    };
    let ids = store.active_member_ids(conversation.id).await.unwrap();
    assert_eq!(*ids, sorted(vec![a.clone(), b.clone()]));
    change(store, conversation.id, &a, Change::AddMembers(vec![c.clone()])).await.unwrap(); // 3
    let ids = store.active_member_ids(conversation.id).await.unwrap();
    assert_eq!(*ids, sorted(vec![a.clone(), b.clone(), c.clone()]), "a cached member list outlived an add");
    send(store, conversation.id, &a, "with", "with c").await.unwrap(); // 4
    change(store, conversation.id, &a, Change::RemoveMember(c.clone())).await.unwrap(); // 5
    let ids = store.active_member_ids(conversation.id).await.unwrap();
    assert_eq!(*ids, sorted(vec![a.clone(), b.clone()]), "a cached member list outlived a removal");
    send(store, conversation.id, &a, "after", "after c").await.unwrap(); // 6
    let member = store.member(conversation.id, &c).await.unwrap().unwrap();
    assert_eq!((member.joined_seq, member.removed_seq), (3, Some(5)));
    let seen =
        store.history(conversation.id, HistoryRange::Before(None), member.visible().ranges()[0], 50).await.unwrap();
    assert_eq!(seen.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
    let synced = store.sync(&c, "phone", Some(conversation.id), None, 50).await.unwrap();
    assert_eq!(synced.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
    let refused = send(store, conversation.id, &c, "late", "let me back").await;
    assert!(matches!(refused, Err(Error::NoLongerMember)), "{refused:?}");
    assert!(store.conversation_for_member(conversation.id, &c).await.unwrap().is_none());
    assert!(store.list_conversations(&c, None, 10).await.unwrap().is_empty());
    let stored = store.ack_delivered(&c, "phone", vec![(conversation.id, 99)]).await.unwrap();
    assert_eq!(stored, vec![(conversation.id, 5)], "a former member's cursor stops at its removal");
}

async fn roles_are_enforced_in_the_store(store: &dyn MessageStore) {
    let (owner, admin, member) = users("roles");
    let conversation = group(store, &owner, &[&admin, &member]).await;
    let id = conversation.id;
    let denied = change(store, id, &member, Change::RemoveMember(admin.clone())).await;
    assert!(matches!(denied, Err(Error::PermissionDenied(_))), "{denied:?}");
    let denied = change(store, id, &admin, Change::SetRole(member.clone(), Role::Admin)).await;
    assert!(matches!(denied, Err(Error::PermissionDenied(_))), "{denied:?}");
    change(store, id, &owner, Change::SetRole(admin.clone(), Role::Admin)).await.unwrap();
    let unchanged = change(store, id, &owner, Change::SetRole(admin.clone(), Role::Admin)).await.unwrap();
    assert!(unchanged.is_empty());
    let denied = change(store, id, &admin, Change::RemoveMember(owner.clone())).await;
    assert!(matches!(denied, Err(Error::PermissionDenied(_))), "{denied:?}");
    change(store, id, &admin, Change::RemoveMember(member.clone())).await.unwrap();
    let outsider = change(store, id, &format!("{member}-never"), Change::Rename("x".into())).await;
    assert!(matches!(outsider, Err(Error::ConversationNotFound)), "{outsider:?}");
    let direct_conversation = direct(store, &owner, &admin).await;
    let refused = change(store, direct_conversation.id, &owner, Change::AddMembers(vec![member.clone()])).await;
    assert!(matches!(refused, Err(Error::FailedPrecondition(_))), "{refused:?}");
}

async fn edits_deletes_and_reactions(store: &dyn MessageStore) {
    let (a, b, c) = users("modify");
    let conversation = group(store, &a, &[&b, &c]).await;
    let id = conversation.id;
    let original = send(store, id, &a, "m", "first draft").await.unwrap().message().seq;
    let denied = change(store, id, &b, Change::Edit { target_seq: original, body: "hijack".into() }).await;
    assert!(matches!(denied, Err(Error::PermissionDenied(_))), "{denied:?}");
    let edit = change(store, id, &a, Change::Edit { target_seq: original, body: "final".into() }).await.unwrap();
    assert_eq!((edit[0].kind, edit[0].target_seq, edit[0].body.as_str()), (Kind::Edit, original, "final"));
    // The message knows its latest edit: readers who cannot see it get no text.
    let read = |range: HistoryRange| async move {
        let page = store.history(id, range, SeqBounds::ALL, 50).await.unwrap();
        page.into_iter().find(|m| m.seq == original).unwrap()
    };
    let edited = read(HistoryRange::Before(None)).await;
    assert_eq!((edited.body.as_str(), edited.last_edit_seq), ("final", edit[0].seq));
    let synced = store.sync(&b, "modify-phone", Some(id), None, 50).await.unwrap();
    assert_eq!(synced.iter().find(|m| m.seq == original).unwrap().last_edit_seq, edit[0].seq);
    let reacted = change(store, id, &b, Change::React { target_seq: original, emoji: "👍".into() }).await.unwrap();
    assert_eq!(reacted[0].reaction, "👍");
    let same = change(store, id, &b, Change::React { target_seq: original, emoji: "👍".into() }).await.unwrap();
    assert!(same.is_empty(), "the same reaction again changes nothing");
    change(store, id, &b, Change::React { target_seq: original, emoji: "❤️".into() }).await.unwrap();
    let removed = change(store, id, &b, Change::React { target_seq: original, emoji: String::new() }).await.unwrap();
    assert_eq!((removed[0].kind, removed[0].reaction.as_str()), (Kind::Reaction, ""));
    let not_a_message = change(store, id, &b, Change::React { target_seq: 1, emoji: "👍".into() }).await;
    assert!(matches!(not_a_message, Err(Error::FailedPrecondition(_))), "{not_a_message:?}");
    let missing = change(store, id, &b, Change::React { target_seq: 999, emoji: "👍".into() }).await;
    assert!(matches!(missing, Err(Error::MessageNotFound(999))), "{missing:?}");
    let denied = change(store, id, &c, Change::Delete { target_seq: original }).await;
    assert!(matches!(denied, Err(Error::PermissionDenied(_))), "{denied:?}");
    let deleted = change(store, id, &a, Change::Delete { target_seq: original }).await.unwrap();
    assert_eq!(deleted[0].kind, Kind::Delete);
    assert!(change(store, id, &a, Change::Delete { target_seq: original }).await.unwrap().is_empty());
    // The body is gone from storage: the message and its edit alike.
    let history = store.history(id, HistoryRange::Before(None), SeqBounds::ALL, 50).await.unwrap();
    let message = history.iter().find(|m| m.seq == original).unwrap();
    assert!(message.deleted && message.body.is_empty());
    assert!(history.iter().all(|m| !m.body.contains("draft") && !m.body.contains("final")), "{history:?}");
    let late = change(store, id, &b, Change::React { target_seq: original, emoji: "😮".into() }).await;
    assert!(matches!(late, Err(Error::FailedPrecondition(_))), "{late:?}");
    // Edits are refused after the window.
    let old = send(store, id, &a, "old", "old").await.unwrap().message().clone();
    let request = ChangeRequest {
        conversation_id: id,
        actor: a.clone(),
        change: Change::Edit { target_seq: old.seq, body: "too late".into() },
        now_ms: old.sent_at_ms + LIMITS.edit_window_ms + 1,
        limits: LIMITS,
    };
    assert!(matches!(store.apply(request).await, Err(Error::FailedPrecondition(_))));
}

async fn read_cursors_and_unread_counts(store: &dyn MessageStore) {
    let (a, b, _) = users("unread");
    let conversation = direct(store, &a, &b).await;
    for i in 0..3 {
        send(store, conversation.id, &a, &format!("u{i}"), &format!("hello {i}")).await.unwrap();
    }
    let inbox = store.list_conversations(&b, None, 10).await.unwrap();
    assert_eq!(inbox[0].unread_count, 3);
    assert_eq!(inbox[0].last_message.as_ref().unwrap().body, "hello 2");
    assert_eq!(store.list_conversations(&a, None, 10).await.unwrap()[0].unread_count, 0, "own messages are read");
    let mark = |read_seq, moved| ReadMark { read_seq, moved };
    assert_eq!(store.mark_read(conversation.id, &b, 2).await.unwrap(), mark(2, true));
    assert_eq!(store.mark_read(conversation.id, &b, 2).await.unwrap(), mark(2, false), "a repeat moved the cursor");
    assert_eq!(store.mark_read(conversation.id, &b, 1).await.unwrap(), mark(2, false), "read cursor moved back");
    assert_eq!(store.mark_read(conversation.id, &b, 50).await.unwrap(), mark(3, true), "read cursor passed the head");
    assert_eq!(store.mark_read(conversation.id, &b, 50).await.unwrap(), mark(3, false));
    assert_eq!(store.list_conversations(&b, None, 10).await.unwrap()[0].unread_count, 0);
    let members = store.members(conversation.id).await.unwrap();
    assert_eq!(members.iter().find(|m| m.user_id == b).unwrap().read_seq, 3);
}

async fn replies_must_point_at_visible_messages(store: &dyn MessageStore) {
    let (a, b, _) = users("reply");
    let conversation = direct(store, &a, &b).await;
    let first = send(store, conversation.id, &a, "q", "question").await.unwrap().message().seq;
    let reply = store
        .send(NewMessage {
            conversation_id: conversation.id,
            message_id: Uuid::now_v7(),
            sender: b.clone(),
            client_msg_id: "r".into(),
            body: "answer".into(),
            reply_to_seq: first,
            sent_at_ms: messenger_platform::ids::now_ms(),
            attachments: Vec::new(),
        })
        .await
        .unwrap();
    assert_eq!(reply.message().reply_to_seq, first);
    let dangling = store
        .send(NewMessage {
            conversation_id: conversation.id,
            message_id: Uuid::now_v7(),
            sender: b.clone(),
            client_msg_id: "r2".into(),
            body: "to nothing".into(),
            reply_to_seq: 42,
            sent_at_ms: messenger_platform::ids::now_ms(),
            attachments: Vec::new(),
        })
        .await;
    assert!(matches!(dangling, Err(Error::InvalidArgument(_))), "{dangling:?}");
}

async fn block_lists(store: &dyn MessageStore) {
    let (a, b, c) = users("blocks");
    assert_eq!(store.blocks_between(&a, &b).await.unwrap(), Blocks::default());
    assert!(store.block(&a, &b, 1_000).await.unwrap(), "a new block changes the list");
    assert!(!store.block(&a, &b, 5_000).await.unwrap(), "blocking again changes nothing");
    assert!(store.block(&a, &c, 2_000).await.unwrap());
    let blocks = store.blocks_between(&a, &b).await.unwrap();
    assert_eq!(blocks, Blocks { a_blocked_b: true, b_blocked_a: false });
    let reverse = store.blocks_between(&b, &a).await.unwrap();
    assert_eq!(reverse, Blocks { a_blocked_b: false, b_blocked_a: true }, "the same block seen from b");
    let listed = store.blocked_users(&a, 10).await.unwrap();
    let expected = vec![
        BlockedUser { user_id: b.clone(), blocked_at_ms: 1_000 },
        BlockedUser { user_id: c.clone(), blocked_at_ms: 2_000 },
    ];
    assert_eq!(listed, expected, "oldest first, the first block's time kept");
    assert_eq!(store.blocked_users(&a, 1).await.unwrap(), expected[..1], "the limit holds");
    assert!(store.blocked_users(&b, 10).await.unwrap().is_empty(), "blocks are one-way lists");
    assert!(store.unblock(&a, &b).await.unwrap());
    assert!(!store.unblock(&a, &b).await.unwrap(), "unblocking again changes nothing");
    assert_eq!(store.blocks_between(&a, &b).await.unwrap(), Blocks::default());
    assert_eq!(store.blocked_users(&a, 10).await.unwrap(), expected[1..]);

    // Who blocked a user, sorted (an index: on ScyllaDB it may trail a moment).
    let blocked_by = |user: String, expected: Vec<String>| async move {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            let found = store.blocked_by(&user).await.unwrap();
            if found == expected || std::time::Instant::now() > deadline {
                assert_eq!(found, expected, "who blocked {user}");
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    blocked_by(b.clone(), vec![]).await;
    assert!(store.block(&c, &b, 3_000).await.unwrap());
    assert!(store.block(&a, &b, 4_000).await.unwrap());
    blocked_by(b.clone(), sorted(&[&a, &c])).await;
    blocked_by(c.clone(), vec![a.clone()]).await;
    assert!(store.unblock(&c, &b).await.unwrap());
    blocked_by(b.clone(), vec![a.clone()]).await;
}

async fn taking_part_is_creating_or_sending(store: &dyn MessageStore) {
    let (a, b, c) = users("took-part");
    let conversation = direct(store, &a, &b).await;
    let took_part = |user: String| async move {
        let listed = store.list_conversations(&user, None, 10).await.unwrap();
        let as_listed = listed.iter().find(|c| c.id == conversation.id).unwrap().took_part;
        let single = store.conversation_for_member(conversation.id, &user).await.unwrap().unwrap().took_part;
        assert_eq!(as_listed, single, "inbox and conversation agree for {user}");
        let members = store.members(conversation.id).await.unwrap();
        (single, members.iter().any(|member| member.user_id == user && member.took_part))
    };
    assert_eq!(took_part(a.clone()).await, (true, false), "the creator takes part without sending");
    assert_eq!(took_part(b.clone()).await, (false, false), "the other side has not answered");
    send(store, conversation.id, &b, "1", "hello").await.unwrap();
    assert_eq!(took_part(b.clone()).await, (true, true), "an answer is taking part");
    let group = group(store, &a, &[&b, &c]).await;
    let members = store.members(group.id).await.unwrap();
    assert!(members.iter().all(|m| !m.took_part), "nobody has sent in the new group");
    let listed = store.list_conversations(&c, None, 10).await.unwrap();
    assert!(!listed.iter().find(|x| x.id == group.id).unwrap().took_part, "an added member has not taken part");
    send(store, group.id, &c, "1", "hi all").await.unwrap();
    let members = store.members(group.id).await.unwrap();
    let sent: Vec<&str> = members.iter().filter(|m| m.took_part).map(|m| m.user_id.as_str()).collect();
    assert_eq!(sent, vec![c.as_str()]);
}

async fn attachments_are_kept_and_go_with_delete(store: &dyn MessageStore) {
    let (a, b, _) = users("attach");
    let conversation = direct(store, &a, &b).await;
    let photo = crate::store::Attachment {
        media_id: Uuid::now_v7().to_string(),
        mime_type: "image/jpeg".into(),
        size: 123_456,
        file_name: "beach \"1\".jpg".into(),
        width: 4000,
        height: 3000,
        blurhash: "LEHV6nWB2yk8pyo0adR*.7kCMdnj".into(),
        has_thumbnail: true,
    };
    let file = crate::store::Attachment { mime_type: "application/pdf".into(), has_thumbnail: false, ..photo.clone() };
    let sent = store
        .send(NewMessage {
            conversation_id: conversation.id,
            message_id: Uuid::now_v7(),
            sender: a.clone(),
            client_msg_id: "with-media".into(),
            body: String::new(),
            reply_to_seq: 0,
            sent_at_ms: messenger_platform::ids::now_ms(),
            attachments: vec![photo.clone(), file.clone()],
        })
        .await
        .unwrap();
    assert_eq!(sent.message().attachments, vec![photo.clone(), file.clone()]);
    let seq = sent.message().seq;
    let history = store.history(conversation.id, HistoryRange::Before(None), SeqBounds::ALL, 10).await.unwrap();
    assert_eq!(history.iter().find(|m| m.seq == seq).unwrap().attachments, vec![photo, file], "read back in order");
    let synced = store.sync(&b, "phone", Some(conversation.id), None, 10).await.unwrap();
    assert!(synced.iter().any(|m| m.seq == seq && m.attachments.len() == 2), "sync carries them");
    change(store, conversation.id, &a, Change::Delete { target_seq: seq }).await.unwrap();
    let history = store.history(conversation.id, HistoryRange::Before(None), SeqBounds::ALL, 10).await.unwrap();
    let deleted = history.iter().find(|m| m.seq == seq).unwrap();
    assert!(deleted.deleted && deleted.attachments.is_empty(), "{deleted:?}");
}
