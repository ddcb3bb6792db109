//! Calls between services that one process runs, made without the network.
//!
//! Each internal port [`crate::server::serve`] serves is also registered here
//! under its bound address, as the same routes behind the same layers (RPC
//! metrics, authorization). A [`crate::discovery::ChannelPool`] asked for an
//! address this process serves hands out a [`LocalLink`]: the request goes to
//! those routes as it is, with no TCP, TLS or HTTP/2 framing, no writes to a
//! socket and no task per stream. `messenger up` (every role in one process)
//! is the case this is for: there each message would otherwise cross four
//! loopback connections, each costing a TLS record, HTTP/2 frames and
//! syscalls on both ends.
//!
//! What stays the same as over the network:
//! - **Who may call what.** The caller's identity is the roles its own
//!   cluster certificate names ([`crate::tls::ClientTls::roles`]: the file
//!   this process loaded, not checked against the CA again), carried as a
//!   [`LocalCaller`] extension that [`crate::authorize`] reads as it would a
//!   verified peer certificate. Extensions never cross the wire, so no remote
//!   caller can claim one.
//! - **Deadlines.** The smaller of the call's `grpc-timeout` and the
//!   endpoint's request timeout; past it the call fails with
//!   [`tonic::TimeoutExpired`], which callers map to DEADLINE_EXCEEDED.
//! - **A server that stops.** Once its shutdown starts, new calls are
//!   refused (as a draining server refuses new streams: UNAVAILABLE, the
//!   instance passed over) while calls already running finish. A link finds
//!   the port again at each call, so a server started again at the same
//!   address is reached.
//! - **A handler that panics** before it answers fails its call
//!   (INTERNAL), not the caller.
//!
//! Addresses match exactly as discovery gives them and the port is bound
//! (`127.0.0.1:7710` is not `localhost:7710`). `discovery.in_process =
//! false` turns this off.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::{FutureExt as _, future::BoxFuture};
use tokio_util::sync::CancellationToken;
use tonic::{body::Body, codegen::http};
use tower::{ServiceExt as _, util::BoxCloneSyncService};

use crate::role::Role;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A port's routes with its layers, as one in-process service.
pub type Routes = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, Infallible>;

/// The roles of a caller in this process (the request extension
/// [`crate::authorize`] reads in place of a peer certificate).
#[derive(Clone, Debug)]
pub struct LocalCaller(pub Arc<[Role]>);

#[derive(Clone)]
struct Port {
    id: u64,
    routes: Routes,
    shutdown: CancellationToken,
}

static PORTS: LazyLock<Mutex<HashMap<SocketAddr, Port>>> = LazyLock::new(Mutex::default);
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn ports() -> std::sync::MutexGuard<'static, HashMap<SocketAddr, Port>> {
    PORTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A port's registration: removed when dropped (its server has returned).
#[must_use = "the port is unregistered when this is dropped"]
pub struct Registration {
    address: SocketAddr,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut ports = ports();
        if ports.get(&self.address).is_some_and(|port| port.id == self.id) {
            ports.remove(&self.address);
        }
    }
}

/// Serves `routes` to in-process callers of `address` until `shutdown`
/// starts (calls running then finish) and the registration is dropped.
pub fn register(address: SocketAddr, routes: Routes, shutdown: CancellationToken) -> Registration {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    ports().insert(address, Port { id, routes, shutdown });
    Registration { address, id }
}

/// A link to the port this process serves at `address`, if it serves one.
/// `address` is `host:port`, optionally with an `http://` or `https://` scheme.
pub fn link(address: &str, caller: Option<Arc<[Role]>>, timeout: Duration) -> Option<LocalLink> {
    let bare = address.strip_prefix("http://").or_else(|| address.strip_prefix("https://")).unwrap_or(address);
    let address: SocketAddr = bare.parse().ok()?;
    ports().contains_key(&address).then(|| LocalLink { address, caller: caller.map(LocalCaller), timeout })
}

/// A client channel to a port in this process (see the module docs).
#[derive(Clone)]
pub struct LocalLink {
    address: SocketAddr,
    caller: Option<LocalCaller>,
    timeout: Duration,
}

impl LocalLink {
    pub fn call(&self, mut request: http::Request<Body>) -> BoxFuture<'static, Result<http::Response<Body>, BoxError>> {
        let routes = match ports().get(&self.address) {
            Some(port) if !port.shutdown.is_cancelled() => port.routes.clone(),
            _ => {
                let refused =
                    tonic::Status::unavailable(format!("the in-process server at {} has stopped", self.address));
                return Box::pin(std::future::ready(Err(refused.into())));
            }
        };
        if let Some(caller) = &self.caller {
            request.extensions_mut().insert(caller.clone());
        }
        let timeout = grpc_timeout(request.headers()).map_or(self.timeout, |asked| asked.min(self.timeout));
        let call = std::panic::AssertUnwindSafe(routes.oneshot(request)).catch_unwind();
        Box::pin(async move {
            match tokio::time::timeout(timeout, call).await {
                Ok(Ok(Ok(response))) => Ok(response),
                Ok(Ok(Err(never))) => match never {},
                Ok(Err(_panic)) => Ok(tonic::Status::internal("the handler failed").into_http()),
                Err(_elapsed) => Err(tonic::TimeoutExpired(()).into()),
            }
        })
    }
}

