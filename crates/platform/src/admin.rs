//! The admin port: plain HTTP for what scrapers and kubelets speak.
//!
//! - `GET /metrics`: every metric of the process (`metrics.rs`), Prometheus text format;
//! - `GET /livez`: 200 while the process runs (a deadlocked runtime does not answer);
//! - `GET /readyz`: 200 while serving (the port opens only once every server
//!   of the process serves), 503 from the moment a drain starts, so load
//!   balancers stop sending work before the gRPC ports close.
//!
//! It carries no user data and no credentials, but it does describe the
//! traffic: keep it on loopback or a cluster-internal address (the Helm
//! chart's NetworkPolicy opens it to the scraper only).

use axum::{Router, http::StatusCode, http::header, response::IntoResponse, routing::get};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminOptions {
    /// Where the admin port listens; empty turns it off.
    pub listen: String,
}

impl Default for AdminOptions {
    fn default() -> Self {
        Self { listen: "127.0.0.1:9464".to_owned() }
    }
}

/// Serves the admin port until `stop`. It starts once every server of the
/// process serves, so it is ready until `draining` (the process's shutdown)
/// is cancelled.
pub async fn serve(
    listener: TcpListener,
    draining: CancellationToken,
    stop: CancellationToken,
) -> Result<(), crate::server::Error> {
    let address = crate::server::local_addr(&listener);
    let router = Router::new()
        .route(
            "/metrics",
            get(|| async {
                ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], crate::metrics::global().render())
            }),
        )
        .route("/livez", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || async move {
                match draining.is_cancelled() {
                    false => (StatusCode::OK, "ready\n").into_response(),
                    true => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response(),
                }
            }),
        );
    info!(server = "admin", %address, "listening");
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
        .map_err(|source| crate::server::Error::Bind { address: address.to_string(), source })
}
