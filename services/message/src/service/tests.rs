//! The domain logic against a real SQLite store and fakes of the other
//! services (`ports.rs`): what it hands fan-out and media, and when.

use std::sync::Mutex;

use async_trait::async_trait;

use super::*;
use crate::{
    error::MediaRefusal,
    ports::{Deliveries, Hint, Media, MediaToAttach},
    sqlite::{SqliteOptions, SqliteStore},
    store::Appended,
};

#[derive(Default)]
pub(crate) struct Recorded {
    entries: Mutex<Vec<Appended>>,
    hints: Mutex<Vec<Hint>>,
    reads: Mutex<Vec<(String, Uuid, u64)>>,
}

#[async_trait]
impl Deliveries for Recorded {
    async fn entry(&self, appended: Appended) {
        self.entries.lock().unwrap().push(appended);
    }

    fn hint(&self, hint: Hint) {
        self.hints.lock().unwrap().push(hint);
    }

    fn read_marked(&self, user_id: &str, conversation_id: Uuid, read_seq: u64) {
        self.reads.lock().unwrap().push((user_id.to_owned(), conversation_id, read_seq));
    }
}

/// A media service that vouches for every id as a photo, or refuses them all.
#[derive(Default)]
struct FakeMedia {
    refuse: Option<MediaRefusal>,
    described: Mutex<Vec<MediaToAttach>>,
    deleted: Mutex<Vec<(String, Vec<String>)>>,
}

#[async_trait]
impl Media for FakeMedia {
    async fn describe(&self, request: MediaToAttach) -> Result<Vec<Attachment>> {
        self.described.lock().unwrap().push(request.clone());
        if let Some(refusal) = self.refuse {
            return Err(Error::Media(refusal, "media m1 is not complete".into()));
        }
        Ok(request
            .media_ids
            .into_iter()
            .map(|media_id| Attachment { media_id, mime_type: "image/png".into(), size: 10, ..Attachment::default() })
            .collect())
    }

    async fn delete(&self, conversation_id: &str, media_ids: Vec<String>) -> Result<()> {
        self.deleted.lock().unwrap().push((conversation_id.to_owned(), media_ids));
        Ok(())
    }
}

struct Fixture {
    service: Service,
    recorded: Arc<Recorded>,
    media: Arc<FakeMedia>,
    _dir: tempfile::TempDir,
}

fn fixture(media: FakeMedia) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("messages.db"), &SqliteOptions::default()).unwrap();
    let (recorded, media) = (Arc::new(Recorded::default()), Arc::new(media));
    let service = Service::new(Options::default(), Arc::new(store), recorded.clone(), media.clone());
    Fixture { service, recorded, media, _dir: dir }
}

/// The service on `store`, with fan-out recorded and a media service that vouches for everything.
pub(crate) fn service_on(store: Arc<dyn MessageStore>) -> (Service, Arc<Recorded>) {
    let recorded = Arc::new(Recorded::default());
    (Service::new(Options::default(), store, recorded.clone(), Arc::new(FakeMedia::default())), recorded)
}

fn input<'a>(sender: &'a str, conversation_id: &'a str, client_msg_id: &'a str, body: &str) -> SendInput<'a> {
    SendInput { sender, conversation_id, client_msg_id, body: body.into(), reply_to_seq: 0, media_ids: Vec::new() }
}

#[tokio::test]
async fn a_send_whose_media_is_refused_stores_nothing_and_says_why() {
    let f = fixture(FakeMedia { refuse: Some(MediaRefusal::FailedPrecondition), ..FakeMedia::default() });
    let direct = f.service.get_or_create_direct("alice", "bob").await.unwrap();
    let id = direct.id.to_string();
    let mut send = input("alice", &id, "c1", "");
    send.media_ids = vec!["m1".into()];
    let error = f.service.send(send).await.unwrap_err();
    assert!(matches!(&error, Error::Media(MediaRefusal::FailedPrecondition, text) if text.contains("m1")), "{error:?}");
    use messenger_platform::error::ServiceError as _;
    assert_eq!(error.code(), tonic::Code::FailedPrecondition);
    let asked = f.media.described.lock().unwrap().clone();
    assert_eq!(
        asked,
        [MediaToAttach {
            sender: "alice".into(),
            conversation_id: id.clone(),
            client_msg_id: "c1".into(),
            media_ids: vec!["m1".into()],
        }]
    );
    assert!(f.service.history("alice", &id, HistoryRange::Before(None), 10).await.unwrap().messages.is_empty());
    assert!(f.recorded.entries.lock().unwrap().is_empty(), "an entry was fanned out for a refused send");
}

