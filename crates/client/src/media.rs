//! Photos, videos and files: upload tickets, PUTs straight to storage with
//! the headers the ticket signs, complete, send; and downloads through the
//! short-lived URLs the server signs.
//!
//! An upload above `Options::multipart_threshold_bytes` goes in parts; a
//! part that fails is retried with fresh URLs (`GetUpload` also says which
//! parts storage already holds), so an upload interrupted by a lost network
//! or a restarted app resumes with [`Client::resume_upload`] instead of
//! starting over.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use messenger_proto::v1 as pb;
use sha2::{Digest, Sha256};

use crate::{Client, Error, SendAck};

/// A file to upload.
#[derive(Clone, Debug)]
pub struct File {
    pub mime_type: String,
    pub file_name: String,
    /// Shared, so clones (retries, resumes) copy nothing.
    pub bytes: Arc<[u8]>,
}

impl File {
    pub fn new(mime_type: impl Into<String>, file_name: impl Into<String>, bytes: impl Into<Vec<u8>>) -> Self {
        Self { mime_type: mime_type.into(), file_name: file_name.into(), bytes: Arc::from(bytes.into()) }
    }
}

/// How far an upload is; reported as bytes go out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    pub media_id: String,
    pub sent_bytes: u64,
    pub total_bytes: u64,
}

/// Bytes handed to the network per progress report.
const CHUNK_BYTES: usize = 64 * 1024;

fn transfer_error(error: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("storage: {error}"))
}

impl Client {
    fn http(&self) -> Result<reqwest::Client, Error> {
        reqwest::Client::builder()
            .timeout(self.options.transfer_timeout)
            .connect_timeout(self.options.connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|error| Error::InvalidArgument(format!("http client: {error}")))
    }

    /// Uploads `file` to `conversation_id`, then sends a message carrying it
    /// (with `body` as its caption, possibly empty).
    pub async fn send_file(
        &self,
        conversation_id: &str,
        body: &str,
        file: File,
        progress: impl Fn(Progress) + Send + Sync,
    ) -> Result<SendAck, Error> {
        let attachment = self.upload(conversation_id, file, progress).await?;
        self.send_attachments(conversation_id, body, &[attachment.media_id]).await
    }

    /// Sends a message carrying completed uploads of this user.
    pub async fn send_attachments(
        &self,
        conversation_id: &str,
        body: &str,
        media_ids: &[String],
    ) -> Result<SendAck, Error> {
        self.send_frame(pb::SendRequestFrame {
            conversation_id: conversation_id.to_owned(),
            client_msg_id: uuid::Uuid::now_v7().to_string(),
            body: body.to_owned(),
            reply_to_seq: 0,
            media_ids: media_ids.to_vec(),
        })
        .await
    }

    /// Uploads and completes `file`: the attachment a message can then carry.
    pub async fn upload(
        &self,
        conversation_id: &str,
        file: File,
        progress: impl Fn(Progress) + Send + Sync,
    ) -> Result<pb::Attachment, Error> {
        let ticket = self.create_upload(conversation_id, &file).await?;
        let media_id = ticket.media_id.clone();
        self.put_upload(ticket, &file.bytes, &progress).await?;
        self.complete_upload(&media_id).await
    }

    /// The first step of [`Client::upload`], for apps that hand the transfer
    /// to the platform's background uploader: the media id, and the PUT
    /// requests (URL, headers, byte range) storage will accept for `file`.
    pub async fn create_upload(&self, conversation_id: &str, file: &File) -> Result<pb::CreateUploadResponse, Error> {
        let size = file.bytes.len() as u64;
        let mut request = pb::CreateUploadRequest {
            conversation_id: conversation_id.to_owned(),
            mime_type: file.mime_type.clone(),
            size,
            sha256: Sha256::digest(&file.bytes).to_vec(),
            file_name: file.file_name.clone(),
            part_size: 0,
            part_sha256: Vec::new(),
        };
        if size > self.options.multipart_threshold_bytes {
            let part = self.options.multipart_part_bytes as usize;
            request.part_size = part as u64;
            request.part_sha256 = file.bytes.chunks(part).map(|chunk| Sha256::digest(chunk).to_vec()).collect();
        }
        Ok(self
            .api
            .once(async {
                let mut api = self.api.current();
                api.create_upload(request).await
            })
            .await?
            .into_inner())
    }

    /// Continues an upload that was interrupted (the app restarted, the
    /// network went): only what storage does not hold yet is sent again.
    pub async fn resume_upload(
        &self,
        media_id: &str,
        bytes: &[u8],
        progress: impl Fn(Progress) + Send + Sync,
    ) -> Result<pb::Attachment, Error> {
        let ticket = self.fresh_ticket(media_id).await?;
        self.put_upload(ticket, bytes, &progress).await?;
        self.complete_upload(media_id).await
    }

    async fn fresh_ticket(&self, media_id: &str) -> Result<pb::CreateUploadResponse, Error> {
        let request = pb::GetUploadRequest { media_id: media_id.to_owned() };
        Ok(self
            .api
            .retried(|mut api| {
                let request = request.clone();
                async move { api.get_upload(request).await }
            })
            .await?
            .into_inner())
    }

