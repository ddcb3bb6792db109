//! The contract every `PresenceStore` must meet, written once and run against
//! each backend. Each case opens its own store with the lease length it needs
//! and uses users unique to the run, so cases run concurrently (most of them
//! wait for leases to expire).

use std::{sync::Arc, time::Duration};

use futures::future::{BoxFuture, join_all};
use messenger_platform::ids;

use super::*;

/// Opens a store of the backend under test with the given session TTL.
pub(crate) type Open = dyn Fn(Duration) -> BoxFuture<'static, Arc<dyn PresenceStore>> + Sync;

/// Long enough that nothing expires during a case.
const LONG: Duration = Duration::from_secs(600);
/// Short leases for expiry cases; waits are generous multiples of it.
const SHORT: Duration = Duration::from_millis(300);

/// A user id unique to this run.
fn user(name: &str) -> String {
    format!("{name}-{}", ids::new_id().simple())
}

pub(crate) fn session(user: &str, device: &str, id: &str, gateway: &str) -> Session {
    Session {
        user_id: user.into(),
        device_id: device.into(),
        session_id: id.into(),
        gateway_id: gateway.into(),
        gateway_addr: format!("{gateway}.internal:7701"),
        connected_at_ms: 1_700_000_000_000,
    }
}

fn reference(user: &str, id: &str) -> SessionRef {
    SessionRef { user_id: user.into(), session_id: id.into() }
}

async fn located_ids(store: &dyn PresenceStore, users: &[String]) -> Vec<String> {
    let mut ids: Vec<String> = store.locate(users).await.unwrap().into_iter().map(|s| s.session_id).collect();
    ids.sort();
    ids
}

pub(crate) async fn run_all(open: &Open) -> usize {
    let cases: Vec<(&str, BoxFuture<'_, ()>)> = vec![
        ("sessions_are_located_and_unregistered", Box::pin(sessions_are_located_and_unregistered(open))),
        ("reconnecting_device_replaces_its_old_session", Box::pin(reconnecting_device_replaces_its_old_session(open))),
        ("restore_never_replaces_a_newer_session", Box::pin(restore_never_replaces_a_newer_session(open))),
        ("session_limit_holds_at_its_edge", Box::pin(session_limit_holds_at_its_edge(open))),
        ("expired_sessions_do_not_count_against_the_limit", Box::pin(expired_sessions_do_not_count(open))),
        ("sessions_expire_without_renewal", Box::pin(sessions_expire_without_renewal(open))),
        ("renew_extends_only_the_callers_sessions", Box::pin(renew_extends_only_the_callers_sessions(open))),
        ("last_seen_after_unregister", Box::pin(last_seen_after_unregister(open))),
        ("last_seen_after_expiry_is_the_last_renewal", Box::pin(last_seen_after_expiry_is_the_last_renewal(open))),
        ("many_users_are_located_at_once", Box::pin(many_users_are_located_at_once(open))),
        ("transitions_come_with_their_writes", Box::pin(transitions_come_with_their_writes(open))),
    ];
    let count = cases.len();
    join_all(cases.into_iter().map(|(name, case)| async move {
        case.await;
        eprintln!("presence contract case passed: {name}");
    }))
    .await;
    count
}

async fn sessions_are_located_and_unregistered(open: &Open) {
    let store = open(LONG).await;
    let (alice, bob) = (user("alice"), user("bob"));
    store.register(session(&alice, "phone", "a1", "g1"), 4, Mode::Connect).await.unwrap();
    store.register(session(&alice, "laptop", "a2", "g2"), 4, Mode::Connect).await.unwrap();
    let users = vec![alice.clone(), bob.clone()];
    let located = store.locate(&users).await.unwrap();
    assert_eq!(located.len(), 2);
    let phone = located.iter().find(|s| s.session_id == "a1").unwrap();
    assert_eq!(phone, &session(&alice, "phone", "a1", "g1"), "a session comes back as registered");

    store.unregister(&alice, "a1").await.unwrap();
    assert_eq!(located_ids(store.as_ref(), &users).await, ["a2"]);
    // Unknown users and sessions are no-ops.
    store.unregister(&bob, "b1").await.unwrap();
    store.unregister(&alice, "nope").await.unwrap();
    store.unregister(&alice, "a2").await.unwrap();
    assert!(store.locate(&users).await.unwrap().is_empty());
    assert!(store.locate(&[]).await.unwrap().is_empty());
}

