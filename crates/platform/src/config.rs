//! Layered configuration: defaults -> TOML file -> `MESSENGER_*` environment ->
//! command-line flags, merged by `figment` into one typed struct.
//!
//! Nested keys use `__` in the environment: `MESSENGER_GATEWAY__LISTEN=0.0.0.0:7700`
//! sets `gateway.listen`. Only the binary calls [`load`]; services receive their
//! typed `Options` and never read the environment.

use std::path::Path;

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Serialize, de::DeserializeOwned};

/// Prefix of every environment variable the configuration reads.
pub const ENV_PREFIX: &str = "MESSENGER_";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration file {path} does not exist")]
    MissingFile { path: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("cannot render configuration: {0}")]
    Render(#[from] toml::ser::Error),
}

impl From<figment::Error> for Error {
    fn from(error: figment::Error) -> Self {
        Error::Invalid(error.to_string())
    }
}

/// Something that can check its own values after merging.
pub trait Validate {
    /// Returns a message naming the offending key when a value is unusable.
    fn validate(&self) -> Result<(), String>;
}

/// Merges the layers into `T`. `flags` is the last layer: only the fields a
/// caller sets (serialize it with `skip_serializing_if = "Option::is_none"`).
/// `not_settings` names the `MESSENGER_*` variables that are the binary's own
/// flags (`MESSENGER_CONFIG` names the file), without the prefix: they are
/// not read as settings, or `deny_unknown_fields` would refuse them.
pub fn load<T, F>(file: Option<&Path>, flags: &F, not_settings: &[&str]) -> Result<T, Error>
where
    T: DeserializeOwned + Serialize + Default + Validate,
    F: Serialize,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file {
        if !path.exists() {
            return Err(Error::MissingFile { path: path.display().to_string() });
        }
        figment = figment.merge(Toml::file(path));
    }
    let environment = Env::prefixed(ENV_PREFIX).ignore(not_settings).split("__");
    figment = figment.merge(environment).merge(Serialized::defaults(flags));
    let value: T = figment.extract()?;
    value.validate().map_err(Error::Invalid)?;
    Ok(value)
}

/// Reads one TOML document over the defaults and validates the result, as
/// [`load`] does with a file (no environment, no flags): what the config
/// fuzz target drives.
pub fn parse<T>(toml: &str) -> Result<T, Error>
where
    T: DeserializeOwned + Serialize + Default + Validate,
{
    let value: T = Figment::from(Serialized::defaults(T::default())).merge(Toml::string(toml)).extract()?;
    value.validate().map_err(Error::Invalid)?;
    Ok(value)
}

/// Renders the effective configuration as TOML (what `messenger config` prints).
pub fn render<T: Serialize>(value: &T) -> Result<String, Error> {
    Ok(toml::to_string_pretty(value)?)
}

/// What [`render_redacted`] puts in place of a secret.
pub const REDACTED: &str = "<redacted>";

/// Renders the effective configuration for people to read (`messenger
/// config`): like [`render`], with every secret replaced by [`REDACTED`]:
/// values of keys naming a secret, password or token (not the `*_file`
/// keys that name where one is), and the password of any URL.
pub fn render_redacted<T: Serialize>(value: &T) -> Result<String, Error> {
    let mut value = toml::Value::try_from(value)?;
    redact(&mut value, None);
    Ok(toml::to_string_pretty(&value)?)
}

/// Refuses a configuration holding [`REDACTED`] as a value: one made from
/// `messenger config`'s output, whose secrets would be a published word.
pub fn refuse_redacted<T: Serialize>(value: &T) -> Result<(), String> {
    fn find(value: &toml::Value, path: &str) -> Option<String> {
        match value {
            toml::Value::String(text) if text.contains(REDACTED) => Some(path.to_owned()),
            toml::Value::Table(table) => table.iter().find_map(|(key, value)| {
                find(value, &if path.is_empty() { key.clone() } else { format!("{path}.{key}") })
            }),
            toml::Value::Array(items) => items.iter().find_map(|item| find(item, path)),
            _ => None,
        }
    }
    let value = toml::Value::try_from(value).map_err(|error| error.to_string())?;
    match find(&value, "") {
        Some(path) => Err(format!(
            "{path} is {REDACTED:?}, copied from `messenger config` output: set the real secret (or remove the key)"
        )),
        None => Ok(()),
    }
}

fn redact(value: &mut toml::Value, key: Option<&str>) {
    let secret_key = key.is_some_and(|key| {
        let key = key.to_ascii_lowercase();
        !key.ends_with("_file")
            && (key.contains("secret") || key.contains("password") || key.contains("token") || key == "private_key")
    });
    match value {
        toml::Value::Table(table) => table.iter_mut().for_each(|(key, value)| redact(value, Some(key))),
        toml::Value::Array(items) => items.iter_mut().for_each(|item| redact(item, key)),
        toml::Value::String(text) if secret_key && !text.is_empty() => *text = REDACTED.to_owned(),
        toml::Value::String(text) => {
            if let Ok(mut url) = url::Url::parse(text)
                && url.password().is_some()
                && url.set_password(Some(REDACTED)).is_ok()
            {
                *text = url.to_string();
            }
        }
        _ => {}
    }
}