    /// Sends `bytes` with the requests of `ticket` (from
    /// [`Client::create_upload`]); a request that fails is retried with
    /// fresh URLs, sending only what storage does not hold yet.
    pub async fn put_upload(
        &self,
        mut ticket: pb::CreateUploadResponse,
        bytes: &[u8],
        progress: impl Fn(Progress) + Send + Sync,
    ) -> Result<(), Error> {
        let http = self.http()?;
        let total = bytes.len() as u64;
        let media_id = ticket.media_id.clone();
        let mut attempt = 0;
        loop {
            // What storage holds is whatever the requests still to make do not
            // cover (the server's part size, not this client's option).
            let remaining: u64 = ticket.requests.iter().map(|request| request.length).sum();
            let mut sent = total.saturating_sub(remaining);
            progress(Progress { media_id: media_id.clone(), sent_bytes: sent, total_bytes: total });
            let mut failed = None;
            for request in &ticket.requests {
                match put(&http, request, bytes, |chunk| {
                    sent += chunk;
                    progress(Progress { media_id: media_id.clone(), sent_bytes: sent, total_bytes: total });
                })
                .await
                {
                    Ok(()) => {}
                    Err(error) => {
                        failed = Some(error);
                        break;
                    }
                }
            }
            match failed {
                None => break,
                Some(error) if attempt + 1 >= self.options.transfer_attempts => return Err(error),
                Some(error) => {
                    tracing::debug!(%media_id, %error, attempt, "upload request failed; resuming");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200 << attempt.min(5))).await;
                    ticket = self.fresh_ticket(&media_id).await?;
                }
            }
        }
        Ok(())
    }

    /// Has the server check and process an upload whose bytes are in
    /// storage: the attachment a message can then carry.
    pub async fn complete_upload(&self, media_id: &str) -> Result<pb::Attachment, Error> {
        let request = pb::CompleteUploadRequest { media_id: media_id.to_owned() };
        let response = self
            .api
            .retried(|mut api| {
                let request = request.clone();
                async move { api.complete_upload(request).await }
            })
            .await?
            .into_inner();
        response.attachment.ok_or_else(|| Error::Protocol("CompleteUpload answered no attachment".into()))
    }

    /// A short-lived URL of an attachment (or its thumbnail) of the message at `seq`.
    pub async fn media_url(
        &self,
        conversation_id: &str,
        seq: u64,
        media_id: &str,
        thumbnail: bool,
    ) -> Result<String, Error> {
        let request = pb::GetMediaUrlRequest {
            conversation_id: conversation_id.to_owned(),
            seq,
            media_id: media_id.to_owned(),
            thumbnail,
        };
        Ok(self
            .api
            .retried(|mut api| {
                let request = request.clone();
                async move { api.get_media_url(request).await }
            })
            .await?
            .into_inner()
            .url)
    }

    /// Downloads an attachment (or its thumbnail) of the message at `seq`.
    pub async fn download(
        &self,
        conversation_id: &str,
        seq: u64,
        media_id: &str,
        thumbnail: bool,
    ) -> Result<Vec<u8>, Error> {
        let http = self.http()?;
        let mut attempt = 0;
        loop {
            let url = self.media_url(conversation_id, seq, media_id, thumbnail).await?;
            match get(&http, &url, self.options.max_download_bytes).await {
                Ok(bytes) => return Ok(bytes),
                // Fetching again would get as much again.
                Err(error @ Error::Rejected { code: tonic::Code::ResourceExhausted, .. }) => return Err(error),
                Err(error) if attempt + 1 >= self.options.transfer_attempts => return Err(error),
                Err(_) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200 << attempt.min(5))).await;
                }
            }
        }
    }
}

/// One presigned request, its body streamed in chunks (each reported to `sent`).
async fn put(
    http: &reqwest::Client,
    request: &pb::UploadRequest,
    bytes: &[u8],
    mut sent: impl FnMut(u64),
) -> Result<(), Error> {
    let start = request.offset as usize;
    let end = start.checked_add(request.length as usize).filter(|end| *end <= bytes.len());
    let Some(end) = end else {
        return Err(Error::Protocol(format!("upload request outside the file ({start}+{})", request.length)));
    };
    let method = reqwest::Method::from_bytes(request.method.as_bytes()).map_err(transfer_error)?;
    let mut builder = http.request(method, &request.url);
    for header in &request.headers {
        builder = builder.header(&header.name, &header.value);
    }
    let chunks: Vec<Vec<u8>> = bytes[start..end].chunks(CHUNK_BYTES).map(<[u8]>::to_vec).collect();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let sending = builder.header(reqwest::header::CONTENT_LENGTH, request.length).body(body).send();
    let feeding = async {
        for chunk in chunks {
            let length = chunk.len() as u64;
            if tx.send(Ok(chunk)).await.is_err() {
                return;
            }
            sent(length);
        }
        drop(tx);
    };
    let (response, ()) = tokio::join!(sending, feeding);
    let response = response.map_err(transfer_error)?;
    if !response.status().is_success() {
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        return Err(Error::Rejected {
            code: if status.is_client_error() { tonic::Code::FailedPrecondition } else { tonic::Code::Unavailable },
            message: format!("storage answered {status}: {}", text.chars().take(300).collect::<String>()),
        });
    }
    Ok(())
}

fn too_large(limit: u64) -> Error {
    Error::Rejected {
        code: tonic::Code::ResourceExhausted,
        message: format!("the download is larger than max_download_bytes ({limit} bytes)"),
    }
}

async fn get(http: &reqwest::Client, url: &str, limit: u64) -> Result<Vec<u8>, Error> {
    let response = http.get(url).send().await.map_err(transfer_error)?;
    let status = response.status();
    if !status.is_success() {
        return Err(Error::Rejected {
            code: if status.is_client_error() { tonic::Code::PermissionDenied } else { tonic::Code::Unavailable },
            message: format!("storage answered {status}"),
        });
    }
    if response.content_length().is_some_and(|length| length > limit) {
        return Err(too_large(limit));
    }
    let mut stream = response.bytes_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(transfer_error)?;
        if (bytes.len() + chunk.len()) as u64 > limit {
            return Err(too_large(limit));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}
