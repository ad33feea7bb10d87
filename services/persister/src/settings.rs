use std::path::Path;

use serde::Deserialize;
use service_kit::telemetry::LogFormat;
use store::PoolSettings;

/// Every setting of the persister; README's configuration table documents each.
#[derive(Clone, Deserialize)]
pub struct Settings {
    pub http_addr: String,
    pub database_url: String,
    pub amqp_url: String,
    pub amqp_prefix: String,
    pub prefetch: u16,
    pub batch_max_readings: usize,
    pub batch_linger_ms: u64,
    pub db_writers: usize,
    pub db_max_connections: u32,
    pub db_acquire_timeout_ms: u64,
    pub db_statement_timeout_ms: u64,
    pub retry_max_backoff_ms: u64,
    pub backfill_horizon_days: models::BackfillHorizon,
    pub dedupe_window_days: u32,
    pub conflicts_kept_days: u32,
    pub startup_wait_ms: u64,
    pub log_format: LogFormat,
}

impl Settings {
    pub const DEFAULTS: &'static str = include_str!("defaults.toml");

    pub fn load(file: Option<&Path>) -> Result<Self, service_kit::config::ConfigError> {
        service_kit::config::load(Self::DEFAULTS, file)
    }

    pub fn defaults() -> Self {
        service_kit::config::load(Self::DEFAULTS, None).expect("built-in defaults parse")
    }

    pub fn pool(&self) -> PoolSettings {
        PoolSettings {
            // the writers, and one for readiness checks
            max_connections: self.db_max_connections.max(self.db_writers as u32 + 1),
            acquire_timeout_ms: self.db_acquire_timeout_ms,
            statement_timeout_ms: self.db_statement_timeout_ms,
            application_name: "persister".into(),
        }
    }
}
