//! Layered configuration: the service's built-in defaults, then an optional file, then environment
//! variables (`DATABASE_URL` sets `database_url`), into one typed struct built at start-up.

use std::path::Path;

use config::{Config, Environment, File, FileFormat};
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

fn load_from<T: DeserializeOwned>(
    defaults: &str,
    file: Option<&Path>,
    environment: Environment,
) -> Result<T, ConfigError> {
    let mut builder = Config::builder().add_source(File::from_str(defaults, FileFormat::Toml));
    if let Some(file) = file {
        builder = builder.add_source(File::from(file).format(FileFormat::Toml).required(true));
    }
    Ok(builder
        .add_source(environment.try_parsing(true))
        .build()?
        .try_deserialize()?)
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

    #[test]
    fn a_bad_value_is_a_clear_error() {
        let env = Environment::default().source(Some(HashMap::from([(
            "BATCH_MAX".to_owned(),
            "many".to_owned(),
        )])));
        let err = load_from::<Example>(DEFAULTS, None, env).unwrap_err();
        assert!(err.to_string().contains("batch_max"), "{err}");
    }
}
