//! TLS on the public port and mutual TLS between services (rustls, ring).
//!
//! Public port: the gateway presents `tls.public_cert_file`; clients verify it
//! with their CA as usual (by host name).
//!
//! Cluster: every internal server requires a client certificate signed by the
//! cluster CA, and every internal client presents one and verifies the server
//! against the same CA. A certificate's *roles* are the DNS names
//! `<role>.<tls.cluster_domain>` it is valid for (`message.messenger.internal`):
//! a client dialing a message instance verifies the server as
//! `message.messenger.internal`, whatever address discovery gave, and a server
//! lets a caller make only the calls its roles may make
//! ([`crate::authorize`]). Certificates and CA are read again when their
//! files change ([`crate::reload`]); open connections keep the identity they
//! were made with.
//!
//! Backends (Redis, the CQL cluster, etcd): [`BackendTls`] (`tls/backend.rs`),
//! one settings table per connection: the server verified against a CA of
//! its own, and a client certificate when the server asks for one.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use futures::Stream;
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    server::WebPkiClientVerifier,
};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, server::TlsStream};
use tokio_util::sync::CancellationToken;
use tonic::codegen::http::Uri;
use tracing::debug;

use crate::{
    connections::{Connections, Guarded},
    role::Role,
};

mod backend;

pub use backend::BackendTls;

/// TLS settings of the whole process (`[tls]`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsOptions {
    /// Certificate chain (PEM) the gateway's public port presents; with
    /// `public_key_file`, turns TLS on there. Unset: plaintext (fine on
    /// loopback, or behind a proxy that terminates TLS).
    pub public_cert_file: Option<PathBuf>,
    pub public_key_file: Option<PathBuf>,
    /// Cluster CA (PEM): with the two below, turns mutual TLS on for every
    /// internal server and client of this process.
    pub cluster_ca_file: Option<PathBuf>,
    /// This process's cluster certificate chain (PEM), valid for
    /// `<role>.<cluster_domain>` for each role it runs (`messenger certs` makes them).
    pub cluster_cert_file: Option<PathBuf>,
    pub cluster_key_file: Option<PathBuf>,
    /// The DNS suffix of role names in cluster certificates.
    pub cluster_domain: String,
    /// Allow plaintext internal ports on addresses other than loopback. Anyone
    /// who reaches such a port can act as any user: only for networks where
    /// something else (a mesh sidecar, say) authenticates every hop.
    pub insecure_cluster_plaintext: bool,
    /// How often certificate files are checked for changes (SIGHUP reloads at once).
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// A connection that has not finished its TLS handshake by then is closed.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// TLS handshakes one server runs at once; further connections wait to be accepted.
    pub max_concurrent_handshakes: usize,
}

impl Default for TlsOptions {
    fn default() -> Self {
        Self {
            public_cert_file: None,
            public_key_file: None,
            cluster_ca_file: None,
            cluster_cert_file: None,
            cluster_key_file: None,
            cluster_domain: "messenger.internal".into(),
            insecure_cluster_plaintext: false,
            reload_interval: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            // Above one address's share (server.max_connections_per_address):
            // a single source can never hold every handshake slot.
            max_concurrent_handshakes: 1024,
        }
    }
}

impl TlsOptions {
    pub fn validate(&self) -> Result<(), String> {
        if self.public_cert_file.is_some() != self.public_key_file.is_some() {
            return Err("tls.public_cert_file and tls.public_key_file go together".into());
        }
        let cluster = [&self.cluster_ca_file, &self.cluster_cert_file, &self.cluster_key_file];
        if cluster.iter().any(|file| file.is_some()) && !cluster.iter().all(|file| file.is_some()) {
            return Err("tls.cluster_ca_file, tls.cluster_cert_file and tls.cluster_key_file go together".into());
        }
        if self.cluster_domain.is_empty() || ServerName::try_from(format!("gateway.{}", self.cluster_domain)).is_err() {
            return Err("tls.cluster_domain must be a DNS name".into());
        }
        if self.handshake_timeout.is_zero() || self.reload_interval.is_zero() || self.max_concurrent_handshakes == 0 {
            return Err(
                "tls.handshake_timeout, tls.reload_interval and tls.max_concurrent_handshakes must be positive".into(),
            );
        }
        Ok(())
    }

    /// Whether internal hops use mutual TLS.
    pub fn cluster_enabled(&self) -> bool {
        self.cluster_ca_file.is_some()
    }

