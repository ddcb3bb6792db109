//! The browser port (`gateway.web`): browsers cannot open a bidirectional
//! gRPC stream, so this port carries the same API in forms they can speak,
//! on HTTP/1.1:
//!
//! - `GET /v1/stream`: the `Connect` session as a WebSocket (`websocket.rs`),
//!   one protobuf `ClientFrame` / `ServerFrame` per binary message;
//! - `POST /messenger.v1.GatewayService/*`: the unary calls as gRPC-Web
//!   (`tonic-web`), behind the same token check, limits and metrics;
//! - `GET /`, `/app.js`, `/app.css`: the web app (`web/`, built into the
//!   binary), when `serve_app` is on;
//! - `POST /v1/dev-token`: a development token for a user id, only while the
//!   process runs with the development key (`messenger up`).
//!
//! A request whose `Origin` is neither this port's own nor in
//! `allowed_origins` is refused (403) before anything else; the allowed
//! other origins also get CORS answers for gRPC-Web.

use std::{collections::HashSet, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{ConnectInfo, Request, State, WebSocketUpgrade},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use messenger_platform::{
    auth::{AuthOptions, Verifier, mint_hs256},
    server::{ServerOptions, rpc_metrics_layer},
    web::Peer,
};
use messenger_proto::v1::gateway_service_server::GatewayServiceServer;
use serde::{Deserialize, Serialize};
use tonic::{service::interceptor::InterceptedService, transport::server::TcpConnectInfo};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::{Context, api, websocket};

/// The WebSocket subprotocol of the session stream.
pub(crate) const SUBPROTOCOL: &str = "messenger.v1";

/// What a WebSocket reads at a time. tungstenite allocates its read buffer
/// up front, 128 KiB by default: an idle browser session then cost 3.7x a
/// gRPC one (`messenger bench`). Client frames are small; a larger one is
/// read in several turns, up to `server.max_message_bytes`.
const READ_BUFFER_BYTES: usize = 4 * 1024;

/// How long a development token from `/v1/dev-token` lives.
const DEV_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// The web app: its page and style as written, its script as `web/build.sh` bundles it.
const INDEX_HTML: &[u8] = include_bytes!("../../../web/src/index.html");
const APP_JS: &[u8] = include_bytes!("../../../web/dist/app.js");
const APP_CSS: &[u8] = include_bytes!("../../../web/src/app.css");

/// What the page may load and connect to: itself, its stream, and media
/// from wherever storage or the CDN serves it (presigned URLs).
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' blob: data: http: https:; \
     connect-src 'self' ws: wss: http: https:; style-src 'self'; script-src 'self'; frame-ancestors 'none'";

/// What the browser port's handlers share.
pub(crate) struct Web {
    pub context: Arc<Context>,
    pub verifier: Verifier,
    /// Set only while the process runs with the development key.
    pub dev_auth: Option<AuthOptions>,
    /// `server.max_message_bytes`: the largest WebSocket message read.
    pub max_message_bytes: usize,
    liveness: websocket::Liveness,
    origins: Origins,
}

impl Web {
    pub(crate) fn new(
        context: Arc<Context>,
        verifier: Verifier,
        dev_auth: Option<AuthOptions>,
        server: &ServerOptions,
        tls: bool,
    ) -> Self {
        let origins = Origins {
            allowed: context.options.web.allowed_origins.iter().map(|origin| origin.to_ascii_lowercase()).collect(),
            scheme: if tls { "https" } else { "http" },
        };
        let liveness = websocket::Liveness {
            ping_every: server.keepalive_interval,
            answer_within: server.keepalive_timeout,
            write_within: context.options.slow_consumer_timeout,
        };
        Self { context, verifier, dev_auth, max_message_bytes: server.max_message_bytes, liveness, origins }
    }
}

/// Which pages may use this port.
struct Origins {
    allowed: HashSet<String>,
    /// This port's own scheme: a page it served has origin `scheme://Host`.
    scheme: &'static str,
}

impl Origins {
    fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(origin) = headers.get(header::ORIGIN) else { return true };
        let Ok(origin) = origin.to_str().map(str::to_ascii_lowercase) else { return false };
        if self.allowed.contains(&origin) {
            return true;
        }
        let host = headers.get(header::HOST).and_then(|host| host.to_str().ok());
        host.is_some_and(|host| origin == format!("{}://{}", self.scheme, host.to_ascii_lowercase()))
    }
}

