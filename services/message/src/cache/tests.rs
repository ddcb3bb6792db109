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

/// A new group of "owner" and "member".
fn owner_and_member() -> NewGroup {
    NewGroup {
        id: Uuid::now_v7(),
        creator: "owner".into(),
        title: "t".into(),
        members: vec!["member".into()],
        now_ms: messenger_platform::ids::now_ms(),
    }
}

/// A change by `actor` now, under generous limits.
fn change(id: Uuid, actor: &str, change: Change) -> ChangeRequest {
    ChangeRequest {
        conversation_id: id,
        actor: actor.into(),
        change,
        now_ms: messenger_platform::ids::now_ms(),
        limits: Limits { max_group_size: 10, edit_window_ms: 60_000 },
    }
}

async fn newest(store: &CachedStore, id: Uuid) -> Vec<StoredMessage> {
    store.history(id, HistoryRange::Before(None), SeqBounds::ALL, 50).await.unwrap()
}

#[tokio::test]
async fn writes_are_visible_through_the_cache_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = cached(&dir);

    let (conversation, _) = store.create_group(owner_and_member(), 10).await.unwrap();
    assert_eq!(conversation.kind, ConversationKind::Group);
    let id = conversation.id;
    assert_eq!(newest(&store, id).await.len(), 1);
    let sent = contract::send(&store, id, "member", "m", "draft").await.unwrap().message().seq;
    assert_eq!(newest(&store, id).await.last().unwrap().body, "draft", "a send was hidden by the cache");
    store.apply(change(id, "member", Change::Edit { target_seq: sent, body: "final".into() })).await.unwrap();
    let page = newest(&store, id).await;
    assert_eq!(page.iter().find(|m| m.seq == sent).unwrap().body, "final", "an edit was hidden by the cache");
    assert!(store.member(id, "member").await.unwrap().unwrap().is_active());
    store.apply(change(id, "owner", Change::RemoveMember("member".into()))).await.unwrap();
    assert!(!store.member(id, "member").await.unwrap().unwrap().is_active(), "a removal was hidden by the cache");
    store.conversation_for_member(id, "owner").await.unwrap();
    store.mark_read(id, "owner", 3).await.unwrap();
    let conversation = store.conversation_for_member(id, "owner").await.unwrap().unwrap();
    assert_eq!(conversation.read_seq, 3, "a read cursor was hidden by the cache");
}

/// A send moves cursors and content, never a membership: every member of a
/// busy group keeps hitting its cached membership (what each history read,
/// read mark and media check asks first), and the cached one holds no cursor
/// that could go stale.
#[tokio::test]
async fn a_send_leaves_the_members_cached_memberships_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = cached(&dir);
    let (conversation, _) = store.create_group(owner_and_member(), 10).await.unwrap();
    let id = conversation.id;
    let count = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    store.member(id, "member").await.unwrap();
    let misses = count(&store.stats.misses);
    for i in 0..5 {
        contract::send(&store, id, "owner", &format!("m{i}"), "busy").await.unwrap();
        store.mark_read(id, "member", 2 + i).await.unwrap();
        let member = store.member(id, "member").await.unwrap().unwrap();
        assert!(member.is_active() && member.read_seq == 0, "{member:?}");
    }
    assert_eq!(count(&store.stats.misses), misses, "a send or a read mark dropped a cached membership");
    store.apply(change(id, "owner", Change::RemoveMember("member".into()))).await.unwrap();
    assert!(!store.member(id, "member").await.unwrap().unwrap().is_active(), "a removal was hidden by the cache");
}

/// The shared tier against a real `redis-server`.
mod on_redis {
    use std::time::{Duration, Instant};

    use messenger_testkit::RedisServer;

    use super::*;

    fn options(redis: &RedisServer) -> CacheOptions {
        CacheOptions {
            backend: CacheBackend::Redis,
            redis: RedisOptions {
                url: redis.url(),
                // Long enough for a loaded CI machine; the pause test still waits out only a few.
                command_timeout: Duration::from_secs(1),
                ..CacheOptions::default().redis
            },
            probe_interval: Duration::from_millis(50),
            ..CacheOptions::default()
        }
    }

