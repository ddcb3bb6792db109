//! The delivery order against a fake message service whose rows can be
//! committed but not readable yet, and which can be unreachable.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::mpsc;

use super::*;
use crate::session::Outbound;

/// Committed entries per conversation, some not readable yet, and the
/// device's delivered cursors.
#[derive(Default)]
struct Fake {
    entries: Mutex<BTreeMap<String, BTreeMap<u64, pb::Message>>>,
    unreadable: Mutex<HashSet<(String, u64)>>,
    cursors: Mutex<HashMap<String, u64>>,
    down: AtomicBool,
}

impl Fake {
    fn commit(&self, conversation: &str, seq: u64) {
        let message = pb::Message { conversation_id: conversation.into(), seq, ..Default::default() };
        self.entries.lock().unwrap().entry(conversation.into()).or_default().insert(seq, message);
    }

    fn set_readable(&self, conversation: &str, seq: u64, readable: bool) {
        let mut unreadable = self.unreadable.lock().unwrap();
        if readable {
            unreadable.remove(&(conversation.to_owned(), seq));
        } else {
            unreadable.insert((conversation.to_owned(), seq));
        }
    }

    /// What a store reads after `after`: in order, up to the first seq not readable yet.
    fn readable_after(&self, conversation: &str, after: u64, limit: u32) -> Vec<pb::Message> {
        let entries = self.entries.lock().unwrap();
        let unreadable = self.unreadable.lock().unwrap();
        entries
            .get(conversation)
            .into_iter()
            .flat_map(|entries| entries.range(after + 1..))
            .take_while(|(seq, _)| !unreadable.contains(&(conversation.to_owned(), **seq)))
            .take(limit as usize)
            .map(|(_, message)| message.clone())
            .collect()
    }

    fn reachable(&self) -> Result<(), Status> {
        if self.down.load(Ordering::SeqCst) { Err(Status::unavailable("message service down")) } else { Ok(()) }
    }
}

impl Backlog for Arc<Fake> {
    async fn sync(&self, only: Option<&str>, _: String, limit: u32) -> Result<(Vec<pb::Message>, String), Status> {
        self.reachable()?;
        let conversations: Vec<String> = match only {
            Some(id) => vec![id.to_owned()],
            None => self.entries.lock().unwrap().keys().cloned().collect(),
        };
        let mut page = Vec::new();
        for id in conversations {
            let cursor = self.cursors.lock().unwrap().get(&id).copied().unwrap_or(0);
            page.extend(self.readable_after(&id, cursor, limit));
        }
        Ok((page, String::new()))
    }

    async fn after(&self, conversation_id: &str, after: u64, limit: u32) -> Result<Vec<pb::Message>, Status> {
        self.reachable()?;
        Ok(self.readable_after(conversation_id, after, limit))
    }
}

fn delivery(fake: &Arc<Fake>) -> (Delivery<Arc<Fake>>, mpsc::Receiver<Outbound>) {
    let (out, frames) = mpsc::channel(64);
    (Delivery::new(fake.clone(), Outlet { out, timeout: Duration::from_secs(1) }, 100), frames)
}

/// (conversation, seq) of every entry pushed since the last look.
fn pushed(frames: &mut mpsc::Receiver<Outbound>) -> Vec<(String, u64)> {
    let mut seen = Vec::new();
    while let Ok(Ok(frame)) = frames.try_recv() {
        if let Some(pb::server_frame::Frame::Message(message)) = frame.frame {
            seen.push((message.conversation_id, message.seq));
        }
    }
    seen
}

fn seqs(conversation: &str, seqs: impl IntoIterator<Item = u64>) -> Vec<(String, u64)> {
    seqs.into_iter().map(|seq| (conversation.to_owned(), seq)).collect()
}

fn entry(conversation: &str, seq: u64) -> pb::Message {
    pb::Message { conversation_id: conversation.into(), seq, ..Default::default() }
}

#[tokio::test]
async fn the_next_live_entry_goes_out_at_once_and_a_repeat_never() {
    let fake = Arc::new(Fake::default());
    let (mut delivery, mut frames) = delivery(&fake);
    fake.commit("c", 1);
    fake.commit("c", 2);
    delivery.sync(None).await.unwrap();
    assert_eq!(pushed(&mut frames), seqs("c", [1, 2]));
    fake.commit("c", 3);
    delivery.live(&entry("c", 3)).await.unwrap();
    delivery.live(&entry("c", 3)).await.unwrap();
    delivery.live(&entry("c", 2)).await.unwrap();
    assert_eq!(pushed(&mut frames), seqs("c", [3]));
    assert!(!delivery.held_back());
}

