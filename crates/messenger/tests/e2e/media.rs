//! Photos and files end to end, against the embedded S3-compatible server
//! (`s3s`, which verifies SigV4 and presigned URLs as S3 does): tickets,
//! PUTs straight to storage, complete, attachments on messages, downloads.

use std::{
    io::Cursor,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use messenger_client::{Error, File, Progress};
use messenger_proto::v1::{self as pb, gateway_service_client::GatewayServiceClient};
use messenger_testkit::media::{jpeg_with_gps, png_bomb};
use sha2::{Digest, Sha256};
use tonic::Code;

use crate::support::*;

/// Every object file the embedded store holds under `dir` (its own
/// bookkeeping files excluded), as paths relative to `dir`.
fn object_files(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.ends_with(".json") && name.contains("internal") {
                continue;
            }
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out
}

fn code(error: Error) -> (Code, String) {
    let message = error.to_string();
    (error.code(), message)
}

#[tokio::test]
async fn photo_is_sent_received_and_downloaded_without_its_gps() {
    let system = TestSystem::start().await;
    let (alice, _alice_events) = system.connect("alice", "phone").await;
    let (bob, mut bob_events) = system.connect("bob", "phone").await;
    let conversation = alice.direct("bob").await.unwrap().conversation_id;
    let photo = jpeg_with_gps(1024, 768);
    assert!(exif::Reader::new().read_from_container(&mut Cursor::new(&photo)).is_ok(), "the upload has EXIF");

    let reports = Arc::new(Mutex::new(Vec::<Progress>::new()));
    let seen = reports.clone();
    let file = File::new("image/jpeg", "beach.jpg", photo.clone());
    let ack = alice
        .send_file(&conversation, "look", file, move |progress| seen.lock().unwrap().push(progress))
        .await
        .unwrap();
    let reports = reports.lock().unwrap().clone();
    assert_eq!(reports.last().unwrap().sent_bytes, photo.len() as u64, "progress reaches the end");
    assert!(reports.windows(2).all(|pair| pair[0].sent_bytes <= pair[1].sent_bytes), "progress only grows");

    let message = next_message(&mut bob_events).await;
    assert_eq!((message.seq, message.body.as_str()), (ack.seq, "look"));
    let [attachment] = message.attachments.as_slice() else { panic!("one attachment: {message:?}") };
    assert_eq!((attachment.mime_type.as_str(), attachment.file_name.as_str()), ("image/jpeg", "beach.jpg"));
    assert_eq!((attachment.width, attachment.height), (1024, 768));
    assert!(attachment.has_thumbnail && attachment.blurhash.len() == 28, "{attachment:?}");
    let model = bob.conversation_state(&conversation).unwrap();
    assert_eq!(model.messages[&ack.seq].attachments, message.attachments, "the SDK model carries attachments");

    let original = bob.download(&conversation, ack.seq, &attachment.media_id, false).await.unwrap();
    assert_eq!(original.len() as u64, attachment.size);
    assert!(exif::Reader::new().read_from_container(&mut Cursor::new(&original)).is_err(), "no EXIF, no GPS");
    let decoded = image::load_from_memory(&original).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (1024, 768));
    let thumbnail =
        image::load_from_memory(&bob.download(&conversation, ack.seq, &attachment.media_id, true).await.unwrap())
            .unwrap();
    assert_eq!((thumbnail.width(), thumbnail.height()), (320, 240));

    // The SDK holds at most max_download_bytes of a download: the edge passes, a byte less is refused.
    for (limit, fits) in [(attachment.size, true), (attachment.size - 1, false)] {
        let mut options = system.options("bob", "tablet");
        options.max_download_bytes = limit;
        let (tablet, _events) = messenger_client::Client::connect(options).await.unwrap();
        let result = tablet.download(&conversation, ack.seq, &attachment.media_id, false).await;
        match (fits, result) {
            (true, Ok(bytes)) => assert_eq!(bytes, original),
            (false, Err(error)) => assert_eq!(error.code(), Code::ResourceExhausted, "{error}"),
            (fits, other) => panic!("limit {limit} (fits: {fits}): {other:?}"),
        }
        tablet.close().await;
    }

    let history = bob.history(&conversation, 0, 10).await.unwrap();
    assert_eq!(history.messages.last().unwrap().attachments, message.attachments, "history carries them too");
    // Nothing is left under the pending prefix once complete.
    let files = object_files(&system.objects_dir());
    assert!(files.iter().all(|file| !file.contains("pending")), "{files:?}");
}

