//! Download URLs: presigned storage GETs, or CDN URLs signed for the CDN.
//!
//! - `hmac`: `{base}/{key}?expires={unix}&token={t}` with
//!   `t = base64url(HMAC-SHA256(secret, "{expires}{path}"))`, `path` being the
//!   URL's path as the edge sees it. nginx (njs), Fastly (VCL `digest.hmac_sha256`)
//!   and Cloudflare (Workers, or WAF `is_timed_hmac_valid_v0`-style rules) check it.
//! - `cloudfront`: CloudFront signed URLs with a canned policy: RSA-SHA1
//!   (PKCS#1 v1.5) over `{"Statement":[{"Resource":URL,"Condition":{"DateLessThan":{"AWS:EpochTime":E}}}]}`,
//!   in CloudFront's URL-safe base64 (`+`->`-`, `=`->`_`, `/`->`~`).

use base64::{
    Engine,
    engine::general_purpose::{STANDARD as BASE64, URL_SAFE_NO_PAD},
};
use hmac::{Hmac, Mac};
use rsa::{
    RsaPrivateKey, pkcs1v15::SigningKey, pkcs8::DecodePrivateKey, signature::SignatureEncoding, signature::Signer,
};
use sha1::Sha1;
use sha2::Sha256;

use crate::options::{CdnMode, CdnOptions};

#[derive(Clone)]
pub enum Cdn {
    None,
    Hmac { base: String, secret: Vec<u8> },
    Cloudfront { base: String, key_pair_id: String, signer: Box<SigningKey<Sha1>> },
}

fn read_file(path: &std::path::Path, what: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|error| format!("media.cdn.{what} {}: {error}", path.display()))
}

impl Cdn {
    pub fn from_options(options: &CdnOptions) -> Result<Self, String> {
        let base = options.base_url.trim_end_matches('/').to_owned();
        Ok(match options.mode {
            CdnMode::None => Cdn::None,
            CdnMode::Hmac => {
                let secret = match &options.secret_file {
                    Some(path) => read_file(path, "secret_file")?.trim().to_owned(),
                    None => options.secret.clone(),
                };
                if secret.len() < 16 {
                    return Err("media.cdn secret must be at least 16 bytes".into());
                }
                Cdn::Hmac { base, secret: secret.into_bytes() }
            }
            CdnMode::Cloudfront => {
                let path = options.private_key_file.as_deref().ok_or("media.cdn.private_key_file is required")?;
                let pem = read_file(path, "private_key_file")?;
                let key = RsaPrivateKey::from_pkcs8_pem(&pem)
                    .or_else(|_| rsa::pkcs1::DecodeRsaPrivateKey::from_pkcs1_pem(&pem))
                    .map_err(|error| format!("media.cdn.private_key_file is not an RSA private key: {error}"))?;
                Cdn::Cloudfront {
                    base,
                    key_pair_id: options.key_pair_id.clone(),
                    signer: Box::new(SigningKey::<Sha1>::new(key)),
                }
            }
        })
    }

    /// The CDN URL of `key`, working until `expires` (Unix seconds). None without a CDN.
    pub fn url(&self, key: &str, expires: u64) -> Option<String> {
        match self {
            Cdn::None => None,
            Cdn::Hmac { base, secret } => {
                let url = format!("{base}/{key}");
                let path = path_of(&url);
                Some(format!("{url}?expires={expires}&token={}", hmac_token(secret, expires, &path)))
            }
            Cdn::Cloudfront { base, key_pair_id, signer } => {
                let url = format!("{base}/{key}");
                let policy = canned_policy(&url, expires);
                let signature = cloudfront_base64(&signer.sign(policy.as_bytes()).to_bytes());
                Some(format!("{url}?Expires={expires}&Signature={signature}&Key-Pair-Id={key_pair_id}"))
            }
        }
    }
}

/// The path part of an absolute URL (what an edge sees as `$uri`).
fn path_of(url: &str) -> String {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    after_scheme.find('/').map_or_else(|| "/".to_owned(), |start| after_scheme[start..].to_owned())
}

