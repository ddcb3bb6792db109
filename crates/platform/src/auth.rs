//! JWT bearer authentication. The user id is the token's `sub`.
//!
//! Verification keys come from configuration: an HS256 shared secret, a PEM
//! public key (RS256 or ES256), or a JWKS file whose keys are chosen by the
//! token's `kid`. Expiry is always required.
//!
//! The published development secret ([`DEV_SECRET`]) is a key only in
//! development mode (`auth.development`, which `messenger up` turns on when no
//! key is configured) and only while no other key is configured: a deployment
//! that sets a public key or JWKS never accepts it, and one that configures
//! the development secret by value without development mode refuses to start.
//! Key files are read again when they change (polled) and on SIGHUP, so keys
//! rotate without a restart; a file that no longer parses keeps the old keys.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, jwk::JwkSet};
use serde::{Deserialize, Serialize};
use tonic::{Request, Status, metadata::MetadataMap};

/// Secret of development mode (`messenger up` with no key configured); published, so never a key elsewhere.
pub const DEV_SECRET: &str = "messenger-dev-secret-change-me";

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthOptions {
    /// Development mode: with no key configured, tokens are signed and verified
    /// with the published [`DEV_SECRET`]. `messenger up` turns it on when no key
    /// is configured; never set it on a deployment.
    pub development: bool,
    /// Shared HS256 secret. Used to verify tokens and by `messenger token` to mint them.
    pub hs256_secret: Option<String>,
    /// PEM public key for RS256/ES256 tokens; `public_key_algorithm` says which.
    pub public_key_file: Option<PathBuf>,
    pub public_key_algorithm: KeyAlgorithm,
    /// A JWKS document (`{"keys": [...]}`); tokens select a key with `kid`.
    pub jwks_file: Option<PathBuf>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud`, when set.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp`/`nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// How often key files are checked for changes (SIGHUP reloads at once).
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for AuthOptions {
    fn default() -> Self {
        Self {
            development: false,
            hs256_secret: None,
            public_key_file: None,
            public_key_algorithm: KeyAlgorithm::Rs256,
            jwks_file: None,
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
            reload_interval: Duration::from_secs(10),
        }
    }
}

impl AuthOptions {
    /// Whether any verification key is configured.
    pub fn keys_configured(&self) -> bool {
        self.hs256_secret.is_some() || self.public_key_file.is_some() || self.jwks_file.is_some()
    }

    /// What `messenger up` (and `token` / `chat` against it) run with:
    /// development mode when no key is configured, the options unchanged otherwise.
    pub fn or_development(mut self) -> Self {
        if !self.keys_configured() {
            self.development = true;
        }
        self
    }

    /// Whether tokens are verified with the development secret.
    pub fn uses_development_secret(&self) -> bool {
        self.development && !self.keys_configured()
    }

    /// The files keys are read from (watched for rotation).
    pub fn key_files(&self) -> Vec<PathBuf> {
        self.public_key_file.iter().chain(&self.jwks_file).cloned().collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum KeyAlgorithm {
    Rs256,
    Es256,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no verification key configured: set auth.jwks_file, auth.public_key_file or auth.hs256_secret \
         (auth.development = true uses the published development secret; for a laptop only)"
    )]
    NoKeys,
    #[error(
        "auth.hs256_secret is the published development secret; configure a real key, or set \
         auth.development = true on a laptop"
    )]
    DevSecretConfigured,
    #[error("cannot read key file {path}: {source}")]
    KeyFile { path: String, source: std::io::Error },
    #[error("invalid key in {path}: {reason}")]
    InvalidKey { path: String, reason: String },
    #[error("missing bearer token")]
    MissingToken,
    #[error("invalid token: {0}")]
    InvalidToken(String),
    #[error("minting requires auth.hs256_secret (or development mode with no key configured)")]
    NoSigningSecret,
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match error {
            Error::MissingToken | Error::InvalidToken(_) => Status::unauthenticated(error.to_string()),
            _ => Status::internal(error.to_string()),
        }
    }
}

/// The claims we read and write.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// The authenticated caller, stored in request extensions by [`Verifier::interceptor`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserId(pub String);

/// When the caller's token expires (`exp`, Unix seconds), stored beside [`UserId`]:
/// a stream opened with the token ends then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenExpiry(pub u64);

struct Key {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// Verifies bearer tokens against every configured key. Cloning shares the
/// keys, so a [`Verifier::reload`] reaches every clone.
#[derive(Clone)]
pub struct Verifier {
    keys: Arc<RwLock<Arc<Vec<Key>>>>,
    options: Arc<AuthOptions>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("keys", &self.current_keys().len()).finish()
    }
}

impl Verifier {
    pub fn from_options(options: &AuthOptions) -> Result<Self, Error> {
        let keys = load_keys(options)?;
        Ok(Self { keys: Arc::new(RwLock::new(Arc::new(keys))), options: Arc::new(options.clone()) })
    }

    /// Reads the key files again; on failure the keys in use stay.
    pub fn reload(&self) -> Result<usize, Error> {
        let keys = load_keys(&self.options)?;
        let count = keys.len();
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        Ok(count)
    }

    /// The options the keys were loaded from.
    pub fn options(&self) -> &AuthOptions {
        &self.options
    }

    fn current_keys(&self) -> Arc<Vec<Key>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Every key the options configure; the development secret only in
/// development mode with nothing else configured.
fn load_keys(options: &AuthOptions) -> Result<Vec<Key>, Error> {
    let mut keys = Vec::new();
    if options.hs256_secret.as_deref() == Some(DEV_SECRET) && !options.development {
        return Err(Error::DevSecretConfigured);
    }
    if options.uses_development_secret() {
        keys.push(Key { kid: None, algorithm: Algorithm::HS256, key: DecodingKey::from_secret(DEV_SECRET.as_bytes()) });
    }
    if let Some(secret) = &options.hs256_secret {
        keys.push(Key { kid: None, algorithm: Algorithm::HS256, key: DecodingKey::from_secret(secret.as_bytes()) });
    }
    if let Some(path) = &options.public_key_file {
        let pem = read(path)?;
        let invalid = |e: jsonwebtoken::errors::Error| Error::InvalidKey {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let (algorithm, key) = match options.public_key_algorithm {
            KeyAlgorithm::Rs256 => (Algorithm::RS256, DecodingKey::from_rsa_pem(&pem).map_err(invalid)?),
            KeyAlgorithm::Es256 => (Algorithm::ES256, DecodingKey::from_ec_pem(&pem).map_err(invalid)?),
        };
        keys.push(Key { kid: None, algorithm, key });
    }
    if let Some(path) = &options.jwks_file {
        let text = read(path)?;
        let invalid = |reason: String| Error::InvalidKey { path: path.display().to_string(), reason };
        let set: JwkSet = serde_json::from_slice(&text).map_err(|e| invalid(e.to_string()))?;
        for jwk in &set.keys {
            let algorithm = match jwk.common.key_algorithm {
                Some(alg) => {
                    alg.to_string().parse::<Algorithm>().map_err(|_| invalid(format!("unsupported algorithm {alg}")))?
                }
                None => match &jwk.algorithm {
                    jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                    _ => return Err(invalid("key without alg".into())),
                },
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| invalid(e.to_string()))?;
            keys.push(Key { kid: jwk.common.key_id.clone(), algorithm, key });
        }
    }
    if keys.is_empty() {
        return Err(Error::NoKeys);
    }
    Ok(keys)
}

impl Verifier {
    /// Returns the verified claims or why the token is refused.
    pub fn verify(&self, token: &str) -> Result<Claims, Error> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| Error::InvalidToken(e.to_string()))?;
        let mut last_error = Error::InvalidToken(format!("no key for algorithm {:?}", header.alg));
        let keys = self.current_keys();
        let options = &self.options;
        for key in keys.iter().filter(|k| k.algorithm == header.alg) {
            if let (Some(wanted), Some(have)) = (&header.kid, &key.kid)
                && wanted != have
            {
                continue;
            }
            let mut validation = Validation::new(key.algorithm);
            validation.leeway = options.leeway.as_secs();
            let mut required = vec!["exp", "sub"];
            if options.issuer.is_some() {
                required.push("iss");
            }
            if options.audience.is_some() {
                required.push("aud");
            }
            validation.set_required_spec_claims(&required);
            match &options.issuer {
                Some(issuer) => validation.set_issuer(&[issuer]),
                None => validation.iss = None,
            }
            match &options.audience {
                Some(audience) => validation.set_audience(&[audience]),
                None => validation.validate_aud = false,
            }
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
                Ok(data) if data.claims.sub.is_empty() => {
                    return Err(Error::InvalidToken("empty sub".into()));
                }
                Ok(data) => return Ok(data.claims),
                Err(error) => last_error = Error::InvalidToken(error.to_string()),
            }
        }
        Err(last_error)
    }

    /// Verifies the `authorization: Bearer` metadata of a request.
    pub fn verify_metadata(&self, metadata: &MetadataMap) -> Result<(UserId, TokenExpiry), Error> {
        let token = bearer_token(metadata).ok_or(Error::MissingToken)?;
        let claims = self.verify(token)?;
        Ok((UserId(claims.sub), TokenExpiry(claims.exp)))
    }

    /// A tonic interceptor that rejects unauthenticated calls and records the
    /// caller ([`UserId`]) and the token's expiry ([`TokenExpiry`]).
    pub fn interceptor(&self) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + use<> {
        let verifier = self.clone();
        move |mut request: Request<()>| {
            let (user, expiry) = verifier.verify_metadata(request.metadata())?;
            request.extensions_mut().insert(user);
            request.extensions_mut().insert(expiry);
            Ok(request)
        }
    }
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::KeyFile { path: path.display().to_string(), source })
}

/// The token of an `authorization: Bearer <token>` header, if present.
pub fn bearer_token(metadata: &MetadataMap) -> Option<&str> {
    let value = metadata.get("authorization")?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer "))?;
    (!token.is_empty()).then_some(token.trim())
}

/// The caller recorded by the interceptor.
pub fn caller<T>(request: &Request<T>) -> Result<&UserId, Status> {
    request.extensions().get::<UserId>().ok_or_else(|| Status::unauthenticated("missing bearer token"))
}

/// Mints HS256 tokens with the configured secret, or the development secret
/// in development mode: `messenger token`, tests and the benchmark.
pub fn mint_hs256(options: &AuthOptions, user: &str, ttl: Duration) -> Result<String, Error> {
    let secret = match &options.hs256_secret {
        Some(secret) => secret.as_str(),
        None if options.uses_development_secret() => DEV_SECRET,
        None => return Err(Error::NoSigningSecret),
    };
    let now = crate::ids::now_ms() as u64 / 1000;
    let claims = Claims {
        sub: user.to_owned(),
        exp: now + ttl.as_secs(),
        iat: Some(now),
        iss: options.issuer.clone(),
        aud: options.audience.clone(),
    };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes()))
        .map_err(|e| Error::InvalidToken(e.to_string()))
}

#[cfg(test)]
mod tests;
