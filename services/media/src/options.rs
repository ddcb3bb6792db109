//! The media service's configuration.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

const MIB: u64 = 1024 * 1024;

/// Smallest part S3 accepts (every part but the last).
pub const MIN_PART_BYTES: u64 = 5 * MIB;
/// Most parts S3 accepts in one multipart upload.
pub const MAX_PARTS: usize = 10_000;

/// Where upload records live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// One SQLite file (`database`): the embedded default.
    #[default]
    Sqlite,
    /// The ScyllaDB cluster and keyspace of `message.scylla`, for several media instances.
    Scylla,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// Internal gRPC address (never exposed to clients).
    pub listen: String,
    pub store: StoreBackend,
    /// SQLite file of upload records; empty means `<data_dir>/media.db`.
    pub database: Option<PathBuf>,
    pub s3: S3Options,
    /// Types a user may upload, each with its largest size in bytes. A type
    /// not listed is refused (INVALID_ARGUMENT).
    pub allowed_types: BTreeMap<String, u64>,
    /// Types served inline (shown by a browser); every other type is served
    /// with `Content-Disposition: attachment`. SVG, HTML and XML are never
    /// inline (they can run script), whatever this says.
    pub inline_types: Vec<String>,
    /// How long upload URLs work.
    #[serde(with = "humantime_serde")]
    pub upload_url_ttl: Duration,
    /// Files larger than this are uploaded in parts.
    pub multipart_threshold_bytes: u64,
    /// Largest part a client may choose.
    pub max_part_bytes: u64,
    /// Bytes of ready media one user may hold in all; a ticket that would
    /// pass it answers RESOURCE_EXHAUSTED.
    pub quota_bytes: u64,
    /// Upload tickets one user may ask for per minute (a burst of this many).
    pub tickets_per_minute: u32,
    /// Uploads never completed are removed this long after their ticket.
    #[serde(with = "humantime_serde")]
    pub pending_ttl: Duration,
    /// How often the sweep looks for abandoned uploads.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    pub images: ImageOptions,
    /// How long download URLs work.
    #[serde(with = "humantime_serde")]
    pub download_url_ttl: Duration,
    /// Downloads through a CDN instead of presigned storage URLs.
    pub cdn: CdnOptions,
}

/// Object storage, the AWS way: credentials from `access_key_id` /
/// `secret_access_key` when set, otherwise the AWS default chain
/// (`AWS_ACCESS_KEY_ID`, profile, web identity, instance metadata).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Options {
    /// Run an S3-compatible server in this process, data under
    /// `<data_dir>/objects` (`messenger up`); `endpoint` is then ignored.
    pub embedded: bool,
    /// Address the embedded server listens on (loopback).
    pub embedded_listen: String,
    /// Lets a CDN edge in front of the embedded server read objects with this
    /// secret in an `x-messenger-origin-secret` header (empty: signed requests only).
    pub embedded_origin_secret: String,
    /// Custom endpoint for S3-compatible servers (e.g. `http://127.0.0.1:9000`);
    /// empty: AWS's own endpoint for `region`.
    pub endpoint: String,
    /// Endpoint written into presigned URLs, when clients reach storage by
    /// another address than this service does; empty: `endpoint`.
    pub public_endpoint: String,
    pub region: String,
    pub bucket: String,
    /// Path-style addressing (`endpoint/bucket/key`), which most S3-compatible servers need.
    pub force_path_style: bool,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Create the bucket at start when it does not exist (embedded and test servers).
    pub create_bucket: bool,
    /// Prefix of uploads not yet completed (the lifecycle rule's prefix).
    pub pending_prefix: String,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