async fn reconnecting_device_replaces_its_old_session(open: &Open) {
    let store = open(LONG).await;
    let bob = user("bob");
    let users = [bob.clone()];
    store.register(session(&bob, "phone", "s1", "g1"), 2, Mode::Connect).await.unwrap();
    store.register(session(&bob, "phone", "s2", "g2"), 2, Mode::Connect).await.unwrap();
    assert_eq!(located_ids(store.as_ref(), &users).await, ["s2"]);
    // A stale unregister of the replaced session changes nothing.
    store.unregister(&bob, "s1").await.unwrap();
    assert_eq!(located_ids(store.as_ref(), &users).await, ["s2"]);
    // Its gateway learns at the next renewal that presence no longer has it.
    assert_eq!(store.renew("g1", &[reference(&bob, "s1")]).await.unwrap(), ["s1"]);
    // Registering the same session again refreshes it instead of adding one.
    store.register(session(&bob, "phone", "s2", "g2"), 1, Mode::Connect).await.unwrap();
    assert_eq!(located_ids(store.as_ref(), &users).await, ["s2"]);
}

async fn restore_never_replaces_a_newer_session(open: &Open) {
    let store = open(LONG).await;
    let carol = user("carol");
    let users = [carol.clone()];
    let old = session(&carol, "phone", "old", "g1");
    let new = Session { connected_at_ms: old.connected_at_ms + 1, ..session(&carol, "phone", "new", "g2") };
    store.register(old.clone(), 4, Mode::Connect).await.unwrap();
    store.register(new.clone(), 4, Mode::Connect).await.unwrap();
    let refused = store.register(old.clone(), 4, Mode::Restore).await;
    assert!(matches!(refused, Err(Error::Superseded { .. })), "{refused:?}");
    assert_eq!(located_ids(store.as_ref(), &users).await, ["new"]);
    // Restoring a session that is simply gone (or still there) works.
    store.unregister(&carol, "new").await.unwrap();
    store.register(old.clone(), 4, Mode::Restore).await.unwrap();
    store.register(old.clone(), 4, Mode::Restore).await.unwrap();
    assert_eq!(located_ids(store.as_ref(), &users).await, ["old"]);
    // A restore newer than the device's other session replaces it, as a
    // connection would (its gateway renewed before its first registration landed).
    store.register(new, 4, Mode::Restore).await.unwrap();
    assert_eq!(located_ids(store.as_ref(), &users).await, ["new"]);
}

async fn session_limit_holds_at_its_edge(open: &Open) {
    let store = open(LONG).await;
    let dave = user("dave");
    store.register(session(&dave, "phone", "s1", "g1"), 2, Mode::Connect).await.unwrap();
    store.register(session(&dave, "laptop", "s2", "g1"), 2, Mode::Connect).await.unwrap();
    let refused = store.register(session(&dave, "tablet", "s3", "g1"), 2, Mode::Connect).await;
    assert!(matches!(refused, Err(Error::TooManySessions { limit: 2, .. })), "{refused:?}");
    // At the limit, a device reconnecting and a session registered again still fit.
    store.register(session(&dave, "phone", "s4", "g2"), 2, Mode::Connect).await.unwrap();
    store.register(session(&dave, "laptop", "s2", "g1"), 2, Mode::Restore).await.unwrap();
    assert_eq!(located_ids(store.as_ref(), std::slice::from_ref(&dave)).await, ["s2", "s4"]);
    // A freed slot is usable again.
    store.unregister(&dave, "s4").await.unwrap();
    store.register(session(&dave, "tablet", "s3", "g1"), 2, Mode::Connect).await.unwrap();
}

