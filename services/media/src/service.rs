//! The media service's domain logic: tickets, complete, URLs, attachments,
//! deletion and the sweep. The gRPC adapter only converts.

use std::{num::NonZeroU32, sync::Arc, time::Duration};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use messenger_platform::{
    discovery::{self, RoleChannel},
    ids,
};
use messenger_proto::v1::{self as pb, CheckAccessRequest, message_service_client::MessageServiceClient};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tracing::{info, warn};
use uuid::Uuid;

use crate::{
    error::{Error, Result},
    images, kinds,
    links::{Cdn, content_disposition},
    objects::{Objects, Presigned, Served, sha256_base64},
    options::{MAX_PARTS, MIN_PART_BYTES, Options},
    store::{MediaStore, Multipart, Processed, State, Upload},
};

/// Longest file name kept, in bytes.
pub const MAX_FILE_NAME_BYTES: usize = 255;

/// Who may see what: the message service answers for membership and
/// message visibility.
#[derive(Clone)]
pub struct Access {
    messages: MessageServiceClient<RoleChannel>,
}

impl Access {
    pub fn new(channel: RoleChannel) -> Self {
        Self { messages: MessageServiceClient::new(channel) }
    }

    /// Ok when `user` is a member of `conversation` (seq 0) or can see the
    /// message at `seq` and it carries `media_id`.
    async fn check(&self, user: &str, conversation: Uuid, seq: u64, media_id: &str) -> Result<()> {
        let key = conversation.to_string();
        let mut request = tonic::Request::new(CheckAccessRequest {
            user_id: user.to_owned(),
            conversation_id: key.clone(),
            seq,
            media_id: media_id.to_owned(),
        });
        discovery::route(&mut request, &key);
        match self.messages.clone().check_access(request).await {
            Ok(_) => Ok(()),
            Err(status) if matches!(status.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded) => {
                Err(Error::Unavailable(format!("message service: {status}")))
            }
            // Its answer (NOT_FOUND for non-members, INVALID_ARGUMENT, ...) is the client's.
            Err(status) => Err(Error::Peer(status)),
        }
    }
}

pub struct Service {
    options: Options,
    store: Arc<dyn MediaStore>,
    objects: Objects,
    access: Access,
    cdn: Cdn,
    tickets: DefaultKeyedRateLimiter<String>,
    decodes: Semaphore,
}

/// Object keys: pending uploads under the pending prefix, ready ones under
/// their conversation (`original` and `thumb` side by side: a file-backed
/// store cannot hold a key and a key below it).
/// Pending-prefix objects one sweep looks at, at most.
const ORPHANS_PER_SWEEP: usize = 1000;

pub fn pending_key(options: &Options, id: Uuid) -> String {
    format!("{}{id}", options.s3.pending_prefix)
}

pub fn object_key(upload: &Upload, thumbnail: bool) -> String {
    let name = if thumbnail { "thumb" } else { "original" };
    format!("conversations/{}/{}/{name}", upload.conversation_id, upload.id)
}

fn parse_id(text: &str, what: &'static str) -> Result<Uuid> {
    ids::parse(text).ok_or_else(|| Error::InvalidArgument(format!("{what} must be a UUID")))
}

/// The name receivers see: no path, no control characters, bounded.
pub fn clean_file_name(name: &str) -> Result<String> {
    if name.len() > MAX_FILE_NAME_BYTES {
        return Err(Error::InvalidArgument(format!(
            "file_name is {} bytes; the limit is {MAX_FILE_NAME_BYTES}",
            name.len()
        )));
    }
    let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let cleaned: String = base.chars().filter(|c| !c.is_control()).collect();
    let cleaned = cleaned.trim().trim_start_matches('.').to_owned();
    Ok(if cleaned.is_empty() { "file".to_owned() } else { cleaned })
}

fn digest(bytes: &[u8], what: &str) -> Result<[u8; 32]> {
    bytes.try_into().map_err(|_| Error::InvalidArgument(format!("{what} must be 32 bytes (SHA-256)")))
}

pub fn attachment(upload: &Upload) -> pb::Attachment {
    pb::Attachment {
        media_id: upload.id.to_string(),
        mime_type: upload.mime.clone(),
        size: upload.processed.stored_size,
        file_name: upload.file_name.clone(),
        width: upload.processed.width,
        height: upload.processed.height,
        blurhash: upload.processed.blurhash.clone(),
        has_thumbnail: upload.processed.has_thumbnail,
    }
}

