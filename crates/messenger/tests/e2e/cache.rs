//! The message service's Redis cache seen from a client: an outage costs
//! neither an error nor a stale read.

use std::time::Duration;

use messenger_message::cache::CacheBackend;
use messenger_testkit::RedisServer;

use crate::support::*;

async fn bodies(client: &messenger_client::Client, conversation: &str) -> Vec<String> {
    let page = client.history(conversation, 0, 200).await.expect("history failed");
    page.messages.into_iter().map(|message| message.body).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_costs_clients_no_error_and_no_stale_history() {
    let redis = RedisServer::start();
    let system = TestSystem::start_with(|config| {
        config.message.cache.backend = CacheBackend::Redis;
        config.message.cache.redis.url = redis.url();
        config.message.cache.probe_interval = Duration::from_millis(50);
    })
    .await;
    let (alice, _alice_events) = system.connect("alice", "alice-phone").await;
    let (bob, mut bob_events) = system.connect("bob", "bob-phone").await;
    let conversation = alice.direct("bob").await.unwrap().conversation_id;
    let mut sent = Vec::new();
    for i in 0..10 {
        sent.push(format!("before {i}"));
        alice.send(&conversation, &sent[i]).await.unwrap();
    }
    messages(&mut bob_events, 10).await;
    // Twice: the second read is served from Redis.
    assert_eq!(bodies(&bob, &conversation).await, sent);
    assert_eq!(bodies(&bob, &conversation).await, sent);

    redis.pause();
    // A read notices first, so the sends below skip their invalidations
    // (a timed-out one could still land when Redis wakes up): only the
    // cache's recovery can keep what they made stale from being served.
    assert_eq!(bodies(&bob, &conversation).await, sent, "history at the start of the pause");
    for i in 0..30 {
        sent.push(format!("during {i}"));
        alice.send(&conversation, &sent[sent.len() - 1]).await.expect("a send failed while redis was paused");
        assert_eq!(next_message(&mut bob_events).await.body, sent[sent.len() - 1]);
        if i % 10 == 9 {
            assert_eq!(bodies(&bob, &conversation).await, sent, "history during the pause");
        }
    }
    redis.resume();
    // Well past several probe intervals: the cache is in use again by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..3 {
        assert_eq!(bodies(&bob, &conversation).await, sent, "stale history after redis came back");
        assert_eq!(bodies(&alice, &conversation).await, sent, "stale history after redis came back");
    }
    let inbox = bob.conversations("", 10).await.unwrap().conversations;
    assert_eq!(inbox[0].last_seq, sent.len() as u64, "stale inbox after redis came back");
}