async fn expired_sessions_do_not_count(open: &Open) {
    let store = open(SHORT).await;
    let erin = user("erin");
    store.register(session(&erin, "phone", "s1", "g1"), 2, Mode::Connect).await.unwrap();
    store.register(session(&erin, "laptop", "s2", "g1"), 2, Mode::Connect).await.unwrap();
    tokio::time::sleep(SHORT * 2).await;
    store.register(session(&erin, "tablet", "s3", "g2"), 2, Mode::Connect).await.unwrap();
    store.register(session(&erin, "watch", "s4", "g2"), 2, Mode::Connect).await.unwrap();
    let refused = store.register(session(&erin, "tv", "s5", "g2"), 2, Mode::Connect).await;
    assert!(matches!(refused, Err(Error::TooManySessions { limit: 2, .. })), "{refused:?}");
}

async fn sessions_expire_without_renewal(open: &Open) {
    let store = open(SHORT).await;
    let frank = user("frank");
    let users = [frank.clone()];
    let before = ids::now_ms();
    store.register(session(&frank, "phone", "s1", "g1"), 4, Mode::Connect).await.unwrap();
    let after = ids::now_ms();
    assert_eq!(located_ids(store.as_ref(), &users).await, ["s1"]);
    assert!(store.status(&users).await.unwrap()[0].online);
    tokio::time::sleep(SHORT * 2).await;
    assert!(store.locate(&users).await.unwrap().is_empty(), "an expired session is never located");
    let status = &store.status(&users).await.unwrap()[0];
    assert!(!status.online, "a user whose sessions expired is offline");
    assert!((before..=after).contains(&status.last_seen_ms), "last seen is the registration: {status:?}");
    // Too late to renew: the gateway has to register it again.
    assert_eq!(store.renew("g1", &[reference(&frank, "s1")]).await.unwrap(), ["s1"]);
    store.register(session(&frank, "phone", "s1", "g1"), 4, Mode::Restore).await.unwrap();
    assert_eq!(located_ids(store.as_ref(), &users).await, ["s1"]);
}

