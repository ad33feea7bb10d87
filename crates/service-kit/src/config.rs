//! Layered configuration: the service's built-in defaults, then an optional file, then environment
//! variables (`DATABASE_URL` sets `database_url`), into one typed struct built at start-up.

use std::path::Path;

use config::{Config, Environment, File, FileFormat, Source, ValueKind};
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(#[from] config::ConfigError);

/// `defaults` is the service's TOML defaults (embedded with `include_str!`); `file` an optional
/// operator file (TOML, YAML-free on purpose: one format to document).
pub fn load<T: DeserializeOwned>(defaults: &str, file: Option<&Path>) -> Result<T, ConfigError> {
    load_from(defaults, file, Environment::default())
}

/// The service's defaults alone, without any file or the environment: what tests start from, so
/// that a variable set in the shell running them cannot change what they test.
pub fn defaults<T: DeserializeOwned>(defaults: &str) -> Result<T, ConfigError> {
    Ok(Config::builder()
        .add_source(File::from_str(defaults, FileFormat::Toml))
        .build()?
        .try_deserialize()?)
}

/// A service's settings, with its built-in defaults (`DEFAULTS`, its `defaults.toml`). Besides
/// its own, every service has `log_format`, which [`crate::service::main`] reads.
pub trait ServiceSettings: DeserializeOwned {
    /// The service's `defaults.toml`, embedded with `include_str!`.
    const DEFAULTS: &'static str;

    /// The built-in defaults alone (no file, no environment), for tests to start from.
    #[allow(
        clippy::expect_used,
        reason = "the defaults are compiled in and every test starts from them"
    )]
    fn defaults() -> Self {
        // `DEFAULTS` is compiled in, and every service's tests start from it: a broken file fails
        // them all, never a deployment
        defaults(Self::DEFAULTS).expect("built-in defaults parse")
    }
}

fn load_from<T: DeserializeOwned>(
    defaults: &str,
    file: Option<&Path>,
    environment: Environment,
) -> Result<T, ConfigError> {
    let defaults_only = Config::builder()
        .add_source(File::from_str(defaults, FileFormat::Toml))
        .build()?;
    let mut builder = Config::builder().add_source(File::from_str(defaults, FileFormat::Toml));
    if let Some(file) = file {
        builder = builder.add_source(File::from(file).format(FileFormat::Toml).required(true));
    }
    let merged = builder.add_source(environment.try_parsing(true)).build()?;
    // The shared sections are `#[serde(flatten)]`ed, and serde hands a flattened field its value
    // as it is, without the coercion (and without the key in an error) the config crate gives
    // the others. So every value is read here as the type of its default, by key: `AMQP_PREFIX=2024`
    // stays the text "2024", and `HTTP_WORKERS=many` is an error that names http_workers.
    let mut typed = Config::builder().add_source(merged.clone());
    for (key, default) in defaults_only.collect()? {
        typed = match default.kind {
            ValueKind::String(_) => typed.set_override(&key, merged.get_string(&key)?)?,
            ValueKind::Boolean(_) => typed.set_override(&key, merged.get_bool(&key)?)?,
            ValueKind::I64(_) | ValueKind::U64(_) | ValueKind::I128(_) | ValueKind::U128(_) => {
                typed.set_override(&key, merged.get_int(&key)?)?
            }
            ValueKind::Float(_) => typed.set_override(&key, merged.get_float(&key)?)?,
            _ => typed,
        };
    }
    Ok(typed.build()?.try_deserialize()?)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[derive(serde::Deserialize, Debug)]
    struct Example {
        database_url: String,
        http_addr: String,
        batch_max: u32,
    }

    const DEFAULTS: &str = r#"
        database_url = "postgres://default"
        http_addr = "127.0.0.1:1"
        batch_max = 10
        batch_min = 1
    "#;

    #[test]
    fn environment_overrides_file_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("sk-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("x.toml");
        std::fs::write(&file, "http_addr = \"0.0.0.0:2\"\nbatch_max = 20\n").unwrap();
        let env = Environment::default().source(Some(HashMap::from([(
            "BATCH_MAX".to_owned(),
            "30".to_owned(),
        )])));
        let c: Example = load_from(DEFAULTS, Some(&file), env).unwrap();
        assert_eq!(c.database_url, "postgres://default");
        assert_eq!(c.http_addr, "0.0.0.0:2");
        assert_eq!(c.batch_max, 30);
    }

    #[derive(serde::Deserialize, Debug)]
    struct Flattened {
        #[serde(flatten)]
        section: Section,
        batch_max: u32,
    }

    #[derive(serde::Deserialize, Debug)]
    struct Section {
        database_url: String,
        http_addr: String,
        batch_min: u32,
    }

    #[test]
    fn environment_reaches_flattened_sections_even_as_digits() {
        let env = Environment::default().source(Some(HashMap::from([
            ("HTTP_ADDR".to_owned(), "2024".to_owned()),
            ("BATCH_MAX".to_owned(), "30".to_owned()),
        ])));
        let c: Flattened = load_from(DEFAULTS, None, env).unwrap();
        assert_eq!(c.section.http_addr, "2024");
        assert_eq!(c.section.database_url, "postgres://default");
        assert_eq!(c.section.batch_min, 1);
        assert_eq!(c.batch_max, 30);
    }

    #[test]
    fn a_bad_value_is_a_clear_error() {
        let env = Environment::default().source(Some(HashMap::from([(
            "BATCH_MAX".to_owned(),
            "many".to_owned(),
        )])));
        let err = load_from::<Example>(DEFAULTS, None, env).unwrap_err();
        assert!(err.to_string().contains("batch_max"), "{err}");
        let env = Environment::default().source(Some(HashMap::from([(
            "BATCH_MIN".to_owned(),
            "few".to_owned(),
        )])));
        let err = load_from::<Flattened>(DEFAULTS, None, env).unwrap_err();
        assert!(err.to_string().contains("batch_min"), "{err}");
    }
}