    /// The DNS name a cluster certificate for `role` is valid for.
    pub fn role_name(&self, role: Role) -> String {
        format!("{role}.{}", self.cluster_domain)
    }

    fn cluster_files(&self) -> Option<(&Path, &Path, &Path)> {
        Some((self.cluster_ca_file.as_deref()?, self.cluster_cert_file.as_deref()?, self.cluster_key_file.as_deref()?))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {reason}")]
    File { path: String, reason: String },
    #[error("{path} holds no {what}")]
    Empty { path: String, what: &'static str },
    #[error("tls configuration refused: {0}")]
    Config(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process's default rustls provider. Everything here names
/// ring itself, but the CQL driver's TLS feature compiles aws-lc-rs in as
/// well, and with two providers built a library that asks rustls for "the"
/// default would panic: this gives it ring. Call it first thing in a process.
pub fn install_default_provider() {
    // An error only says a default is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let file_error = |reason: String| Error::File { path: path.display().to_string(), reason };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(e.to_string()))?;
    if certificates.is_empty() {
        return Err(Error::Empty { path: path.display().to_string(), what: "certificate" });
    }
    Ok(certificates)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| Error::File { path: path.display().to_string(), reason: e.to_string() })
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, Error> {
    let mut roots = RootCertStore::empty();
    for certificate in certificates(path)? {
        roots.add(certificate).map_err(|e| Error::Config(format!("CA in {}: {e}", path.display())))?;
    }
    Ok(Arc::new(roots))
}

fn config_error(error: rustls::Error) -> Error {
    Error::Config(error.to_string())
}

/// What a server presents, rebuilt from its files on every reload.
#[derive(Clone, Debug)]
enum ServerFiles {
    Public { cert: PathBuf, key: PathBuf },
    Cluster { ca: PathBuf, cert: PathBuf, key: PathBuf },
}

impl ServerFiles {
    fn paths(&self) -> Vec<PathBuf> {
        match self {
            ServerFiles::Public { cert, key } => vec![cert.clone(), key.clone()],
            ServerFiles::Cluster { ca, cert, key } => vec![ca.clone(), cert.clone(), key.clone()],
        }
    }

    fn build(&self, alpn: &[&[u8]]) -> Result<ServerConfig, Error> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_error)?;
        let mut config = match self {
            ServerFiles::Public { cert, key } => {
                builder.with_no_client_auth().with_single_cert(certificates(cert)?, private_key(key)?)
            }
            ServerFiles::Cluster { ca, cert, key } => {
                let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
                    .build()
                    .map_err(|e| Error::Config(e.to_string()))?;
                builder.with_client_cert_verifier(verifier).with_single_cert(certificates(cert)?, private_key(key)?)
            }
        }
        .map_err(config_error)?;
        config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
        Ok(config)
    }
}

const HTTP2: &[&[u8]] = &[b"h2"];
const HTTP1: &[&[u8]] = &[b"http/1.1"];

/// A TLS server configuration that follows its files.
#[derive(Clone)]
pub struct ServerTls {
    files: ServerFiles,
    /// What ALPN offers: gRPC ports speak HTTP/2 only, the browser port HTTP/1.1.
    alpn: &'static [&'static [u8]],
    config: Arc<RwLock<Arc<ServerConfig>>>,
    handshake_timeout: Duration,
    max_concurrent_handshakes: usize,
    domain: String,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("files", &self.files).finish()
    }
}

impl ServerTls {
    /// The public port's TLS, if configured.
    pub fn public(options: &TlsOptions) -> Result<Option<Self>, Error> {
        let (Some(cert), Some(key)) = (&options.public_cert_file, &options.public_key_file) else { return Ok(None) };
        Self::new(ServerFiles::Public { cert: cert.clone(), key: key.clone() }, options).map(Some)
    }

    /// Internal ports' mutual TLS, if configured.
    pub fn cluster(options: &TlsOptions) -> Result<Option<Self>, Error> {
        let Some((ca, cert, key)) = options.cluster_files() else { return Ok(None) };
        let files = ServerFiles::Cluster { ca: ca.into(), cert: cert.into(), key: key.into() };
        Self::new(files, options).map(Some)
    }

    fn new(files: ServerFiles, options: &TlsOptions) -> Result<Self, Error> {
        let alpn = HTTP2;
        let config = Arc::new(RwLock::new(Arc::new(files.build(alpn)?)));
        Ok(Self {
            files,
            alpn,
            config,
            handshake_timeout: options.handshake_timeout,
            max_concurrent_handshakes: options.max_concurrent_handshakes,
            domain: options.cluster_domain.clone(),
        })
    }

