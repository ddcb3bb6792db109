//! Object storage through `aws-sdk-s3`: presigned uploads and downloads, and
//! the few calls complete, delete and the sweep make.
//!
//! Two clients share one configuration: `client` talks to `endpoint` (what
//! this service reaches), `presigner` only signs URLs for `public_endpoint`
//! (what clients reach; SigV4 signs the host).

use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_sdk_s3::{
    Client,
    config::{Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation, timeout::TimeoutConfig},
    presigning::{PresignedRequest, PresigningConfig},
    primitives::ByteStream,
    types::{ChecksumAlgorithm, ChecksumMode, CompletedMultipartUpload, CompletedPart, MetadataDirective},
};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};

use crate::{
    error::{Error, Result},
    options::S3Options,
};

/// A request a client makes to storage, as presigned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Presigned {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
}

impl From<PresignedRequest> for Presigned {
    fn from(request: PresignedRequest) -> Self {
        Self {
            method: request.method().to_owned(),
            url: request.uri().to_owned(),
            headers: request.headers().map(|(name, value)| (name.to_owned(), value.to_owned())).collect(),
        }
    }
}

/// What HEAD says about an object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Head {
    pub size: u64,
    /// Base64 SHA-256 as storage computed it (`…-N` for multipart objects).
    pub sha256: Option<String>,
}

/// A part storage holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    pub number: u32,
    pub size: u64,
    pub etag: String,
    pub sha256: Option<String>,
}

/// How a stored object is served.
#[derive(Clone, Debug)]
pub struct Served<'a> {
    pub content_type: &'a str,
    pub content_disposition: &'a str,
}

#[derive(Clone)]
pub struct Objects {
    client: Client,
    presigner: Client,
    bucket: String,
}

fn unavailable(error: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("object storage: {error}"))
}

/// The service error's full text (the SDK's `Display` says only "service error").
fn describe<E: std::error::Error + Send + Sync + 'static>(error: aws_sdk_s3::error::SdkError<E>) -> Error {
    unavailable(aws_sdk_s3::error::DisplayErrorContext(error))
}

pub fn sha256_base64(digest: &[u8]) -> String {
    BASE64.encode(digest)
}