/// Hard limits on decoding images (decompression bombs are refused, not decoded).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageOptions {
    /// Most pixels (width x height) of an image that is decoded.
    pub max_pixels: u64,
    /// Most memory one decode may allocate.
    pub max_decode_bytes: u64,
    /// Images decoded at once; with `max_decode_bytes` this bounds the memory decoding uses.
    pub max_concurrent_decodes: usize,
    /// Longest side of a thumbnail.
    pub thumbnail_size: u32,
    /// JPEG quality of re-encoded originals and thumbnails (1-100).
    pub jpeg_quality: u8,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CdnMode {
    /// Presigned GETs straight from storage.
    #[default]
    None,
    /// `base_url/key?expires=..&token=..`, token = base64url(HMAC-SHA256(secret,
    /// "{expires}{path}")): what an nginx, Fastly or Cloudflare edge checks.
    Hmac,
    /// CloudFront signed URLs with a canned policy (RSA-SHA1 over the policy,
    /// `Key-Pair-Id`), verifiable with the key group's public key.
    Cloudfront,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CdnOptions {
    pub mode: CdnMode,
    /// Scheme, host and optional path prefix of the CDN, e.g. `https://media.example.com`.
    pub base_url: String,
    /// `hmac` mode: the shared secret, or a file holding it.
    pub secret: String,
    pub secret_file: Option<PathBuf>,
    /// `cloudfront` mode: the public key's id and the PEM private key file.
    pub key_pair_id: String,
    pub private_key_file: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        let image = 25 * MIB;
        let allowed_types = [
            ("image/jpeg", image),
            ("image/png", image),
            ("image/gif", image),
            ("image/webp", image),
            ("video/mp4", 1024 * MIB),
            ("video/quicktime", 1024 * MIB),
            ("video/webm", 1024 * MIB),
            ("audio/mpeg", 100 * MIB),
            ("audio/mp4", 100 * MIB),
            ("audio/ogg", 100 * MIB),
            ("application/pdf", 100 * MIB),
            ("application/zip", 100 * MIB),
        ]
        .into_iter()
        .map(|(mime, size)| (mime.to_owned(), size))
        .collect();
        Self {
            listen: "127.0.0.1:7730".into(),
            store: StoreBackend::Sqlite,
            database: None,
            s3: S3Options::default(),
            allowed_types,
            inline_types: ["image/jpeg", "image/png", "image/gif", "image/webp", "video/mp4", "video/webm"]
                .into_iter()
                .map(str::to_owned)
                .collect(),
            upload_url_ttl: Duration::from_secs(15 * 60),
            multipart_threshold_bytes: 16 * MIB,
            max_part_bytes: 64 * MIB,
            quota_bytes: 10 * 1024 * MIB,
            tickets_per_minute: 60,
            pending_ttl: Duration::from_secs(24 * 3600),
            sweep_interval: Duration::from_secs(600),
            images: ImageOptions::default(),
            download_url_ttl: Duration::from_secs(300),
            cdn: CdnOptions::default(),
        }
    }
}

impl Default for S3Options {
    fn default() -> Self {
        Self {
            embedded: false,
            embedded_listen: "127.0.0.1:7739".into(),
            embedded_origin_secret: String::new(),
            endpoint: String::new(),
            public_endpoint: String::new(),
            region: "us-east-1".into(),
            bucket: "messenger-media".into(),
            force_path_style: true,
            access_key_id: String::new(),
            secret_access_key: String::new(),
            create_bucket: false,
            pending_prefix: "pending/".into(),
            request_timeout: Duration::from_secs(30),
        }
    }
}

impl Default for ImageOptions {
    fn default() -> Self {
        Self {
            max_pixels: 50_000_000,
            max_decode_bytes: 256 * MIB,
            max_concurrent_decodes: 2,
            thumbnail_size: 320,
            jpeg_quality: 85,
        }
    }
}

impl Default for CdnOptions {
    fn default() -> Self {
        Self {
            mode: CdnMode::None,
            base_url: String::new(),
            secret: String::new(),
            secret_file: None,
            key_pair_id: String::new(),
            private_key_file: None,
        }
    }
}

