use bus::{BusSettings, PublisherSettings};
use serde::Deserialize;
use service_kit::HttpSettings;
use service_kit::config::ServiceSettings;

use crate::audit::AcceptedWrites;

/// Every setting of ingest-http but `log_format` (which `service_kit::service::main` reads); README's
/// configuration table documents each.
#[derive(Clone, Deserialize)]
pub struct Settings {
    #[serde(flatten)]
    pub http: HttpSettings,
    /// See [`service_kit::connections::ConnectionCap`]; 0: no cap.
    pub http_max_connections: usize,
    pub max_body_bytes: usize,
    pub backfill_horizon_days: models::BackfillHorizon,
    #[serde(flatten)]
    pub bus: BusSettings,
    #[serde(flatten)]
    pub publisher: PublisherSettings,
    pub auth_public_key_file: String,
    pub auth_allow_anonymous: bool,
    /// The device registry is read from here.
    pub database_url: String,
    pub auth_refresh_ms: u64,
    pub auth_registry_max_age_secs: u64,
    pub auth_prompt_read_interval_ms: u64,
    pub auth_unknown_device_cache_ms: u64,
    pub rate_limit_per_second: u32,
    pub rate_limit_burst: u32,
    pub refusal_limit_per_second: u32,
    pub refusal_limit_burst: u32,
    pub trusted_proxies: String,
    pub rabbitmq_mqtt_auth: bool,
    pub rabbitmq_mqtt_vhost: String,
    pub audit_accepted: AcceptedWrites,
    pub audit_summary_interval_secs: u64,
    pub commands_db_max_connections: u32,
    pub command_poll_max_wait_secs: u64,
}

impl ServiceSettings for Settings {
    const DEFAULTS: &'static str = include_str!("defaults.toml");
}
