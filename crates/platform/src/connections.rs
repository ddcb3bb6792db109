//! What a server accepts before and between calls, bounded so that sockets
//! nobody uses cannot exhaust it: at most `server.max_connections_per_address`
//! open connections per client address (TLS handshakes included; more are
//! closed at once); a connection that sends nothing within
//! `server.first_byte_timeout` of being accepted (no TLS ClientHello, no
//! HTTP/2 preface) is closed; and on public ports one with no call open for
//! `server.idle_timeout` (an HTTP/2 connection that opens no stream after
//! its preface, a keep-alive connection nobody uses) is closed too, with a
//! moment's grace when bytes arrive as it runs out. An honest client on
//! another address connects as if nothing happened.
//!
//! Calls are counted by [`CallsLayer`], which finds its connection by the
//! client's socket address (unique among a port's open connections): the
//! connection's `ConnectInfo` stays what tonic and axum expect.

use std::{
    collections::HashMap,
    future::Future as _,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::{future::BoxFuture, task::AtomicWaker};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};
use tonic::{
    codegen::http,
    transport::server::{Connected, TcpConnectInfo, TlsConnectInfo},
};
use tower::{Layer, Service};
use tracing::debug;

/// The open connections of one port: how many each client address holds,
/// and the calls open on each.
#[derive(Clone)]
pub struct Connections {
    shared: Arc<Shared>,
}

struct Shared {
    per_address: Mutex<HashMap<IpAddr, usize>>,
    by_peer: Mutex<HashMap<SocketAddr, Arc<Calls>>>,
    limit: usize,
    first_byte_timeout: Duration,
    /// None on ports whose peers are authenticated before they can speak
    /// HTTP/2 (internal ports).
    idle_timeout: Option<Duration>,
}

/// The calls of one connection.
struct Calls {
    open: AtomicUsize,
    /// Upgraded to another protocol (a WebSocket), whose own pings keep it.
    upgraded: AtomicBool,
    /// When the last call ended, or the connection was accepted.
    idle_since: Mutex<Instant>,
    /// The connection's reader, woken when its last call ends to arm its
    /// idle deadline.
    reader: AtomicWaker,
}

