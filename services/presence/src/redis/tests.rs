//! `RedisStore` against a real `redis-server`: the shared contract, then
//! what only a shared, restartable backend can get wrong.

use std::{sync::Arc, time::Duration};

use futures::future::{BoxFuture, join_all};
use messenger_testkit::RedisServer;

use super::*;
use crate::store::contract::{self, session};

fn options(url: &str) -> RedisOptions {
    RedisOptions {
        url: url.to_owned(),
        // A prefix per store keeps tests apart on one server.
        key_prefix: format!("test:{}:", ids::new_id().simple()),
        command_timeout: Duration::from_millis(300),
        connect_timeout: Duration::from_secs(2),
        ..RedisOptions::default()
    }
}

async fn store(options: &RedisOptions, ttl: Duration) -> RedisStore {
    RedisStore::connect(options, ttl).await.unwrap()
}

fn reference(user: &str, id: &str) -> SessionRef {
    SessionRef { user_id: user.into(), session_id: id.into() }
}

/// Retries `call` until Redis answers (after a restart the client reconnects).
async fn when_back<T, F: Future<Output = Result<T, Error>>>(mut call: impl FnMut() -> F) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match call().await {
            Ok(value) => return value,
            Err(Error::Unavailable(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("redis did not come back within 10 s: {error}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_passes_the_contract_suite() {
    let redis = RedisServer::start();
    let url = redis.url();
    let open = move |ttl| -> BoxFuture<'static, Arc<dyn PresenceStore>> {
        // The suite checks answers, not outages: a loaded machine's slow reply is no failure here.
        let options = RedisOptions { command_timeout: Duration::from_secs(5), ..options(&url) };
        Box::pin(async move { Arc::new(store(&options, ttl).await) as Arc<dyn PresenceStore> })
    };
    let cases = contract::run_all(&open).await;
    eprintln!("presence store contract: {cases} cases passed on redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_lost_with_redis_data_are_reported_unknown_and_restored() {
    let mut redis = RedisServer::start();
    let store = store(&options(&redis.url()), Duration::from_secs(60)).await;
    store.register(session("ann", "phone", "a1", "g1"), 4, Mode::Connect).await.unwrap();
    store.register(session("ben", "phone", "b1", "g1"), 4, Mode::Connect).await.unwrap();
    let mine = [reference("ann", "a1"), reference("ben", "b1")];
    assert!(store.renew("g1", &mine).await.unwrap().is_empty());

    // Redis comes back empty (data and loaded scripts gone).
    redis.stop();
    for entry in std::fs::read_dir(redis.dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) }.unwrap();
    }
    redis.restart();

    let unknown = when_back(|| store.renew("g1", &mine)).await;
    assert_eq!(unknown, ["a1", "b1"], "the gateway learns that presence lost its sessions");
    let users = ["ann".to_owned(), "ben".to_owned()];
    assert!(store.locate(&users).await.unwrap().is_empty());
    store.register(session("ann", "phone", "a1", "g1"), 4, Mode::Restore).await.unwrap();
    store.register(session("ben", "phone", "b1", "g1"), 4, Mode::Restore).await.unwrap();
    assert_eq!(store.locate(&users).await.unwrap().len(), 2);
    assert!(store.renew("g1", &mine).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_is_unavailable_and_recovers() {
    let redis = RedisServer::start();
    let store = store(&options(&redis.url()), Duration::from_secs(60)).await;
    store.register(session("cat", "phone", "c1", "g1"), 4, Mode::Connect).await.unwrap();
    redis.pause();
    let started = std::time::Instant::now();
    let users = ["cat".to_owned()];
    assert!(matches!(store.locate(&users).await, Err(Error::Unavailable(_))));
    assert!(matches!(store.renew("g1", &[reference("cat", "c1")]).await, Err(Error::Unavailable(_))));
    let refused = store.register(session("cat", "laptop", "c2", "g1"), 4, Mode::Connect).await;
    assert!(matches!(refused, Err(Error::Unavailable(_))), "{refused:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "calls fail at the command timeout");
    let status: tonic::Status = Error::Unavailable("redis: timed out".into()).into();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    redis.resume();
    let located = when_back(|| store.locate(&users)).await;
    // The timed-out register may still have run once Redis resumed: a write
    // that timed out is not known to have failed. Nobody renews c2, so its
    // lease ends by itself; c1 was never lost.
    assert!(located.iter().any(|s| s.session_id == "c1"), "{located:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_registers_on_two_instances_respect_the_limit() {
    let redis = RedisServer::start();
    let options = options(&redis.url());
    let ttl = Duration::from_secs(60);
    let instances = [store(&options, ttl).await, store(&options, ttl).await];
    let registers = (0..24).map(|i| {
        let device = format!("device{i}");
        instances[i % 2].register(session("dan", &device, &device, "g1"), 3, Mode::Connect)
    });
    let results = join_all(registers).await;
    let accepted = results.iter().filter(|result| result.is_ok()).count();
    assert_eq!(accepted, 3, "{results:?}");
    assert!(results.iter().all(|r| matches!(r, Ok(_) | Err(Error::TooManySessions { limit: 3, .. }))));
    assert_eq!(instances[1].locate(&["dan".to_owned()]).await.unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_keys_expire_with_their_newest_lease_and_last_seen_stays() {
    let redis = RedisServer::start();
    let ttl = Duration::from_millis(400);
    let store = store(&options(&redis.url()), ttl).await;
    store.register(session("eve", "phone", "e1", "g1"), 4, Mode::Connect).await.unwrap();
    let [sessions, last_seen] = store.keys("eve");
    let remaining: i64 = store.client.pttl(&sessions).await.unwrap();
    assert!(remaining > 0 && remaining <= 400, "the key lives as long as the lease: {remaining} ms");
    tokio::time::sleep(ttl / 2).await;
    assert!(store.renew("g1", &[reference("eve", "e1")]).await.unwrap().is_empty());
    let remaining: i64 = store.client.pttl(&sessions).await.unwrap();
    assert!(remaining > 300, "renewal extends the key: {remaining} ms");
    tokio::time::sleep(ttl * 2).await;
    let exists: i64 = store.client.exists(&sessions).await.unwrap();
    assert_eq!(exists, 0, "the sessions of a user nobody renews disappear");
    let seen: Option<i64> = store.client.get(&last_seen).await.unwrap();
    assert!(seen.is_some_and(|seen| seen > 0));
    let status = store.status(&["eve".to_owned()]).await.unwrap();
    assert!(!status[0].online);
    assert_eq!(Some(status[0].last_seen_ms), seen);
}
