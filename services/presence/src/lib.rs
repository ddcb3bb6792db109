//! The presence service: which devices are connected to which gateway, and
//! when each user was last seen.
//!
//! Sessions are leases: a registration lives `session_ttl` unless the gateway
//! holding it renews it (one `Renew` per gateway per interval for all its
//! sessions), so the sessions of a gateway that died expire by themselves.
//!
//! Layout:
//! - [`store`]: the `PresenceStore` trait, the lease rules, and the in-process
//!   `MemoryStore`; `store/contract.rs` is the test suite every backend runs.
//! - [`redis`]: `RedisStore`, shared by every presence instance, and its
//!   Lua scripts (`redis/*.lua`).
//! - `options.rs`: `Options` (backend, lease length, limits).
//! - `grpc.rs`: the thin tonic adapter.
//!
//! Started as every service is: [`Server::build`] opens the configured store,
//! then [`Server::serve`] runs the internal gRPC API until the shutdown token
//! is cancelled.

#![forbid(unsafe_code)]

mod grpc;
mod options;
pub mod redis;
pub mod store;

use std::sync::Arc;

use messenger_platform::{
    authorize,
    discovery::Role,
    server::{self, Port, ServerOptions},
    tls::ServerTls,
};
use messenger_proto::v1::presence_service_server::{PresenceServiceServer, SERVICE_NAME};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

pub use messenger_platform::redis::RedisOptions;
pub use options::{Backend, Options};
pub use redis::RedisStore;
pub use store::{Error, MemoryStore, Mode, PresenceStore, Session, SessionRef, Transition, UserStatus};

/// The store `options` ask for. Redis that cannot be reached yet is not an
/// error: calls answer UNAVAILABLE until it can.
async fn open_store(options: &Options) -> Result<Arc<dyn PresenceStore>, Error> {
    Ok(match options.backend {
        Backend::Memory => Arc::new(MemoryStore::new(options.session_ttl)),
        Backend::Redis => Arc::new(RedisStore::connect(&options.redis, options.session_ttl).await?),
    })
}

/// Who may call presence: gateways hold sessions (register, renew,
/// unregister); message instances locate members for fan-out.
fn callers() -> authorize::Rules {
    vec![
        ("/messenger.v1.PresenceService/", &[Role::Gateway]),
        ("/messenger.v1.PresenceService/Locate", &[Role::Message]),
        ("/messenger.v1.PresenceService/Status", &[Role::Message, Role::Gateway]),
    ]
}

/// What the presence service needs from the outside.
pub struct Deps {
    pub server: ServerOptions,
    /// Mutual TLS on the internal port, when the cluster has it.
    pub tls: Option<ServerTls>,
}

/// The presence service with its store open, ready to serve.
pub struct Server {
    options: Options,
    deps: Deps,
    store: Arc<dyn PresenceStore>,
}

impl Server {
    /// Opens the store `options` name (its lease length is `session_ttl`).
    pub async fn build(options: Options, deps: Deps) -> Result<Self, Error> {
        let store = open_store(&options).await?;
        Ok(Self { options, deps, store })
    }

    /// Serves on `listener` until `shutdown` is cancelled.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) -> Result<(), server::Error> {
        let Self { options, deps, store } = self;
        let api = PresenceServiceServer::new(grpc::Adapter { options, store })
            .max_decoding_message_size(deps.server.internal_max_message_bytes);
        let port = Port::internal(listener, deps.tls, callers());
        server::serve("presence", &deps.server, port, Routes::new(api), &[SERVICE_NAME], shutdown).await
    }
}