impl Calls {
    /// Since when no call has been open, unless one is (or the connection
    /// was upgraded).
    fn idle_since(&self) -> Option<Instant> {
        let idle = self.open.load(Ordering::Acquire) == 0 && !self.upgraded.load(Ordering::Acquire);
        idle.then(|| *self.idle_since.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// How long a connection that has just received bytes is kept past its idle
/// deadline, once per idle period: the bytes may be a request the HTTP
/// layer has read but not yet started as a call.
const IDLE_GRACE: Duration = Duration::from_secs(1);

/// One open connection, counted until dropped.
pub struct Slot {
    shared: Arc<Shared>,
    peer: SocketAddr,
    calls: Arc<Calls>,
}

impl Connections {
    /// At most `limit` connections per address; `first_byte_timeout` and
    /// `idle_timeout` (None: none) as [`Guarded`] applies them.
    pub fn new(limit: usize, first_byte_timeout: Duration, idle_timeout: Option<Duration>) -> Self {
        let shared = Shared {
            per_address: Mutex::default(),
            by_peer: Mutex::default(),
            limit,
            first_byte_timeout,
            idle_timeout,
        };
        Self { shared: Arc::new(shared) }
    }

    /// A slot for one more connection from `peer`, or None when its address
    /// is at the limit.
    pub fn admit(&self, peer: SocketAddr) -> Option<Slot> {
        let address = peer.ip();
        {
            let mut open = self.shared.per_address.lock().unwrap_or_else(|e| e.into_inner());
            let count = open.entry(address).or_insert(0);
            if *count >= self.shared.limit {
                debug!(%address, limit = self.shared.limit, "connection refused: too many from this address");
                return None;
            }
            *count += 1;
        }
        let calls = Arc::new(Calls {
            open: AtomicUsize::new(0),
            upgraded: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
            reader: AtomicWaker::new(),
        });
        // Calls are counted only where an idle timeout reads the count:
        // internal ports skip the lookup on every call.
        if self.shared.idle_timeout.is_some() {
            self.shared.by_peer.lock().unwrap_or_else(|e| e.into_inner()).insert(peer, calls.clone());
        }
        Some(Slot { shared: self.shared.clone(), peer, calls })
    }

    /// Connections open now from `address`.
    pub fn open(&self, address: IpAddr) -> usize {
        self.shared.per_address.lock().unwrap_or_else(|e| e.into_inner()).get(&address).copied().unwrap_or(0)
    }

    /// A call starting on the connection of `peer` (None if it is gone).
    fn call(&self, peer: SocketAddr) -> Option<Call> {
        self.shared.idle_timeout?;
        let calls = self.shared.by_peer.lock().unwrap_or_else(|e| e.into_inner()).get(&peer).cloned()?;
        calls.open.fetch_add(1, Ordering::AcqRel);
        Some(Call { calls })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut open = self.shared.per_address.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(count) = open.get_mut(&self.peer.ip()) {
                *count -= 1;
                if *count == 0 {
                    open.remove(&self.peer.ip());
                }
            }
        }
        if self.shared.idle_timeout.is_none() {
            return;
        }
        let mut by_peer = self.shared.by_peer.lock().unwrap_or_else(|e| e.into_inner());
        if by_peer.get(&self.peer).is_some_and(|calls| Arc::ptr_eq(calls, &self.calls)) {
            by_peer.remove(&self.peer);
        }
    }
}

/// One open call, counted until dropped (with its response body).
struct Call {
    calls: Arc<Calls>,
}

impl Drop for Call {
    fn drop(&mut self) {
        *self.calls.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        if self.calls.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.calls.reader.wake();
        }
    }
}

/// A connection holding its slot, closed (a read error) when nothing
/// arrived within its first-byte deadline, or when no call has been open on
/// it for the idle timeout.
pub struct Guarded<S> {
    inner: S,
    slot: Slot,
    /// Until the first byte arrives.
    first_byte: Option<Pin<Box<Sleep>>>,
    idle: Pin<Box<Sleep>>,
    /// Bytes arrived since the last read that had to wait.
    received: bool,
    /// The idle period (by its start) that had its grace, and its end.
    grace: Option<(Instant, Instant)>,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, slot: Slot) -> Self {
        let first_byte = Some(Box::pin(tokio::time::sleep(slot.shared.first_byte_timeout)));
        let idle = Box::pin(tokio::time::sleep(slot.shared.idle_timeout.unwrap_or(Duration::MAX / 4)));
        Self { inner, slot, first_byte, idle, received: false, grace: None }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Whether a deadline has passed: polled whenever a read would wait, so
    /// the connection's task wakes for it.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<&'static str> {
        if self.first_byte.as_mut().is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready()) {
            return Some("nothing received within server.first_byte_timeout");
        }
        let timeout = self.slot.shared.idle_timeout?;
        let received = std::mem::take(&mut self.received);
        // Registered before reading the count: a call ending after the
        // read wakes this task to arm the deadline.
        self.slot.calls.reader.register(cx.waker());
        let since = self.slot.calls.idle_since()?;
        let deadline = match self.grace {
            Some((period, until)) if period == since => until,
            _ => since + timeout,
        };
        if self.idle.deadline() != deadline {
            self.idle.as_mut().reset(deadline);
        }
        if self.idle.as_mut().poll(cx).is_pending() {
            return None;
        }
        // The HTTP layer reads until it would wait, then starts the calls it
        // read: bytes just in may be a call about to be counted.
        if received && self.grace.is_none_or(|(period, _)| period != since) {
            let until = Instant::now() + IDLE_GRACE;
            self.grace = Some((since, until));
            self.idle.as_mut().reset(until);
            let _ = self.idle.as_mut().poll(cx);
            return None;
        }
        Some("no call open within server.idle_timeout")
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.first_byte = None;
                    this.received = true;
                }
                Poll::Ready(result)
            }
            Poll::Pending => match this.expired(cx) {
                Some(reason) => {
                    debug!(peer = %this.slot.peer, reason, "connection closed");
                    Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, reason)))
                }
                None => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: Connected> Connected for Guarded<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// The client address of a call on a gRPC port (tonic's connect info,