fn request(part_number: u32, presigned: Presigned, offset: u64, length: u64) -> pb::UploadRequest {
    pb::UploadRequest {
        part_number,
        method: presigned.method,
        url: presigned.url,
        headers: presigned.headers.into_iter().map(|(name, value)| pb::HttpHeader { name, value }).collect(),
        offset,
        length,
    }
}

/// Completes by outcome: ready, refused (the bytes are not what was
/// declared, or were never uploaded), invalid, failed.
fn upload_outcomes() -> &'static messenger_platform::metrics::Counter<u64> {
    static OUTCOMES: std::sync::OnceLock<messenger_platform::metrics::Counter<u64>> = std::sync::OnceLock::new();
    OUTCOMES.get_or_init(|| {
        messenger_platform::metrics::meter()
            .u64_counter("messenger.media.uploads_completed")
            .with_description("CompleteUpload calls by outcome: ready, refused, invalid, failed")
            .build()
    })
}

impl Service {
    pub fn new(options: Options, store: Arc<dyn MediaStore>, objects: Objects, access: Access) -> Result<Self> {
        let cdn = Cdn::from_options(&options.cdn).map_err(Error::InvalidArgument)?;
        let per_minute = NonZeroU32::new(options.tickets_per_minute.max(1)).expect("positive");
        let tickets = RateLimiter::keyed(Quota::per_minute(per_minute));
        let decodes = Semaphore::new(options.images.max_concurrent_decodes);
        Ok(Self { options, store, objects, access, cdn, tickets, decodes })
    }

    /// An upload the caller owns (NOT_FOUND for anyone else's).
    async fn owned(&self, user: &str, media_id: &str) -> Result<Upload> {
        let id = parse_id(media_id, "media_id")?;
        match self.store.get(id).await? {
            Some(upload) if upload.owner == user && upload.state != State::Deleted => Ok(upload),
            _ => Err(Error::NotFound("media")),
        }
    }

    pub async fn create_upload(
        &self,
        user: &str,
        request: pb::CreateUploadRequest,
    ) -> Result<pb::CreateUploadResponse> {
        let conversation = parse_id(&request.conversation_id, "conversation_id")?;
        let mime = request.mime_type.trim().to_ascii_lowercase();
        let Some(max_size) = self.options.max_size(&mime) else {
            let allowed: Vec<&str> = self.options.allowed_types.keys().map(String::as_str).collect();
            return Err(Error::InvalidArgument(format!(
                "type {mime:?} is not allowed; allowed: {}",
                allowed.join(", ")
            )));
        };
        if request.size == 0 {
            return Err(Error::InvalidArgument("size must be positive".into()));
        }
        if request.size > max_size {
            return Err(Error::InvalidArgument(format!(
                "the file is {} bytes; the limit for {mime} is {max_size} bytes",
                request.size
            )));
        }
        let sha256 = digest(&request.sha256, "sha256")?;
        let file_name = clean_file_name(&request.file_name)?;
        let parts = self.plan_parts(&request)?;
        if self.tickets.check_key(&user.to_owned()).is_err() {
            return Err(Error::ResourceExhausted(format!(
                "upload tickets are limited to {} per minute",
                self.options.tickets_per_minute
            )));
        }
        self.access.check(user, conversation, 0, "").await?;
        // Pending uploads count: sixty 1 GiB tickets a minute must not outrun the quota.
        let used = self.store.used_bytes(user).await?;
        if used.saturating_add(request.size) > self.options.quota_bytes {
            return Err(Error::ResourceExhausted(format!(
                "storage quota: {used} of {} bytes used; this file needs {}",
                self.options.quota_bytes, request.size
            )));
        }
        let id = ids::new_id();
        let key = pending_key(&self.options, id);
        let multipart = match parts {
            None => None,
            Some((part_size, part_sha256)) => {
                Some(Multipart { upload_id: self.objects.create_multipart(&key, &mime).await?, part_size, part_sha256 })
            }
        };
        let upload = Upload {
            id,
            owner: user.to_owned(),
            conversation_id: conversation,
            mime,
            size: request.size,
            sha256,
            file_name,
            created_at_ms: ids::now_ms(),
            state: State::Pending,
            multipart,
            processed: Processed::default(),
        };
        self.store.create(&upload).await?;
        info!(media_id = %id, conversation_id = %conversation, size = upload.size, mime = %upload.mime, "upload ticket issued");
        self.requests(&upload).await
    }

