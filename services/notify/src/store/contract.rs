//! Cases every `PushStore` backend passes.

use uuid::Uuid;

use super::*;

pub(crate) fn device(user_id: &str, device_id: &str, platform: Platform) -> Device {
    Device {
        user_id: user_id.to_owned(),
        device_id: device_id.to_owned(),
        platform,
        token: format!("token-{device_id}"),
        web_push: (platform == Platform::WebPush).then(|| WebPushKeys {
            endpoint: "https://push.example/abc".into(),
            p256dh: "BP256".into(),
            auth: "auth".into(),
        }),
        app_id: "com.example.chat".into(),
        locale: "en-GB".into(),
        previews: false,
        secret: String::new(),
        registration: Uuid::now_v7(),
        updated_at_ms: 1_000,
    }
}

pub(crate) fn job(
    kind: JobKind,
    user_id: &str,
    device_id: &str,
    conversation_id: Uuid,
    seq: u64,
    due_at_ms: i64,
) -> Job {
    Job {
        id: Job::id_for(kind, user_id, device_id, conversation_id, seq),
        kind,
        user_id: user_id.to_owned(),
        device_id: device_id.to_owned(),
        conversation_id,
        seq,
        state: JobState::Queued,
        due_at_ms,
        attempts: 0,
        created_at_ms: due_at_ms - 10,
        preview: None,
        last_error: String::new(),
        trace_context: String::new(),
    }
}

pub(crate) async fn run(store: &dyn PushStore) {
    devices(store).await;
    mutes(store).await;
    outbox(store).await;
    reads(store).await;
    unread_counts(store).await;
}

async fn devices(store: &dyn PushStore) {
    let user = format!("user-{}", Uuid::now_v7());
    let phone = device(&user, "phone", Platform::Apns);
    let mut browser = device(&user, "browser", Platform::WebPush);
    browser.previews = true;
    let mut hook = device(&user, "hook", Platform::Webhook);
    hook.secret = "whsec_c2VjcmV0".into();
    for d in [&phone, &browser, &hook] {
        store.put_device(d).await.unwrap();
    }
    assert_eq!(store.device(&user, "phone").await.unwrap().as_ref(), Some(&phone), "round trip");
    assert_eq!(store.device(&user, "browser").await.unwrap().as_ref(), Some(&browser), "web push keys kept");
    assert_eq!(store.device(&user, "nope").await.unwrap(), None);
    let listed: Vec<String> = store.devices(&user).await.unwrap().into_iter().map(|d| d.device_id).collect();
    assert_eq!(listed, ["browser", "hook", "phone"], "by device id");
    assert!(store.devices("someone-else").await.unwrap().is_empty());

    let mut renewed = phone.clone();
    renewed.token = "token-new".into();
    renewed.registration = Uuid::now_v7();
    store.put_device(&renewed).await.unwrap();
    assert_eq!(store.devices(&user).await.unwrap().len(), 3, "a device registers once");
    assert!(
        !store.remove_device_if(&user, "phone", phone.registration).await.unwrap(),
        "a dead old token does not remove the new registration"
    );
    assert_eq!(store.device(&user, "phone").await.unwrap().unwrap().token, "token-new");
    assert!(store.remove_device_if(&user, "phone", renewed.registration).await.unwrap());
    assert!(store.remove_device(&user, "hook").await.unwrap());
    assert!(!store.remove_device(&user, "hook").await.unwrap(), "removed once");
    assert_eq!(store.devices(&user).await.unwrap().len(), 1);
}

async fn mutes(store: &dyn PushStore) {
    let (alice, bob) = (format!("alice-{}", Uuid::now_v7()), format!("bob-{}", Uuid::now_v7()));
    let (conversation, other) = (Uuid::now_v7(), Uuid::now_v7());
    let mute = |until_ms, mentions_only| Mute { until_ms, mentions_only };
    store.set_mute(&alice, conversation, mute(5_000, false)).await.unwrap();
    store.set_mute(&bob, other, mute(6_000, false)).await.unwrap();
    let users = [alice.clone(), bob.clone()];
    assert_eq!(store.mutes(&users, conversation).await.unwrap(), vec![(alice.clone(), mute(5_000, false))]);
    store.set_mute(&alice, conversation, mute(9_000, true)).await.unwrap();
    let replaced = vec![(alice.clone(), mute(9_000, true))];
    assert_eq!(store.mutes(&users, conversation).await.unwrap(), replaced, "replaced");
    store.set_mute(&alice, conversation, mute(0, true)).await.unwrap();
    assert!(store.mutes(&users, conversation).await.unwrap().is_empty(), "0 unmutes");
    assert!(store.mutes(&[], conversation).await.unwrap().is_empty());
}