/// The browser port's routes.
pub(crate) fn router(web: Arc<Web>) -> Router {
    let max_message_bytes = web.max_message_bytes;
    let grpc = GatewayServiceServer::new(api::Adapter { context: web.context.clone() })
        .max_decoding_message_size(max_message_bytes);
    let grpc = InterceptedService::new(grpc, api::interceptor(&web.context, &web.verifier));
    let grpc_web = tower::ServiceBuilder::new()
        .layer(cors(&web.context.options.web.allowed_origins))
        .layer(tonic_web::GrpcWebLayer::new())
        .layer(rpc_metrics_layer("gateway-web"))
        .map_request(with_peer_address)
        .map_response(|response: axum::http::Response<_>| response.map(tonic::body::Body::new))
        .service(grpc);
    let mut router = Router::new()
        .route("/v1/stream", get(stream))
        .route("/v1/dev-token", post(dev_token))
        .route_service("/messenger.v1.GatewayService/{method}", grpc_web);
    if web.context.options.web.serve_app {
        router = router
            .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
            .route("/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
            .route("/app.css", get(|| async { asset("text/css; charset=utf-8", APP_CSS) }));
    }
    router.layer(middleware::from_fn_with_state(web.clone(), check_origin)).with_state(web)
}

/// CORS answers for the other allowed origins' gRPC-Web calls.
fn cors(allowed: &[String]) -> CorsLayer {
    // Browsers send origins in lower case (as `Origins` compares them).
    let origins = allowed.iter().filter_map(|origin| HeaderValue::from_str(&origin.to_ascii_lowercase()).ok());
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::POST])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            "x-grpc-web".parse().expect("valid header name"),
            "x-user-agent".parse().expect("valid header name"),
            "grpc-timeout".parse().expect("valid header name"),
        ])
        .expose_headers([
            "grpc-status".parse().expect("valid header name"),
            "grpc-message".parse().expect("valid header name"),
            "grpc-status-details-bin".parse().expect("valid header name"),
        ])
        .max_age(Duration::from_secs(600))
}

/// tonic reads the client's address (the per-address limits) from its own
/// connection info; this port's comes from axum.
fn with_peer_address<B>(mut request: axum::http::Request<B>) -> axum::http::Request<B> {
    if let Some(ConnectInfo(Peer(peer))) = request.extensions().get::<ConnectInfo<Peer>>().copied() {
        request.extensions_mut().insert(TcpConnectInfo { local_addr: None, remote_addr: Some(peer) });
    }
    request
}

async fn check_origin(State(web): State<Arc<Web>>, request: Request, next: Next) -> Response {
    if !web.origins.allows(request.headers()) {
        return (StatusCode::FORBIDDEN, "this origin may not use this server (gateway.web.allowed_origins)\n")
            .into_response();
    }
    next.run(request).await
}

fn asset(content_type: &'static str, body: &'static [u8]) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        ],
        body,
    )
        .into_response()
}

async fn stream(
    State(web): State<Arc<Web>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    upgrade: WebSocketUpgrade,
) -> Response {
    upgrade
        .protocols([SUBPROTOCOL])
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(web.max_message_bytes)
        .max_frame_size(web.max_message_bytes)
        .on_upgrade(move |socket| websocket::run(web.context.clone(), web.verifier.clone(), web.liveness, peer, socket))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DevTokenRequest {
    user_id: String,
}

#[derive(Serialize)]
struct DevTokenResponse {
    token: String,
}

/// A development token, so a browser can sign in to `messenger up` by name.
/// Only to pages that name a loopback host: a site whose name an attacker
/// re-points at 127.0.0.1 (DNS rebinding) is same-origin with itself, not
/// with `localhost`, and gets none.
async fn dev_token(State(web): State<Arc<Web>>, headers: HeaderMap, Json(request): Json<DevTokenRequest>) -> Response {
    let Some(auth) = &web.dev_auth else {
        return (StatusCode::NOT_FOUND, "development tokens are off: this server verifies real tokens\n")
            .into_response();
    };
    let host = headers.get(header::HOST).and_then(|host| host.to_str().ok()).unwrap_or_default();
    if !loopback_host(host) {
        return (StatusCode::FORBIDDEN, "development tokens go only to pages of localhost or a loopback address\n")
            .into_response();
    }
    let user = request.user_id.trim();
    if user.is_empty() || user.len() > 128 || user.chars().any(char::is_control) {
        return (StatusCode::BAD_REQUEST, "user_id must be 1 to 128 printable bytes\n").into_response();
    }
    match mint_hs256(auth, user, DEV_TOKEN_TTL) {
        Ok(token) => Json(DevTokenResponse { token }).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")).into_response(),
    }
}

/// Whether a `Host` header (with or without a port) names this machine.
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::loopback_host;

    #[test]
    fn only_loopback_hosts_get_development_tokens() {
        for host in ["localhost", "LOCALHOST:7780", "127.0.0.1:7780", "127.1.2.3", "[::1]:7780", "[::1]"] {
            assert!(loopback_host(host), "{host}");
        }
        for host in [
            "",
            "evil.example.com",
            "evil.example.com:7780",
            "10.0.0.1:7780",
            "[2001:db8::1]:7780",
            "localhost.evil.com",
        ] {
            assert!(!loopback_host(host), "{host}");
        }
    }
}
