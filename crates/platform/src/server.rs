//! The bootstrap every gRPC server uses: explicit HTTP/2 limits, TLS or
//! mutual TLS with per-role authorization, health and reflection, and a
//! graceful drain bounded by a grace period.

use std::{net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{service::Routes, transport::server::TcpIncoming};
use tower::util::BoxCloneSyncService;

use crate::{
    authorize::{AuthorizeLayer, Callers, Rules},
    connections::{CallsLayer, Connections, Guarded, grpc_peer},
    metrics::RpcMetricsLayer,
    tls::ServerTls,
};
use tonic_health::ServingStatus;
use tracing::{info, warn};

/// HTTP/2 and drain limits, shared by every server of the process.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerOptions {
    /// Concurrent HTTP/2 streams one connection may open.
    pub max_concurrent_streams: u32,
    /// Largest HTTP/2 frame payload accepted, in bytes (16 KiB ..= 16 MiB).
    pub max_frame_size: u32,
    /// Largest encoded gRPC message a client may send to the public API, in bytes.
    pub max_message_bytes: usize,
    /// Largest encoded gRPC message accepted on internal APIs (sync pages and
    /// Deliver batches between services), in bytes.
    pub internal_max_message_bytes: usize,
    /// Largest header block accepted, in bytes.
    pub max_header_list_size: u32,
    /// Remotely reset streams tolerated in the accept queue before GOAWAY
    /// (guards against rapid-reset floods).
    pub max_pending_reset_streams: usize,
    /// HTTP/2 PING interval on idle connections.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// Close the connection when a PING is not answered within this.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// How long in-flight calls may take to finish after shutdown starts.
    #[serde(with = "humantime_serde")]
    pub drain_grace: Duration,
    /// Open connections one client address may hold on one port, TLS
    /// handshakes included; further ones are closed at once.
    pub max_connections_per_address: usize,
    /// A connection that sends nothing (no TLS ClientHello, no HTTP/2
    /// preface) within this after being accepted is closed.
    #[serde(with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// On public ports, a connection with no call open for this long is
    /// closed: an HTTP/2 connection that opens no stream after its preface,
    /// a keep-alive connection nobody uses. Clients reconnect when they next call.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 128,
            max_frame_size: 64 * 1024,
            max_message_bytes: 256 * 1024,
            internal_max_message_bytes: 64 * 1024 * 1024,
            max_header_list_size: 16 * 1024,
            max_pending_reset_streams: 32,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            drain_grace: Duration::from_secs(10),
            max_connections_per_address: 256,
            first_byte_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
        }
    }
}