impl Objects {
    /// Builds the clients. Nothing is contacted until the first call
    /// (except with `create_bucket`, which makes sure the bucket exists).
    pub async fn connect(options: &S3Options, endpoint: &str) -> Result<Self> {
        let http =
            aws_smithy_http_client::Builder::new().tls_provider(tls::Provider::Rustls(CryptoMode::Ring)).build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(options.region.clone()))
            .http_client(http)
            .timeout_config(TimeoutConfig::builder().operation_timeout(options.request_timeout).build());
        if !options.access_key_id.is_empty() {
            loader = loader.credentials_provider(Credentials::new(
                options.access_key_id.clone(),
                options.secret_access_key.clone(),
                None,
                None,
                "messenger-config",
            ));
        }
        let shared = loader.load().await;
        let build = |endpoint: &str| {
            let mut builder = aws_sdk_s3::config::Builder::from(&shared)
                .force_path_style(options.force_path_style)
                // Checksums are ours to choose (the declared SHA-256), never an
                // SDK default added to presigned URLs the client cannot match.
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
            if !endpoint.is_empty() {
                builder = builder.endpoint_url(endpoint);
            }
            Client::from_conf(builder.build())
        };
        let public = if options.public_endpoint.is_empty() { endpoint } else { &options.public_endpoint };
        let objects = Self { client: build(endpoint), presigner: build(public), bucket: options.bucket.clone() };
        if options.create_bucket {
            objects.ensure_bucket().await?;
        }
        Ok(objects)
    }

    async fn ensure_bucket(&self) -> Result<()> {
        if self.client.head_bucket().bucket(&self.bucket).send().await.is_ok() {
            return Ok(());
        }
        match self.client.create_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            // Another instance created it meanwhile.
            Err(_) if self.client.head_bucket().bucket(&self.bucket).send().await.is_ok() => Ok(()),
            Err(error) => Err(describe(error)),
        }
    }

    fn presigning(ttl: Duration, start: Option<SystemTime>) -> Result<PresigningConfig> {
        let mut builder = PresigningConfig::builder().expires_in(ttl);
        if let Some(start) = start {
            builder = builder.start_time(start);
        }
        builder.build().map_err(|error| Error::InvalidArgument(format!("url lifetime: {error}")))
    }

    /// A PUT that storage accepts only with exactly this type, length and SHA-256.
    pub async fn presign_put(
        &self,
        key: &str,
        content_type: &str,
        length: u64,
        sha256: &[u8; 32],
        ttl: Duration,
    ) -> Result<Presigned> {
        let request = self
            .presigner
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .content_length(length as i64)
            .checksum_sha256(sha256_base64(sha256))
            .presigned(Self::presigning(ttl, None)?)
            .await
            .map_err(describe)?;
        Ok(request.into())
    }

    /// Starts a multipart upload whose parts storage checks against SHA-256.
    pub async fn create_multipart(&self, key: &str, content_type: &str) -> Result<String> {
        let output = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .send()
            .await
            .map_err(describe)?;
        output.upload_id.ok_or_else(|| unavailable("no upload id in CreateMultipartUpload's answer"))
    }

    pub async fn presign_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        length: u64,
        sha256: &[u8; 32],
        ttl: Duration,
    ) -> Result<Presigned> {
        let request = self
            .presigner
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number as i32)
            .content_length(length as i64)
            .checksum_sha256(sha256_base64(sha256))
            .presigned(Self::presigning(ttl, None)?)
            .await
            .map_err(describe)?;
        Ok(request.into())
    }

    /// The parts storage holds for a multipart upload, in order.
    pub async fn list_parts(&self, key: &str, upload_id: &str) -> Result<Vec<Part>> {
        let mut parts = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let output = self
                .client
                .list_parts()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .set_part_number_marker(marker.clone())
                .send()
                .await
                .map_err(describe)?;
            for part in output.parts() {
                parts.push(Part {
                    number: part.part_number().unwrap_or_default() as u32,
                    size: part.size().unwrap_or_default() as u64,
                    etag: part.e_tag().unwrap_or_default().to_owned(),
                    sha256: part.checksum_sha256().map(str::to_owned),
                });
            }
            match (output.is_truncated(), output.next_part_number_marker()) {
                (Some(true), Some(next)) => marker = Some(next.to_owned()),
                _ => break,
            }
        }
        parts.sort_by_key(|part| part.number);
        Ok(parts)
    }

    pub async fn complete_multipart(&self, key: &str, upload_id: &str, parts: &[Part]) -> Result<()> {
        let completed = CompletedMultipartUpload::builder()
            .set_parts(Some(
                parts
                    .iter()
                    .map(|part| {
                        CompletedPart::builder()
                            .part_number(part.number as i32)
                            .e_tag(&part.etag)
                            .set_checksum_sha256(part.sha256.clone())
                            .build()
                    })
                    .collect(),
            ))
            .build();
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(completed)
            .send()
            .await
            .map_err(describe)?;
        Ok(())
    }

    pub async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<()> {
        self.client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map_err(describe)?;
        Ok(())
    }

    /// None when the object does not exist.
    pub async fn head(&self, key: &str) -> Result<Option<Head>> {
        match self.client.head_object().bucket(&self.bucket).key(key).checksum_mode(ChecksumMode::Enabled).send().await
        {
            Ok(output) => Ok(Some(Head {
                size: output.content_length().unwrap_or_default().max(0) as u64,
                sha256: output.checksum_sha256().map(str::to_owned),
            })),
            Err(error) if error.as_service_error().is_some_and(|error| error.is_not_found()) => Ok(None),
            Err(error) => Err(describe(error)),
        }
    }

    /// The first `limit` bytes of an object (all of it when shorter).
    pub async fn read(&self, key: &str, limit: u64) -> Result<Vec<u8>> {
        let output = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .range(format!("bytes=0-{}", limit.saturating_sub(1)))
            .send()
            .await
            .map_err(describe)?;
        let bytes = output.body.collect().await.map_err(unavailable)?.into_bytes();
        Ok(bytes.to_vec())
    }

    pub async fn put(&self, key: &str, bytes: Vec<u8>, served: &Served<'_>) -> Result<()> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(served.content_type)
            .content_disposition(served.content_disposition)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(describe)?;
        Ok(())
    }

    /// Copies `from` to `to` with new serving headers (the upload's own are the client's).
    pub async fn copy(&self, from: &str, to: &str, served: &Served<'_>) -> Result<()> {
        self.client
            .copy_object()
            .bucket(&self.bucket)
            .key(to)
            .copy_source(format!("{}/{}", self.bucket, from))
            .metadata_directive(MetadataDirective::Replace)
            .content_type(served.content_type)
            .content_disposition(served.content_disposition)
            .send()
            .await
            .map_err(describe)?;
        Ok(())
    }

    /// Keys under `prefix` last written before `before_ms` (ms since the
    /// epoch), at most `limit`, read a page of S3's listing at a time.
    pub async fn keys_older(&self, prefix: &str, before_ms: i64, limit: usize) -> Result<Vec<String>> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(describe)?;
            for object in page.contents() {
                let written_ms = object.last_modified().and_then(|at| at.to_millis().ok()).unwrap_or(i64::MAX);
                if let Some(key) = object.key()
                    && written_ms < before_ms
                {
                    keys.push(key.to_owned());
                    if keys.len() >= limit {
                        return Ok(keys);
                    }
                }
            }
            match page.next_continuation_token() {
                Some(next) if page.is_truncated() == Some(true) => token = Some(next.to_owned()),
                _ => return Ok(keys),
            }
        }
    }

    /// Deleting an object that does not exist succeeds (S3's semantics).
    pub async fn delete(&self, key: &str) -> Result<()> {
        self.client.delete_object().bucket(&self.bucket).key(key).send().await.map_err(describe)?;
        Ok(())
    }

    /// A GET that serves the object with these headers whatever it was stored with.
    pub async fn presign_get(&self, key: &str, served: &Served<'_>, ttl: Duration) -> Result<Presigned> {
        let request = self
            .presigner
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .response_content_type(served.content_type)
            .response_content_disposition(served.content_disposition)
            .presigned(Self::presigning(ttl, None)?)
            .await
            .map_err(describe)?;
        Ok(request.into())
    }
}