/// A ticket through the raw gateway API, for requests the SDK would never make.
async fn ticket(
    system: &TestSystem,
    user: &str,
    conversation: &str,
    mime: &str,
    bytes: &[u8],
) -> pb::CreateUploadResponse {
    try_ticket(system, user, conversation, mime, bytes).await.unwrap()
}

async fn try_ticket(
    system: &TestSystem,
    user: &str,
    conversation: &str,
    mime: &str,
    bytes: &[u8],
) -> Result<pb::CreateUploadResponse, tonic::Status> {
    let mut api = GatewayServiceClient::new(system.raw_channel().await);
    let request = pb::CreateUploadRequest {
        conversation_id: conversation.to_owned(),
        mime_type: mime.to_owned(),
        size: bytes.len() as u64,
        sha256: Sha256::digest(bytes).to_vec(),
        file_name: "x".into(),
        part_size: 0,
        part_sha256: Vec::new(),
    };
    api.create_upload(system.authorized(user, request)).await.map(|response| response.into_inner())
}

async fn put(request: &pb::UploadRequest, body: Vec<u8>, change: impl Fn(&str, &str) -> Option<String>) -> u16 {
    let mut builder = reqwest::Client::new().put(&request.url);
    for header in &request.headers {
        if let Some(value) = change(&header.name, &header.value) {
            builder = builder.header(&header.name, value);
        }
    }
    builder.body(body).send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn storage_refuses_other_type_length_or_bytes_and_expired_urls() {
    let system = TestSystem::start_with(|config| config.media.upload_url_ttl = Duration::from_secs(2)).await;
    let (alice, _events) = system.connect("alice", "phone").await;
    let conversation = alice.direct("bob").await.unwrap().conversation_id;
    let photo = jpeg_with_gps(64, 64);
    let ticket = ticket(&system, "alice", &conversation, "image/jpeg", &photo).await;
    let [request] = ticket.requests.as_slice() else { panic!("one PUT: {ticket:?}") };
    let names: Vec<String> = request.headers.iter().map(|header| header.name.to_ascii_lowercase()).collect();
    for signed in ["content-type", "content-length", "x-amz-checksum-sha256"] {
        assert!(names.contains(&signed.to_owned()), "{signed} is among the headers to send: {names:?}");
        assert!(request.url.contains(signed), "{signed} is signed: {}", request.url);
    }
    let same = |_: &str, value: &str| Some(value.to_owned());
    let as_html = |name: &str, value: &str| {
        Some(if name.eq_ignore_ascii_case("content-type") { "text/html".to_owned() } else { value.to_owned() })
    };
    assert_eq!(put(request, photo.clone(), as_html).await, 403, "another Content-Type");
    let mut longer = photo.clone();
    longer.push(0);
    let length = |name: &str, value: &str| {
        Some(if name.eq_ignore_ascii_case("content-length") { (photo.len() + 1).to_string() } else { value.to_owned() })
    };
    assert_eq!(put(request, longer, length).await, 403, "another length");
    let mut other = photo.clone();
    let last = other.len() - 3;
    other[last] ^= 0xff;
    assert_eq!(put(request, other, same).await, 400, "other bytes: BadDigest");
    let files = object_files(&system.objects_dir());
    assert!(files.iter().all(|file| !file.contains(&ticket.media_id)), "nothing refused was stored: {files:?}");

    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(put(request, photo.clone(), same).await, 403, "expired");
    let error = alice.resume_upload(&ticket.media_id, &photo, |_| {}).await;
    assert!(error.is_ok(), "fresh URLs from GetUpload work: {error:?}");
}

#[tokio::test]
async fn html_declared_as_png_is_refused_at_complete_and_removed() {
    let system = TestSystem::start().await;
    let (alice, _events) = system.connect("alice", "phone").await;
    let conversation = alice.direct("bob").await.unwrap().conversation_id;
    let page = b"<!DOCTYPE html><html><script>alert(document.cookie)</script></html>".to_vec();
    let error = alice.upload(&conversation, File::new("image/png", "cat.png", page), |_| {}).await.unwrap_err();
    let (code, message) = code(error);
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert!(message.contains("HTML"), "{message}");
    let files = object_files(&system.objects_dir());
    assert!(files.is_empty(), "its object is gone: {files:?}");
}

#[tokio::test]
async fn decompression_bomb_is_refused() {
    let system = TestSystem::start().await;
    let (alice, _events) = system.connect("alice", "phone").await;
    let conversation = alice.direct("bob").await.unwrap().conversation_id;
    let bomb = png_bomb(20_000);
    let error = alice.upload(&conversation, File::new("image/png", "big.png", bomb), |_| {}).await.unwrap_err();
    let (code, message) = code(error);
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert!(message.contains("20000x20000"), "{message}");
    assert!(object_files(&system.objects_dir()).is_empty());
}

#[tokio::test]
async fn only_members_get_tickets_and_urls_and_only_own_ready_media_is_sent() {
    let system = TestSystem::start().await;
    let (alice, _a) = system.connect("alice", "phone").await;
    let (bob, _b) = system.connect("bob", "phone").await;
    let (carol, _c) = system.connect("carol", "phone").await;
    let direct = alice.direct("bob").await.unwrap().conversation_id;
    let photo = File::new("image/jpeg", "p.jpg", jpeg_with_gps(64, 48));
    let text = alice.send(&direct, "a text first").await.unwrap();

    let error = carol.upload(&direct, photo.clone(), |_| {}).await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound, "a non-member gets no ticket: {error}");

    let ack = alice.send_file(&direct, "", photo.clone(), |_| {}).await.unwrap();
    let message = bob.history(&direct, 0, 10).await.unwrap().messages.pop().unwrap();
    let media_id = message.attachments[0].media_id.clone();
    assert!(bob.media_url(&direct, ack.seq, &media_id, false).await.is_ok());
    let error = carol.media_url(&direct, ack.seq, &media_id, false).await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound, "a non-member gets no URL: {error}");
    let error = bob.media_url(&direct, text.seq, &media_id, false).await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound, "the media is not on that message: {error}");

    let error = bob.send_attachments(&direct, "mine now", std::slice::from_ref(&media_id)).await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound, "someone else's media: {error}");
    let error = alice.send_attachments(&direct, "again", std::slice::from_ref(&media_id)).await.unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition, "one message per media (deleting one deletes it): {error}");
    let pending = ticket(&system, "alice", &direct, "image/jpeg", &jpeg_with_gps(8, 8)).await;
    let error = alice.send_attachments(&direct, "", std::slice::from_ref(&pending.media_id)).await.unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition, "an incomplete upload: {error}");
    // A send refused for one of its media ties none of them: the good one goes with the next send.
    let ready = alice.upload(&direct, photo.clone(), |_| {}).await.unwrap().media_id;
    let both = [ready.clone(), pending.media_id];
    let error = alice.send_attachments(&direct, "both", &both).await.unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition, "{error}");
    alice.send_attachments(&direct, "the ready one", &[ready]).await.unwrap();

    let group = alice.create_group("trip", &["bob", "carol"]).await.unwrap().conversation_id;
    let error = alice.send_attachments(&group, "", std::slice::from_ref(&media_id)).await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound, "media of another conversation: {error}");
    let ack = alice.send_file(&group, "", photo, |_| {}).await.unwrap();
    let media_id = alice.history(&group, 0, 10).await.unwrap().messages.pop().unwrap().attachments[0].media_id.clone();
    assert!(carol.media_url(&group, ack.seq, &media_id, true).await.is_ok());
    alice.remove_member(&group, "carol").await.unwrap();
    let error = carol.media_url(&group, ack.seq, &media_id, true).await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound, "a removed member gets no URL: {error}");
}

