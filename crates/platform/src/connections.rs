//! What a server accepts before any call is made, bounded so that sockets
//! nobody uses cannot exhaust it: at most `server.max_connections_per_address`
//! open connections per client address (TLS handshakes included; more are
//! closed at once), and a connection that sends nothing within
//! `server.first_byte_timeout` of being accepted (no TLS ClientHello, no
//! HTTP/2 preface) is closed. An honest client on another address connects
//! as if nothing happened.

use std::{
    collections::HashMap,
    future::Future as _,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;
use tracing::debug;

/// Open connections per client address.
#[derive(Clone)]
pub struct PerAddress {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    limit: usize,
}

/// One open connection of an address, counted until dropped.
pub struct Slot {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    address: IpAddr,
}

impl PerAddress {
    pub fn new(limit: usize) -> Self {
        Self { open: Arc::default(), limit }
    }

    /// A slot for one more connection from `address`, or None at the limit.
    pub fn admit(&self, address: IpAddr) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(address).or_insert(0);
        if *count >= self.limit {
            debug!(%address, limit = self.limit, "connection refused: too many from this address");
            return None;
        }
        *count += 1;
        Some(Slot { open: self.open.clone(), address })
    }

    /// Connections open now from `address`.
    pub fn open(&self, address: IpAddr) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).get(&address).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.address);
            }
        }
    }
}

/// A connection holding its address's slot, closed (a read error) when
/// nothing arrived within its first-byte deadline.
pub struct Guarded<S> {
    inner: S,
    _slot: Slot,
    /// Until the first byte arrives.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, slot: Slot, first_byte_timeout: Duration) -> Self {
        Self { inner, _slot: slot, deadline: Some(Box::pin(tokio::time::sleep(first_byte_timeout))) }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.deadline = None;
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                let expired = this.deadline.as_mut().is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if expired {
                    Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "nothing received within server.first_byte_timeout",
                    )))
                } else {
                    Poll::Pending
                }
            }
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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[test]
    fn an_address_holds_at_most_its_limit_and_a_closed_connection_frees_its_slot() {
        let limits = PerAddress::new(2);
        let (one, two): (IpAddr, IpAddr) = ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
        let first = limits.admit(one).unwrap();
        let _second = limits.admit(one).unwrap();
        assert!(limits.admit(one).is_none(), "a third from one address");
        assert!(limits.admit(two).is_some(), "another address is not affected");
        drop(first);
        assert_eq!(limits.open(one), 1);
        assert!(limits.admit(one).is_some());
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed_and_one_that_speaks_is_not() {
        let limits = PerAddress::new(8);
        let address: IpAddr = "127.0.0.1".parse().unwrap();
        let (silent, _peer) = tokio::io::duplex(64);
        let mut silent = Guarded::new(silent, limits.admit(address).unwrap(), Duration::from_millis(50));
        let error = silent.read(&mut [0; 8]).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);

        let (speaking, mut peer) = tokio::io::duplex(64);
        let mut speaking = Guarded::new(speaking, limits.admit(address).unwrap(), Duration::from_millis(50));
        peer.write_all(b"PRI").await.unwrap();
        assert_eq!(speaking.read(&mut [0; 8]).await.unwrap(), 3);
        // Past the deadline, once it has spoken, a quiet connection stays.
        tokio::time::sleep(Duration::from_millis(100)).await;
        peer.write_all(b"!").await.unwrap();
        assert_eq!(speaking.read(&mut [0; 8]).await.unwrap(), 1);
        drop((silent, speaking));
        assert_eq!(limits.open(address), 0);
    }
}
