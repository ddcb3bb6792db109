//! The media service: photos, videos and files sent through presigned S3
//! uploads and fetched through short-lived (CDN-signed) URLs.
//!
//! A client asks for an upload ticket (conversation, type, size, SHA-256,
//! name); the answer's presigned PUT signs `Content-Type`, `Content-Length`
//! and `x-amz-checksum-sha256`, so storage itself refuses other bytes. Files
//! above a threshold go in parts, each part's length and checksum signed, and
//! can be resumed. Complete checks the object (size, checksum, magic bytes
//! against the declared type), strips images of metadata and makes a
//! thumbnail and BlurHash; only then can a message carry the media. The
//! message service answers who may see what.
//!
//! Layout:
//! - [`store`]: the `MediaStore` trait (upload records); [`sqlite`] its embedded
//!   backend, [`scylla`] the one for several instances (the message store's cluster).
//! - [`objects`]: `aws-sdk-s3` calls and presigning; [`embedded`]: the in-process S3 server.
//! - `kinds.rs` (declared type vs. magic bytes), `images.rs` (bounded decode,
//!   re-encode, thumbnail, BlurHash), `links.rs` (CDN URL signing, Content-Disposition).
//! - `service.rs`: the domain logic; `grpc.rs`: the thin tonic adapter; `options.rs`.
//!
//! [`serve`] runs the internal gRPC API and the sweep of abandoned uploads
//! until the shutdown token is cancelled.

#![forbid(unsafe_code)]

pub mod embedded;
mod error;
mod grpc;
pub mod images;
pub mod kinds;
pub mod links;
pub mod objects;
mod options;
pub mod scylla;
mod service;
pub mod sqlite;
pub mod store;

use std::{path::Path, sync::Arc};

use messenger_platform::{
    authorize, cql,
    discovery::{self, Discovery, DiscoveryOptions, Role},
    server::{self, Port, ServerOptions},
    supervise::Supervisor,
    tls::ServerTls,
};
use messenger_proto::v1::media_service_server::{MediaServiceServer, SERVICE_NAME};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

pub use error::Error;
pub use objects::Objects;
pub use options::{CdnMode, CdnOptions, ImageOptions, Options, S3Options, StoreBackend};
pub use service::{Access, Service, object_key, pending_key};

/// The store `options` ask for: SQLite files live under `data_dir`; the
/// Scylla store uses the cluster and keyspace of the message store.
pub async fn open_store(
    options: &Options,
    data_dir: &Path,
    cluster: &cql::Cluster,
) -> Result<Arc<dyn store::MediaStore>, Error> {
    match options.store {
        StoreBackend::Sqlite => {
            let path = options.database.clone().unwrap_or_else(|| data_dir.join("media.db"));
            Ok(Arc::new(sqlite::SqliteStore::open(&path)?))
        }
        StoreBackend::Scylla => Ok(Arc::new(scylla::ScyllaStore::connect(cluster).await?)),
    }
}

/// Builds the service: its CDN keys are read here, so a bad key stops start-up.
pub fn service(
    options: Options,
    store: Arc<dyn store::MediaStore>,
    objects: Objects,
    discovery: Arc<dyn Discovery>,
    discovery_options: &DiscoveryOptions,
) -> Result<Arc<Service>, Error> {
    let messages = discovery::channel(discovery, Role::Message, discovery_options);
    Ok(Arc::new(Service::new(options, store, objects, Access::new(messages))?))
}

/// Who may call media: gateways on behalf of their users; message
/// instances to describe a send's media and delete a deleted message's.
fn callers() -> authorize::Rules {
    vec![
        ("/messenger.v1.MediaService/", &[Role::Gateway]),
        ("/messenger.v1.MediaService/DescribeMedia", &[Role::Message]),
        ("/messenger.v1.MediaService/DeleteMedia", &[Role::Message]),
    ]
}

/// Serves `service` on `listener` (mutual TLS with `tls`), and sweeps
/// abandoned uploads, until `shutdown` is cancelled.
pub async fn serve(
    service: Arc<Service>,
    server_options: ServerOptions,
    listener: TcpListener,
    tls: Option<ServerTls>,
    supervisor: &Supervisor,
    shutdown: CancellationToken,
) -> Result<(), server::Error> {
    supervisor.spawn("media-sweep", service.clone().run_sweeper(shutdown.clone()));
    let api = MediaServiceServer::new(grpc::Adapter { service })
        .max_decoding_message_size(server_options.internal_max_message_bytes);
    let port = Port::internal(listener, tls, callers());
    server::serve("media", &server_options, port, Routes::new(api), &[SERVICE_NAME], shutdown).await
}
