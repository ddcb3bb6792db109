//! An S3-compatible server in this process (`s3s` over `s3s-fs`, objects as
//! files under a folder), so `messenger up` and the tests use the same
//! `aws-sdk-s3` code path as production. It verifies SigV4 signatures,
//! presigned URLs and their expiry like S3 does.
//!
//! `s3s-fs` alone differs from S3 where this service depends on it: it
//! writes an object before comparing its checksum (a refused PUT leaves the
//! bytes in place) and does not check part checksums at all. [`Verified`]
//! closes both: a body is read whole (its length is signed and bounded by the
//! ticket) and checked against its `x-amz-checksum-sha256` before anything is
//! written.
//!
//! Browsers upload and fetch with presigned URLs from pages of another
//! origin (the web app), so it answers CORS for any origin: every request
//! carries its own signature, and no cookie or ambient credential is ever
//! honoured. (A real bucket needs the same CORS rule: docs/configuration.md.)

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, sync::Mutex};

use async_trait::async_trait;
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use futures::StreamExt;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto::Builder as ConnectionBuilder,
};
use s3s::{
    Body, S3, S3Request, S3Response, S3Result,
    access::{S3Access, S3AccessContext},
    auth::SimpleAuth,
    dto::*,
    s3_error,
    service::S3ServiceBuilder,
};
use s3s_fs::FileSystem;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Header a CDN sends to fetch objects without a signature (what S3 does
/// with a bucket policy on a secret `Referer`, or CloudFront's origin access).
pub const ORIGIN_SECRET_HEADER: &str = "x-messenger-origin-secret";

#[derive(Clone, Debug)]
pub struct EmbeddedOptions {
    pub root: PathBuf,
    pub listen: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Lets a CDN edge GET and HEAD objects with this header instead of a signature.
    pub origin_secret: Option<String>,
    /// Largest body one PUT may carry (it is held in memory to be checked).
    pub max_body_bytes: u64,
}

/// A running server; stops when dropped or when `shutdown` is cancelled.
pub struct EmbeddedS3 {
    address: SocketAddr,
    shutdown: CancellationToken,
}

impl EmbeddedS3 {
    pub async fn start(options: EmbeddedOptions) -> std::io::Result<Self> {
        std::fs::create_dir_all(&options.root)?;
        let filesystem = FileSystem::new(&options.root).map_err(|error| std::io::Error::other(format!("{error:?}")))?;
        let verified =
            Verified { inner: filesystem, max_body_bytes: options.max_body_bytes, part_checksums: Mutex::default() };
        let mut builder = S3ServiceBuilder::new(verified);
        builder.set_auth(SimpleAuth::from_single(options.access_key_id.clone(), options.secret_access_key.clone()));
        builder.set_access(Access { origin_secret: options.origin_secret.clone() });
        let service = hyper_util::service::TowerToHyperService::new(
            tower::ServiceBuilder::new().layer(cors()).service(builder.build()),
        );
        let listener = TcpListener::bind(&options.listen).await?;
        let address = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let connections = ConnectionBuilder::new(TokioExecutor::new());
            loop {
                let socket = tokio::select! {
                    () = stop.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok((socket, _)) => socket,
                        Err(error) => {
                            tracing::warn!(%error, "embedded object store: accept failed");
                            continue;
                        }
                    },
                };
                let connection = connections.serve_connection(TokioIo::new(socket), service.clone()).into_owned();
                let stop = stop.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = connection => {}
                        () = stop.cancelled() => {}
                    }
                });
            }
        });
        tracing::info!(%address, root = %options.root.display(), "embedded object store listening");
        Ok(Self { address, shutdown })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }
}