#[tokio::test]
async fn large_file_goes_in_parts_resumes_after_interruption_and_downloads_equal() {
    let system = TestSystem::start().await;
    let (alice, _a) = system.connect("alice", "phone").await;
    let (bob, _b) = system.connect("bob", "phone").await;
    let conversation = alice.direct("bob").await.unwrap().conversation_id;
    let mut bytes = b"%PDF-1.7\n".to_vec();
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    while bytes.len() < 50 * 1024 * 1024 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    let file = File::new("application/pdf", "report.pdf", bytes.clone());

    // Interrupted (the upload is dropped, as when the app is killed) after 20 MiB.
    let (stop, stopped) = tokio::sync::watch::channel(None::<String>);
    let upload = alice.upload(&conversation, file, move |progress| {
        if progress.sent_bytes > 20 * 1024 * 1024 {
            stop.send_replace(Some(progress.media_id));
        }
    });
    let mut stopped_rx = stopped.clone();
    tokio::select! {
        result = upload => panic!("the upload should have been interrupted: {result:?}"),
        _ = stopped_rx.wait_for(Option::is_some) => {}
    }
    let media_id = stopped.borrow().clone().unwrap();

    let first = Arc::new(Mutex::new(None::<u64>));
    let seen = first.clone();
    let attachment = alice
        .resume_upload(&media_id, &bytes, move |progress| {
            seen.lock().unwrap().get_or_insert(progress.sent_bytes);
        })
        .await
        .unwrap();
    let resumed_from = first.lock().unwrap().unwrap();
    assert!(resumed_from >= 16 * 1024 * 1024, "parts storage held were not sent again (from {resumed_from})");
    assert_eq!(attachment.size, bytes.len() as u64);
    let ack =
        alice.send_attachments(&conversation, "the report", std::slice::from_ref(&attachment.media_id)).await.unwrap();
    let downloaded = bob.download(&conversation, ack.seq, &attachment.media_id, false).await.unwrap();
    assert!(downloaded == bytes, "downloaded {} bytes, equal to the upload", downloaded.len());
}