    /// Two message-service instances over one database, sharing one Redis,
    /// and the database itself (the truth every cached read must match).
    async fn instances(
        dir: &tempfile::TempDir,
        redis: &RedisServer,
    ) -> (Arc<dyn MessageStore>, CachedStore, CachedStore) {
        let store: Arc<dyn MessageStore> =
            Arc::new(SqliteStore::open(&dir.path().join("messages.db"), &SqliteOptions::default()).unwrap());
        let a = CachedStore::redis(store.clone(), &options(redis)).await.unwrap();
        let b = CachedStore::redis(store.clone(), &options(redis)).await.unwrap();
        (store, a, b)
    }

    async fn wait_in_use(stores: &[&CachedStore]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while stores.iter().any(|store| store.is_bypassed()) {
            assert!(Instant::now() < deadline, "the cache did not use redis again within 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn count(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_cache_passes_the_contract_suite() {
        let redis = RedisServer::start();
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn MessageStore> =
            Arc::new(SqliteStore::open(&dir.path().join("messages.db"), &SqliteOptions::default()).unwrap());
        // The suite checks what the cache answers, not how it degrades: a
        // loaded CI machine must not turn a slow reply into a bypass.
        let mut options = options(&redis);
        options.redis.command_timeout = Duration::from_secs(5);
        let store = CachedStore::redis(store, &options).await.unwrap();
        wait_in_use(&[&store]).await;
        let cases = contract::run_all(&store).await;
        assert!(count(&store.stats.misses) > 0, "the suite never went through the cache");
        assert_eq!((count(&store.stats.errors), count(&store.stats.bypassed)), (0, 0));
        eprintln!("message store contract: {cases} cases passed on sqlite behind the redis cache");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hits_misses_and_invalidation_across_instances() {
        let redis = RedisServer::start();
        let dir = tempfile::tempdir().unwrap();
        let (_, a, b) = instances(&dir, &redis).await;
        wait_in_use(&[&a, &b]).await;
        let id = a.create_group(owner_and_member(), 10).await.unwrap().0.id;
        let sent = contract::send(&a, id, "member", "m1", "draft").await.unwrap().message().seq;

        // A miss on one instance fills Redis; the other instance hits it.
        assert_eq!(newest(&a, id).await.len(), 2);
        assert_eq!((count(&a.stats.misses), count(&a.stats.hits)), (1, 0));
        assert_eq!(newest(&b, id).await.len(), 2);
        assert_eq!((count(&b.stats.misses), count(&b.stats.hits)), (0, 1), "b did not read a's entry from redis");
        assert_eq!(b.list_conversations("owner", None, 10).await.unwrap()[0].last_seq, 2);

        // Each write on `a` invalidates exactly what `b` reads next.
        contract::send(&a, id, "owner", "m2", "second").await.unwrap();
        assert_eq!(newest(&b, id).await.last().unwrap().body, "second", "a send was hidden by the cache");
        assert_eq!(b.list_conversations("owner", None, 10).await.unwrap()[0].last_seq, 3, "stale inbox after send");
        assert_eq!(b.list_conversations("member", None, 10).await.unwrap()[0].unread_count, 1);

        a.apply(change(id, "member", Change::Edit { target_seq: sent, body: "final".into() })).await.unwrap();
        let page = newest(&b, id).await;
        assert_eq!(page.iter().find(|m| m.seq == sent).unwrap().body, "final", "an edit was hidden by the cache");

        a.mark_read(id, "member", 4).await.unwrap();
        let conversation = b.conversation_for_member(id, "member").await.unwrap().unwrap();
        assert_eq!(conversation.read_seq, 4, "a read cursor was hidden");
        assert_eq!(b.list_conversations("member", None, 10).await.unwrap()[0].unread_count, 0, "stale unread count");

        assert!(b.conversation_for_member(id, "member").await.unwrap().is_some());
        a.apply(change(id, "owner", Change::RemoveMember("member".into()))).await.unwrap();
        assert!(!b.member(id, "member").await.unwrap().unwrap().is_active(), "a removal was hidden by the cache");
        assert!(b.conversation_for_member(id, "member").await.unwrap().is_none(), "stale conversation after removal");
        assert!(b.list_conversations("member", None, 10).await.unwrap().is_empty(), "stale inbox after removal");
        assert_eq!(count(&a.stats.errors) + count(&b.stats.errors), 0);
    }

    #[derive(Clone, Copy, Debug)]
    enum Outage {
        /// SIGTERM, then started again with its data (the append-only file).
        Stop,
        /// SIGSTOP, then SIGCONT: every call times out meanwhile.
        Pause,
    }

    /// Sends and reads keep working through the outage, and afterwards both
    /// instances serve exactly what the database holds.
    async fn survives(outage: Outage) {
        let mut redis = RedisServer::start();
        let dir = tempfile::tempdir().unwrap();
        let (truth, a, b) = instances(&dir, &redis).await;
        wait_in_use(&[&a, &b]).await;
        let id = a.get_or_create_direct("alice", "bob", Uuid::now_v7(), 1).await.unwrap().id;
        let first = contract::send(&a, id, "alice", "m0", "before").await.unwrap().message().seq;
        // Warm every kind of entry in Redis.
        for store in [&a, &b] {
            newest(store, id).await;
            store.list_conversations("bob", None, 10).await.unwrap();
            store.member(id, "bob").await.unwrap();
            store.conversation_for_member(id, "bob").await.unwrap();
        }

        match outage {
            Outage::Stop => redis.stop(),
            Outage::Pause => redis.pause(),
        }
        // Reads notice the outage first, so the writes below skip their bumps
        // (a bump that timed out may still land when Redis wakes up; a skipped
        // one never does): only the epoch can retire what they made stale.
        for store in [&a, &b] {
            assert_eq!(newest(store, id).await.len(), 1);
            assert!(store.is_bypassed(), "a read into a dead redis did not degrade the cache");
        }
        let edit = Change::Edit { target_seq: first, body: "edited during the outage".into() };
        a.apply(change(id, "alice", edit)).await.expect("an edit failed while redis was down");
        for i in 0..30 {
            contract::send(&a, id, "alice", &format!("m{}", i + 1), "during").await.expect("a send failed");
            a.mark_read(id, "bob", 1 + i).await.expect("a read mark failed");
            for store in [&a, &b] {
                assert_eq!(newest(store, id).await, newest_of(&*truth, id).await, "stale page during the outage");
            }
            // Long enough for several probes to fail too.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(a.is_bypassed() && count(&a.stats.bypassed) > 0, "the outage was never noticed");
        assert!(count(&a.stats.errors) >= 2, "no probe ran during the outage");

        match outage {
            Outage::Stop => redis.restart(),
            Outage::Pause => redis.resume(),
        }
        wait_in_use(&[&a, &b]).await;
        for store in [&a, &b] {
            assert_eq!(newest(store, id).await, newest_of(&*truth, id).await, "stale page after the outage");
            let inbox = store.list_conversations("bob", None, 10).await.unwrap();
            assert_eq!(inbox, truth.list_conversations("bob", None, 10).await.unwrap(), "stale inbox after the outage");
            let member = store.member(id, "bob").await.unwrap();
            let truth_member = truth.member(id, "bob").await.unwrap().map(Member::without_cursors);
            assert_eq!(member, truth_member, "stale member after the outage");
            let conversation = store.conversation_for_member(id, "bob").await.unwrap();
            assert_eq!(conversation, truth.conversation_for_member(id, "bob").await.unwrap(), "stale conversation");
        }
        // And the cache is used again: the second read of a page hits.
        let hits = count(&b.stats.hits);
        newest(&b, id).await;
        newest(&b, id).await;
        assert!(count(&b.stats.hits) > hits, "the cache was not used after redis came back");
    }

    async fn newest_of(store: &dyn MessageStore, id: Uuid) -> Vec<StoredMessage> {
        store.history(id, HistoryRange::Before(None), SeqBounds::ALL, 50).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sends_continue_while_redis_is_stopped_and_nothing_stale_follows() {
        survives(Outage::Stop).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sends_continue_while_redis_is_paused_and_nothing_stale_follows() {
        survives(Outage::Pause).await;
    }

    #[tokio::test]
    async fn an_unreachable_redis_at_start_is_bypassed_not_fatal() {
        let port = messenger_testkit::free_port();
        let options = CacheOptions {
            backend: CacheBackend::Redis,
            redis: RedisOptions {
                url: format!("redis://127.0.0.1:{port}"),
                connect_timeout: Duration::from_millis(200),
                ..CacheOptions::default().redis
            },
            ..CacheOptions::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let store = CachedStore::redis(
            Arc::new(SqliteStore::open(&dir.path().join("messages.db"), &SqliteOptions::default()).unwrap()),
            &options,
        )
        .await
        .unwrap();
        assert!(store.is_bypassed());
        let id = store.get_or_create_direct("a", "b", Uuid::now_v7(), 1).await.unwrap().id;
        contract::send(&store, id, "a", "m", "hello").await.unwrap();
        assert_eq!(newest(&store, id).await.len(), 1);
    }

    /// An entry an older build wrote (the same key without this build's
    /// format; a page whose messages lack `last_edit_seq`, say) is never
    /// read: the read goes to the store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_entry_an_older_build_wrote_is_never_read() {
        let redis = RedisServer::start();
        let dir = tempfile::tempdir().unwrap();
        let (_, store, other) = instances(&dir, &redis).await;
        wait_in_use(&[&store, &other]).await;
        let id = store.get_or_create_direct("a", "b", Uuid::now_v7(), 1).await.unwrap().id;
        contract::send(&store, id, "a", "m1", "the truth").await.unwrap();
        assert_eq!(newest(&store, id).await[0].body, "the truth");
        let cli = |args: &[&str]| {
            let output = std::process::Command::new("redis-cli").arg("-u").arg(redis.url()).args(args).output();
            String::from_utf8(output.expect("redis-cli runs").stdout).unwrap()
        };
        let prefix = options(&redis).redis.key_prefix;
        let listed = cli(&["--raw", "KEYS", &format!("{prefix}e*:*page:*")]);
        let key = listed.lines().next().expect("the page was filled in redis").to_owned();
        let (_, rest) = key.strip_prefix(&prefix).unwrap().split_once(':').unwrap();
        let entry = cli(&["--raw", "GET", &key]);
        // What the older build would have left under its key: another body.
        cli(&["DEL", &key]);
        cli(&["SET", &format!("{prefix}e:{rest}"), &entry.trim_end().replace("the truth", "stale words")]);
        // Another instance (nothing in process yet) reads through Redis.
        assert_eq!(newest(&other, id).await[0].body, "the truth", "an older build's entry was read");
    }

    /// A Redis that comes back from an older snapshot brings back replaced
    /// generations and their entries; no call failed meanwhile, so only the
    /// reconnection itself can tell the cache to retire them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_redis_restored_from_an_older_snapshot_serves_nothing_stale() {
        fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
            std::fs::create_dir_all(to).unwrap();
            for entry in std::fs::read_dir(from).unwrap() {
                let entry = entry.unwrap();
                std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
            }
        }

        let mut redis = RedisServer::start();
        let dir = tempfile::tempdir().unwrap();
        let (truth, store, _) = instances(&dir, &redis).await;
        wait_in_use(&[&store]).await;
        let id = store.get_or_create_direct("a", "b", Uuid::now_v7(), 1).await.unwrap().id;
        contract::send(&store, id, "a", "m1", "first").await.unwrap();
        assert_eq!(newest(&store, id).await.len(), 1);

        // The snapshot: generations and the one-message page as they are now.
        redis.stop();
        let backup = tempfile::tempdir().unwrap();
        copy_dir(&redis.dir().join("appendonlydir"), backup.path());
        redis.restart();
        tokio::time::sleep(Duration::from_millis(300)).await;
        wait_in_use(&[&store]).await;
        contract::send(&store, id, "a", "m2", "second").await.unwrap();
        assert_eq!(newest(&store, id).await.len(), 2);

        // Back to the snapshot.
        redis.stop();
        std::fs::remove_dir_all(redis.dir().join("appendonlydir")).unwrap();
        copy_dir(backup.path(), &redis.dir().join("appendonlydir"));
        redis.restart();
        tokio::time::sleep(Duration::from_millis(300)).await;
        wait_in_use(&[&store]).await;
        assert_eq!(newest(&store, id).await, newest_of(&*truth, id).await, "a generation from the snapshot came back");
    }
}