impl Drop for EmbeddedS3 {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// CORS answers for presigned requests from browser pages: uploads send
/// the checksum and content headers the ticket names; multipart uploads
/// read each part's `ETag`.
fn cors() -> tower_http::cors::CorsLayer {
    use tower_http::cors::{Any, CorsLayer};
    CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([http::Method::GET, http::Method::HEAD, http::Method::PUT])
        .allow_headers(Any)
        .expose_headers([http::header::ETAG])
        .max_age(std::time::Duration::from_secs(600))
}

/// Signed requests pass (SigV4 was checked before this); anonymous ones
/// only to read an object, and only with the CDN's origin secret.
struct Access {
    origin_secret: Option<String>,
}

#[async_trait]
impl S3Access for Access {
    async fn check(&self, context: &mut S3AccessContext<'_>) -> S3Result<()> {
        if context.credentials().is_some() {
            return Ok(());
        }
        let reads = matches!(context.s3_op().name(), "GetObject" | "HeadObject");
        let presented = context.headers().get(ORIGIN_SECRET_HEADER).and_then(|value| value.to_str().ok());
        match (&self.origin_secret, presented) {
            (Some(secret), Some(presented)) if reads && constant_time_eq(secret.as_bytes(), presented.as_bytes()) => {
                Ok(())
            }
            _ => Err(s3_error!(AccessDenied, "signature required")),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `s3s-fs` with bodies checked before they are written.
struct Verified {
    inner: FileSystem,
    max_body_bytes: u64,
    /// Each part's checksum as verified at upload, by (upload id, part
    /// number), reported by ListParts as S3 does (`s3s-fs` keeps none). In
    /// memory: after a restart a held part reports none, and the media
    /// service has it uploaded again rather than trust bytes nobody checked.
    part_checksums: Mutex<HashMap<(String, i32), String>>,
}

impl Verified {
    fn forget_parts(&self, upload_id: &str) {
        self.part_checksums.lock().unwrap_or_else(|e| e.into_inner()).retain(|(upload, _), _| upload != upload_id);
    }

    async fn checked(
        &self,
        body: Option<StreamingBlob>,
        length: Option<i64>,
        sha256: Option<&str>,
    ) -> S3Result<StreamingBlob> {
        let mut body = body.ok_or_else(|| s3_error!(IncompleteBody))?;
        let mut bytes = Vec::new();
        let mut hasher = Sha256::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|error| s3_error!(IncompleteBody, "reading the body: {error}"))?;
            if (bytes.len() + chunk.len()) as u64 > self.max_body_bytes {
                return Err(s3_error!(EntityTooLarge, "the body exceeds {} bytes", self.max_body_bytes));
            }
            hasher.update(&chunk);
            bytes.extend_from_slice(&chunk);
        }
        if let Some(length) = length
            && length != bytes.len() as i64
        {
            return Err(s3_error!(IncompleteBody, "got {} bytes of a declared {length}", bytes.len()));
        }
        if let Some(expected) = sha256
            && BASE64.encode(hasher.finalize()) != expected
        {
            return Err(s3_error!(BadDigest, "the body does not match x-amz-checksum-sha256"));
        }
        Ok(StreamingBlob::from(Body::from(bytes)))
    }
}

#[async_trait]
impl S3 for Verified {
    async fn put_object(&self, mut req: S3Request<PutObjectInput>) -> S3Result<S3Response<PutObjectOutput>> {
        let input = &mut req.input;
        let body = self.checked(input.body.take(), input.content_length, input.checksum_sha256.as_deref()).await?;
        req.input.body = Some(body);
        self.inner.put_object(req).await
    }

    async fn upload_part(&self, mut req: S3Request<UploadPartInput>) -> S3Result<S3Response<UploadPartOutput>> {
        let input = &mut req.input;
        let sha256 = input.checksum_sha256.clone();
        let body = self.checked(input.body.take(), input.content_length, sha256.as_deref()).await?;
        req.input.body = Some(body);
        let part = (req.input.upload_id.clone(), req.input.part_number);
        let mut response = self.inner.upload_part(req).await?;
        // What S3 answers for a part uploaded with a checksum (s3s-fs does not).
        response.output.checksum_sha256 = sha256.clone();
        let mut checksums = self.part_checksums.lock().unwrap_or_else(|e| e.into_inner());
        match sha256 {
            Some(sha256) => checksums.insert(part, sha256),
            None => checksums.remove(&part),
        };
        Ok(response)
    }

    async fn create_bucket(&self, req: S3Request<CreateBucketInput>) -> S3Result<S3Response<CreateBucketOutput>> {
        self.inner.create_bucket(req).await
    }

    async fn head_bucket(&self, req: S3Request<HeadBucketInput>) -> S3Result<S3Response<HeadBucketOutput>> {
        self.inner.head_bucket(req).await
    }

    async fn copy_object(&self, req: S3Request<CopyObjectInput>) -> S3Result<S3Response<CopyObjectOutput>> {
        self.inner.copy_object(req).await
    }

    async fn delete_object(&self, req: S3Request<DeleteObjectInput>) -> S3Result<S3Response<DeleteObjectOutput>> {
        self.inner.delete_object(req).await
    }

    async fn delete_objects(&self, req: S3Request<DeleteObjectsInput>) -> S3Result<S3Response<DeleteObjectsOutput>> {
        self.inner.delete_objects(req).await
    }

    async fn get_object(&self, req: S3Request<GetObjectInput>) -> S3Result<S3Response<GetObjectOutput>> {
        self.inner.get_object(req).await
    }

    async fn head_object(&self, req: S3Request<HeadObjectInput>) -> S3Result<S3Response<HeadObjectOutput>> {
        self.inner.head_object(req).await
    }

    async fn list_objects_v2(&self, req: S3Request<ListObjectsV2Input>) -> S3Result<S3Response<ListObjectsV2Output>> {
        self.inner.list_objects_v2(req).await
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        self.inner.create_multipart_upload(req).await
    }

    async fn list_parts(&self, req: S3Request<ListPartsInput>) -> S3Result<S3Response<ListPartsOutput>> {
        let upload_id = req.input.upload_id.clone();
        let mut response = self.inner.list_parts(req).await?;
        let checksums = self.part_checksums.lock().unwrap_or_else(|e| e.into_inner());
        for part in response.output.parts.iter_mut().flatten() {
            let number = part.part_number.unwrap_or_default();
            part.checksum_sha256 = checksums.get(&(upload_id.clone(), number)).cloned();
        }
        Ok(response)
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let upload_id = req.input.upload_id.clone();
        let response = self.inner.complete_multipart_upload(req).await?;
        self.forget_parts(&upload_id);
        Ok(response)
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        let upload_id = req.input.upload_id.clone();
        let response = self.inner.abort_multipart_upload(req).await?;
        self.forget_parts(&upload_id);
        Ok(response)
    }
}