pub fn hmac_token(secret: &[u8], expires: u64, path: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(format!("{expires}{path}").as_bytes());
    URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

pub fn canned_policy(url: &str, expires: u64) -> String {
    format!(r#"{{"Statement":[{{"Resource":"{url}","Condition":{{"DateLessThan":{{"AWS:EpochTime":{expires}}}}}}}]}}"#)
}

fn cloudfront_base64(bytes: &[u8]) -> String {
    BASE64.encode(bytes).replace('+', "-").replace('=', "_").replace('/', "~")
}

/// `Content-Disposition` for serving `file_name`: inline only when allowed.
pub fn content_disposition(inline: bool, file_name: &str) -> String {
    let ascii: String = file_name
        .chars()
        .map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' { c } else { '_' })
        .collect();
    let mut encoded = String::new();
    for byte in file_name.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    let kind = if inline { "inline" } else { "attachment" };
    format!("{kind}; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_urls_sign_expiry_and_path() {
        let cdn = Cdn::Hmac { base: "https://cdn.example.com/media".into(), secret: b"0123456789abcdef".to_vec() };
        let url = cdn.url("conversations/c/m/original", 1_900_000_000).unwrap();
        let token = hmac_token(b"0123456789abcdef", 1_900_000_000, "/media/conversations/c/m/original");
        assert_eq!(
            url,
            format!("https://cdn.example.com/media/conversations/c/m/original?expires=1900000000&token={token}")
        );
        assert_ne!(token, hmac_token(b"0123456789abcdef", 1_900_000_001, "/media/conversations/c/m/original"));
    }

    /// CloudFront's signature checked by an independent implementation (the
    /// `openssl` tool) with the public key alone.
    #[test]
    fn cloudfront_urls_verify_with_the_public_key() {
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let status = std::process::Command::new("openssl").args(args).current_dir(dir.path()).status().unwrap();
            assert!(status.success(), "openssl {args:?}");
        };
        run(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "key.pem"]);
        run(&["pkey", "-in", "key.pem", "-pubout", "-out", "public.pem"]);
        let options = CdnOptions {
            mode: CdnMode::Cloudfront,
            base_url: "https://d111111abcdef8.cloudfront.net".into(),
            key_pair_id: "K2JCJMDEHXQW5F".into(),
            private_key_file: Some(dir.path().join("key.pem")),
            ..CdnOptions::default()
        };
        let cdn = Cdn::from_options(&options).unwrap();
        let url = cdn.url("conversations/c/m/original", 1_900_000_000).unwrap();
        let (resource, query) = url.split_once('?').unwrap();
        assert_eq!(resource, "https://d111111abcdef8.cloudfront.net/conversations/c/m/original");
        let params: std::collections::HashMap<&str, &str> =
            query.split('&').map(|pair| pair.split_once('=').unwrap()).collect();
        assert_eq!((params["Expires"], params["Key-Pair-Id"]), ("1900000000", "K2JCJMDEHXQW5F"));
        let signature = params["Signature"].replace('-', "+").replace('_', "=").replace('~', "/");
        std::fs::write(dir.path().join("signature"), BASE64.decode(signature).unwrap()).unwrap();
        std::fs::write(dir.path().join("policy"), canned_policy(resource, 1_900_000_000)).unwrap();
        let verify = ["dgst", "-sha1", "-verify", "public.pem", "-signature", "signature", "policy"];
        run(&verify);
        std::fs::write(dir.path().join("policy"), canned_policy(resource, 1_900_000_001)).unwrap();
        let tampered = std::process::Command::new("openssl").args(verify).current_dir(dir.path()).output().unwrap();
        assert!(!tampered.status.success(), "another expiry does not verify");
    }

    #[test]
    fn disposition_quotes_nothing_a_header_could_break_on() {
        assert_eq!(
            content_disposition(false, "a\"b\r\n.pdf"),
            "attachment; filename=\"a_b__.pdf\"; filename*=UTF-8''a%22b%0D%0A.pdf"
        );
        assert!(content_disposition(true, "é.jpg").starts_with("inline; filename=\"_.jpg\""));
    }
}
