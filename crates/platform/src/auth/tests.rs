use std::path::PathBuf;

use super::*;

fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/auth/testdata").join(name)
}

fn claims(sub: &str, exp_offset_secs: i64) -> Claims {
    let now = crate::ids::now_ms() / 1000;
    Claims { sub: sub.into(), exp: (now + exp_offset_secs) as u64, iat: None, iss: None, aud: None }
}

fn sign(algorithm: Algorithm, kid: Option<&str>, private_pem: &str, claims: &Claims) -> String {
    let pem = std::fs::read(testdata(private_pem)).unwrap();
    let key = match algorithm {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
        _ => EncodingKey::from_ec_pem(&pem).unwrap(),
    };
    let mut header = Header::new(algorithm);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

fn development() -> AuthOptions {
    AuthOptions::default().or_development()
}

#[test]
fn dev_token_round_trips() {
    let options = development();
    let token = mint_hs256(&options, "alice", Duration::from_secs(60)).unwrap();
    let verifier = Verifier::from_options(&options).unwrap();
    assert_eq!(verifier.verify(&token).unwrap().sub, "alice");
}

#[test]
fn expired_and_badly_signed_tokens_are_refused() {
    let options = AuthOptions { leeway: Duration::ZERO, ..development() };
    let verifier = Verifier::from_options(&options).unwrap();
    let expired = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims("alice", -10),
        &EncodingKey::from_secret(DEV_SECRET.as_bytes()),
    )
    .unwrap();
    assert!(matches!(verifier.verify(&expired), Err(Error::InvalidToken(_))));
    let other = AuthOptions { hs256_secret: Some("another secret".into()), ..AuthOptions::default() };
    let forged = mint_hs256(&other, "alice", Duration::from_secs(60)).unwrap();
    assert!(matches!(verifier.verify(&forged), Err(Error::InvalidToken(_))));
    assert!(matches!(verifier.verify("garbage"), Err(Error::InvalidToken(_))));
}

#[test]
fn rs256_and_es256_public_keys_verify() {
    let rsa = AuthOptions {
        hs256_secret: None,
        public_key_file: Some(testdata("rs256_public.pem")),
        public_key_algorithm: KeyAlgorithm::Rs256,
        ..AuthOptions::default()
    };
    let verifier = Verifier::from_options(&rsa).unwrap();
    let token = sign(Algorithm::RS256, None, "rs256_private.pem", &claims("bob", 60));
    assert_eq!(verifier.verify(&token).unwrap().sub, "bob");
    // An HS256 token is refused when only a public key is configured.
    let hs = mint_hs256(&development(), "bob", Duration::from_secs(60)).unwrap();
    assert!(verifier.verify(&hs).is_err());

    let ec = AuthOptions {
        hs256_secret: None,
        public_key_file: Some(testdata("es256_public.pem")),
        public_key_algorithm: KeyAlgorithm::Es256,
        ..AuthOptions::default()
    };
    let verifier = Verifier::from_options(&ec).unwrap();
    let token = sign(Algorithm::ES256, None, "es256_private.pem", &claims("carol", 60));
    assert_eq!(verifier.verify(&token).unwrap().sub, "carol");
}

#[test]
fn jwks_keys_are_selected_by_kid() {
    let options = AuthOptions { hs256_secret: None, jwks_file: Some(testdata("jwks.json")), ..AuthOptions::default() };
    let verifier = Verifier::from_options(&options).unwrap();
    let token = sign(Algorithm::RS256, Some("test-rsa-1"), "rs256_private.pem", &claims("dave", 60));
    assert_eq!(verifier.verify(&token).unwrap().sub, "dave");
    let wrong_kid = sign(Algorithm::RS256, Some("unknown"), "rs256_private.pem", &claims("dave", 60));
    assert!(verifier.verify(&wrong_kid).is_err());
}

#[test]
fn issuer_and_audience_are_enforced_when_configured() {
    let options =
        AuthOptions { issuer: Some("https://id.example".into()), audience: Some("messenger".into()), ..development() };
    let verifier = Verifier::from_options(&options).unwrap();
    let good = mint_hs256(&options, "erin", Duration::from_secs(60)).unwrap();
    assert!(verifier.verify(&good).is_ok());
    let plain = mint_hs256(&development(), "erin", Duration::from_secs(60)).unwrap();
    assert!(verifier.verify(&plain).is_err());
}

#[test]
fn no_keys_is_a_configuration_error() {
    let options = AuthOptions { hs256_secret: None, ..AuthOptions::default() };
    assert!(matches!(Verifier::from_options(&options), Err(Error::NoKeys)));
    assert!(matches!(mint_hs256(&options, "x", Duration::from_secs(1)), Err(Error::NoSigningSecret)));
}

#[test]
fn the_development_secret_is_a_key_only_in_development_mode_with_nothing_else_configured() {
    let dev_token = mint_hs256(&development(), "mallory", Duration::from_secs(60)).unwrap();
    // Configured by value outside development mode: refused at start.
    let by_value = AuthOptions { hs256_secret: Some(DEV_SECRET.into()), ..AuthOptions::default() };
    assert!(matches!(Verifier::from_options(&by_value), Err(Error::DevSecretConfigured)));
    // Development mode plus a real key: only the real key verifies.
    for configured in [
        AuthOptions { jwks_file: Some(testdata("jwks.json")), ..development() },
        AuthOptions {
            public_key_file: Some(testdata("rs256_public.pem")),
            development: true,
            ..AuthOptions::default()
        },
        AuthOptions { hs256_secret: Some("a real secret".into()), development: true, ..AuthOptions::default() },
    ] {
        assert!(!configured.uses_development_secret());
        let verifier = Verifier::from_options(&configured).unwrap();
        assert!(verifier.verify(&dev_token).is_err(), "development secret accepted beside {configured:?}");
    }
}

#[test]
fn reload_picks_up_a_rotated_jwks_and_keeps_the_old_keys_when_the_new_file_is_broken() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::copy(testdata("jwks.json"), &path).unwrap();
    let verifier =
        Verifier::from_options(&AuthOptions { jwks_file: Some(path.clone()), ..AuthOptions::default() }).unwrap();
    let rsa = sign(Algorithm::RS256, Some("test-rsa-1"), "rs256_private.pem", &claims("dave", 60));
    let ec = sign(Algorithm::ES256, Some("test-ec-2"), "es256_private.pem", &claims("dave", 60));
    assert!(verifier.verify(&rsa).is_ok() && verifier.verify(&ec).is_err());
    std::fs::copy(testdata("jwks_rotated.json"), &path).unwrap();
    assert_eq!(verifier.clone().reload().unwrap(), 1);
    assert!(verifier.verify(&ec).is_ok() && verifier.verify(&rsa).is_err(), "clones share the reloaded keys");
    std::fs::write(&path, "{ not json").unwrap();
    assert!(verifier.reload().is_err());
    assert!(verifier.verify(&ec).is_ok(), "a broken file keeps the keys in use");
}

#[test]
fn bearer_token_is_read_from_metadata() {
    let mut metadata = MetadataMap::new();
    assert!(bearer_token(&metadata).is_none());
    metadata.insert("authorization", "Bearer abc".parse().unwrap());
    assert_eq!(bearer_token(&metadata), Some("abc"));
    metadata.insert("authorization", "Basic abc".parse().unwrap());
    assert!(bearer_token(&metadata).is_none());
}
