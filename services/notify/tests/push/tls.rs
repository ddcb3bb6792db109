//! What the platform fakes share: a TLS server (a CA of the test's own,
//! trusted by notify through `ca_file`) and key pairs in the formats the
//! platforms hand out.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Which protocols the server offers (ALPN).
#[derive(Clone, Copy)]
pub enum Protocols {
    /// HTTP/2 only, as APNs.
    Http2,
    /// HTTP/2 or HTTP/1.1, as Google's front ends.
    Any,
}

/// Serves `app` over TLS on a loopback port for `localhost`; returns its
/// address and the CA certificate file to trust (written into `dir`).
pub async fn serve(app: axum::Router, protocols: Protocols, dir: &Path) -> (SocketAddr, PathBuf) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let ca_path = dir.join(format!("fake-ca-{}.pem", uuid::Uuid::now_v7()));
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();

    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(leaf.der().to_vec())], key)
        .unwrap();
    config.alpn_protocols = match protocols {
        Protocols::Http2 => vec![b"h2".to_vec()],
        Protocols::Any => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    };
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                if let Protocols::Http2 = protocols {
                    builder = builder.http2_only();
                }
                let _ = builder.serve_connection(TokioIo::new(tls), service).await;
            });
        }
    });
    (address, ca_path)
}

/// A P-256 key pair: the private key as PKCS#8 PEM (an APNs `.p8` file, a
/// VAPID key file) and the public key as SPKI PEM.
pub fn p256_key() -> (String, String) {
    let key = KeyPair::generate().unwrap();
    (key.serialize_pem(), key.public_key_pem())
}
