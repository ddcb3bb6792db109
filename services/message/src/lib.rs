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
//! [`serve`] runs the internal gRPC API until the shutdown token is cancelled.

#![forbid(unsafe_code)]

pub mod cache;
mod error;
mod fanout;
mod grpc;
mod options;
mod policy;
mod push;
pub mod scylla;
mod service;
pub mod sqlite;
pub mod store;
pub mod timed;
pub mod visibility;

use std::sync::Arc;

use messenger_platform::{
    authorize,
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
    pub store: Arc<dyn store::MessageStore>,
    pub discovery: Arc<dyn Discovery>,
    pub discovery_options: DiscoveryOptions,
    /// Mutual TLS on the internal port, when the cluster has it.
    pub tls: Option<ServerTls>,
    /// Runs the fan-out workers; their panic stops the process.
    pub supervisor: Supervisor,
}

/// Who may call the message service: gateways, on behalf of their users.
fn callers() -> authorize::Rules {
    vec![
        ("/messenger.v1.MessageService/", &[Role::Gateway]),
        // The media service asks who may upload to and fetch from a conversation.
        ("/messenger.v1.MessageService/CheckAccess", &[Role::Media]),
    ]
}

/// Serves the message service on `listener` until `shutdown` is cancelled.
pub async fn serve(
    options: Options,
    server_options: ServerOptions,
    deps: Deps,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), server::Error> {
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
        deps.store.clone(),
        PresenceServiceClient::new(presence),
        ChannelPool::new(deps.discovery_options.clone(), Role::Gateway),
        pushes,
        &deps.supervisor,
    );
    let send_stream_max_inflight = options.send_stream_max_inflight;
    let media = discovery::channel(deps.discovery.clone(), Role::Media, &deps.discovery_options);
    let service = Arc::new(Service::new(options, deps.store, fanout, media));
    let adapter = grpc::Adapter { service, send_stream_max_inflight, shutdown: shutdown.clone() };
    let api = MessageServiceServer::new(adapter).max_decoding_message_size(server_options.internal_max_message_bytes);
    let port = Port::internal(listener, deps.tls, callers());
    server::serve("message", &server_options, port, Routes::new(api), &[SERVICE_NAME], shutdown).await
}