/// with or without TLS).
pub fn grpc_peer(extensions: &http::Extensions) -> Option<SocketAddr> {
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| extensions.get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|info| info.get_ref().remote_addr()))
}

/// Counts each call on its connection from its start until its response
/// body is done or dropped; a response switching protocols (a WebSocket)
/// leaves its connection to that protocol's liveness rules.
#[derive(Clone)]
pub struct CallsLayer {
    connections: Connections,
    peer: fn(&http::Extensions) -> Option<SocketAddr>,
}

impl CallsLayer {
    /// `peer` finds a request's client address in its extensions.
    pub fn new(connections: Connections, peer: fn(&http::Extensions) -> Option<SocketAddr>) -> Self {
        Self { connections, peer }
    }
}

impl<S> Layer<S> for CallsLayer {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Counted { inner, layer: self.clone() }
    }
}

#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    layer: CallsLayer,
}

impl<S, B, R> Service<http::Request<B>> for Counted<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<CallBody<R>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let call = (self.layer.peer)(request.extensions()).and_then(|peer| self.layer.connections.call(peer));
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            if response.status() == http::StatusCode::SWITCHING_PROTOCOLS
                && let Some(call) = &call
            {
                call.calls.upgraded.store(true, Ordering::Release);
            }
            Ok(response.map(|body| CallBody { body, _call: call }))
        })
    }
}

/// A response body that holds its call open until it is done or dropped.
pub struct CallBody<B> {
    body: B,
    _call: Option<Call>,
}

