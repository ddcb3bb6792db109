//! `messenger certs`: a development cluster CA with a certificate per role,
//! and a public certificate for the gateway, so TLS and mutual TLS can be
//! tried without a PKI. Production mounts certificates from its own CA
//! (cert-manager, say) with the same names: a role's certificate is valid
//! for `<role>.<tls.cluster_domain>`.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use messenger_platform::discovery::Role;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// What `generate` writes.
#[derive(Debug, Clone)]
pub struct Generated {
    pub dir: PathBuf,
    /// `ca.pem`: the cluster CA, also the CA clients trust for the public certificate.
    pub ca: PathBuf,
    /// `public.pem` / `public-key.pem`: the gateway's public port.
    pub public: (PathBuf, PathBuf),
    /// `<role>.pem` / `<role>-key.pem` for each role, and `all` (every role: one
    /// process running several, as `messenger up` does).
    pub roles: Vec<(String, PathBuf, PathBuf)>,
}

impl Generated {
    /// The certificate and key of one name (`gateway`, `message`, `presence`, `all`).
    pub fn role(&self, name: &str) -> Option<(&Path, &Path)> {
        self.roles.iter().find(|(role, ..)| role == name).map(|(_, cert, key)| (cert.as_path(), key.as_path()))
    }

    /// The `[tls]` settings that use these files for a process holding `name`'s certificate.
    pub fn config_snippet(&self, name: &str) -> String {
        let (cert, key) = self.role(name).expect("generated for every role");
        format!(
            "[tls]\npublic_cert_file = {:?}\npublic_key_file = {:?}\ncluster_ca_file = {:?}\ncluster_cert_file = {:?}\ncluster_key_file = {:?}\n",
            self.public.0, self.public.1, self.ca, cert, key
        )
    }
}

/// Writes a new CA and certificates valid for `days` into `dir`. The public
/// certificate is valid for `public_names` (DNS names or IP addresses).
pub fn generate(dir: &Path, domain: &str, public_names: &[String], days: u32) -> anyhow::Result<Generated> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let now = time_now();
    let until = now + std::time::Duration::from_secs(u64::from(days) * 86_400);

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.distinguished_name.push(DnType::CommonName, "messenger development cluster CA");
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    ca_params.not_before = now.into();
    ca_params.not_after = until.into();
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca = dir.join("ca.pem");
    write(&ca, &ca_cert.pem(), false)?;
    write(&dir.join("ca-key.pem"), &ca_key.serialize_pem(), true)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |name: &str, subject_alt_names: Vec<String>| -> anyhow::Result<(PathBuf, PathBuf)> {
        let mut params = CertificateParams::new(subject_alt_names)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // A role's certificate serves its port and calls other roles.
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = now.into();
        params.not_after = until.into();
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        let (cert_path, key_path) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")));
        write(&cert_path, &cert.pem(), false)?;
        write(&key_path, &key.serialize_pem(), true)?;
        Ok((cert_path, key_path))
    };
    let role_name = |role: Role| format!("{role}.{domain}");
    let mut roles = Vec::new();
    for role in Role::ALL {
        let (cert, key) = leaf(role.as_str(), vec![role_name(role)])?;
        roles.push((role.as_str().to_owned(), cert, key));
    }
    let (cert, key) = leaf("all", Role::ALL.into_iter().map(role_name).collect())?;
    roles.push(("all".to_owned(), cert, key));
    let public = leaf("public", public_names.to_vec())?;
    Ok(Generated { dir: dir.to_path_buf(), ca, public, roles })
}

fn time_now() -> std::time::SystemTime {
    // A minute back, so a machine whose clock is slightly behind accepts them.
    std::time::SystemTime::now() - std::time::Duration::from_secs(60)
}

fn write(path: &Path, contents: &str, private: bool) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("cannot write {}", path.display()))?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Where `messenger up` keeps the cluster CA it makes at every start.
pub const EPHEMERAL_DIR: &str = "cluster-tls";
/// How long that CA and its certificate are valid.
const EPHEMERAL_DAYS: u32 = 365;

/// Mutual TLS for `messenger up`'s internal hops when none is configured: a
/// new cluster CA and an `all` certificate made now under
/// `<data_dir>/cluster-tls` (replaced at every start, keys readable by this
/// user only, valid a year: a long-running `up` must not lose its hops), set
/// in `config.tls`, so a forged call on an
/// internal port is refused as in production. Nothing happens when cluster
/// certificates are configured, or plaintext is asked for by name
/// (`tls.insecure_cluster_plaintext`). Returns whether it made one.
pub fn ephemeral_cluster_tls(config: &mut crate::Config) -> anyhow::Result<bool> {
    let tls = &config.tls;
    if tls.insecure_cluster_plaintext
        || tls.cluster_ca_file.is_some()
        || tls.cluster_cert_file.is_some()
        || tls.cluster_key_file.is_some()
    {
        return Ok(false);
    }
    let dir = config.data_dir.join(EPHEMERAL_DIR);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot replace {}", dir.display()))?;
    }
    let generated = generate(&dir, &config.tls.cluster_domain, &[], EPHEMERAL_DAYS)?;
    let (cert, key) = generated.role("all").context("an all-roles certificate is always made")?;
    config.tls.cluster_ca_file = Some(generated.ca.clone());
    config.tls.cluster_cert_file = Some(cert.to_path_buf());
    config.tls.cluster_key_file = Some(key.to_path_buf());
    Ok(true)
}
