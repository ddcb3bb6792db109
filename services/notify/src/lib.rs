//! The notify service: push notifications for devices with no live session.
//!
//! After commit, the message service hands over the entries that should
//! notify, with each recipient's online devices. Notify stores one job per
//! offline registered device (the outbox) before it answers, due after a
//! short grace during which a read on another device cancels it; workers
//! deliver due jobs through each platform's provider, retry with backoff,
//! and dead-letter what keeps failing. A read after a push queues a silent
//! retraction. Pushes carry no content unless the device allows previews.
//!
//! Layout:
//! - [`store`]: the `PushStore` trait (devices, mutes, jobs) and its
//!   contract suite; [`sqlite`] the embedded backend, [`scylla`] the one
//!   several instances share.
//! - `service.rs`: registration checks, enqueue, reads; `worker.rs`: the
//!   delivery loop; `breaker.rs`: its circuit per endpoint; `grpc.rs`: the
//!   thin tonic adapter; `options.rs`.
//! - [`providers`]: APNs (HTTP/2, ES256 provider tokens), FCM HTTP v1
//!   (service-account OAuth), Web Push (VAPID, RFC 8291 encryption), the
//!   webhook (Standard Webhooks signatures) and the log provider for
//!   platforms without credentials; [`guard`]: outbound requests to
//!   user-supplied URLs without SSRF.
//!
//! Started as every service is: [`Server::build`] opens the outbox and reads
//! the providers' credentials, then [`Server::serve`] runs the internal gRPC
//! API and the delivery worker until the
//! shutdown token is cancelled.

#![forbid(unsafe_code)]

mod breaker;
mod error;
mod grpc;
pub mod guard;
mod options;
pub mod providers;
pub mod scylla;
mod service;
pub mod sqlite;
pub mod store;
mod worker;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use messenger_platform::{
    authorize,
    discovery::Role,
    server::{self, Port, ServerOptions},
    supervise::Supervisor,
    tls::ServerTls,
};
use messenger_proto::v1::notify_service_server::{NotifyServiceServer, SERVICE_NAME};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

pub use error::{Error, Result};
pub use guard::EgressOptions;
pub use options::{Options, StoreBackend};
pub use service::{ReadOutcome, Service};
pub use worker::backoff;

/// The store `options` ask for: `<data_dir>/notify.db` unless `database`
/// names a file; the Scylla store uses the shared cluster and keyspace
/// (`[scylla]`).
async fn open_store(
    options: &Options,
    data_dir: &Path,
    cluster: &messenger_platform::cql::Cluster,
) -> Result<Arc<dyn store::PushStore>> {
    match options.store {
        StoreBackend::Sqlite => {
            let path = options.database.clone().unwrap_or_else(|| data_dir.join("notify.db"));
            Ok(Arc::new(sqlite::SqliteStore::open(&path)?))
        }
        StoreBackend::Scylla => {
            let retention =
                scylla::Retention { finished: options.finished_retention, dead: options.dead_letter_retention };
            Ok(Arc::new(scylla::ScyllaStore::connect(cluster, retention).await?))
        }
    }
}

/// The providers this process pushes through: each platform whose
/// credentials are configured through its own client (credentials reloaded
/// on change until `shutdown`), the others through the log provider.
fn providers(options: &Options, shutdown: &CancellationToken) -> Result<providers::Providers> {
    let settings = providers::Settings {
        egress: &options.egress,
        apns: &options.apns,
        fcm: &options.fcm,
        web_push: &options.web_push,
        reload_interval: options.credentials_reload_interval,
    };
    providers::build(&settings, shutdown)
}

/// Who may call notify: gateways on behalf of their users (devices,
/// mutes); message instances hand over entries and reads.
fn callers() -> authorize::Rules {
    vec![
        ("/messenger.v1.NotifyService/", &[Role::Gateway]),
        ("/messenger.v1.NotifyService/Enqueue", &[Role::Message]),
        ("/messenger.v1.NotifyService/Read", &[Role::Message]),
    ]
}

/// What the notify service needs from the outside.
pub struct Deps {
    pub server: ServerOptions,
    /// Mutual TLS on the internal port, when the cluster has it.
    pub tls: Option<ServerTls>,
    /// Runs the delivery worker; its panic stops the process. Credentials
    /// are reloaded until it stops (with the token `serve` is given).
    pub supervisor: Supervisor,
    /// Where the SQLite file is when `database` names none.
    pub data_dir: PathBuf,
    /// The cluster of the Scylla store (`[scylla]`).
    pub scylla: messenger_platform::cql::Cluster,
}

/// The notify service with its outbox open and its providers' credentials
/// read, ready to serve.
pub struct Server {
    options: Options,
    deps: Deps,
    store: Arc<dyn store::PushStore>,
    providers: providers::Providers,
}

impl Server {
    /// Opens the outbox `options` name and reads every provider's
    /// credentials: a bad file stops the start.
    pub async fn build(options: Options, deps: Deps) -> Result<Self> {
        let store = open_store(&options, &deps.data_dir, &deps.scylla).await?;
        let providers = providers(&options, &deps.supervisor.stopping())?;
        Ok(Self { options, deps, store, providers })
    }

    /// The outbox this server uses (tests look into it).
    pub fn store(&self) -> Arc<dyn store::PushStore> {
        self.store.clone()
    }

    /// Runs the delivery worker and serves on `listener` until `shutdown`
    /// is cancelled.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::result::Result<(), server::Error> {
        let Self { options, deps, store, providers } = self;
        let wake = Arc::new(worker::Wake::default());
        let worker = worker::Worker {
            store: store.clone(),
            providers: Arc::new(providers),
            options: options.clone(),
            wake: wake.clone(),
            breakers: breaker::Breakers::new(options.circuit_failures, options.circuit_open),
        };
        deps.supervisor.spawn("push delivery", worker.run(shutdown.clone()));
        deps.supervisor
            .spawn("outbox maintenance", worker::Worker::maintain(store.clone(), options.clone(), shutdown.clone()));
        let service = Arc::new(Service::new(store, options, wake));
        let api = NotifyServiceServer::new(grpc::Adapter { service })
            .max_decoding_message_size(deps.server.internal_max_message_bytes);
        let port = Port::internal(listener, deps.tls, callers());
        server::serve("notify", &deps.server, port, Routes::new(api), &[SERVICE_NAME], shutdown).await
    }
}