#[tokio::test]
async fn a_gap_is_filled_from_history_before_the_live_entry() {
    let fake = Arc::new(Fake::default());
    let (mut delivery, mut frames) = delivery(&fake);
    fake.commit("c", 1);
    delivery.sync(None).await.unwrap();
    for seq in 2..=4 {
        fake.commit("c", seq);
    }
    delivery.live(&entry("c", 4)).await.unwrap();
    assert_eq!(pushed(&mut frames), seqs("c", [1, 2, 3, 4]));
}

#[tokio::test]
async fn nothing_passes_a_seq_that_is_not_readable_yet() {
    let fake = Arc::new(Fake::default());
    let (mut delivery, mut frames) = delivery(&fake);
    fake.commit("c", 1);
    delivery.sync(None).await.unwrap();
    assert_eq!(pushed(&mut frames), seqs("c", [1]));
    // Seq 2 is committed but lands late; 3 and 4 arrive live.
    for seq in 2..=4 {
        fake.commit("c", seq);
    }
    fake.set_readable("c", 2, false);
    delivery.live(&entry("c", 3)).await.unwrap();
    delivery.live(&entry("c", 4)).await.unwrap();
    assert_eq!(pushed(&mut frames), [], "pushed past seq 2");
    assert!(delivery.held_back());
    delivery.retry_held_back("s").await.unwrap();
    assert_eq!(pushed(&mut frames), [], "pushed past seq 2 on a retry");
    fake.set_readable("c", 2, true);
    delivery.retry_held_back("s").await.unwrap();
    assert_eq!(pushed(&mut frames), seqs("c", [2, 3, 4]));
    assert!(!delivery.held_back());
}

#[tokio::test]
async fn a_conversations_first_live_entry_starts_from_the_devices_cursor() {
    let fake = Arc::new(Fake::default());
    let (mut delivery, mut frames) = delivery(&fake);
    fake.cursors.lock().unwrap().insert("d".into(), 5);
    for seq in 1..=7 {
        fake.commit("d", seq);
    }
    fake.set_readable("d", 6, false);
    delivery.live(&entry("d", 7)).await.unwrap();
    assert_eq!(pushed(&mut frames), [], "pushed 7 with 6 missing");
    assert!(delivery.held_back());
    fake.commit("d", 8);
    delivery.live(&entry("d", 8)).await.unwrap();
    assert_eq!(pushed(&mut frames), []);
    fake.set_readable("d", 6, true);
    delivery.retry_held_back("s").await.unwrap();
    assert_eq!(pushed(&mut frames), seqs("d", [6, 7, 8]));
    assert!(!delivery.held_back());
}

#[tokio::test]
async fn a_message_service_down_for_a_moment_postpones_the_catch_up() {
    let fake = Arc::new(Fake::default());
    let (mut delivery, mut frames) = delivery(&fake);
    fake.commit("c", 1);
    delivery.sync(None).await.unwrap();
    fake.down.store(true, Ordering::SeqCst);
    delivery.resync("s").await.unwrap();
    fake.commit("c", 2);
    fake.commit("c", 3);
    delivery.live(&entry("c", 3)).await.unwrap();
    assert_eq!(pushed(&mut frames), seqs("c", [1]));
    assert!(delivery.held_back());
    fake.down.store(false, Ordering::SeqCst);
    delivery.retry_held_back("s").await.unwrap();
    assert_eq!(pushed(&mut frames), seqs("c", [2, 3]));
    assert!(!delivery.held_back());
}

#[tokio::test]
async fn a_refusal_that_is_not_transient_ends_the_session() {
    struct Refusing;
    impl Backlog for Refusing {
        async fn sync(&self, _: Option<&str>, _: String, _: u32) -> Result<(Vec<pb::Message>, String), Status> {
            Err(Status::permission_denied("no"))
        }
        async fn after(&self, _: &str, _: u64, _: u32) -> Result<Vec<pb::Message>, Status> {
            Err(Status::permission_denied("no"))
        }
    }
    let (out, _frames) = mpsc::channel(4);
    let mut delivery = Delivery::new(Refusing, Outlet { out, timeout: Duration::from_secs(1) }, 100);
    assert!(
        matches!(delivery.resync("s").await, Err(End::Upstream(status)) if status.code() == Code::PermissionDenied)
    );
}
