use std::path::Path;

use serde::Deserialize;
use service_kit::telemetry::LogFormat;
use service_kit::{DatabaseSettings, HttpSettings};
use store::PoolSettings;

/// Every setting of query-api; README's configuration table documents each.
#[derive(Clone, Deserialize)]
pub struct Settings {
    #[serde(flatten)]
    pub http: HttpSettings,
    #[serde(flatten)]
    pub database: DatabaseSettings,
    pub auth_public_key_file: String,
    pub auth_signing_key_file: String,
    /// The same setting, and environment variable, as sensorctl's.
    #[serde(rename = "sensorhub_mqtt_admin_url")]
    pub mqtt_admin_url: String,
    pub auth_refresh_ms: u64,
    pub auth_registry_max_age_secs: u64,
    pub app_token_max_ttl_secs: u64,
    pub rate_limit_per_second: u32,
    pub rate_limit_burst: u32,
    pub refusal_limit_per_second: u32,
    pub refusal_limit_burst: u32,
    pub command_max_open: u32,
    pub command_args_max_bytes: u32,
    pub command_ttl_default_secs: u32,
    pub command_ttl_max_secs: u32,
    pub cors_allowed_origins: String,
    pub trusted_proxies: String,
    pub log_format: LogFormat,
}

impl Settings {
    pub const DEFAULTS: &'static str = include_str!("defaults.toml");

    pub fn load(file: Option<&Path>) -> Result<Self, service_kit::config::ConfigError> {
        service_kit::config::load(Self::DEFAULTS, file)
    }

    /// The built-in defaults alone (no file, no environment), for tests to start from.
    #[allow(
        clippy::expect_used,
        reason = "the defaults are compiled in and every test starts from them"
    )]
    pub fn defaults() -> Self {
        // `DEFAULTS` is compiled in, and every service's tests start from it: a broken file fails
        // them all, never a deployment
        service_kit::config::defaults(Self::DEFAULTS).expect("built-in defaults parse")
    }

    pub fn pool(&self) -> PoolSettings {
        PoolSettings {
            max_connections: self.database.db_max_connections,
            acquire_timeout_ms: self.database.db_acquire_timeout_ms,
            statement_timeout_ms: self.database.db_statement_timeout_ms,
            application_name: "query-api".into(),
        }
    }
}
