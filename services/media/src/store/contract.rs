//! Cases every `MediaStore` backend passes.

use uuid::Uuid;

use super::*;

pub(crate) fn upload(owner: &str, created_at_ms: i64, multipart: bool) -> Upload {
    Upload {
        id: Uuid::now_v7(),
        owner: owner.to_owned(),
        conversation_id: Uuid::now_v7(),
        mime: "image/png".into(),
        size: 1234,
        sha256: [7; 32],
        file_name: "cat.png".into(),
        created_at_ms,
        state: State::Pending,
        multipart: multipart.then(|| Multipart {
            upload_id: "s3-upload-id".into(),
            part_size: 5 << 20,
            part_sha256: vec![[1; 32], [2; 32]],
        }),
        processed: Processed::default(),
    }
}

pub(crate) async fn run(store: &dyn MediaStore) {
    let owner = format!("user-{}", Uuid::now_v7());
    let single = upload(&owner, 1_000, false);
    let parts = upload(&owner, 2_000, true);
    store.create(&single).await.unwrap();
    store.create(&parts).await.unwrap();
    assert_eq!(store.get(single.id).await.unwrap().as_ref(), Some(&single), "round trip");
    assert_eq!(store.get(parts.id).await.unwrap().as_ref(), Some(&parts), "round trip with parts");
    assert_eq!(store.get(Uuid::now_v7()).await.unwrap(), None);
    assert!(store.create(&single).await.is_err(), "a media id is created once");

    assert_eq!(store.used_bytes(&owner).await.unwrap(), 2 * 1234, "pending uploads count by their declared size");
    let processed = Processed { stored_size: 1000, width: 3, height: 2, blurhash: "LKO2".into(), has_thumbnail: true };
    assert!(store.mark_ready(single.id, &processed).await.unwrap());
    assert!(!store.mark_ready(single.id, &processed).await.unwrap(), "ready once");
    let ready = store.get(single.id).await.unwrap().unwrap();
    assert_eq!((ready.state, &ready.processed), (State::Ready, &processed));
    assert_eq!(store.used_bytes(&owner).await.unwrap(), 1000 + 1234, "a ready upload counts by what it stores");
    assert_eq!(store.used_bytes("someone-else").await.unwrap(), 0);

    let abandoned = store.pending_before(10_000, 10).await.unwrap();
    assert!(abandoned.iter().any(|upload| upload.id == parts.id), "pending and old");
    assert!(!abandoned.iter().any(|upload| upload.id == single.id), "ready ones are not abandoned");
    assert!(store.pending_before(1_500, 10).await.unwrap().iter().all(|upload| upload.created_at_ms < 1_500));

    assert!(!store.attach(parts.id, "m1").await.unwrap(), "only ready media is attached");
    assert!(store.attach(single.id, "m1").await.unwrap());
    assert!(store.attach(single.id, "m1").await.unwrap(), "the same message again: a retried send");
    assert!(!store.attach(single.id, "m2").await.unwrap(), "one message per media");
    assert!(!store.abandon(single.id).await.unwrap(), "a ready upload is not abandoned");
    assert!(store.mark_deleted(single.id).await.unwrap());
    assert!(!store.mark_deleted(single.id).await.unwrap(), "deleted once");
    assert_eq!(store.used_bytes(&owner).await.unwrap(), 1234, "deleted media use no quota");
    assert!(store.abandon(parts.id).await.unwrap(), "a pending upload is abandoned once");
    assert_eq!(store.used_bytes(&owner).await.unwrap(), 0, "abandoned uploads use no quota");
    assert!(!store.abandon(parts.id).await.unwrap());
    assert!(!store.mark_ready(parts.id, &processed).await.unwrap(), "a deleted upload never becomes ready");
}