    /// Multipart above the threshold: the client's part size and checksums, checked.
    fn plan_parts(&self, request: &pb::CreateUploadRequest) -> Result<Option<(u64, Vec<[u8; 32]>)>> {
        if request.size <= self.options.multipart_threshold_bytes {
            if !request.part_sha256.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "files up to {} bytes are uploaded in one request: send no part_sha256",
                    self.options.multipart_threshold_bytes
                )));
            }
            return Ok(None);
        }
        let part_size = request.part_size;
        if !(MIN_PART_BYTES..=self.options.max_part_bytes).contains(&part_size) {
            return Err(Error::InvalidArgument(format!(
                "files above {} bytes go in parts: part_size must be between {MIN_PART_BYTES} and {} bytes",
                self.options.multipart_threshold_bytes, self.options.max_part_bytes
            )));
        }
        let count = request.size.div_ceil(part_size) as usize;
        if count > MAX_PARTS {
            return Err(Error::InvalidArgument(format!("{count} parts; the limit is {MAX_PARTS}: use larger parts")));
        }
        if request.part_sha256.len() != count {
            return Err(Error::InvalidArgument(format!(
                "{} bytes in parts of {part_size} make {count} parts; got {} part_sha256",
                request.size,
                request.part_sha256.len()
            )));
        }
        let digests = request.part_sha256.iter().map(|part| digest(part, "each part_sha256")).collect::<Result<_>>()?;
        Ok(Some((part_size, digests)))
    }

    /// The requests still to make for `upload`, with fresh URLs.
    async fn requests(&self, upload: &Upload) -> Result<pb::CreateUploadResponse> {
        let ttl = self.options.upload_url_ttl;
        let key = pending_key(&self.options, upload.id);
        let mut requests = Vec::new();
        let mut completed_parts = Vec::new();
        match &upload.multipart {
            None => {
                let presigned = self.objects.presign_put(&key, &upload.mime, upload.size, &upload.sha256, ttl).await?;
                requests.push(request(0, presigned, 0, upload.size));
            }
            Some(multipart) => {
                let held = self.objects.list_parts(&key, &multipart.upload_id).await?;
                for (index, sha256) in multipart.part_sha256.iter().enumerate() {
                    let number = index as u32 + 1;
                    let offset = index as u64 * multipart.part_size;
                    let length = multipart.part_size.min(upload.size - offset);
                    let expected = sha256_base64(sha256);
                    if held.iter().any(|part| holds(part, number, length, &expected)) {
                        completed_parts.push(number);
                        continue;
                    }
                    let presigned =
                        self.objects.presign_part(&key, &multipart.upload_id, number, length, sha256, ttl).await?;
                    requests.push(request(number, presigned, offset, length));
                }
            }
        }
        Ok(pb::CreateUploadResponse {
            media_id: upload.id.to_string(),
            requests,
            expires_at_ms: ids::now_ms() + ttl.as_millis() as i64,
            completed_parts,
        })
    }

    pub async fn get_upload(&self, user: &str, media_id: &str) -> Result<pb::CreateUploadResponse> {
        let upload = self.owned(user, media_id).await?;
        if upload.state != State::Pending {
            return Err(Error::FailedPrecondition("the upload is complete already".into()));
        }
        self.requests(&upload).await
    }

    /// Refuses the upload for `reason`: its objects go, its record is deleted.
    async fn refuse(&self, upload: &Upload, reason: String) -> Error {
        warn!(media_id = %upload.id, %reason, "upload refused at complete");
        self.remove_objects(upload).await;
        if let Err(error) = self.store.mark_deleted(upload.id).await {
            warn!(media_id = %upload.id, %error, "refused upload not marked deleted; the sweep retries");
        }
        Error::FailedPrecondition(reason)
    }

    pub async fn complete_upload(&self, user: &str, media_id: &str) -> Result<pb::CompleteUploadResponse> {
        let result = self.complete(user, media_id).await;
        let outcome = match &result {
            Ok(_) => "ready",
            // The bytes are not what was declared (refused and removed), or nothing came yet.
            Err(Error::FailedPrecondition(_)) => "refused",
            Err(Error::NotFound(_) | Error::InvalidArgument(_)) => "invalid",
            Err(_) => "failed",
        };
        upload_outcomes().add(1, &[messenger_platform::metrics::KeyValue::new("outcome", outcome)]);
        result
    }

    async fn complete(&self, user: &str, media_id: &str) -> Result<pb::CompleteUploadResponse> {
        let upload = self.owned(user, media_id).await?;
        if upload.state == State::Ready {
            return Ok(pb::CompleteUploadResponse { attachment: Some(attachment(&upload)) });
        }
        let pending = pending_key(&self.options, upload.id);
        if let Some(multipart) = &upload.multipart {
            self.complete_parts(&upload, multipart, &pending).await?;
        }
        let Some(head) = self.objects.head(&pending).await? else {
            return Err(Error::FailedPrecondition("nothing was uploaded for this media id yet".into()));
        };
        if head.size != upload.size {
            return Err(self
                .refuse(&upload, format!("storage holds {} bytes; {} were declared", head.size, upload.size))
                .await);
        }
        if upload.multipart.is_none() && head.sha256.as_deref() != Some(sha256_base64(&upload.sha256).as_str()) {
            return Err(self.refuse(&upload, "storage's SHA-256 of the file is not the declared one".into()).await);
        }
        let image = kinds::is_image(&upload.mime);
        // An image is held whole while decoded: the permit bounds how many are.
        let permit = if image {
            Some(self.decodes.acquire().await.map_err(|_| Error::Unavailable("shutting down".into()))?)
        } else {
            None
        };
        let bytes = self.objects.read(&pending, if image { upload.size } else { kinds::SNIFF_BYTES }).await?;
        if let Err(reason) = kinds::check(&upload.mime, &bytes) {
            return Err(self.refuse(&upload, reason).await);
        }
        let served_type = upload.mime.clone();
        let disposition = content_disposition(self.options.is_inline(&upload.mime), &upload.file_name);
        let served = Served { content_type: &served_type, content_disposition: &disposition };
        let original_key = object_key(&upload, false);
        let mut processed = Processed { stored_size: upload.size, ..Processed::default() };
        if image {
            if <[u8; 32]>::from(Sha256::digest(&bytes)) != upload.sha256 {
                return Err(self.refuse(&upload, "the file's SHA-256 is not the declared one".into()).await);
            }
            let result = {
                let (mime, limits) = (upload.mime.clone(), self.options.images.clone());
                tokio::task::spawn_blocking(move || images::process(&mime, &bytes, &limits))
                    .await
                    .map_err(|error| Error::Storage(format!("image worker: {error}")))?
            };
            let made = match result {
                Ok(made) => made,
                Err(error) => return Err(self.refuse(&upload, error.to_string()).await),
            };
            let thumb_disposition = content_disposition(true, "thumbnail.jpg");
            let thumb = Served { content_type: "image/jpeg", content_disposition: &thumb_disposition };
            self.objects.put(&object_key(&upload, true), made.thumbnail, &thumb).await?;
            match made.original {
                Some(original) => {
                    processed.stored_size = original.len() as u64;
                    self.objects.put(&original_key, original, &served).await?;
                }
                None => self.objects.copy(&pending, &original_key, &served).await?,
            }
            processed.width = made.width;
            processed.height = made.height;
            processed.blurhash = made.blurhash;
            processed.has_thumbnail = true;
        } else {
            self.objects.copy(&pending, &original_key, &served).await?;
        }
        drop(permit);
        // Counted again here: tickets issued together each passed with the
        // same usage. This upload counts by what it stores, not its ticket.
        let used = self.store.used_bytes(&upload.owner).await?.saturating_sub(upload.size);
        if used.saturating_add(processed.stored_size) > self.options.quota_bytes {
            self.remove_objects(&upload).await;
            self.store.mark_deleted(upload.id).await?;
            return Err(Error::ResourceExhausted(format!(
                "storage quota: {used} of {} bytes used; this file needs {}",
                self.options.quota_bytes, processed.stored_size
            )));
        }
        if !self.store.mark_ready(upload.id, &processed).await? {
            return match self.store.get(upload.id).await? {
                // Another complete of the same upload finished first: same objects, same answer.
                Some(ready) if ready.state == State::Ready => {
                    Ok(pb::CompleteUploadResponse { attachment: Some(attachment(&ready)) })
                }
                // Deleted (swept, or its message deleted) while completing.
                _ => {
                    self.remove_objects(&upload).await;
                    Err(Error::NotFound("media"))
                }
            };
        }
        // Only now: a complete that failed above can be retried from the pending object.
        if let Err(error) = self.objects.delete(&pending).await {
            warn!(media_id = %upload.id, error = %error, "pending object left behind");
        }
        info!(media_id = %upload.id, stored_size = processed.stored_size, "upload ready");
        let ready = Upload { state: State::Ready, processed, ..upload };
        Ok(pb::CompleteUploadResponse { attachment: Some(attachment(&ready)) })
    }

    /// Completes S3's multipart upload once every part is there, each of its declared length.
    async fn complete_parts(&self, upload: &Upload, multipart: &Multipart, key: &str) -> Result<()> {
        if self.objects.head(key).await?.is_some() {
            return Ok(()); // completed by an earlier attempt
        }
        let held = self.objects.list_parts(key, &multipart.upload_id).await?;
        let mut parts = Vec::new();
        let mut missing = Vec::new();
        for (index, sha256) in multipart.part_sha256.iter().enumerate() {
            let number = index as u32 + 1;
            let length = multipart.part_size.min(upload.size - index as u64 * multipart.part_size);
            let expected = sha256_base64(sha256);
            match held.iter().find(|part| holds(part, number, length, &expected)) {
                Some(part) => parts.push(part.clone()),
                None => {
                    let unchecked = held.iter().any(|part| part.number == number && part.sha256.is_none());
                    if unchecked {
                        // A store that keeps no part checksums can take no multipart upload.
                        warn!(media_id = %upload.id, part = number, "storage reports no checksum for a held part: \
                               it is asked for again (a store that never reports part checksums cannot take \
                               multipart uploads: raise media.multipart_threshold_bytes)");
                    }
                    missing.push(number.to_string());
                }
            }
        }
        if !missing.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "parts {} are not uploaded yet, or storage cannot vouch for their checksums: upload them again \
                 (GetUpload names them)",
                missing.join(", ")
            )));
        }
        self.objects.complete_multipart(key, &multipart.upload_id, &parts).await
    }

    pub async fn get_url(&self, user: &str, request: pb::GetMediaUrlRequest) -> Result<pb::GetMediaUrlResponse> {
        let conversation = parse_id(&request.conversation_id, "conversation_id")?;
        let id = parse_id(&request.media_id, "media_id")?;
        if request.seq == 0 {
            return Err(Error::InvalidArgument("seq must name the message that carries the media".into()));
        }
        let upload = match self.store.get(id).await? {
            Some(upload) if upload.state == State::Ready && upload.conversation_id == conversation => upload,
            _ => return Err(Error::NotFound("media")),
        };
        self.access.check(user, conversation, request.seq, &request.media_id).await?;
        if request.thumbnail && !upload.processed.has_thumbnail {
            return Err(Error::NotFound("thumbnail"));
        }
        let key = object_key(&upload, request.thumbnail);
        let ttl = self.options.download_url_ttl;
        let expires_at_ms = ids::now_ms() + ttl.as_millis() as i64;
        let url = match self.cdn.url(&key, (expires_at_ms / 1000) as u64) {
            Some(url) => url,
            None => {
                let (content_type, disposition) = if request.thumbnail {
                    ("image/jpeg".to_owned(), content_disposition(true, "thumbnail.jpg"))
                } else {
                    (upload.mime.clone(), content_disposition(self.options.is_inline(&upload.mime), &upload.file_name))
                };
                let served = Served { content_type: &content_type, content_disposition: &disposition };
                self.objects.presign_get(&key, &served, ttl).await?.url
            }
        };
        Ok(pb::GetMediaUrlResponse { url, expires_at_ms })
    }

    /// The attachments a send carries: each ready, the sender's, this conversation's.
    /// Each media goes with one message: the first send that names it (by
    /// its client message id, so that send's retries still pass).
    pub async fn describe(
        &self,
        sender: &str,
        conversation_id: &str,
        client_msg_id: &str,
        media_ids: &[String],
    ) -> Result<Vec<pb::Attachment>> {
        if client_msg_id.is_empty() {
            return Err(Error::InvalidArgument("client_msg_id is required".into()));
        }
        let conversation = parse_id(conversation_id, "conversation_id")?;
        // Every media is checked before any is tied to the message: a send
        // refused for one of them leaves the others free for the next send.
        let mut uploads = Vec::with_capacity(media_ids.len());
        for media_id in media_ids {
            let id = parse_id(media_id, "media_id")?;
            let upload = match self.store.get(id).await? {
                Some(upload)
                    if upload.owner == sender
                        && upload.conversation_id == conversation
                        && upload.state != State::Deleted =>
                {
                    upload
                }
                _ => return Err(Error::NotFound("media")),
            };
            if upload.state != State::Ready {
                return Err(Error::FailedPrecondition(format!(
                    "media {media_id} is not complete (CompleteUpload first)"
                )));
            }
            uploads.push(upload);
        }
        let mut attachments = Vec::with_capacity(uploads.len());
        for upload in uploads {
            if !self.store.attach(upload.id, client_msg_id).await? {
                return Err(Error::FailedPrecondition(format!(
                    "media {} was sent with another message already; upload it again to send it again",
                    upload.id
                )));
            }
            attachments.push(attachment(&upload));
        }
        Ok(attachments)
    }

    /// A message deleted for everyone: its media's objects go.
    pub async fn delete(&self, conversation_id: &str, media_ids: &[String]) -> Result<()> {
        let conversation = parse_id(conversation_id, "conversation_id")?;
        for media_id in media_ids {
            let id = parse_id(media_id, "media_id")?;
            let Some(upload) = self.store.get(id).await? else { continue };
            if upload.conversation_id != conversation {
                continue;
            }
            self.store.mark_deleted(id).await?;
            self.remove_objects(&upload).await;
            info!(media_id = %id, "media deleted with its message");
        }
        Ok(())
    }

    /// Every object an upload may have; failures are logged (the sweep and
    /// the bucket's lifecycle rule are the backstop).
    async fn remove_objects(&self, upload: &Upload) {
        let pending = pending_key(&self.options, upload.id);
        if let Some(multipart) = &upload.multipart
            && let Err(error) = self.objects.abort_multipart(&pending, &multipart.upload_id).await
        {
            tracing::debug!(media_id = %upload.id, %error, "multipart upload not aborted (completed or gone)");
        }
        for key in [pending, object_key(upload, false), object_key(upload, true)] {
            if let Err(error) = self.objects.delete(&key).await {
                warn!(media_id = %upload.id, %key, %error, "object not deleted");
            }
        }
    }

    /// Removes uploads never completed within `pending_ttl`; returns how many.
    pub async fn sweep(&self, now_ms: i64) -> Result<usize> {
        let cutoff = now_ms - self.options.pending_ttl.as_millis() as i64;
        let mut swept = 0;
        loop {
            let batch = self.store.pending_before(cutoff, 100).await?;
            if batch.is_empty() {
                break;
            }
            for upload in batch {
                // Claimed first: a complete that finished meanwhile keeps its objects.
                if self.store.abandon(upload.id).await? {
                    self.remove_objects(&upload).await;
                    swept += 1;
                }
            }
        }
        Ok(swept + self.sweep_orphans(cutoff).await?)
    }

    /// Removes objects under the pending prefix written before `cutoff_ms`
    /// whose upload is not pending: a presigned PUT replayed after its
    /// upload completed (or was deleted) writes its pending key again, and
    /// no pending record would ever take it away. `pending_ttl` is at least
    /// the URL's lifetime, so a URL that wrote one is dead by now.
    async fn sweep_orphans(&self, cutoff_ms: i64) -> Result<usize> {
        let prefix = &self.options.s3.pending_prefix;
        let mut swept = 0;
        for key in self.objects.keys_older(prefix, cutoff_ms, ORPHANS_PER_SWEEP).await? {
            let Some(id) = key.strip_prefix(prefix.as_str()).and_then(ids::parse) else { continue };
            let pending = self.store.get(id).await?.is_some_and(|upload| upload.state == State::Pending);
            if !pending {
                self.objects.delete(&key).await?;
                swept += 1;
            }
        }
        Ok(swept)
    }

    /// Sweeps every `sweep_interval` until `shutdown`.
    pub async fn run_sweeper(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut interval = tokio::time::interval(self.options.sweep_interval.max(Duration::from_millis(10)));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = interval.tick() => {}
            }
            match self.sweep(ids::now_ms()).await {
                Ok(0) => {}
                Ok(swept) => info!(swept, "abandoned uploads removed"),
                Err(error) => warn!(%error, "sweep failed; next interval retries"),
            }
            // The ticket limiter forgets users whose share is whole again:
            // its memory follows recent uploaders, not every user ever seen.
            self.tickets.retain_recent();
            self.tickets.shrink_to_fit();
        }
    }
}

/// Whether storage holds part `number` as declared: its length, and the
/// checksum storage verified when it was uploaded. A part storage reports
/// without a checksum (a store that keeps none, or lost them) does not count:
/// nobody checked its bytes, so it is uploaded again.
fn holds(part: &crate::objects::Part, number: u32, length: u64, sha256: &str) -> bool {
    part.number == number && part.size == length && part.sha256.as_deref() == Some(sha256)
}