async fn outbox(store: &dyn PushStore) {
    let user = format!("user-{}", Uuid::now_v7());
    let conversation = Uuid::now_v7();
    let mut first = job(JobKind::Notify, &user, "phone", conversation, 1, 1_000);
    first.preview = Some(Preview { sender_id: "alice".into(), title: "Team".into(), body: "hi".into() });
    first.trace_context = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into();
    let later = job(JobKind::Notify, &user, "phone", conversation, 2, 5_000);
    assert_eq!(store.enqueue(&[first.clone(), later.clone()]).await.unwrap(), 2);
    assert_eq!(store.enqueue(&[first.clone(), later.clone()]).await.unwrap(), 0, "a retried enqueue stores nothing");
    assert_eq!(store.job(first.id).await.unwrap().as_ref(), Some(&first), "round trip with preview");
    assert!(store.outbox().await.unwrap().queued >= 2);

    assert!(store.claim(999, 60_000, 10).await.unwrap().iter().all(|j| j.user_id != user), "nothing due yet");
    let claimed: Vec<Uuid> =
        store.claim(1_000, 60_000, 10).await.unwrap().into_iter().filter(|j| j.user_id == user).map(|j| j.id).collect();
    assert_eq!(claimed, vec![first.id], "due ones only");
    assert!(
        store.claim(2_000, 60_000, 10).await.unwrap().iter().all(|j| j.id != first.id),
        "a claimed job is held by its claimer"
    );
    let reclaimed = store.claim(61_001, 60_000, 100).await.unwrap();
    assert!(reclaimed.iter().any(|j| j.id == first.id), "a hold that ran out is claimed again");
    assert!(reclaimed.iter().any(|j| j.id == later.id));

    store.reschedule(first.id, 90_000, 1, "HTTP 500").await.unwrap();
    let retried = store.job(first.id).await.unwrap().unwrap();
    assert_eq!(
        (retried.state, retried.due_at_ms, retried.attempts, retried.last_error.as_str()),
        (JobState::Queued, 90_000, 1, "HTTP 500")
    );
    assert!(store.claim(89_999, 60_000, 100).await.unwrap().iter().all(|j| j.id != first.id), "not before its due");
    assert!(store.claim(90_000, 60_000, 100).await.unwrap().iter().any(|j| j.id == first.id), "rescheduled is free");

    assert!(store.finish(first.id, JobState::Sent, 2, "").await.unwrap());
    assert!(!store.finish(first.id, JobState::Dead, 3, "late").await.unwrap(), "finished once");
    assert_eq!(store.job(first.id).await.unwrap().unwrap().state, JobState::Sent);
    assert!(store.finish(later.id, JobState::Dead, 8, "HTTP 503").await.unwrap());
    let dead = store.dead_letters(1_000).await.unwrap();
    let found = dead.iter().find(|j| j.id == later.id).expect("dead-lettered");
    assert_eq!((found.attempts, found.last_error.as_str()), (8, "HTTP 503"));
    assert!(store.outbox().await.unwrap().dead >= 1);
    assert!(store.claim(i64::MAX / 2, 60_000, 1_000).await.unwrap().iter().all(|j| j.user_id != user), "finished");
}