/// Types that can run script in a browser: never served inline.
pub fn is_scriptable(mime: &str) -> bool {
    let mime = mime.to_ascii_lowercase();
    mime.contains("svg") || mime.contains("html") || mime.contains("xml") || mime.contains("javascript")
}

impl Options {
    pub fn validate(&self) -> Result<(), String> {
        if self.allowed_types.is_empty() {
            return Err("media.allowed_types must list at least one type".into());
        }
        for (mime, size) in &self.allowed_types {
            if *size == 0 {
                return Err(format!("media.allowed_types.\"{mime}\" must be positive"));
            }
        }
        if let Some(mime) = self.inline_types.iter().find(|mime| is_scriptable(mime)) {
            return Err(format!("media.inline_types may not list {mime}: it can run script in a browser"));
        }
        if self.multipart_threshold_bytes < MIN_PART_BYTES {
            return Err(format!("media.multipart_threshold_bytes must be at least {MIN_PART_BYTES}"));
        }
        if self.max_part_bytes < MIN_PART_BYTES {
            return Err(format!("media.max_part_bytes must be at least {MIN_PART_BYTES}"));
        }
        if self.upload_url_ttl.is_zero() || self.upload_url_ttl > Duration::from_secs(7 * 24 * 3600) {
            return Err("media.upload_url_ttl must be between 1s and 7 days (SigV4's limit)".into());
        }
        if self.download_url_ttl.is_zero() || self.download_url_ttl > Duration::from_secs(7 * 24 * 3600) {
            return Err("media.download_url_ttl must be between 1s and 7 days".into());
        }
        if self.pending_ttl < self.upload_url_ttl {
            return Err("media.pending_ttl must be at least media.upload_url_ttl (a working URL would upload into a swept slot)".into());
        }
        if self.sweep_interval.is_zero() {
            return Err("media.sweep_interval must be positive".into());
        }
        if self.tickets_per_minute == 0 {
            return Err("media.tickets_per_minute must be positive".into());
        }
        if self.images.max_concurrent_decodes == 0 || self.images.thumbnail_size == 0 {
            return Err("media.images.max_concurrent_decodes and thumbnail_size must be positive".into());
        }
        if !(1..=100).contains(&self.images.jpeg_quality) {
            return Err("media.images.jpeg_quality must be between 1 and 100".into());
        }
        if self.s3.bucket.is_empty() {
            return Err("media.s3.bucket must be set".into());
        }
        if !self.s3.pending_prefix.ends_with('/') || self.s3.pending_prefix.len() < 2 {
            return Err("media.s3.pending_prefix must be a folder such as \"pending/\"".into());
        }
        if self.s3.access_key_id.is_empty() != self.s3.secret_access_key.is_empty() {
            return Err("media.s3.access_key_id and secret_access_key are set together".into());
        }
        match self.cdn.mode {
            CdnMode::None => {}
            CdnMode::Hmac => {
                if self.cdn.base_url.is_empty() || (self.cdn.secret.is_empty() && self.cdn.secret_file.is_none()) {
                    return Err(
                        "media.cdn.mode = \"hmac\" needs media.cdn.base_url and a secret (secret or secret_file)"
                            .into(),
                    );
                }
            }
            CdnMode::Cloudfront => {
                if self.cdn.base_url.is_empty()
                    || self.cdn.key_pair_id.is_empty()
                    || self.cdn.private_key_file.is_none()
                {
                    return Err(
                        "media.cdn.mode = \"cloudfront\" needs base_url, key_pair_id and private_key_file".into()
                    );
                }
            }
        }
        Ok(())
    }

    /// Largest size allowed for `mime`, if it may be uploaded at all.
    pub fn max_size(&self, mime: &str) -> Option<u64> {
        self.allowed_types.get(mime).copied()
    }

    pub fn is_inline(&self, mime: &str) -> bool {
        !is_scriptable(mime) && self.inline_types.iter().any(|inline| inline == mime)
    }
}
