use std::{sync::Arc, time::Duration};

use futures::future::BoxFuture;

use super::*;

#[tokio::test]
async fn memory_store_passes_the_contract_suite() {
    let open = |ttl| -> BoxFuture<'static, Arc<dyn PresenceStore>> {
        Box::pin(async move { Arc::new(MemoryStore::new(ttl)) as Arc<dyn PresenceStore> })
    };
    let cases = contract::run_all(&open).await;
    eprintln!("presence store contract: {cases} cases passed on the memory store");
}

#[tokio::test]
async fn expired_leases_of_users_nobody_asks_about_are_dropped() {
    let ttl = Duration::from_millis(100);
    let store = MemoryStore::new(ttl);
    for i in 0..10 {
        let user = format!("gone{i}");
        let session = Session {
            user_id: user.clone(),
            device_id: "phone".into(),
            session_id: user,
            gateway_id: "dead".into(),
            gateway_addr: "127.0.0.1:1".into(),
            connected_at_ms: 1,
        };
        store.register(session, 4, Mode::Connect).await.unwrap();
    }
    tokio::time::sleep(ttl * 2).await;
    store.renew("alive", &[]).await.unwrap();
    let state = store.state.read().await;
    assert!(state.sessions.is_empty(), "{} users still held", state.sessions.len());
    assert_eq!(state.last_seen.len(), 10, "last seen outlives the sessions");
}
