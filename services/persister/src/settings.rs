use std::path::Path;

use bus::BusSettings;
use serde::Deserialize;
use service_kit::DatabaseSettings;
use service_kit::telemetry::LogFormat;
use store::PoolSettings;

/// Every setting of the persister; README's configuration table documents each.
#[derive(Clone, Deserialize)]
pub struct Settings {
    /// The ops endpoints (`/healthz`, `/readyz`, `/metrics`).
    pub http_addr: String,
    #[serde(flatten)]
    pub database: DatabaseSettings,
    #[serde(flatten)]
    pub bus: BusSettings,
    pub prefetch: u16,
    pub batch_max_readings: usize,
    pub batch_linger_ms: u64,
    pub db_writers: usize,
    pub retry_max_backoff_ms: u64,
    pub backfill_horizon_days: models::BackfillHorizon,
    pub dedupe_window_days: u32,
    pub conflicts_kept_days: u32,
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
            // the writers, and one for readiness checks
            max_connections: self
                .database
                .db_max_connections
                .max(self.db_writers as u32 + 1),
            acquire_timeout_ms: self.database.db_acquire_timeout_ms,
            statement_timeout_ms: self.database.db_statement_timeout_ms,
            application_name: "persister".into(),
        }
    }
}
