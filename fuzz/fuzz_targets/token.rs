//! Bearer tokens and JWKS files, as the gateway parses them: a token against
//! a verifier holding an HS256 secret and the test JWKS (RS256 and ES256
//! keys), or, when the first byte is 0, the rest as a JWKS file to load.
//! Nothing may panic; a token the fuzzer forges must never verify.

#![no_main]

use std::{io::Write as _, sync::OnceLock};

use libfuzzer_sys::fuzz_target;
use messenger_platform::auth::{AuthOptions, Verifier};

fn testdata(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/platform/src/auth/testdata").join(name)
}

fn verifier() -> &'static Verifier {
    static VERIFIER: OnceLock<Verifier> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        let options = AuthOptions {
            hs256_secret: Some("a fuzz secret the fuzzer cannot know".into()),
            jwks_file: Some(testdata("jwks.json")),
            ..AuthOptions::default()
        };
        Verifier::from_options(&options).expect("the test keys load")
    })
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((0, jwks)) => {
            let mut file = tempfile::NamedTempFile::new().unwrap();
            file.write_all(jwks).unwrap();
            let options = AuthOptions { jwks_file: Some(file.path().to_owned()), ..AuthOptions::default() };
            let _ = Verifier::from_options(&options);
        }
        _ => {
            let Ok(token) = std::str::from_utf8(data) else { return };
            assert!(verifier().verify(token).is_err(), "a token the fuzzer made verified: {token:?}");
        }
    }
});