#[cfg(test)]
// figment's Jail API returns its large error type; that is fine in tests.
#[allow(clippy::result_large_err)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Sample {
        name: String,
        limit: u32,
        inner: Inner,
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Inner {
        depth: u32,
    }

    impl Default for Sample {
        fn default() -> Self {
            Self { name: "default".into(), limit: 10, inner: Inner { depth: 1 } }
        }
    }

    impl Validate for Sample {
        fn validate(&self) -> Result<(), String> {
            if self.limit == 0 { Err("limit must be positive".into()) } else { Ok(()) }
        }
    }

    #[derive(Serialize)]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    }

    #[test]
    fn layers_merge_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("m.toml", "name = \"file\"\nlimit = 5\n[inner]\ndepth = 3\n")?;
            jail.set_env("MESSENGER_LIMIT", "7");
            jail.set_env("MESSENGER_INNER__DEPTH", "9");
            let sample: Sample = load(Some(Path::new("m.toml")), &Flags { name: Some("flag".into()) }, &[]).unwrap();
            assert_eq!(sample.name, "flag");
            assert_eq!(sample.limit, 7);
            assert_eq!(sample.inner.depth, 9);
            let defaults: Sample = load(None, &Flags { name: None }, &[]).unwrap();
            assert_eq!(defaults.name, "default");
            Ok(())
        });
    }

    #[test]
    fn rendering_for_people_hides_every_secret() {
        #[derive(Serialize)]
        struct Secrets {
            hs256_secret: Option<String>,
            secret_access_key: String,
            secret_file: String,
            redis: Redis,
            nodes: Vec<String>,
        }
        #[derive(Serialize)]
        struct Redis {
            url: String,
            password: String,
        }
        let secrets = Secrets {
            hs256_secret: Some("hmac-key-1".into()),
            secret_access_key: "s3-key-2".into(),
            secret_file: "/run/secrets/cdn".into(),
            redis: Redis { url: "redis://cache:url-pass-3@redis:6379/0".into(), password: "pass-4".into() },
            nodes: vec!["10.0.0.1:9042".into()],
        };
        let text = render_redacted(&secrets).unwrap();
        for secret in ["hmac-key-1", "s3-key-2", "url-pass-3", "pass-4"] {
            assert!(!text.contains(secret), "{secret} shown:\n{text}");
        }
        for kept in ["/run/secrets/cdn", "redis:6379/0", "cache:", "10.0.0.1:9042"] {
            assert!(text.contains(kept), "{kept} hidden:\n{text}");
        }
        // Fed back as a configuration, a placeholder is refused, not used as a key.
        let printed: toml::Value = toml::from_str(&text).unwrap();
        let error = refuse_redacted(&printed).unwrap_err();
        assert!(error.contains("hs256_secret") || error.contains("secret_access_key"), "{error}");
        assert!(refuse_redacted(&secrets.nodes).is_ok());
    }

    #[test]
    fn the_binarys_own_variables_are_not_settings() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("m.toml", "limit = 5\n")?;
            jail.set_env("MESSENGER_CONFIG", "m.toml");
            jail.set_env("MESSENGER_TOKEN", "a bearer token");
            let sample: Sample = load(Some(Path::new("m.toml")), &Flags { name: None }, &["CONFIG", "TOKEN"]).unwrap();
            assert_eq!(sample.limit, 5);
            // Any other unknown variable is still refused.
            jail.set_env("MESSENGER_LIMT", "3");
            let error = load::<Sample, _>(None, &Flags { name: None }, &["CONFIG", "TOKEN"]).unwrap_err();
            assert!(error.to_string().contains("limt"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn invalid_values_and_unknown_keys_are_rejected() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "limit = 0\n")?;
            let error = load::<Sample, _>(Some(Path::new("bad.toml")), &Flags { name: None }, &[]).unwrap_err();
            assert!(error.to_string().contains("limit must be positive"), "{error}");
            jail.create_file("typo.toml", "limt = 3\n")?;
            let error = load::<Sample, _>(Some(Path::new("typo.toml")), &Flags { name: None }, &[]).unwrap_err();
            assert!(error.to_string().contains("limt"), "{error}");
            let error = load::<Sample, _>(Some(Path::new("absent.toml")), &Flags { name: None }, &[]).unwrap_err();
            assert!(matches!(error, Error::MissingFile { .. }));
            Ok(())
        });
    }

    #[test]
    fn parse_reads_one_document_over_the_defaults_and_validates() {
        let sample: Sample = parse("limit = 7\n").unwrap();
        assert_eq!((sample.limit, sample.name.as_str()), (7, Sample::default().name.as_str()));
        assert!(parse::<Sample>("limit = 0\n").unwrap_err().to_string().contains("limit must be positive"));
        assert!(parse::<Sample>("limt = 3\n").unwrap_err().to_string().contains("limt"));
        assert!(parse::<Sample>("limit = \"seven\"\n").is_err());
    }
}