#[tokio::test]
async fn delete_for_everyone_removes_the_objects() {
    let system = TestSystem::start().await;
    let (alice, _a) = system.connect("alice", "phone").await;
    let (bob, _b) = system.connect("bob", "phone").await;
    let conversation = alice.direct("bob").await.unwrap().conversation_id;
    let ack = alice
        .send_file(&conversation, "oops", File::new("image/jpeg", "p.jpg", jpeg_with_gps(64, 48)), |_| {})
        .await
        .unwrap();
    let media_id = bob.history(&conversation, 0, 1).await.unwrap().messages[0].attachments[0].media_id.clone();
    let held = || object_files(&system.objects_dir()).into_iter().filter(|file| file.contains(&media_id)).count();
    assert_eq!(held(), 2, "original and thumbnail");
    alice.delete(&conversation, ack.seq).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while held() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "objects still there: {:?}",
            object_files(&system.objects_dir())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let error = bob.media_url(&conversation, ack.seq, &media_id, false).await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound, "{error}");
    let message =
        bob.history(&conversation, 0, 10).await.unwrap().messages.into_iter().find(|m| m.seq == ack.seq).unwrap();
    assert!(message.deleted && message.attachments.is_empty(), "{message:?}");
}

/// A system whose sweep runs often, with short-lived upload URLs and pending slots.
async fn sweeping_system() -> TestSystem {
    TestSystem::start_with(|config| {
        // The URL must outlive a loaded machine's ticket-to-PUT gap; the sweep may
        // only take the slot once the URL is dead.
        config.media.upload_url_ttl = Duration::from_secs(4);
        config.media.pending_ttl = Duration::from_secs(4);
        config.media.sweep_interval = Duration::from_millis(200);
    })
    .await
}

#[tokio::test]
async fn abandoned_upload_is_swept_after_its_ttl() {
    let system = sweeping_system().await;
    let (alice, _a) = system.connect("alice", "phone").await;
    let conversation = alice.direct("bob").await.unwrap().conversation_id;
    let photo = jpeg_with_gps(32, 32);
    let ticket = ticket(&system, "alice", &conversation, "image/jpeg", &photo).await;
    assert_eq!(put(&ticket.requests[0], photo.clone(), |_, value| Some(value.to_owned())).await, 200);
    let held =
        || object_files(&system.objects_dir()).into_iter().filter(|file| file.contains(&ticket.media_id)).count();
    assert_eq!(held(), 1, "uploaded, not completed");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4) + WAIT;
    while held() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "not swept");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut api = GatewayServiceClient::new(system.raw_channel().await);
    let request = pb::CompleteUploadRequest { media_id: ticket.media_id.clone() };
    let status = api.complete_upload(system.authorized("alice", request)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
}

