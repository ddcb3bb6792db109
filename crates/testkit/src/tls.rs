//! Certificates for the servers tests start over TLS: a CA of a test's own
//! signing a server certificate for the loopback names and a client
//! certificate, as PEM files (`messenger certs` makes a deployment's cluster
//! certificates; these are for tests only).

use std::{
    fs,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// A certificate and its private key (PKCS#8), as PEM files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What a client needs to reach a server [`loopback`] set up: the CA that
/// signed the server's certificate, and a client certificate the server
/// accepts (signed by the same CA).
#[derive(Clone, Debug)]
pub struct ClientFiles {
    pub ca_file: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate authority of a test's own; its certificate is `<dir>/<name>.pem`.
pub struct TestCa {
    dir: PathBuf,
    ca_file: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(dir: &Path, name: &str) -> Self {
        fs::create_dir_all(dir).expect("certificate directory");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("CA key");
        let certificate = params.self_signed(&key).expect("CA certificate");
        let ca_file = dir.join(format!("{name}.pem"));
        fs::write(&ca_file, certificate.pem()).expect("write the CA certificate");
        Self { dir: dir.to_owned(), ca_file, issuer: Issuer::new(params, key) }
    }

    /// The CA certificate, what clients (and servers checking client certificates) trust.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// A certificate for `names` (DNS names or IP addresses), good for
    /// serving and for client authentication alike, written as
    /// `<dir>/<name>.pem` and `<dir>/<name>-key.pem`.
    pub fn issue(&self, name: &str, names: &[&str]) -> CertFiles {
        let names: Vec<String> = names.iter().map(|subject| (*subject).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("certificate names");
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().expect("key");
        let certificate = params.signed_by(&key, &self.issuer).expect("certificate");
        let files =
            CertFiles { cert: self.dir.join(format!("{name}.pem")), key: self.dir.join(format!("{name}-key.pem")) };
        fs::write(&files.cert, certificate.pem()).expect("write a certificate");
        fs::write(&files.key, key.serialize_pem()).expect("write a key");
        files
    }
}

/// A server's TLS files and a client's, from one new CA.
#[derive(Clone, Debug)]
pub struct Loopback {
    /// Valid for `localhost` and `127.0.0.1`.
    pub server: CertFiles,
    pub client: ClientFiles,
}

/// A new CA in `dir` (`ca.pem`), a server certificate for the loopback
/// names (`server.pem`) and a client certificate (`client.pem`).
pub fn loopback(dir: &Path) -> Loopback {
    let ca = TestCa::new(dir, "ca");
    let server = ca.issue("server", &["localhost", "127.0.0.1"]);
    let client = ca.issue("client", &["client.test"]);
    Loopback { server, client: ClientFiles { ca_file: ca.ca_file().to_owned(), cert: client.cert, key: client.key } }
}