/// The `grpc-timeout` header's deadline (`<digits><unit>`, the gRPC spec's format).
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let split = value.len().checked_sub(1)?;
    let (digits, unit) = value.split_at(split);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::authorize::{AuthorizeLayer, Callers};

    /// Routes that answer OK after `delay` (or panic on `/panic`), behind the
    /// authorization layer: only message instances may call them.
    fn routes(delay: Duration, calls: Arc<AtomicUsize>) -> Routes {
        let handler = tower::service_fn(move |request: http::Request<Body>| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                if request.uri().path() == "/panic" {
                    panic!("handler bug");
                }
                tokio::time::sleep(delay).await;
                Ok::<_, Infallible>(tonic::Status::new(tonic::Code::Ok, "").into_http())
            }
        });
        let callers =
            Callers::new("messenger.internal", vec![("/locate", &[Role::Message]), ("/panic", &[Role::Message])]);
        BoxCloneSyncService::new(
            tower::ServiceBuilder::new().layer(AuthorizeLayer::new(Some(callers))).service(handler),
        )
    }

    fn request(path: &str) -> http::Request<Body> {
        http::Request::builder().uri(format!("http://ignored{path}")).body(Body::empty()).unwrap()
    }

    fn code(response: &http::Response<Body>) -> tonic::Code {
        response.headers().get("grpc-status").map_or(tonic::Code::Ok, |value| tonic::Code::from_bytes(value.as_bytes()))
    }

    #[tokio::test]
    async fn calls_reach_the_registered_port_as_its_callers_roles_allow() {
        let address: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let shutdown = CancellationToken::new();
        let registration = register(address, routes(Duration::ZERO, calls.clone()), shutdown.clone());
        let timeout = Duration::from_secs(5);
        assert!(link("127.0.0.1:2", None, timeout).is_none(), "another port");
        assert!(link("localhost:1", None, timeout).is_none(), "addresses match exactly");

        let message = link("http://127.0.0.1:1", Some(Arc::from([Role::Message])), timeout).unwrap();
        assert_eq!(code(&message.call(request("/locate")).await.unwrap()), tonic::Code::Ok);
        let gateway = link("127.0.0.1:1", Some(Arc::from([Role::Gateway])), timeout).unwrap();
        assert_eq!(code(&gateway.call(request("/locate")).await.unwrap()), tonic::Code::PermissionDenied);
        let nobody = link("127.0.0.1:1", None, timeout).unwrap();
        assert_eq!(code(&nobody.call(request("/locate")).await.unwrap()), tonic::Code::PermissionDenied);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "refused calls never reach the handler");

        // A handler's panic fails its call, not the caller.
        assert_eq!(code(&message.call(request("/panic")).await.unwrap()), tonic::Code::Internal);

        // Stopping: new calls are refused as by a draining server, on links made before too.
        shutdown.cancel();
        let unavailable = |error: BoxError| error.downcast_ref::<tonic::Status>().map(tonic::Status::code);
        assert_eq!(unavailable(message.call(request("/locate")).await.unwrap_err()), Some(tonic::Code::Unavailable));
        drop(registration);
        assert!(link("127.0.0.1:1", None, timeout).is_none(), "unregistered once its server returned");
        assert_eq!(unavailable(message.call(request("/locate")).await.unwrap_err()), Some(tonic::Code::Unavailable));

        // Started again at the same address: a link made before reaches it.
        let _again = register(address, routes(Duration::ZERO, calls.clone()), CancellationToken::new());
        assert_eq!(code(&message.call(request("/locate")).await.unwrap()), tonic::Code::Ok);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_call_past_its_deadline_times_out() {
        let address: SocketAddr = "127.0.0.1:3".parse().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let _registration = register(address, routes(Duration::from_secs(30), calls), CancellationToken::new());
        let caller = Some(Arc::from([Role::Message]));
        // The endpoint's request timeout...
        let link = link("127.0.0.1:3", caller, Duration::from_millis(50)).unwrap();
        let error = link.call(request("/locate")).await.unwrap_err();
        assert!(crate::discovery::timed_out(&*error), "{error}");
        // ...or the call's own, when shorter.
        let mut short = request("/locate");
        short.headers_mut().insert("grpc-timeout", "20m".parse().unwrap());
        let other = super::link("127.0.0.1:3", Some(Arc::from([Role::Message])), Duration::from_secs(60)).unwrap();
        let started = std::time::Instant::now();
        let error = other.call(short).await.unwrap_err();
        assert!(crate::discovery::timed_out(&*error));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn grpc_timeout_reads_every_unit_and_refuses_the_malformed() {
        let parse = |value: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert("grpc-timeout", value.parse().unwrap());
            grpc_timeout(&headers)
        };
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(parse("5"), None);
        assert_eq!(parse("S"), None);
        assert_eq!(parse("5s"), None);
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }
}
