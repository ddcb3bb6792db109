//! TLS to the backends a service is a client of (Redis, the CQL cluster,
//! etcd), set per connection (`presence.redis.tls`, `message.cache.redis.tls`,
//! `scylla.tls`, `discovery.etcd.tls`) and built into what each
//! driver takes: a rustls [`ClientConfig`] (Redis, CQL) or tonic's
//! [`ClientTlsConfig`] (etcd's client builds its own from PEM).
//!
//! The server is verified against `ca_file` alone (never the system's CAs),
//! by the host connected to, or by `server_name` when set; a client
//! certificate is presented when `cert_file` is set (mutual TLS).

use std::{path::PathBuf, sync::Arc};

use rustls::{
    ClientConfig, DigitallySignedStruct, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use serde::{Deserialize, Serialize};
use tonic::transport::{ClientTlsConfig, Identity};

use super::{Error, certificates, config_error, private_key, provider, roots};

/// TLS to one backend: on when `ca_file` is set, plaintext otherwise.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendTls {
    /// CA certificates (PEM) the server's certificate must chain to; setting
    /// it turns TLS on. For a server with a publicly trusted certificate, name
    /// the system's bundle (`/etc/ssl/certs/ca-certificates.crt` on Debian).
    pub ca_file: Option<PathBuf>,
    /// A client certificate chain (PEM) and its private key, for a server
    /// that requires one (mutual TLS).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The name (DNS name or IP address) the server's certificate must be
    /// valid for, instead of the host connected to. The CQL driver connects
    /// to (and so checks) each node's IP address: a cluster whose
    /// certificates name the nodes by DNS name needs this.
    pub server_name: Option<String>,
}

impl BackendTls {
    /// Whether connections use TLS.
    pub fn enabled(&self) -> bool {
        self.ca_file.is_some()
    }

    /// The settings' shape; `section` names them in messages, e.g.
    /// `presence.redis.tls`. The files are read when a connection is built
    /// (at the start of the component that uses it, which then fails naming
    /// the file), not here: every section is validated in every process,
    /// whichever roles it runs and whatever files it was given.
    pub fn validate(&self, section: &str) -> Result<(), String> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(format!("{section}.cert_file and {section}.key_file go together"));
        }
        if !self.enabled() && (self.cert_file.is_some() || self.server_name.is_some()) {
            return Err(format!(
                "{section}.ca_file is unset, so TLS is off: set it (the CA that signed the server's certificate) \
                 for the other {section} settings to apply"
            ));
        }
        if let Some(name) = &self.server_name
            && ServerName::try_from(name.as_str()).is_err()
        {
            return Err(format!("{section}.server_name {name:?} is neither a DNS name nor an IP address"));
        }
        Ok(())
    }

    /// The rustls client configuration (ring), read from the files now;
    /// `None` when TLS is off.
    pub fn client_config(&self) -> Result<Option<ClientConfig>, Error> {
        let Some(ca) = &self.ca_file else { return Ok(None) };
        let roots = roots(ca)?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_error)?;
        let builder = match &self.server_name {
            None => builder.with_root_certificates(roots),
            Some(name) => {
                let verifier = AsNamed::new(roots, name)?;
                builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier))
            }
        };
        let config = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                builder.with_client_auth_cert(certificates(cert)?, private_key(key)?).map_err(config_error)?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Some(config))
    }

    /// The same settings as tonic takes them (etcd's client is a tonic
    /// channel, which builds its rustls configuration itself, with ring as
    /// this crate's does), read from the files now; `None` when TLS is off.
    pub fn tonic(&self) -> Result<Option<ClientTlsConfig>, Error> {
        let Some(ca) = &self.ca_file else { return Ok(None) };
        let mut config = ClientTlsConfig::new().trust_anchors(roots(ca)?.roots.iter().cloned());
        if let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) {
            // Parsed here first, so a bad file fails as it does for Redis and CQL.
            certificates(cert)?;
            private_key(key)?;
            let read = |path: &PathBuf| {
                std::fs::read(path).map_err(|e| Error::File { path: path.display().to_string(), reason: e.to_string() })
            };
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        Ok(Some(config))
    }
}

/// Verifies the server's certificate against the CA as usual, but for the
/// configured name rather than the one the client connected by.
#[derive(Debug)]
struct AsNamed {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl AsNamed {
    fn new(roots: Arc<rustls::RootCertStore>, name: &str) -> Result<Self, Error> {
        let name = ServerName::try_from(name.to_owned())
            .map_err(|_| Error::Config(format!("server_name {name:?} is neither a DNS name nor an IP address")))?;
        let inner = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| Error::Config(e.to_string()))?;
        Ok(Self { inner, name })
    }
}

impl ServerCertVerifier for AsNamed {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _connected_as: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, certificate, signature)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, certificate, signature)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(ca: Option<&str>, cert: Option<&str>, key: Option<&str>, server_name: Option<&str>) -> BackendTls {
        BackendTls {
            ca_file: ca.map(PathBuf::from),
            cert_file: cert.map(PathBuf::from),
            key_file: key.map(PathBuf::from),
            server_name: server_name.map(str::to_owned),
        }
    }

    #[test]
    fn settings_that_cannot_apply_are_refused() {
        let section = "presence.redis.tls";
        BackendTls::default().validate(section).unwrap();
        tls(Some("ca.pem"), Some("c.pem"), Some("k.pem"), Some("redis.internal")).validate(section).unwrap();
        tls(Some("ca.pem"), None, None, Some("10.0.0.7")).validate(section).unwrap();
        for (bad, says) in [
            (tls(Some("ca.pem"), Some("c.pem"), None, None), "go together"),
            (tls(None, Some("c.pem"), Some("k.pem"), None), "ca_file is unset"),
            (tls(None, None, None, Some("redis.internal")), "ca_file is unset"),
            (tls(Some("ca.pem"), None, None, Some("not a name")), "neither a DNS name"),
        ] {
            let error = bad.validate(section).unwrap_err();
            assert!(error.contains(says) && error.contains(section), "{bad:?}: {error}");
        }
    }

    #[test]
    fn off_without_a_ca_and_a_missing_file_is_named() {
        assert!(BackendTls::default().client_config().unwrap().is_none());
        assert!(BackendTls::default().tonic().unwrap().is_none());
        let missing = tls(Some("/nonexistent/ca.pem"), None, None, None);
        let error = missing.client_config().unwrap_err().to_string();
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");
        let error = missing.tonic().unwrap_err().to_string();
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");
    }

    #[test]
    fn builds_with_a_client_certificate_and_a_server_name() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let certificate =
            rcgen::CertificateParams::new(vec!["db.internal".to_owned()]).unwrap().self_signed(&key).unwrap();
        let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_file, certificate.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let files = BackendTls {
            ca_file: Some(cert_file.clone()),
            cert_file: Some(cert_file),
            key_file: Some(key_file),
            server_name: Some("db.internal".into()),
        };
        assert!(files.client_config().unwrap().is_some());
        assert!(files.tonic().unwrap().is_some());
    }
}