#[tokio::test]
async fn a_deleted_messages_media_is_deleted_after_the_commit() {
    let f = fixture(FakeMedia::default());
    let direct = f.service.get_or_create_direct("alice", "bob").await.unwrap();
    let id = direct.id.to_string();
    let mut send = input("alice", &id, "c1", "look");
    send.media_ids = vec!["m1".into(), "m2".into()];
    let (sent, created) = f.service.send(send).await.unwrap();
    assert!(created);
    assert_eq!(sent.attachments.iter().map(|a| a.media_id.as_str()).collect::<Vec<_>>(), ["m1", "m2"]);
    let deleted = f.service.modify_message("alice", &id, Change::Delete { target_seq: sent.seq }).await.unwrap();
    assert!(deleted.is_some());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while f.media.deleted.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(f.media.deleted.lock().unwrap().clone(), [(id.clone(), vec!["m1".to_owned(), "m2".to_owned()])]);
    // Both entries went to fan-out, to both members.
    let entries = f.recorded.entries.lock().unwrap().clone();
    assert_eq!(entries.len(), 2);
    assert!(entries.iter().all(|e| e.audience.to_vec() == ["alice", "bob"]), "{entries:?}");
}

#[tokio::test]
async fn in_a_group_a_blocked_users_entries_and_typing_skip_the_blocker() {
    let f = fixture(FakeMedia::default());
    let group = f.service.create_group("alice", "team", vec!["bob".into(), "carol".into()]).await.unwrap();
    let id = group.id.to_string();
    assert!(f.service.block("bob", "alice").await.unwrap());
    let (said, _) = f.service.send(input("alice", &id, "c1", "hello")).await.unwrap();
    let (answer, _) = f.service.send(input("carol", &id, "c2", "hi alice")).await.unwrap();
    let audience = |seq: u64| {
        let entries = f.recorded.entries.lock().unwrap();
        entries.iter().find(|e| e.entry.seq == seq).map(|e| e.audience.to_vec()).unwrap()
    };
    assert_eq!(audience(said.seq), ["alice", "carol"]);
    let withheld = |seq: u64| {
        let entries = f.recorded.entries.lock().unwrap();
        entries.iter().find(|e| e.entry.seq == seq).map(|e| e.withheld_from.to_vec()).unwrap()
    };
    assert_eq!(withheld(said.seq), ["bob"], "the blocker gets the entry without content");
    assert_eq!(audience(answer.seq), ["alice", "bob", "carol"]);
    // A retry is published again, with the same audience.
    f.service.send(input("alice", &id, "c1", "hello")).await.unwrap();
    assert_eq!(f.recorded.entries.lock().unwrap().iter().filter(|e| e.entry.seq == said.seq).count(), 2);
    assert!(
        f.recorded
            .entries
            .lock()
            .unwrap()
            .iter()
            .all(|e| e.entry.seq != said.seq || !e.audience.contains(&"bob".into()))
    );

    f.service.notify_typing("alice", &id, true).await.unwrap();
    let hints = f.recorded.hints.lock().unwrap().clone();
    let Some(Hint::Typing(typing)) = hints.last() else { panic!("{hints:?}") };
    assert_eq!((typing.user_id.as_str(), typing.hidden_from.clone()), ("alice", vec!["bob".to_owned()]));

    // Bob reads alice's words withheld; carol in full.
    let bobs = f.service.history("bob", &id, HistoryRange::Before(None), 10).await.unwrap().messages;
    let withheld = bobs.iter().find(|m| m.seq == said.seq).unwrap();
    assert!(withheld.withheld && withheld.body.is_empty(), "{withheld:?}");
    let carols = f.service.history("carol", &id, HistoryRange::Before(None), 10).await.unwrap().messages;
    assert!(carols.iter().any(|m| m.seq == said.seq && m.body == "hello" && !m.withheld));
}

#[tokio::test]
async fn read_marks_become_receipt_hints_and_withdraw_pushes() {
    let f = fixture(FakeMedia::default());
    let direct = f.service.get_or_create_direct("alice", "bob").await.unwrap();
    let id = direct.id.to_string();
    let (sent, _) = f.service.send(input("alice", &id, "c1", "hello")).await.unwrap();
    assert_eq!(f.service.mark_read("bob", &id, sent.seq).await.unwrap(), sent.seq);
    let hints = f.recorded.hints.lock().unwrap().clone();
    let expected = Receipt { conversation_id: direct.id, user_id: "bob".into(), read_seq: sent.seq, delivered_seq: 0 };
    assert_eq!(hints, [Hint::Receipt(expected)]);
    assert_eq!(f.recorded.reads.lock().unwrap().clone(), [("bob".to_owned(), direct.id, sent.seq)]);
    // A mark that moves nothing tells nobody.
    f.service.mark_read("bob", &id, sent.seq).await.unwrap();
    assert_eq!(f.recorded.hints.lock().unwrap().len(), 1);
}