impl ServerOptions {
    /// The bounds on one port's connections these options set. Internal
    /// ports have no idle timeout: with cluster TLS nobody unauthenticated
    /// gets as far as HTTP/2 there, and a `Deliver` racing the close of an
    /// idle connection would be lost.
    pub fn connections(&self, public: bool) -> Connections {
        let idle = public.then_some(self.idle_timeout);
        Connections::new(self.max_connections_per_address, self.first_byte_timeout, idle)
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(16_384..=16_777_215).contains(&self.max_frame_size) {
            return Err("server.max_frame_size must be between 16384 and 16777215".into());
        }
        if self.max_concurrent_streams == 0 {
            return Err("server.max_concurrent_streams must be positive".into());
        }
        if self.max_message_bytes < 1024 || self.internal_max_message_bytes < 1024 {
            return Err("server.max_message_bytes and server.internal_max_message_bytes must be at least 1024".into());
        }
        if self.max_connections_per_address == 0 || self.first_byte_timeout.is_zero() || self.idle_timeout.is_zero() {
            return Err(
                "server.max_connections_per_address, server.first_byte_timeout and server.idle_timeout must be positive"
                    .into(),
            );
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot bind {address}: {source}")]
    Bind { address: String, source: std::io::Error },
    #[error("server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection setup failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("cannot reach a dependency: {0}")]
    Discovery(#[from] crate::discovery::Error),
}

/// Binds a listener; `port 0` picks a free port (what tests do).
pub async fn bind(address: &str) -> Result<TcpListener, Error> {
    TcpListener::bind(address).await.map_err(|source| Error::Bind { address: address.to_owned(), source })
}

/// The address a listener actually bound.
pub fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener.local_addr().expect("bound listener has an address")
}

/// A bound listener and how it is protected.
pub struct Port {
    listener: TcpListener,
    tls: Option<ServerTls>,
    /// `Some` on internal ports: reflection lists every service, and with
    /// mutual TLS each call is checked against these rules.
    callers: Option<Callers>,
    internal: bool,
}

impl Port {
    /// The public port: TLS if configured; reflection lists only `public_service`.
    pub fn public(listener: TcpListener, tls: Option<ServerTls>) -> Self {
        Self { listener, tls, callers: None, internal: false }
    }

    /// An internal port: with cluster TLS, only callers whose certificate
    /// carries a role that `rules` grant may call.
    pub fn internal(listener: TcpListener, tls: Option<ServerTls>, rules: Rules) -> Self {
        let callers = tls.as_ref().map(|tls| Callers::new(tls.domain(), rules));
        Self { listener, tls, callers, internal: true }
    }
}

/// Serves `routes` plus health and reflection on `port` until `shutdown`
/// is cancelled, then drains for at most `options.drain_grace`.
///
/// `service_names` are reported SERVING to health checks while running and
/// NOT_SERVING once draining starts, so load balancers stop sending work.
/// On a public port reflection describes only `service_names` (and health):
/// internal services stay unlisted.
pub async fn serve(
    name: &'static str,
    options: &ServerOptions,
    port: Port,
    routes: Routes,
    service_names: &[&'static str],
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let methods = method_paths(&descriptors_of_all());
    // Callers in this process reach an internal port's routes directly,
    // behind the same metrics and authorization (`local.rs`), from the
    // moment it is served.
    let _local = port.internal.then(|| {
        let layers = tower::ServiceBuilder::new()
            .layer(RpcMetricsLayer::new(name, methods.clone()))
            .layer(AuthorizeLayer::new(port.callers.clone()));
        let routes = BoxCloneSyncService::new(layers.service(routes.clone()));
        crate::local::register(local_addr(&port.listener), routes, shutdown.clone())
    });
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    for service in service_names {
        health_reporter.set_service_status(*service, ServingStatus::Serving).await;
    }
    // Reflection v1, and v1alpha for older tools (Postman, evans).
    let descriptors = reflected_descriptors(port.internal, service_names);
    let reflection = || {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_file_descriptor_set(descriptors.clone())
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        if !port.internal {
            for service in service_names {
                builder = builder.with_service_name(*service);
            }
            builder = builder.with_service_name("grpc.health.v1.Health");
        }
        builder
    };
    let (reflection_v1, reflection_v1alpha) = (reflection().build_v1()?, reflection().build_v1alpha()?);
    let Port { listener, tls, callers, internal } = port;
    let address = local_addr(&listener);
    info!(server = name, %address, tls = tls.is_some(), "listening");

    let drain_started = shutdown.clone();
    let reporter = health_reporter.clone();
    let names = service_names.to_vec();
    let signal = async move {
        drain_started.cancelled().await;
        for service in names {
            reporter.set_service_status(service, ServingStatus::NotServing).await;
        }
    };
    let connections = options.connections(!internal);
    let router = tonic::transport::Server::builder()
        // Outermost: a call holds its connection open until its response ends.
        .layer(CallsLayer::new(connections.clone(), grpc_peer))
        // Refusals by the layers inside are calls too.
        .layer(RpcMetricsLayer::new(name, methods))
        .layer(AuthorizeLayer::new(callers))
        .tcp_nodelay(true)
        .max_concurrent_streams(Some(options.max_concurrent_streams))
        .max_frame_size(Some(options.max_frame_size))
        .http2_max_header_list_size(Some(options.max_header_list_size))
        .http2_max_pending_accept_reset_streams(Some(options.max_pending_reset_streams))
        .http2_keepalive_interval(Some(options.keepalive_interval))
        .http2_keepalive_timeout(Some(options.keepalive_timeout))
        .add_routes(routes)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let server: futures::future::BoxFuture<'_, Result<(), tonic::transport::Error>> = match tls {
        Some(tls) => Box::pin(router.serve_with_incoming_shutdown(
            tls.incoming(listener, options.keepalive_interval, connections, shutdown.clone()),
            signal,
        )),
        // Accepted sockets need TCP_NODELAY themselves: the builder's setting
        // applies only to listeners tonic binds. Without it small frames wait
        // for delayed ACKs (tens of milliseconds).
        None => {
            use futures::StreamExt as _;
            let incoming = TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(options.keepalive_interval))
                .filter_map(move |accepted| {
                    let admitted = match accepted {
                        Ok(stream) => stream
                            .peer_addr()
                            .ok()
                            .and_then(|peer| connections.admit(peer))
                            .map(|slot| Ok(Guarded::new(stream, slot))),
                        Err(error) => Some(Err(error)),
                    };
                    std::future::ready(admitted)
                });
            Box::pin(router.serve_with_incoming_shutdown(incoming, signal))
        }
    };
    tokio::pin!(server);
    let grace = options.drain_grace;
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = &mut server => {
            result?;
            info!(server = name, "stopped");
        }
        () = deadline => warn!(server = name, grace_ms = grace.as_millis() as u64, "drain grace elapsed, closing remaining calls"),
    }
    Ok(())
}