#[tokio::test]
async fn cdn_edge_serves_signed_urls_from_its_cache_and_refuses_tampered_or_expired_ones() {
    const SECRET: &str = "cdn-shared-secret-for-tests";
    const ORIGIN: &str = "origin-secret-for-tests";
    // The edge needs the object store's address before the system starts.
    let objects_port = messenger_testkit::free_port();
    let origin = format!("http://127.0.0.1:{objects_port}");
    let edge = messenger_testkit::CdnEdge::start(&origin, "messenger-media", "media", SECRET, ORIGIN);
    let base_url = edge.base_url("media");
    let system = TestSystem::start_with(|config| {
        config.media.s3.embedded_listen = format!("127.0.0.1:{objects_port}");
        config.media.s3.embedded_origin_secret = ORIGIN.into();
        config.media.cdn.mode = messenger_media::CdnMode::Hmac;
        config.media.cdn.base_url = base_url.clone();
        config.media.cdn.secret = SECRET.into();
        config.media.download_url_ttl = Duration::from_secs(3);
    })
    .await;
    let (alice, _a) = system.connect("alice", "phone").await;
    let (bob, _b) = system.connect("bob", "phone").await;
    let conversation = alice.direct("bob").await.unwrap().conversation_id;
    let mut pdf = b"%PDF-1.4\n".to_vec();
    pdf.extend(std::iter::repeat_n(b'x', 100_000));
    let ack =
        alice.send_file(&conversation, "", File::new("application/pdf", "q3.pdf", pdf.clone()), |_| {}).await.unwrap();
    let media_id = bob.history(&conversation, 0, 1).await.unwrap().messages[0].attachments[0].media_id.clone();

    let url = bob.media_url(&conversation, ack.seq, &media_id, false).await.unwrap();
    assert!(url.starts_with(&base_url), "{url}");
    let http = reqwest::Client::new();
    let first = http.get(&url).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let header = |response: &reqwest::Response, name: &str| {
        response.headers().get(name).map(|value| value.to_str().unwrap().to_owned()).unwrap_or_default()
    };
    assert_eq!(header(&first, "x-cache-status"), "MISS");
    assert_eq!(header(&first, "x-content-type-options"), "nosniff");
    assert!(header(&first, "content-disposition").starts_with("attachment;"), "{:?}", first.headers());
    assert_eq!(header(&first, "content-type"), "application/pdf");
    assert!(first.bytes().await.unwrap() == pdf);
    let second = http.get(&url).send().await.unwrap();
    assert_eq!((second.status().as_u16(), header(&second, "x-cache-status")), (200, "HIT".to_owned()));
    assert!(bob.download(&conversation, ack.seq, &media_id, false).await.unwrap() == pdf, "the SDK fetches through it");

    let (head, token) = url.rsplit_once("token=").unwrap();
    let flipped = if token.starts_with('A') { "B" } else { "A" };
    let tampered = format!("{head}token={flipped}{}", &token[1..]);
    assert_eq!(http.get(&tampered).send().await.unwrap().status(), 403, "tampered token");
    let elsewhere = url.replace("/original?", "/thumb?");
    assert_eq!(http.get(&elsewhere).send().await.unwrap().status(), 403, "the token signs the path");
    let unsigned = url.split('?').next().unwrap().to_owned();
    assert_eq!(http.get(&unsigned).send().await.unwrap().status(), 403, "no token");
    let direct = format!("{origin}/messenger-media/{}", unsigned.trim_start_matches(&format!("{base_url}/")));
    assert_eq!(http.get(&direct).send().await.unwrap().status(), 403, "the origin wants a signature or the edge");
    tokio::time::sleep(Duration::from_millis(4200)).await;
    assert_eq!(http.get(&url).send().await.unwrap().status(), 403, "expired");
}

#[tokio::test]
async fn concurrent_completes_of_one_upload_both_answer_and_keep_its_objects() {
    let system = TestSystem::start().await;
    let (alice, _a) = system.connect("alice", "phone").await;
    let (bob, _b) = system.connect("bob", "phone").await;
    let conversation = alice.direct("bob").await.unwrap().conversation_id;
    let photo = jpeg_with_gps(800, 600);
    let ticket = ticket(&system, "alice", &conversation, "image/jpeg", &photo).await;
    assert_eq!(put(&ticket.requests[0], photo, |_, value| Some(value.to_owned())).await, 200);
    let complete = || async {
        let mut api = GatewayServiceClient::new(system.raw_channel().await);
        let request = pb::CompleteUploadRequest { media_id: ticket.media_id.clone() };
        api.complete_upload(system.authorized("alice", request)).await.map(|response| response.into_inner())
    };
    let (first, second) = tokio::join!(complete(), complete());
    assert_eq!(first.unwrap().attachment, second.unwrap().attachment, "a double tap answers the same");
    let ack = alice.send_attachments(&conversation, "", std::slice::from_ref(&ticket.media_id)).await.unwrap();
    let original = bob.download(&conversation, ack.seq, &ticket.media_id, false).await.unwrap();
    assert!(image::load_from_memory(&original).is_ok(), "the objects are still there");
}

