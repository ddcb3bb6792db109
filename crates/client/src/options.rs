use std::{sync::Arc, time::Duration};

use futures::future::BoxFuture;

use crate::Error;

/// Fetches a fresh token (a callback into the app's sign-in). Called when
/// the gateway ends the stream because the token expired, or refuses it on
/// reconnect; the client then reconnects with the new token, resending what
/// was pending, so nothing is lost or shown twice.
#[derive(Clone)]
pub struct TokenProvider(Arc<dyn Fn() -> BoxFuture<'static, Result<String, String>> + Send + Sync>);

impl TokenProvider {
    pub fn new<F>(fetch: F) -> Self
    where
        F: Fn() -> BoxFuture<'static, Result<String, String>> + Send + Sync + 'static,
    {
        Self(Arc::new(fetch))
    }

    pub(crate) async fn fetch(&self) -> Result<String, String> {
        (self.0)().await
    }
}

impl std::fmt::Debug for TokenProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenProvider")
    }
}

/// TLS to the gateway (endpoints are `https://`).
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// CA certificate(s), PEM, that signed the gateway's certificate; `None`
    /// trusts the public web roots (webpki-roots).
    pub ca_pem: Option<Vec<u8>>,
    /// Name the certificate must be valid for; defaults to the endpoint's host.
    pub server_name: Option<String>,
}

/// How a client connects. [`Options::new`] fills in production defaults.
#[derive(Clone, Debug)]
pub struct Options {
    /// Gateway URL, e.g. `http://127.0.0.1:7700`.
    pub endpoint: String,
    /// Further gateways: after a lost connection the client reconnects to the
    /// next one (round robin), so a dead gateway costs one reconnect. Empty
    /// when `endpoint` is a load balancer.
    pub fallback_endpoints: Vec<String>,
    /// JWT bearer token; its `sub` is the user.
    pub token: String,
    /// Where a fresh token comes from when this one expires (without one,
    /// an expired token ends the client with `Error::Unauthenticated`).
    pub token_provider: Option<TokenProvider>,
    /// TLS settings for `https://` endpoints.
    pub tls: TlsOptions,
    /// Stable per installation; the server keeps this device's delivered cursor.
    pub device_id: String,
    /// First and longest wait between reconnect attempts (jittered, doubling).
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// How long `send` waits for its ack (across reconnects) before `Error::Timeout`.
    pub send_timeout: Duration,
    /// Delivered acks are coalesced and sent at this interval.
    pub ack_interval: Duration,
    /// Application-level ping on the stream; also the HTTP/2 keepalive interval.
    pub ping_interval: Duration,
    pub connect_timeout: Duration,
    /// Events buffered for the app before the client stops reading the stream.
    pub event_buffer: usize,
    /// Sends queued or awaiting acks before `send` waits.
    pub max_pending_sends: usize,
    /// Largest response accepted (history pages), in bytes.
    pub max_response_bytes: usize,
    /// Largest frame `send` puts on the stream, in bytes; keep it at or below the
    /// server's `server.max_message_bytes`. A bigger frame would cost the whole
    /// stream, so it is refused locally with `InvalidArgument`.
    pub max_frame_bytes: usize,
    /// Source address for the connection (None: the system picks). Load tools
    /// use several loopback addresses to get past one address's ephemeral ports.
    pub local_address: Option<std::net::IpAddr>,
    /// Files above this size are uploaded in parts (keep it equal to the
    /// server's `media.multipart_threshold_bytes`).
    pub multipart_threshold_bytes: u64,
    /// Size of each part (at least 5 MiB, at most the server's `media.max_part_bytes`).
    pub multipart_part_bytes: u64,
    /// Attempts per upload or download request to storage before giving up.
    pub transfer_attempts: u32,
    /// Deadline of one request to storage (one PUT, one part, one GET).
    pub transfer_timeout: Duration,
    /// Largest download held in memory: a larger answer is refused
    /// (RESOURCE_EXHAUSTED) before, or as soon as, its bytes pass this.
    pub max_download_bytes: u64,
}

impl Options {
    pub fn new(endpoint: impl Into<String>, token: impl Into<String>, device_id: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            fallback_endpoints: Vec::new(),
            token: token.into(),
            token_provider: None,
            tls: TlsOptions::default(),
            device_id: device_id.into(),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(10),
            send_timeout: Duration::from_secs(30),
            ack_interval: Duration::from_millis(50),
            ping_interval: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(5),
            event_buffer: 4096,
            max_pending_sends: 1024,
            max_response_bytes: 16 * 1024 * 1024,
            max_frame_bytes: 256 * 1024,
            local_address: None,
            multipart_threshold_bytes: 16 * 1024 * 1024,
            multipart_part_bytes: 8 * 1024 * 1024,
            transfer_attempts: 4,
            transfer_timeout: Duration::from_secs(300),
            max_download_bytes: 1024 * 1024 * 1024,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.device_id.is_empty() {
            return Err(Error::InvalidArgument("device_id is required".into()));
        }
        if self.event_buffer == 0 || self.max_pending_sends == 0 {
            return Err(Error::InvalidArgument("event_buffer and max_pending_sends must be positive".into()));
        }
        if self.reconnect_min.is_zero() || self.reconnect_min > self.reconnect_max {
            return Err(Error::InvalidArgument("need 0 < reconnect_min <= reconnect_max".into()));
        }
        if self.max_download_bytes == 0 {
            return Err(Error::InvalidArgument("max_download_bytes must be positive".into()));
        }
        if self.multipart_part_bytes < 5 * 1024 * 1024 || self.transfer_attempts == 0 {
            return Err(Error::InvalidArgument("need multipart_part_bytes >= 5 MiB and transfer_attempts > 0".into()));
        }
        Ok(())
    }
}
