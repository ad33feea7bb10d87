use bus::{BusSettings, PublisherSettings};
use serde::Deserialize;
use service_kit::DatabaseSettings;
use service_kit::config::ServiceSettings;
use store::PoolSettings;

/// Every setting of the persister but `log_format` (which `service_kit::service::main` reads); README's
/// configuration table documents each.
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
    /// An unanswered command is published again this long after it was last sent.
    pub command_resend_secs: u32,
    /// The retention policy is applied this often (by one persister at a time).
    pub retention_interval_secs: u64,
    /// How commands are published (see the bus crate).
    #[serde(flatten)]
    pub publisher: PublisherSettings,
}

impl ServiceSettings for Settings {
    const DEFAULTS: &'static str = include_str!("defaults.toml");
}

impl Settings {
    pub fn pool(&self) -> PoolSettings {
        PoolSettings {
            // the writers, one for readiness checks and housekeeping, one for commands
            max_connections: self
                .database
                .db_max_connections
                .max(self.db_writers as u32 + 2),
            ..self.database.pool("persister")
        }
    }
}
