use serde::Deserialize;
use service_kit::config::ServiceSettings;
use service_kit::{DatabaseSettings, HttpSettings};
use store::PoolSettings;

/// Every setting of query-api but `log_format` (which `service_kit::service::main` reads); README's
/// configuration table documents each.
#[derive(Clone, Deserialize)]
pub struct Settings {
    #[serde(flatten)]
    pub http: HttpSettings,
    #[serde(flatten)]
    pub database: DatabaseSettings,
    /// Where the read-only API reads (a standby); empty: `database_url`.
    pub database_read_url: String,
    /// RabbitMQ, for the live feed (`GET /v1/live`).
    #[serde(flatten)]
    pub bus: bus::BusSettings,
    pub live_max_streams: u32,
    pub live_keepalive_secs: u64,
    pub offline_after_secs: u64,
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
}

impl ServiceSettings for Settings {
    const DEFAULTS: &'static str = include_str!("defaults.toml");
}

impl Settings {
    pub fn pool(&self) -> PoolSettings {
        self.database.pool("query-api")
    }

    /// The read pool's settings: the primary's, but for the URL and the name it shows in
    /// `pg_stat_activity`; `None` when reads go to the primary's pool.
    pub fn read_database(&self) -> Option<(DatabaseSettings, PoolSettings)> {
        if self.database_read_url.trim().is_empty() {
            return None;
        }
        let database = DatabaseSettings {
            database_url: self.database_read_url.clone(),
            ..self.database.clone()
        };
        let pool = database.pool("query-api-reads");
        Some((database, pool))
    }
}
