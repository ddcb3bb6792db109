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
