//! The admin port: plain HTTP for what scrapers and kubelets speak.
//!
//! - `GET /metrics`: every metric of the process (`metrics.rs`), Prometheus text format;
//! - `GET /livez`: 200 while the process runs (a deadlocked runtime does not answer);
//! - `GET /readyz`: 200 once every server of the process serves, 503 before
//!   that and from the moment a drain starts, so load balancers stop sending
//!   work before the gRPC ports close.
//!
//! It carries no user data and no credentials, but it does describe the
//! traffic: keep it on loopback or a cluster-internal address (the Helm
//! chart's NetworkPolicy opens it to the scraper only).

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

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

/// Whether the process is ready for traffic (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Serves the admin port until `stop`; readiness turns false as soon as
/// `draining` is cancelled (the process's shutdown).
pub async fn serve(
    listener: TcpListener,
    readiness: Readiness,
    draining: CancellationToken,
    stop: CancellationToken,
) -> Result<(), crate::server::Error> {
    let address = crate::server::local_addr(&listener);
    let ready = readiness.clone();
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
                match ready.is_ready() {
                    true => (StatusCode::OK, "ready\n").into_response(),
                    false => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response(),
                }
            }),
        );
    tokio::spawn(async move {
        draining.cancelled().await;
        readiness.set(false);
    });
    info!(server = "admin", %address, "listening");
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
        .map_err(|source| crate::server::Error::Bind { address: address.to_string(), source })
}
