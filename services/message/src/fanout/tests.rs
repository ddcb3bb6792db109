//! Fan-out against fakes of presence and the gateways: who gets what, in
//! how many calls, and what is sent again after a failed `Deliver`.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Mutex,
    time::Duration,
};

use super::*;
use crate::{
    ports::Presence,
    sqlite::{SqliteOptions, SqliteStore},
};

struct FakePresence {
    sessions: Vec<pb::Session>,
    /// The users of every `Locate`, in order.
    calls: Mutex<Vec<Vec<String>>>,
}

#[async_trait]
impl Locate for FakePresence {
    async fn locate(&self, user_ids: Vec<String>) -> Result<Vec<pb::Session>, tonic::Status> {
        let found = self.sessions.iter().filter(|s| user_ids.contains(&s.user_id)).cloned().collect();
        self.calls.lock().unwrap().push(user_ids);
        Ok(found)
    }
}

/// Gateways that record what they are handed, failing the next calls to an
/// address when told to.
#[derive(Default)]
struct FakeGateways {
    delivered: Mutex<Vec<(String, Delivery)>>,
    failing: Mutex<HashMap<String, usize>>,
    calls: Mutex<Vec<String>>,
}

#[async_trait]
impl Gateways for FakeGateways {
    async fn deliver(&self, address: &str, deliveries: Vec<Delivery>) -> Result<u32, tonic::Status> {
        self.calls.lock().unwrap().push(address.to_owned());
        if let Some(failures) = self.failing.lock().unwrap().get_mut(address).filter(|failures| **failures > 0) {
            *failures -= 1;
            return Err(tonic::Status::unavailable("link down"));
        }
        self.delivered.lock().unwrap().extend(deliveries.into_iter().map(|delivery| (address.to_owned(), delivery)));
        Ok(0)
    }
}

fn session(user: &str, gateway: &str) -> pb::Session {
    pb::Session {
        user_id: user.into(),
        session_id: format!("{user}@{gateway}"),
        gateway_addr: gateway.into(),
        ..Default::default()
    }
}

struct Fixture {
    fanout: Fanout,
    presence: Arc<FakePresence>,
    gateways: Arc<FakeGateways>,
    _dir: tempfile::TempDir,
}

fn fixture(sessions: Vec<pb::Session>, options: FanoutOptions) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("messages.db"), &SqliteOptions::default()).unwrap());
    let presence = Arc::new(FakePresence { sessions, calls: Mutex::default() });
    let gateways = Arc::new(FakeGateways::default());
    let supervisor = Supervisor::detached();
    let fanout =
        Fanout::start(&options, 32, store, presence.clone(), gateways.clone(), Pushes::disabled(), &supervisor);
    Fixture { fanout, presence, gateways, _dir: dir }
}

fn text(seq: u64, body: &str) -> StoredMessage {
    let mut entry = StoredMessage::event(Uuid::nil(), "alice", Kind::Text, 0);
    entry.seq = seq;
    entry.body = body.into();
    entry
}

fn users(names: &[&str]) -> Arc<Vec<String>> {
    Arc::new(names.iter().map(|name| name.to_string()).collect())
}

/// (gateway, session, body, withheld) of every message delivered, once `count` have been.
async fn delivered_messages(gateways: &FakeGateways, count: usize) -> BTreeSet<(String, String, String, bool)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut seen = BTreeSet::new();
        for (gateway, delivery) in gateways.delivered.lock().unwrap().iter() {
            if let Some(delivery::Event::Message(message)) = &delivery.event {
                for session in &delivery.session_ids {
                    seen.insert((gateway.clone(), session.clone(), message.body.clone(), message.withheld));
                }
            }
        }
        if seen.len() >= count || tokio::time::Instant::now() >= deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn row(gateway: &str, session: &str, body: &str, withheld: bool) -> (String, String, String, bool) {
    (gateway.into(), session.into(), body.into(), withheld)
}

#[tokio::test]
async fn an_entry_reaches_its_audience_in_full_and_the_rest_withheld() {
    let sessions = vec![
        session("alice", "gw1"),
        session("bob", "gw1"),
        session("bob", "gw2"),
        session("carol", "gw2"),
        session("dave", "gw1"),
    ];
    let f = fixture(sessions, FanoutOptions::default());
    let appended =
        Appended { entry: text(7, "hello"), audience: users(&["alice", "bob"]), withheld_from: users(&["carol"]) };
    f.fanout.entry(appended).await;
    let expected = BTreeSet::from([
        row("gw1", "alice@gw1", "hello", false),
        row("gw1", "bob@gw1", "hello", false),
        row("gw2", "bob@gw2", "hello", false),
        row("gw2", "carol@gw2", "", true),
    ]);
    assert_eq!(delivered_messages(&f.gateways, expected.len()).await, expected, "dave is in neither list");
}

#[tokio::test]
async fn a_failed_deliver_is_sent_again_and_a_presence_hint_is_not() {
    let options = FanoutOptions { redeliver_backoff: Duration::from_millis(10), ..FanoutOptions::default() };
    let f = fixture(vec![session("alice", "gw1")], options);
    f.gateways.failing.lock().unwrap().insert("gw1".into(), 2);
    let appended = Appended { entry: text(3, "again"), audience: users(&["alice"]), withheld_from: users(&[]) };
    f.fanout.entry(appended).await;
    let expected = BTreeSet::from([row("gw1", "alice@gw1", "again", false)]);
    assert_eq!(delivered_messages(&f.gateways, 1).await, expected);
    assert_eq!(f.gateways.calls.lock().unwrap().len(), 3, "the first call and two tries more");

    f.gateways.failing.lock().unwrap().insert("gw1".into(), 1);
    let update = Presence { user_id: "bob".into(), online: true, last_seen_ms: 1 };
    f.fanout.hint(Hint::Presence(users(&["alice"]), update));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(f.gateways.calls.lock().unwrap().len(), 4, "a moment's hint was sent again");
    let presence_delivered =
        f.gateways.delivered.lock().unwrap().iter().any(|(_, d)| matches!(d.event, Some(delivery::Event::Presence(_))));
    assert!(!presence_delivered);
}

#[tokio::test]
async fn recipients_are_located_in_parts_of_locate_max_users() {
    let names = ["a", "b", "c", "d", "e"];
    let sessions = names.iter().map(|name| session(name, "gw1")).collect();
    let f = fixture(sessions, FanoutOptions { locate_max_users: 2, ..FanoutOptions::default() });
    let appended = Appended { entry: text(1, "all"), audience: users(&names), withheld_from: users(&[]) };
    f.fanout.entry(appended).await;
    assert_eq!(delivered_messages(&f.gateways, 5).await.len(), 5);
    let calls = f.presence.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert!(calls.iter().all(|part| part.len() <= 2), "{calls:?}");
    let located: BTreeSet<&String> = calls.iter().flatten().collect();
    assert_eq!(located.len(), 5);
    assert_eq!(f.gateways.calls.lock().unwrap().len(), 1, "one Deliver per gateway and batch");
}