fn pdf(size: usize) -> Vec<u8> {
    let mut bytes = b"%PDF-1.4\n".to_vec();
    bytes.resize(size, b'x');
    bytes
}

#[tokio::test]
async fn type_size_quota_and_ticket_rate_hold_at_their_edges() {
    let system = TestSystem::start_with(|config| {
        config.media.allowed_types.insert("application/pdf".into(), 10_000);
        config.media.quota_bytes = 15_000;
        config.media.tickets_per_minute = 5;
    })
    .await;
    let (alice, _a) = system.connect("alice", "phone").await;
    let conversation = alice.direct("bob").await.unwrap().conversation_id;
    let refused =
        |result: Result<pb::CreateUploadResponse, tonic::Status>| result.map(drop).map_err(|status| status.code());

    // Refused before they count against the rate.
    let too_big = try_ticket(&system, "alice", &conversation, "application/pdf", &pdf(10_001)).await;
    assert_eq!(refused(too_big), Err(Code::InvalidArgument));
    let html = try_ticket(&system, "alice", &conversation, "text/html", &pdf(100)).await;
    assert_eq!(refused(html), Err(Code::InvalidArgument));

    // A pending upload counts from its ticket on: a second ticket that would
    // pass the quota once both complete is refused up front.
    let first = ticket(&system, "alice", &conversation, "application/pdf", &pdf(10_000)).await;
    let pending = try_ticket(&system, "alice", &conversation, "application/pdf", &pdf(10_000)).await.unwrap_err();
    assert!(pending.code() == Code::ResourceExhausted && pending.message().contains("quota"), "{pending:?}");
    let same = |_: &str, value: &str| Some(value.to_owned());
    assert_eq!(put(&first.requests[0], pdf(10_000), same).await, 200);
    let mut api = GatewayServiceClient::new(system.raw_channel().await);
    let complete =
        |media_id: &str| system.authorized("alice", pb::CompleteUploadRequest { media_id: media_id.to_owned() });
    api.complete_upload(complete(&first.media_id)).await.unwrap();

    // Exactly at the quota passes; one byte more does not.
    alice.upload(&conversation, File::new("application/pdf", "b.pdf", pdf(5_000)), |_| {}).await.unwrap();
    let over = try_ticket(&system, "alice", &conversation, "application/pdf", &pdf(10)).await.unwrap_err();
    assert!(over.code() == Code::ResourceExhausted && over.message().contains("quota"), "{over:?}");
    // That was the fourth ticket this minute; the fifth passes the rate (and fails the quota), the sixth not.
    let fifth = try_ticket(&system, "alice", &conversation, "application/pdf", &pdf(10)).await.unwrap_err();
    assert!(fifth.message().contains("quota"), "{fifth:?}");
    let sixth = try_ticket(&system, "alice", &conversation, "application/pdf", &pdf(10)).await.unwrap_err();
    assert!(sixth.code() == Code::ResourceExhausted && sixth.message().contains("per minute"), "{sixth:?}");
}

/// A presigned PUT replayed after its upload completed writes the pending
/// key again; the sweep removes that orphan once the URL is dead, and the
/// completed media stays.
#[tokio::test]
async fn a_put_replayed_after_complete_leaves_no_orphan() {
    let system = sweeping_system().await;
    let (alice, _a) = system.connect("alice", "phone").await;
    let conversation = alice.direct("bob").await.unwrap().conversation_id;
    let document = pdf(2_000);
    let ticket = ticket(&system, "alice", &conversation, "application/pdf", &document).await;
    let same = |_: &str, value: &str| Some(value.to_owned());
    assert_eq!(put(&ticket.requests[0], document.clone(), same).await, 200);
    let mut api = GatewayServiceClient::new(system.raw_channel().await);
    let complete = pb::CompleteUploadRequest { media_id: ticket.media_id.clone() };
    api.complete_upload(system.authorized("alice", complete)).await.unwrap();
    let pending = || {
        object_files(&system.objects_dir())
            .into_iter()
            .filter(|file| file.contains("pending") && file.contains(&ticket.media_id))
            .count()
    };
    assert_eq!(pending(), 0, "completing moved the bytes out of the pending key");
    assert_eq!(put(&ticket.requests[0], document, same).await, 200, "the URL still works: a replay");
    assert_eq!(pending(), 1, "the replay wrote the pending key again");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4) + WAIT;
    while pending() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the orphaned pending object was never swept");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kept = object_files(&system.objects_dir());
    assert!(kept.iter().any(|file| file.contains(&ticket.media_id)), "the completed media went too: {kept:?}");
}

