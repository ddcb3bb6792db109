use std::sync::atomic::Ordering;

use futures::future::join_all;

use super::*;
use crate::{
    sqlite::{SqliteOptions, SqliteStore},
    store::{ConversationKind, Limits, contract},
};

fn cached(dir: &tempfile::TempDir) -> CachedStore {
    let store = SqliteStore::open(&dir.path().join("messages.db"), &SqliteOptions::default()).unwrap();
    CachedStore::new(Arc::new(store), &CacheOptions::default())
}

#[tokio::test]
async fn cached_store_passes_the_contract_suite() {
    let dir = tempfile::tempdir().unwrap();
    let store = cached(&dir);
    let cases = contract::run_all(&store).await;
    eprintln!("message store contract: {cases} cases passed on sqlite behind the cache");
}

#[tokio::test]
async fn concurrent_misses_share_one_store_read_and_hits_follow() {
    let dir = tempfile::tempdir().unwrap();
    let store = cached(&dir);
    let conversation = store.get_or_create_direct("a", "b", Uuid::now_v7(), 1).await.unwrap();
    contract::send(&store, conversation.id, "a", "m1", "hello").await.unwrap();
    let reads = (0..50).map(|_| store.history(conversation.id, HistoryRange::Before(None), SeqBounds::ALL, 20));
    let pages = join_all(reads).await;
    assert!(pages.iter().all(|p| p.as_ref().unwrap().len() == 1));
    assert_eq!(store.stats.misses.load(Ordering::Relaxed), 1, "concurrent misses were not coalesced");
    store.history(conversation.id, HistoryRange::Before(None), SeqBounds::ALL, 20).await.unwrap();
    assert!(store.stats.hits.load(Ordering::Relaxed) >= 1);
}

async fn newest(store: &CachedStore, id: Uuid) -> Vec<StoredMessage> {
    store.history(id, HistoryRange::Before(None), SeqBounds::ALL, 50).await.unwrap()
}

#[tokio::test]
async fn writes_are_visible_through_the_cache_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = cached(&dir);

    let group = NewGroup {
        id: Uuid::now_v7(),
        creator: "owner".into(),
        title: "t".into(),
        members: vec!["member".into()],
        now_ms: messenger_platform::ids::now_ms(),
    };
    let (conversation, _) = store.create_group(group, 10).await.unwrap();
    assert_eq!(conversation.kind, ConversationKind::Group);
    let id = conversation.id;
    assert_eq!(newest(&store, id).await.len(), 1);
    let sent = contract::send(&store, id, "member", "m", "draft").await.unwrap().message().seq;
    assert_eq!(newest(&store, id).await.last().unwrap().body, "draft", "a send was hidden by the cache");
    let limits = Limits { max_group_size: 10, edit_window_ms: 60_000 };
    let request = |actor: &str, change| ChangeRequest {
        conversation_id: id,
        actor: actor.into(),
        change,
        now_ms: messenger_platform::ids::now_ms(),
        limits,
    };
    store.apply(request("member", Change::Edit { target_seq: sent, body: "final".into() })).await.unwrap();
    let page = newest(&store, id).await;
    assert_eq!(page.iter().find(|m| m.seq == sent).unwrap().body, "final", "an edit was hidden by the cache");
    assert!(store.member(id, "member").await.unwrap().unwrap().is_active());
    store.apply(request("owner", Change::RemoveMember("member".into()))).await.unwrap();
    assert!(!store.member(id, "member").await.unwrap().unwrap().is_active(), "a removal was hidden by the cache");
    store.mark_read(id, "owner", 3).await.unwrap();
    assert_eq!(store.member(id, "owner").await.unwrap().unwrap().read_seq, 3, "a read cursor was hidden by the cache");
}
