//! The presence service: which devices are connected to which gateway, and
//! when each user was last seen.
//!
//! Layout:
//! - [`store`]: the `PresenceStore` trait and the in-process implementation.
//! - `grpc.rs`: the thin tonic adapter.
//!
//! [`serve`] runs the internal gRPC API until the shutdown token is cancelled.

#![forbid(unsafe_code)]

mod grpc;
pub mod store;

use std::sync::Arc;

use messenger_platform::server::{self, ServerOptions};
use messenger_proto::v1::presence_service_server::{PresenceServiceServer, SERVICE_NAME};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

pub use store::{MemoryStore, PresenceStore, Session, UserStatus};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// Internal gRPC address (never exposed to clients).
    pub listen: String,
    /// Most users one Locate or Status call may ask about.
    pub max_users_per_call: usize,
    /// Most concurrent sessions (devices) one user may hold.
    pub max_sessions_per_user: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self { listen: "127.0.0.1:7720".into(), max_users_per_call: 10_000, max_sessions_per_user: 16 }
    }
}

impl Options {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_users_per_call == 0 {
            return Err("presence.max_users_per_call must be positive".into());
        }
        if self.max_sessions_per_user == 0 {
            return Err("presence.max_sessions_per_user must be positive".into());
        }
        Ok(())
    }
}

/// Serves the presence service on `listener` until `shutdown` is cancelled.
pub async fn serve(
    options: Options,
    server_options: ServerOptions,
    store: Arc<dyn PresenceStore>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), server::Error> {
    let api = PresenceServiceServer::new(grpc::Adapter { options, store })
        .max_decoding_message_size(server_options.internal_max_message_bytes);
    server::serve("presence", &server_options, listener, Routes::new(api), &[SERVICE_NAME], shutdown).await
}