async fn reads(store: &dyn PushStore) {
    let user = format!("user-{}", Uuid::now_v7());
    let conversation = Uuid::now_v7();
    let jobs: Vec<Job> = [("phone", 1), ("phone", 2), ("tablet", 1), ("phone", 3), ("phone", 7)]
        .into_iter()
        .map(|(device, seq)| job(JobKind::Notify, &user, device, conversation, seq, 1_000))
        .collect();
    store.enqueue(&jobs).await.unwrap();
    let elsewhere = job(JobKind::Notify, &user, "phone", Uuid::now_v7(), 1, 1_000);
    store.enqueue(std::slice::from_ref(&elsewhere)).await.unwrap();
    for sent in &jobs[..3] {
        assert!(store.finish(sent.id, JobState::Sent, 1, "").await.unwrap());
    }
    assert_eq!(
        store.shown_through(&user, conversation, 5).await.unwrap(),
        vec![Shown { device_id: "phone".into(), seq: 2 }, Shown { device_id: "tablet".into(), seq: 1 },]
    );
    assert_eq!(store.shown_through(&user, conversation, 1).await.unwrap().len(), 2);
    assert_eq!(store.read_through(&user, conversation, 5).await.unwrap(), 1, "seq 3 cancelled; 7 is after the read");
    assert_eq!(store.job(jobs[3].id).await.unwrap().unwrap().state, JobState::Cancelled);
    assert_eq!(store.job(jobs[4].id).await.unwrap().unwrap().state, JobState::Queued);
    assert_eq!(store.job(jobs[0].id).await.unwrap().unwrap().state, JobState::Retracted);
    assert_eq!(store.job(elsewhere.id).await.unwrap().unwrap().state, JobState::Queued, "other conversations kept");
    assert!(store.shown_through(&user, conversation, 5).await.unwrap().is_empty(), "retracted once");
    assert!(!store.finish(jobs[3].id, JobState::Sent, 1, "").await.unwrap(), "a cancelled job is not sent");
    let retract = job(JobKind::Retract, &user, "phone", conversation, 2, 1_000);
    assert_ne!(retract.id, jobs[1].id, "a retraction has an id of its own");
    store.enqueue(std::slice::from_ref(&retract)).await.unwrap();
    assert_eq!(store.read_through(&user, conversation, 9).await.unwrap(), 1, "retractions are not cancelled by reads");
    assert_eq!(store.job(retract.id).await.unwrap().unwrap().state, JobState::Queued);
}

async fn unread_counts(store: &dyn PushStore) {
    let user = format!("user-{}", Uuid::now_v7());
    let (conversation, other) = (Uuid::now_v7(), Uuid::now_v7());
    let mark = |conversation_id, seq| Unread { user_id: user.clone(), conversation_id, seq, at_ms: 1_000 };
    let marks = [mark(conversation, 1), mark(conversation, 2), mark(conversation, 4), mark(other, 1)];
    store.add_unread(&marks).await.unwrap();
    store.add_unread(&marks[..2]).await.unwrap();
    assert_eq!(store.unread(&user, 100).await.unwrap(), 4, "a repeat counts once");
    assert_eq!(store.unread(&user, 3).await.unwrap(), 3, "capped");
    assert_eq!(store.unread("nobody", 100).await.unwrap(), 0);
    store.clear_unread(&user, conversation, 2).await.unwrap();
    assert_eq!(store.unread(&user, 100).await.unwrap(), 2, "a read clears its conversation's entries through it");
    store.clear_unread(&user, other, 1).await.unwrap();
    assert_eq!(store.unread(&user, 100).await.unwrap(), 1);
}

/// For backends that forget by [`PushStore::purge`] (not by TTL).
pub(crate) async fn purge(store: &dyn PushStore) {
    let user = format!("user-{}", Uuid::now_v7());
    let conversation = Uuid::now_v7();
    let jobs: Vec<Job> = (1..=3).map(|seq| job(JobKind::Notify, &user, "phone", conversation, seq, 1_000)).collect();
    store.enqueue(&jobs).await.unwrap();
    store.finish(jobs[0].id, JobState::Sent, 1, "").await.unwrap();
    store.finish(jobs[1].id, JobState::Dead, 8, "HTTP 500").await.unwrap();
    store
        .add_unread(&[Unread { user_id: user.clone(), conversation_id: conversation, seq: 1, at_ms: 5_000 }])
        .await
        .unwrap();
    let later = messenger_platform::ids::now_ms() + 60_000;
    store.purge(later, 0).await.unwrap();
    assert_eq!(store.job(jobs[0].id).await.unwrap(), None, "a finished job past its retention is forgotten");
    assert_eq!(store.job(jobs[1].id).await.unwrap().unwrap().state, JobState::Dead, "dead letters are kept longer");
    assert_eq!(store.job(jobs[2].id).await.unwrap().unwrap().state, JobState::Queued, "queued jobs are never purged");
    assert_eq!(store.unread(&user, 10).await.unwrap(), 0, "old unread marks go too");
    store.purge(later, later).await.unwrap();
    assert_eq!(store.job(jobs[1].id).await.unwrap(), None);
    assert!(store.job(jobs[2].id).await.unwrap().is_some());
}
