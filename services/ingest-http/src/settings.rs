use std::path::Path;

use bus::PublisherSettings;
use serde::Deserialize;
use service_kit::telemetry::LogFormat;

use crate::audit::AcceptedWrites;

/// Every setting of ingest-http; README's configuration table documents each.
#[derive(Clone, Deserialize)]
pub struct Settings {
    pub http_addr: String,
    pub http_workers: usize,
    pub max_body_bytes: usize,
    pub backfill_horizon_days: models::BackfillHorizon,
    pub amqp_url: String,
    pub amqp_prefix: String,
    #[serde(flatten)]
    pub publisher: PublisherSettings,
    pub auth_public_key_file: String,
    pub auth_allow_anonymous: bool,
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
    pub http_header_timeout_ms: u64,
    pub http_body_timeout_ms: u64,
    pub http_keep_alive_secs: u64,
    pub rabbitmq_mqtt_auth: bool,
    pub rabbitmq_mqtt_vhost: String,
    pub audit_accepted: AcceptedWrites,
    pub audit_summary_interval_secs: u64,
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
}