impl<B> http_body::Body for CallBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    fn peer(address: &str, port: u16) -> SocketAddr {
        SocketAddr::new(address.parse().unwrap(), port)
    }

    #[test]
    fn an_address_holds_at_most_its_limit_and_a_closed_connection_frees_its_slot() {
        let connections = Connections::new(2, Duration::from_secs(10), Some(Duration::from_secs(60)));
        let one = "127.0.0.1".parse().unwrap();
        let first = connections.admit(peer("127.0.0.1", 1)).unwrap();
        let _second = connections.admit(peer("127.0.0.1", 2)).unwrap();
        assert!(connections.admit(peer("127.0.0.1", 3)).is_none(), "a third from one address");
        assert!(connections.admit(peer("127.0.0.2", 1)).is_some(), "another address is not affected");
        drop(first);
        assert_eq!(connections.open(one), 1);
        assert!(connections.call(peer("127.0.0.1", 1)).is_none(), "a closed connection takes no calls");
        assert!(connections.admit(peer("127.0.0.1", 1)).is_some());
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed_and_one_that_speaks_is_not() {
        let connections = Connections::new(8, Duration::from_millis(50), Some(Duration::from_secs(60)));
        let (silent, _peer) = tokio::io::duplex(64);
        let mut silent = Guarded::new(silent, connections.admit(peer("127.0.0.1", 1)).unwrap());
        let error = silent.read(&mut [0; 8]).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);

        let (speaking, mut other) = tokio::io::duplex(64);
        let mut speaking = Guarded::new(speaking, connections.admit(peer("127.0.0.1", 2)).unwrap());
        other.write_all(b"PRI").await.unwrap();
        assert_eq!(speaking.read(&mut [0; 8]).await.unwrap(), 3);
        // Past the deadline, once it has spoken, a quiet connection stays.
        tokio::time::sleep(Duration::from_millis(100)).await;
        other.write_all(b"!").await.unwrap();
        assert_eq!(speaking.read(&mut [0; 8]).await.unwrap(), 1);
        drop((silent, speaking));
        assert_eq!(connections.open("127.0.0.1".parse().unwrap()), 0);
    }

    #[tokio::test]
    async fn a_connection_with_no_call_open_for_the_idle_timeout_is_closed_and_one_with_a_call_is_not() {
        let idle = Duration::from_millis(200);
        let connections = Connections::new(8, Duration::from_secs(10), Some(idle));
        let address = peer("127.0.0.1", 1);
        let (io, mut other) = tokio::io::duplex(64);
        let mut connection = Guarded::new(io, connections.admit(address).unwrap());
        other.write_all(b"PRI").await.unwrap();
        assert_eq!(connection.read(&mut [0; 8]).await.unwrap(), 3);

        // A call open past the idle timeout keeps it.
        let call = connections.call(address).unwrap();
        let read = tokio::time::timeout(idle * 3, connection.read(&mut [0; 8])).await;
        assert!(read.is_err(), "closed while a call was open: {read:?}");
        // Its end starts the idle clock; traffic without a call (PINGs)
        // does not reset it.
        drop(call);
        let ended = Instant::now();
        tokio::time::sleep(idle / 2).await;
        other.write_all(b"ping").await.unwrap();
        assert_eq!(connection.read(&mut [0; 8]).await.unwrap(), 4);
        let error = connection.read(&mut [0; 8]).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        let closed_after = ended.elapsed();
        assert!(closed_after >= idle && closed_after < idle * 2, "closed {closed_after:?} after the last call");

        // Bytes read as the deadline passes may be a call the HTTP layer has
        // not started yet: they get a moment, once, then the connection goes.
        for starts_a_call in [true, false] {
            let address = peer("127.0.0.1", if starts_a_call { 3 } else { 4 });
            let (io, mut other) = tokio::io::duplex(64);
            let mut late = Guarded::new(io, connections.admit(address).unwrap());
            other.write_all(b"PRI").await.unwrap();
            assert_eq!(late.read(&mut [0; 8]).await.unwrap(), 3);
            tokio::time::sleep(idle * 2).await;
            other.write_all(b"HEADERS").await.unwrap();
            assert_eq!(late.read(&mut [0; 8]).await.unwrap(), 7);
            let started = Instant::now();
            if starts_a_call {
                let _call = connections.call(address).unwrap();
                let read = tokio::time::timeout(IDLE_GRACE * 2, late.read(&mut [0; 8])).await;
                assert!(read.is_err(), "a call that came in at the deadline lost its connection: {read:?}");
            } else {
                let error = late.read(&mut [0; 8]).await.unwrap_err();
                assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
                let closed_after = started.elapsed();
                assert!(closed_after >= IDLE_GRACE.mul_f32(0.9) && closed_after < IDLE_GRACE * 2, "{closed_after:?}");
            }
        }

        // An upgraded connection (a WebSocket) is left to its protocol.
        let address = peer("127.0.0.1", 2);
        let (io, mut other) = tokio::io::duplex(64);
        let mut upgraded = Guarded::new(io, connections.admit(address).unwrap());
        other.write_all(b"GET").await.unwrap();
        assert_eq!(upgraded.read(&mut [0; 8]).await.unwrap(), 3);
        connections.call(address).unwrap().calls.upgraded.store(true, Ordering::Release);
        assert!(tokio::time::timeout(idle * 3, upgraded.read(&mut [0; 8])).await.is_err());

        // A port without an idle timeout (an internal one) keeps it.
        let internal = Connections::new(8, Duration::from_secs(10), None);
        let (io, mut other) = tokio::io::duplex(64);
        let mut kept = Guarded::new(io, internal.admit(address).unwrap());
        other.write_all(b"PRI").await.unwrap();
        assert_eq!(kept.read(&mut [0; 8]).await.unwrap(), 3);
        assert!(tokio::time::timeout(idle * 3, kept.read(&mut [0; 8])).await.is_err());
    }
}