    /// The same certificate for a port browsers use: HTTP/1.1 in ALPN (a
    /// WebSocket upgrade needs it), with a configuration of its own (watch it
    /// for reloads too).
    pub fn http1(&self) -> Result<Self, Error> {
        let alpn = HTTP1;
        let config = Arc::new(RwLock::new(Arc::new(self.files.build(alpn)?)));
        Ok(Self { files: self.files.clone(), alpn, config, ..self.clone() })
    }

    /// The suffix of role names (`tls.cluster_domain`).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Reads the files again; on failure the configuration in use stays.
    pub fn reload(&self) -> Result<(), Error> {
        let config = self.files.build(self.alpn)?;
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        Ok(())
    }

    /// Reloads whenever the files change, until `shutdown`.
    pub fn watch(&self, what: &'static str, interval: Duration, shutdown: CancellationToken) {
        let this = self.clone();
        crate::reload::watch(what, self.files.paths(), interval, shutdown, move || {
            this.reload().map(|()| "certificates".to_owned()).map_err(|e| e.to_string())
        });
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// The TLS connections accepted on `listener`. The accept loop only
    /// accepts: each connection within its address's share (`connections`)
    /// runs its handshake as a task of its own, bounded by
    /// `handshake_timeout` (and the first-byte deadline for the ClientHello), at
    /// most `max_concurrent_handshakes` at once (more are closed, not
    /// queued), so slow or silent clients can neither stall the loop nor
    /// make an honest client wait behind them. A failed handshake is logged
    /// and dropped. Ends when `shutdown` is cancelled.
    pub fn incoming(
        &self,
        listener: TcpListener,
        keepalive: Duration,
        connections: Connections,
        shutdown: CancellationToken,
    ) -> impl Stream<Item = Result<TlsStream<Guarded<TcpStream>>, std::io::Error>> + Send + 'static {
        use futures::StreamExt;
        let (ready, mut handshaken) = tokio::sync::mpsc::channel(self.max_concurrent_handshakes);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(self.max_concurrent_handshakes));
        let this = self.clone();
        tokio::spawn(async move {
            let tcp = tonic::transport::server::TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(keepalive))
                .take_until(shutdown.cancelled_owned());
            let mut tcp = std::pin::pin!(tcp);
            while let Some(accepted) = tcp.next().await {
                let stream = match accepted {
                    Ok(stream) => stream,
                    Err(error) => {
                        debug!(%error, "accept failed");
                        continue;
                    }
                };
                let Some(peer) = stream.peer_addr().ok() else { continue };
                // Dropped, so closed: over its address's share, or too many handshakes now.
                let Some(slot) = connections.admit(peer) else { continue };
                let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                    debug!(%peer, "tls handshake refused: tls.max_concurrent_handshakes under way");
                    continue;
                };
                let (acceptor, timeout, ready) = (this.acceptor(), this.handshake_timeout, ready.clone());
                tokio::spawn(async move {
                    let stream = Guarded::new(stream, slot);
                    let handshake = tokio::time::timeout(timeout, acceptor.accept(stream)).await;
                    drop(permit);
                    match handshake {
                        Ok(Ok(tls)) => {
                            let _ = ready.send(Ok(tls)).await;
                        }
                        Ok(Err(error)) => debug!(%peer, %error, "tls handshake refused"),
                        Err(_) => debug!(%peer, "tls handshake timed out"),
                    }
                });
            }
        });
        futures::stream::poll_fn(move |cx| handshaken.poll_recv(cx))
    }
}

/// A client connection to another service, over mutual TLS.
pub type ClusterStream = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

/// The cluster's client side: presents this process's certificate and
/// verifies servers against the cluster CA, by role name.
#[derive(Clone)]
pub struct ClientTls {
    files: (PathBuf, PathBuf, PathBuf),
    loaded: Arc<RwLock<Loaded>>,
    options: Arc<TlsOptions>,
}

/// What the files held when last read.
struct Loaded {
    config: Arc<ClientConfig>,
    /// The roles this process's own certificate carries: its identity on
    /// calls that stay in the process ([`crate::local`]).
    roles: Arc<[Role]>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("cert", &self.files.1).finish()
    }
}