/// The RPC metrics (and unary-call spans) of a server named `name`, for a
/// port served outside [`serve`] (the gateway's gRPC-Web on its browser port).
pub fn rpc_metrics_layer(name: &'static str) -> RpcMetricsLayer {
    RpcMetricsLayer::new(name, method_paths(&descriptors_of_all()))
}

fn descriptors_of_all() -> prost_types::FileDescriptorSet {
    use prost::Message as _;
    prost_types::FileDescriptorSet::decode(messenger_proto::FILE_DESCRIPTOR_SET)
        .expect("the build embeds a valid descriptor set")
}

/// Every RPC path a server of ours can answer (`/package.Service/Method`),
/// with whether each call gets a server span (unary calls; streams trace per
/// frame, and health checks, probes every few seconds, not at all): the
/// messenger services, health and reflection. Metrics name these; any other
/// path is `unknown`.
fn method_paths(set: &prost_types::FileDescriptorSet) -> std::collections::HashMap<String, bool> {
    let mut paths: std::collections::HashMap<String, bool> = set
        .file
        .iter()
        .flat_map(|file| {
            file.service.iter().flat_map(move |service| {
                service.method.iter().map(move |method| {
                    let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                    (path, !(method.client_streaming() || method.server_streaming()))
                })
            })
        })
        .collect();
    paths.extend(
        [
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ]
        .map(|path| (path.to_owned(), false)),
    );
    paths
}

/// The descriptors reflection serves: every messenger file on an internal
/// port; on a public one only the files that define `service_names` and what
/// they import, so internal services are neither listed nor described.
fn reflected_descriptors(internal: bool, service_names: &[&'static str]) -> prost_types::FileDescriptorSet {
    let all = descriptors_of_all();
    if internal {
        return all;
    }
    let defines = |file: &prost_types::FileDescriptorProto, service: &str| {
        file.service.iter().any(|s| format!("{}.{}", file.package(), s.name()) == service)
    };
    let mut wanted: Vec<String> = all
        .file
        .iter()
        .filter(|file| service_names.iter().any(|service| defines(file, service)))
        .map(|file| file.name().to_owned())
        .collect();
    let mut index = 0;
    while index < wanted.len() {
        let file = all.file.iter().find(|file| file.name() == wanted[index]).expect("listed from the set");
        for dependency in &file.dependency {
            if !wanted.contains(dependency) {
                wanted.push(dependency.clone());
            }
        }
        index += 1;
    }
    prost_types::FileDescriptorSet {
        file: all.file.into_iter().filter(|file| wanted.contains(&file.name().to_owned())).collect(),
    }
}
