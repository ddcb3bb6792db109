//! The gateway's configuration.

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::limits::{Rate, RateLimits};

/// Renewing more often than this only loads presence.
const MIN_PRESENCE_RENEW_INTERVAL: Duration = Duration::from_millis(10);

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// Client-facing gRPC address (Connect stream and unary API).
    pub listen: String,
    /// Internal address for `Deliver`; never expose it to clients.
    pub internal_listen: String,
    /// Address other services use to reach `internal_listen`; defaults to the bound address.
    pub advertise_internal: Option<String>,
    /// Instance id registered with presence; defaults to a new UUID per start.
    pub gateway_id: Option<String>,
    /// Most concurrent Connect streams on this instance.
    pub max_sessions: usize,
    /// Server frames queued per session before the client counts as slow.
    pub session_queue_depth: usize,
    /// Live messages waiting per session; beyond it the session re-syncs from its
    /// cursor instead of buffering more.
    pub inbox_depth: usize,
    /// Sends a session may have awaiting their ack; more are read only as acks return.
    pub max_inflight_sends: usize,
    /// Sends this gateway may have in flight on its stream to one
    /// message-service instance (all sessions together); more wait for a slot.
    pub send_stream_max_inflight: usize,
    /// A client that sends no Hello within this is disconnected.
    #[serde(with = "humantime_serde")]
    pub hello_timeout: Duration,
    /// A client that leaves its queue full for this long is disconnected (it resumes later).
    #[serde(with = "humantime_serde")]
    pub slow_consumer_timeout: Duration,
    /// Messages fetched per sync call.
    pub sync_page: u32,
    /// How often a session looks again for seqs it holds live messages back
    /// behind (a store whose concurrent writers land out of order, or a
    /// writer that died after taking a seq): the gap fills, or is declared
    /// lost, without waiting for the conversation's next message.
    #[serde(with = "humantime_serde")]
    pub gap_retry_interval: Duration,
    /// How often, at most, the sessions' delivered acks go to the message
    /// service, together: an ack waits at most this long, and no timer runs
    /// while none waits.
    #[serde(with = "humantime_serde")]
    pub ack_flush_interval: Duration,
    /// Cursors per ack-flush request; a larger flush goes out in several.
    pub ack_flush_max_cursors: usize,
    /// Sustained sends per second one user may make through this gateway
    /// (all of the user's devices together); beyond it a send is answered
    /// with RESOURCE_EXHAUSTED and the stream stays open.
    pub sends_per_second: u32,
    /// Sends a user may make in a burst above the sustained rate.
    pub send_burst: u32,
    /// Typing indicators one user may send per second (burst twice that);
    /// extra ones are dropped: they are hints, not data.
    pub typing_per_second: u32,
    /// How often this gateway renews the presence leases of all its sessions
    /// (one call). Must be well below `presence.session_ttl`, or sessions of a
    /// healthy gateway expire between renewals.
    #[serde(with = "humantime_serde")]
    pub presence_renew_interval: Duration,
    /// Per-user and per-address limits of every other public call.
    pub rate_limits: RateLimits,
    /// The port browsers use.
    pub web: WebOptions,
}

/// The browser port: the web app at `/`, the session stream as a WebSocket
/// at `/v1/stream` and the unary API as gRPC-Web, on HTTP/1.1 (TLS when the
/// public port has it), under the same limits as the gRPC port.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebOptions {
    /// Where the browser port listens; empty turns it off.
    pub listen: String,
    /// Origins (`https://chat.example.com`) whose pages may open a stream
    /// or call the API besides the port's own; a request from any other
    /// origin is refused with 403. Requests without `Origin` (not from a
    /// browser) pass: the token is what authenticates.
    pub allowed_origins: Vec<String>,
    /// Serve the web app at `/` (off: the port carries only the API).
    pub serve_app: bool,
}

impl Default for WebOptions {
    fn default() -> Self {
        Self { listen: "127.0.0.1:7780".into(), allowed_origins: Vec::new(), serve_app: true }
    }
}

impl WebOptions {
    fn validate(&self) -> Result<(), String> {
        for origin in &self.allowed_origins {
            let valid = (origin.starts_with("https://") || origin.starts_with("http://"))
                && !origin.ends_with('/')
                && origin.split("://").nth(1).is_some_and(|host| !host.is_empty() && !host.contains('/'));
            if !valid {
                return Err(format!(
                    "gateway.web.allowed_origins: {origin:?} is not an origin (scheme://host[:port], no path)"
                ));
            }
        }
        Ok(())
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7700".into(),
            internal_listen: "127.0.0.1:7701".into(),
            advertise_internal: None,
            gateway_id: None,
            max_sessions: 200_000,
            session_queue_depth: 256,
            inbox_depth: 1024,
            max_inflight_sends: 64,
            send_stream_max_inflight: 1024,
            hello_timeout: Duration::from_secs(10),
            slow_consumer_timeout: Duration::from_secs(10),
            sync_page: 200,
            gap_retry_interval: Duration::from_millis(500),
            ack_flush_interval: Duration::from_millis(20),
            ack_flush_max_cursors: 4096,
            sends_per_second: 20,
            send_burst: 50,
            typing_per_second: 2,
            presence_renew_interval: Duration::from_secs(10),
            rate_limits: RateLimits::default(),
            web: WebOptions::default(),
        }
    }
}

impl Options {
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("gateway.max_sessions", self.max_sessions),
            ("gateway.session_queue_depth", self.session_queue_depth),
            ("gateway.inbox_depth", self.inbox_depth),
            ("gateway.max_inflight_sends", self.max_inflight_sends),
            ("gateway.send_stream_max_inflight", self.send_stream_max_inflight),
            ("gateway.sync_page", self.sync_page as usize),
            ("gateway.ack_flush_max_cursors", self.ack_flush_max_cursors),
            ("gateway.sends_per_second", self.sends_per_second as usize),
            ("gateway.send_burst", self.send_burst as usize),
            ("gateway.typing_per_second", self.typing_per_second as usize),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(format!("{key} must be positive"));
            }
        }
        if self.hello_timeout.is_zero() || self.slow_consumer_timeout.is_zero() || self.ack_flush_interval.is_zero() {
            return Err("gateway.hello_timeout and gateway.slow_consumer_timeout must be positive".into());
        }
        if self.gap_retry_interval.is_zero() {
            return Err("gateway.gap_retry_interval must be positive".into());
        }
        self.rate_limits.validate()?;
        self.web.validate()?;
        if self.presence_renew_interval < MIN_PRESENCE_RENEW_INTERVAL {
            return Err(format!(
                "gateway.presence_renew_interval must be at least {}ms",
                MIN_PRESENCE_RENEW_INTERVAL.as_millis()
            ));
        }
        Ok(())
    }

    /// Checks the renewal interval against presence's lease length (the
    /// whole-system config knows both; a gateway also warns at run time when
    /// presence reports a shorter lease).
    pub fn validate_renewal(&self, session_ttl: Duration) -> Result<(), String> {
        if self.presence_renew_interval >= session_ttl {
            return Err(format!(
                "gateway.presence_renew_interval ({}ms) must be shorter than presence.session_ttl ({}ms)",
                self.presence_renew_interval.as_millis(),
                session_ttl.as_millis()
            ));
        }
        Ok(())
    }
}
