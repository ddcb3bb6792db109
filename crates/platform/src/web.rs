//! The bootstrap of a port browsers use (HTTP/1.1 with WebSocket upgrades):
//! the same per-address connection cap, first-byte and idle deadlines and TLS as the
//! gRPC ports (`server.rs`), and a drain bounded by `server.drain_grace`.
//!
//! Handlers learn the client's address from [`Peer`] (axum's `ConnectInfo`).

use std::{net::SocketAddr, time::Duration};

use axum::{Router, extract::connect_info::Connected, serve::IncomingStream};
use futures::{StreamExt, stream::BoxStream};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_util::{either::Either, sync::CancellationToken};
use tracing::{info, warn};

use crate::{
    connections::{CallsLayer, Guarded},
    server::{Error, ServerOptions, local_addr},
    tls::ServerTls,
};

/// One accepted connection, TLS or not.
pub type Connection = Either<TlsStream<Guarded<TcpStream>>, Guarded<TcpStream>>;

/// The client address of a request (`ConnectInfo<Peer>`).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

/// Accepted connections, as axum's `serve` takes them.
struct Accepted {
    connections: BoxStream<'static, (Connection, SocketAddr)>,
    local: SocketAddr,
}

impl axum::serve::Listener for Accepted {
    type Io = Connection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Connection, SocketAddr) {
        match self.connections.next().await {
            Some(accepted) => accepted,
            // The listener stopped (shutdown): nothing more to accept.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

impl Connected<IncomingStream<'_, Accepted>> for Peer {
    fn connect_info(stream: IncomingStream<'_, Accepted>) -> Self {
        Peer(*stream.remote_addr())
    }
}

/// Serves `router` on `listener` (over `tls` when given) until `shutdown`
/// is cancelled, then lets requests finish for at most `options.drain_grace`.
/// Upgraded connections (WebSockets) are the handlers' to end on shutdown.
pub async fn serve(
    name: &'static str,
    options: &ServerOptions,
    listener: TcpListener,
    tls: Option<ServerTls>,
    router: Router,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let local = local_addr(&listener);
    info!(server = name, address = %local, tls = tls.is_some(), "listening");
    let connections = options.connections(true);
    // A request holds its connection open until its response ends; a
    // WebSocket keeps it by its own pings.
    let router = router.layer(CallsLayer::new(connections.clone(), |extensions| {
        extensions.get::<axum::extract::ConnectInfo<Peer>>().map(|info| info.0.0)
    }));
    let connections: BoxStream<'static, (Connection, SocketAddr)> = match tls {
        Some(tls) => tls
            .incoming(listener, options.keepalive_interval, connections, shutdown.clone())
            .filter_map(|accepted| async move {
                let tls = accepted.ok()?;
                let peer = tls.get_ref().0.get_ref().peer_addr().ok()?;
                Some((Either::Left(tls), peer))
            })
            .boxed(),
        None => tonic::transport::server::TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(options.keepalive_interval))
            .take_until(shutdown.clone().cancelled_owned())
            .filter_map(move |accepted| {
                let admitted = accepted.ok().and_then(|stream| {
                    let peer = stream.peer_addr().ok()?;
                    let slot = connections.admit(peer)?;
                    Some((Either::Right(Guarded::new(stream, slot)), peer))
                });
                std::future::ready(admitted)
            })
            .boxed(),
    };
    let stop = shutdown.clone();
    let server = axum::serve(Accepted { connections, local }, router.into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown(async move { stop.cancelled().await });
    let grace: Duration = options.drain_grace;
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = server => {
            result.map_err(|source| Error::Bind { address: local.to_string(), source })?;
            info!(server = name, "stopped");
        }
        () = deadline => warn!(server = name, grace_ms = grace.as_millis() as u64, "drain grace elapsed, closing remaining requests"),
    }
    Ok(())
}