impl ClientTls {
    /// The cluster client configuration, if mutual TLS is configured.
    pub fn cluster(options: &TlsOptions) -> Result<Option<Self>, Error> {
        let Some((ca, cert, key)) = options.cluster_files() else { return Ok(None) };
        let files = (ca.to_path_buf(), cert.to_path_buf(), key.to_path_buf());
        let loaded = Arc::new(RwLock::new(load_client(&files, &options.cluster_domain)?));
        Ok(Some(Self { files, loaded, options: Arc::new(options.clone()) }))
    }

    /// Reads the files again; on failure the configuration in use stays.
    pub fn reload(&self) -> Result<(), Error> {
        let loaded = load_client(&self.files, &self.options.cluster_domain)?;
        *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = loaded;
        Ok(())
    }

    /// The roles this process's cluster certificate carries now.
    pub fn roles(&self) -> Arc<[Role]> {
        self.loaded.read().unwrap_or_else(|e| e.into_inner()).roles.clone()
    }

    /// Reloads whenever the files change, until `shutdown`.
    pub fn watch(&self, shutdown: CancellationToken) {
        let this = self.clone();
        let paths = vec![self.files.0.clone(), self.files.1.clone(), self.files.2.clone()];
        crate::reload::watch("cluster client certificate", paths, self.options.reload_interval, shutdown, move || {
            this.reload().map(|()| "certificates".to_owned()).map_err(|e| e.to_string())
        });
    }

    /// Connects to an instance of `role` at the URI's host and port, over TLS
    /// verified as that role: what tonic's `connect_with_connector` takes.
    pub fn connector(
        &self,
        role: Role,
    ) -> impl tower::Service<
        Uri,
        Response = ClusterStream,
        Error = std::io::Error,
        Future = futures::future::BoxFuture<'static, std::io::Result<ClusterStream>>,
    > + Clone
    + Send
    + 'static {
        let this = self.clone();
        let name = ServerName::try_from(self.options.role_name(role)).expect("validated cluster domain");
        tower::service_fn(move |uri: Uri| {
            let config = this.loaded.read().unwrap_or_else(|e| e.into_inner()).config.clone();
            let name = name.clone();
            Box::pin(async move {
                let invalid =
                    || std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("no host:port in {uri}"));
                let host = uri.host().ok_or_else(invalid)?.trim_start_matches('[').trim_end_matches(']').to_owned();
                let port = uri.port_u16().ok_or_else(invalid)?;
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                let tls = TlsConnector::from(config).connect(name, tcp).await?;
                Ok(hyper_util::rt::TokioIo::new(tls))
            }) as futures::future::BoxFuture<'static, _>
        })
    }
}

fn load_client((ca, cert, key): &(PathBuf, PathBuf, PathBuf), domain: &str) -> Result<Loaded, Error> {
    let chain = certificates(cert)?;
    let roles = roles_of(&chain[0], domain).into();
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_error)?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(chain, private_key(key)?)
        .map_err(config_error)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Loaded { config: Arc::new(config), roles })
}

/// The roles a verified peer certificate carries: those whose
/// `<role>.<domain>` name it names exactly and is valid for. A wildcard
/// name (`*.<domain>`) grants no role: a certificate made for something
/// else under the cluster domain must not act as every service.
pub fn roles_of(certificate: &CertificateDer<'_>, domain: &str) -> Vec<Role> {
    let Ok(end_entity) = webpki::EndEntityCert::try_from(certificate) else { return Vec::new() };
    Role::ALL
        .into_iter()
        .filter(|role| {
            let wanted = format!("{role}.{domain}");
            end_entity.valid_dns_names().any(|name| name.eq_ignore_ascii_case(&wanted))
                && ServerName::try_from(wanted)
                    .is_ok_and(|name| end_entity.verify_is_valid_for_subject_name(&name).is_ok())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(names: &[&str]) -> CertificateDer<'static> {
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::new(names).unwrap().self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn a_role_is_granted_by_its_exact_name_only() {
        let domain = "messenger.internal";
        assert_eq!(roles_of(&certificate(&["message.messenger.internal"]), domain), [Role::Message]);
        let both = certificate(&["gateway.messenger.internal", "PRESENCE.messenger.internal"]);
        assert_eq!(roles_of(&both, domain), [Role::Presence, Role::Gateway]);
        assert!(roles_of(&certificate(&["*.messenger.internal"]), domain).is_empty(), "a wildcard granted roles");
        assert!(roles_of(&certificate(&["message.elsewhere.internal"]), domain).is_empty());
    }
}