async fn renew_extends_only_the_callers_sessions(open: &Open) {
    let ttl = Duration::from_secs(1);
    let store = open(ttl).await;
    let (grace, heidi) = (user("grace"), user("heidi"));
    let users = [grace.clone(), heidi.clone()];
    store.register(session(&grace, "phone", "g1-a", "g1"), 4, Mode::Connect).await.unwrap();
    store.register(session(&heidi, "phone", "g1-b", "g1"), 4, Mode::Connect).await.unwrap();
    store.register(session(&grace, "laptop", "g2-a", "g2"), 4, Mode::Connect).await.unwrap();
    tokio::time::sleep(ttl * 6 / 10).await;
    // g1 renews its own sessions, claims g2's, and names ones presence never had.
    let unknown = store
        .renew(
            "g1",
            &[
                reference(&grace, "g1-a"),
                reference(&heidi, "g1-b"),
                reference(&grace, "g2-a"),
                reference(&grace, "never"),
                reference(&user("ivan"), "never-either"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(unknown, ["g2-a", "never", "never-either"]);
    tokio::time::sleep(ttl * 6 / 10).await;
    // Past the first lease: only what g1 renewed is left; g1 could not keep g2's alive.
    assert_eq!(located_ids(store.as_ref(), &users).await, ["g1-a", "g1-b"]);
    assert!(store.renew("g1", &[]).await.unwrap().is_empty());
}

async fn last_seen_after_unregister(open: &Open) {
    let store = open(LONG).await;
    let (judy, never) = (user("judy"), user("never-seen"));
    let users = [judy.clone(), never.clone()];
    store.register(session(&judy, "phone", "s1", "g1"), 4, Mode::Connect).await.unwrap();
    store.register(session(&judy, "laptop", "s2", "g1"), 4, Mode::Connect).await.unwrap();
    store.unregister(&judy, "s1").await.unwrap();
    let status = store.status(&users).await.unwrap();
    assert_eq!(
        status.iter().map(|s| (s.user_id.as_str(), s.online)).collect::<Vec<_>>(),
        [(judy.as_str(), true), (never.as_str(), false)]
    );
    assert_eq!(status[1].last_seen_ms, 0, "never seen");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let before = ids::now_ms();
    store.unregister(&judy, "s2").await.unwrap();
    let after = ids::now_ms();
    let status = &store.status(&users).await.unwrap()[0];
    assert!(!status.online);
    assert!((before..=after).contains(&status.last_seen_ms), "last seen is the disconnect: {status:?}");
}

async fn last_seen_after_expiry_is_the_last_renewal(open: &Open) {
    let store = open(SHORT).await;
    let (kim, lee) = (user("kim"), user("lee"));
    let users = [kim.clone(), lee.clone()];
    store.register(session(&kim, "phone", "k1", "g1"), 4, Mode::Connect).await.unwrap();
    store.register(session(&lee, "phone", "l1", "g2"), 4, Mode::Connect).await.unwrap();
    let registered = ids::now_ms();
    tokio::time::sleep(SHORT / 3).await;
    let before = ids::now_ms();
    assert!(store.renew("g1", &[reference(&kim, "k1")]).await.unwrap().is_empty());
    let after = ids::now_ms();
    tokio::time::sleep(SHORT * 2).await;
    let status = store.status(&users).await.unwrap();
    assert!(!status[0].online && !status[1].online, "{status:?}");
    assert!((before..=after).contains(&status[0].last_seen_ms), "kim was last seen at the renewal: {status:?}");
    assert!(status[1].last_seen_ms <= registered && status[1].last_seen_ms > 0, "{status:?}");
}

async fn many_users_are_located_at_once(open: &Open) {
    let store = open(LONG).await;
    let users: Vec<String> = (0..200).map(|i| user(&format!("many{i}"))).collect();
    for (i, user) in users.iter().enumerate() {
        store.register(session(user, "phone", &format!("{i}-p"), "g1"), 4, Mode::Connect).await.unwrap();
        if i % 2 == 0 {
            store.register(session(user, "laptop", &format!("{i}-l"), "g2"), 4, Mode::Connect).await.unwrap();
        }
    }
    let mut asked = users.clone();
    asked.push(user("absent"));
    let located = store.locate(&asked).await.unwrap();
    assert_eq!(located.len(), 300);
    for (i, user) in users.iter().enumerate() {
        let mine = located.iter().filter(|s| &s.user_id == user).count();
        assert_eq!(mine, if i % 2 == 0 { 2 } else { 1 }, "{user}");
    }
    let status = store.status(&asked).await.unwrap();
    assert_eq!(status.len(), 201);
    assert!(status[..200].iter().all(|s| s.online) && !status[200].online);
    assert_eq!(status.iter().map(|s| &s.user_id).collect::<Vec<_>>(), asked.iter().collect::<Vec<_>>());
}

/// Came online / went offline is decided with the write, and each
/// transition is stamped after the user's every earlier one.
async fn transitions_come_with_their_writes(open: &Open) {
    let store = open(LONG).await;
    let mia = user("mia");
    let online = store.register(session(&mia, "phone", "m1", "g1"), 4, Mode::Connect).await.unwrap();
    assert!(online.changed, "{online:?}");
    let second = store.register(session(&mia, "laptop", "m2", "g1"), 4, Mode::Connect).await.unwrap();
    assert!(!second.changed, "{second:?}");
    // The same device reconnecting replaces its session: still online.
    let replaced = store.register(session(&mia, "laptop", "m3", "g2"), 4, Mode::Connect).await.unwrap();
    assert!(!replaced.changed, "{replaced:?}");
    assert!(!store.unregister(&mia, "m1").await.unwrap().changed);
    let offline = store.unregister(&mia, "m3").await.unwrap();
    assert!(offline.changed && offline.at_ms > online.at_ms, "{offline:?} after {online:?}");
    assert_eq!(store.status(std::slice::from_ref(&mia)).await.unwrap()[0].last_seen_ms, offline.at_ms);
    // Within one millisecond of the last transition, the next still stamps after it.
    let back = store.register(session(&mia, "phone", "m4", "g1"), 4, Mode::Connect).await.unwrap();
    let gone = store.unregister(&mia, "m4").await.unwrap();
    assert!(back.changed && gone.changed, "{back:?} {gone:?}");
    assert!(offline.at_ms < back.at_ms && back.at_ms < gone.at_ms, "{offline:?} {back:?} {gone:?}");
    // Unknown sessions change nothing while another is live.
    store.register(session(&mia, "phone", "m5", "g1"), 4, Mode::Connect).await.unwrap();
    assert!(!store.unregister(&mia, "never").await.unwrap().changed);
}
