//! The message service: conversations, sends with dense per-conversation
//! sequence numbers and idempotent retries, history, per-device delivered
//! cursors, sync, and fan-out of committed messages to online devices.
//!
//! Layout:
//! - [`store`]: the `MessageStore` trait and its domain types; `store/contract.rs`
//!   is the test suite every backend must pass.
//! - [`sqlite`]: the embedded backend (WAL, one writer thread with group commit).
//! - [`scylla`]: the production backend (LWT-reserved seq ranges, bucketed partitions).
//! - [`cache`]: the read-through cache any store can sit behind (in process or Redis).
//! - `service.rs`: domain logic (validation, membership, send then fan-out).
//! - `policy.rs`: who may do what in a group; used by every store inside its transaction.
//! - [`visibility`]: which entries a member sees (by seq), for every read and delivery.
//! - `fanout.rs`: presence `Locate` + one gateway `Deliver` per gateway and batch.
//! - `grpc.rs`: the thin tonic adapter.
//!
//! Started as every service is: [`Server::build`] opens the configured store
//! (timed, behind the cache), then [`Server::serve`] runs fan-out and the
//! internal gRPC API until the shutdown token is cancelled.

#![forbid(unsafe_code)]

pub mod cache;
mod convert;
mod error;
mod fanout;
mod grpc;
mod options;
mod policy;
pub mod ports;
mod push;
pub mod scylla;
mod service;
pub mod sqlite;
pub mod store;
pub mod timed;
pub mod visibility;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use messenger_platform::{
    authorize,
    cql::Cluster,
    discovery::{self, ChannelPool, Discovery, DiscoveryBackend, DiscoveryOptions, Role},
    server::{self, Port, ServerOptions},
    supervise::Supervisor,
    tls::ServerTls,
};
use messenger_proto::v1::{
    message_service_server::{MessageServiceServer, SERVICE_NAME},
    presence_service_client::PresenceServiceClient,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

pub use error::Error;
pub use options::{FanoutOptions, Options, PushOptions, StoreBackend};
pub use service::Service;

/// What the message service needs from the outside.
pub struct Deps {
    pub server: ServerOptions,
    pub discovery: Arc<dyn Discovery>,
    pub discovery_options: DiscoveryOptions,
    /// Mutual TLS on the internal port, when the cluster has it.
    pub tls: Option<ServerTls>,
    /// Runs the store's writer and the fan-out workers; their panic stops the process.
    pub supervisor: Supervisor,
    /// Where the SQLite file is when `database` names none.
    pub data_dir: PathBuf,
    /// The cluster of the Scylla store (`[scylla]`).
    pub scylla: Cluster,
}

/// Who may call the message service: gateways, on behalf of their users.
fn callers() -> authorize::Rules {
    vec![
        ("/messenger.v1.MessageService/", &[Role::Gateway]),
        // The media service asks who may upload to and fetch from a conversation.
        ("/messenger.v1.MessageService/CheckAccess", &[Role::Media]),
    ]
}

/// The SQLite file of the message store: `database`, else `<data_dir>/messages.db`.
pub fn database_path(options: &Options, data_dir: &Path) -> PathBuf {
    options.database.clone().unwrap_or_else(|| data_dir.join("messages.db"))
}

/// The message service with its store open, ready to serve.
pub struct Server {
    options: Options,
    deps: Deps,
    store: Arc<dyn store::MessageStore>,
}

impl Server {
    /// Opens the store `options` name (migrating a Scylla keyspace first when
    /// `scylla.migrate_on_start` says so), timed, behind the cache when it is on.
    pub async fn build(options: Options, deps: Deps) -> Result<Self, Error> {
        let (store, backend): (Arc<dyn store::MessageStore>, _) = match options.store {
            StoreBackend::Sqlite => {
                let path = database_path(&options, &deps.data_dir);
                (Arc::new(sqlite::SqliteStore::open_supervised(&path, &options.sqlite, &deps.supervisor)?), "sqlite")
            }
            StoreBackend::Scylla => {
                (Arc::new(scylla::ScyllaStore::connect(&deps.scylla, &options.scylla).await?), "scylla")
            }
        };
        // Timed under the cache: store latency is what reaches the store.
        let mut store: Arc<dyn store::MessageStore> = Arc::new(timed::TimedStore::new(store, backend));
        if options.cache.enabled {
            store = Arc::new(cache::CachedStore::from_options(store, &options.cache).await?);
        }
        Ok(Self { options, deps, store })
    }

    /// Runs fan-out and serves on `listener` until `shutdown` is cancelled.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) -> Result<(), server::Error> {
        let Self { options, deps, store } = self;
        let presence = discovery::channel(deps.discovery.clone(), Role::Presence, &deps.discovery_options);
        let no_notify =
            deps.discovery_options.backend == DiscoveryBackend::Static && deps.discovery_options.notify.is_empty();
        let pushes = if !options.push.enabled || no_notify {
            tracing::info!("push notifications off (message.push.enabled, or no notify address)");
            push::Pushes::disabled()
        } else {
            let notify = discovery::channel(deps.discovery.clone(), Role::Notify, &deps.discovery_options);
            push::Pushes::start(&options.push, notify, &deps.supervisor)
        };
        let fanout = fanout::Fanout::start(
            &options.fanout,
            options.delivered_receipts_max_members,
            store.clone(),
            Arc::new(grpc::GrpcPresence(PresenceServiceClient::new(presence))),
            Arc::new(grpc::GrpcGateways(ChannelPool::new(deps.discovery_options.clone(), Role::Gateway))),
            pushes,
            &deps.supervisor,
        );
        let send_stream_max_inflight = options.send_stream_max_inflight;
        let media = discovery::channel(deps.discovery.clone(), Role::Media, &deps.discovery_options);
        let service = Arc::new(Service::new(options, store, Arc::new(fanout), Arc::new(grpc::GrpcMedia::new(media))));
        let adapter = grpc::Adapter { service, send_stream_max_inflight, shutdown: shutdown.clone() };
        let api = MessageServiceServer::new(adapter).max_decoding_message_size(deps.server.internal_max_message_bytes);
        let port = Port::internal(listener, deps.tls, callers());
        server::serve("message", &deps.server, port, Routes::new(api), &[SERVICE_NAME], shutdown).await
    }
}
