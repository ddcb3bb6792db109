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
//!   backend, [`scylla`] the one for several instances (on `[scylla]`).
//! - [`objects`]: `aws-sdk-s3` calls and presigning; [`embedded`]: the in-process S3 server.
//! - `kinds.rs` (declared type vs. magic bytes), `images.rs` (bounded decode,
//!   re-encode, thumbnail, BlurHash), `links.rs` (CDN URL signing, Content-Disposition).
//! - `service.rs`: the domain logic; `grpc.rs`: the thin tonic adapter; `options.rs`.
//!
//! Started as every service is: [`Server::build`] opens the store and the
//! object storage, then [`Server::serve`] runs the internal gRPC API and the
//! sweep of abandoned uploads until the shutdown token is cancelled.

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

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

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
/// Scylla store uses the shared cluster and keyspace (`[scylla]`).
async fn open_store(
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

/// Who may call media: gateways on behalf of their users; message
/// instances to describe a send's media and delete a deleted message's.
fn callers() -> authorize::Rules {
    vec![
        ("/messenger.v1.MediaService/", &[Role::Gateway]),
        ("/messenger.v1.MediaService/DescribeMedia", &[Role::Message]),
        ("/messenger.v1.MediaService/DeleteMedia", &[Role::Message]),
    ]
}

/// What the media service needs from the outside.
pub struct Deps {
    pub server: ServerOptions,
    pub discovery: Arc<dyn Discovery>,
    pub discovery_options: DiscoveryOptions,
    /// Mutual TLS on the internal port, when the cluster has it.
    pub tls: Option<ServerTls>,
    /// Runs the sweep of abandoned uploads; its panic stops the process.
    pub supervisor: Supervisor,
    /// Where the SQLite file is when `database` names none.
    pub data_dir: PathBuf,
    /// The cluster of the Scylla store (`[scylla]`).
    pub scylla: cql::Cluster,
    /// The object store's S3 endpoint: `s3.endpoint`, or the embedded
    /// store's when this process runs one.
    pub objects_endpoint: String,
}

/// The media service with its store and object storage open, ready to serve.
pub struct Server {
    service: Arc<Service>,
    deps: Deps,
}

impl Server {
    /// Opens the store and the object storage `options` name and reads the
    /// CDN keys: a bad key stops the start.
    pub async fn build(options: Options, deps: Deps) -> Result<Self, Error> {
        let store = open_store(&options, &deps.data_dir, &deps.scylla).await?;
        let objects = Objects::connect(&options.s3, &deps.objects_endpoint).await?;
        let messages = discovery::channel(deps.discovery.clone(), Role::Message, &deps.discovery_options);
        let service = Arc::new(Service::new(options, store, objects, Access::new(messages))?);
        Ok(Self { service, deps })
    }

    /// Sweeps abandoned uploads and serves on `listener` until `shutdown` is cancelled.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) -> Result<(), server::Error> {
        let Self { service, deps } = self;
        deps.supervisor.spawn("media-sweep", service.clone().run_sweeper(shutdown.clone()));
        let api = MediaServiceServer::new(grpc::Adapter { service })
            .max_decoding_message_size(deps.server.internal_max_message_bytes);
        let port = Port::internal(listener, deps.tls, callers());
        server::serve("media", &deps.server, port, Routes::new(api), &[SERVICE_NAME], shutdown).await
    }
}
