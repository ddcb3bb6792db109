//! JWT bearer authentication. The user id is the token's `sub`.
//!
//! Verification keys come from configuration: an HS256 shared secret (the dev
//! default), a PEM public key (RS256 or ES256), or a JWKS file whose keys are
//! chosen by the token's `kid`. Expiry is always required.

use std::{path::PathBuf, time::Duration};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, jwk::JwkSet};
use serde::{Deserialize, Serialize};
use tonic::{Request, Status, metadata::MetadataMap};

/// Secret used when nothing else is configured; only fit for a laptop.
pub const DEV_SECRET: &str = "messenger-dev-secret-change-me";

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthOptions {
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
}

impl Default for AuthOptions {
    fn default() -> Self {
        Self {
            hs256_secret: Some(DEV_SECRET.to_owned()),
            public_key_file: None,
            public_key_algorithm: KeyAlgorithm::Rs256,
            jwks_file: None,
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
        }
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
    #[error("no verification key configured (set auth.hs256_secret, auth.public_key_file or auth.jwks_file)")]
    NoKeys,
    #[error("cannot read key file {path}: {source}")]
    KeyFile { path: String, source: std::io::Error },
    #[error("invalid key in {path}: {reason}")]
    InvalidKey { path: String, reason: String },
    #[error("missing bearer token")]
    MissingToken,
    #[error("invalid token: {0}")]
    InvalidToken(String),
    #[error("minting requires auth.hs256_secret")]
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

struct Key {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// Verifies bearer tokens against every configured key.
#[derive(Clone)]
pub struct Verifier {
    keys: std::sync::Arc<Vec<Key>>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: u64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("keys", &self.keys.len()).finish()
    }
}

impl Verifier {
    pub fn from_options(options: &AuthOptions) -> Result<Self, Error> {
        let mut keys = Vec::new();
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
                    Some(alg) => alg
                        .to_string()
                        .parse::<Algorithm>()
                        .map_err(|_| invalid(format!("unsupported algorithm {alg}")))?,
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
        Ok(Self {
            keys: std::sync::Arc::new(keys),
            issuer: options.issuer.clone(),
            audience: options.audience.clone(),
            leeway: options.leeway.as_secs(),
        })
    }

    /// Returns the verified claims or why the token is refused.
    pub fn verify(&self, token: &str) -> Result<Claims, Error> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| Error::InvalidToken(e.to_string()))?;
        let mut last_error = Error::InvalidToken(format!("no key for algorithm {:?}", header.alg));
        for key in self.keys.iter().filter(|k| k.algorithm == header.alg) {
            if let (Some(wanted), Some(have)) = (&header.kid, &key.kid)
                && wanted != have
            {
                continue;
            }
            let mut validation = Validation::new(key.algorithm);
            validation.leeway = self.leeway;
            let mut required = vec!["exp", "sub"];
            if self.issuer.is_some() {
                required.push("iss");
            }
            if self.audience.is_some() {
                required.push("aud");
            }
            validation.set_required_spec_claims(&required);
            match &self.issuer {
                Some(issuer) => validation.set_issuer(&[issuer]),
                None => validation.iss = None,
            }
            match &self.audience {
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
    pub fn verify_metadata(&self, metadata: &MetadataMap) -> Result<UserId, Error> {
        let token = bearer_token(metadata).ok_or(Error::MissingToken)?;
        Ok(UserId(self.verify(token)?.sub))
    }

    /// A tonic interceptor that rejects unauthenticated calls and records the caller.
    pub fn interceptor(&self) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + use<> {
        let verifier = self.clone();
        move |mut request: Request<()>| {
            let user = verifier.verify_metadata(request.metadata())?;
            request.extensions_mut().insert(user);
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

/// Mints HS256 tokens: `messenger token`, tests and the benchmark.
pub fn mint_hs256(options: &AuthOptions, user: &str, ttl: Duration) -> Result<String, Error> {
    let secret = options.hs256_secret.as_ref().ok_or(Error::NoSigningSecret)?;
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