#[tokio::test]
async fn parts_storage_cannot_vouch_for_are_uploaded_again_not_trusted() {
    let mut system = TestSystem::start_with(|config| config.media.multipart_threshold_bytes = 5 * 1024 * 1024).await;
    let (alice, _a) = system.connect("alice", "phone").await;
    let conversation = alice.direct("bob").await.unwrap().conversation_id;
    let part_size = 5 * 1024 * 1024;
    let mut bytes = b"%PDF-1.7\n".to_vec();
    bytes.resize(2 * part_size, b'p');
    let parts: Vec<&[u8]> = bytes.chunks(part_size).collect();
    let request = pb::CreateUploadRequest {
        conversation_id: conversation.clone(),
        mime_type: "application/pdf".into(),
        size: bytes.len() as u64,
        sha256: Sha256::digest(&bytes).to_vec(),
        file_name: "two parts.pdf".into(),
        part_size: part_size as u64,
        part_sha256: parts.iter().map(|part| Sha256::digest(part).to_vec()).collect(),
    };
    let mut api = GatewayServiceClient::new(system.raw_channel().await);
    let ticket = api.create_upload(system.authorized("alice", request)).await.unwrap().into_inner();
    assert_eq!(ticket.requests.len(), 2);
    for (request, part) in ticket.requests.iter().zip(&parts) {
        assert_eq!(put(request, part.to_vec(), |_, value| Some(value.to_owned())).await, 200);
    }
    let held = get_upload(&system, &ticket.media_id).await;
    assert_eq!(held.completed_parts, [1, 2], "both parts held, each with its checksum");

    // Storage restarts and no longer knows the parts' checksums (as a store
    // that keeps none), and the second part's bytes are not what was sent.
    system.stop().await;
    let part_file = std::fs::read_dir(system.objects_dir())
        .unwrap()
        .flatten()
        .map(|entry| entry.path())
        .find(|path| path.file_name().unwrap().to_string_lossy().ends_with(".part-2"))
        .expect("storage holds part 2 as a file");
    std::fs::write(&part_file, vec![b'x'; part_size]).unwrap();
    system.start_again().await;
    let mut api = GatewayServiceClient::new(system.raw_channel().await);
    let complete = || system.authorized("alice", pb::CompleteUploadRequest { media_id: ticket.media_id.clone() });
    let refused = api.complete_upload(complete()).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("parts 1, 2"), "{}", refused.message());
    // Both are asked for again, with fresh URLs; sent again, they complete.
    let again = get_upload(&system, &ticket.media_id).await;
    assert!(again.completed_parts.is_empty(), "{:?}", again.completed_parts);
    assert_eq!(again.requests.len(), 2);
    // (Under the same key id as before the restart: the store ties an upload to it.)
    for (request, part) in again.requests.iter().zip(&parts) {
        assert_eq!(put(request, part.to_vec(), |_, value| Some(value.to_owned())).await, 200);
    }
    let attachment = api.complete_upload(complete()).await.unwrap().into_inner().attachment.unwrap();
    let (alice, _a) = system.connect("alice", "phone").await;
    let ack = alice.send_attachments(&conversation, "", std::slice::from_ref(&attachment.media_id)).await.unwrap();
    let downloaded = alice.download(&conversation, ack.seq, &attachment.media_id, false).await.unwrap();
    assert!(downloaded == bytes, "the download is the bytes sent, not what storage held unchecked");
}

/// What `GetUpload` answers `alice` for `media_id`.
async fn get_upload(system: &TestSystem, media_id: &str) -> pb::CreateUploadResponse {
    let mut api = GatewayServiceClient::new(system.raw_channel().await);
    let request = system.authorized("alice", pb::GetUploadRequest { media_id: media_id.to_owned() });
    api.get_upload(request).await.unwrap().into_inner()
}
