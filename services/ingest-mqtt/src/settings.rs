use bus::{BusSettings, PublisherSettings};
use mqtt_admin::{MqttEndpoint, parse_mqtt_url};
use serde::Deserialize;
use service_kit::config::ServiceSettings;

/// Which broker devices publish to, and so where ingest-mqtt takes their messages from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MqttBroker {
    /// Mosquitto: a persistent MQTT session with QoS 1 subscriptions (shared between instances).
    Mosquitto,
    /// RabbitMQ's MQTT plugin: devices' messages wait in a quorum queue (see
    /// [`bus::MqttTopology`]), consumed over AMQP by every instance (competing consumers).
    Rabbitmq,
}

/// Every setting of ingest-mqtt but `log_format` (which `service_kit::service::main` reads); README's
/// configuration table documents each.
#[derive(Clone, Deserialize)]
pub struct Settings {
    pub http_addr: String,
    pub mqtt_broker: MqttBroker,
    pub mqtt_queue_prefetch: u16,
    pub mqtt_url: String,
    pub mqtt_username: String,
    pub mqtt_password: String,
    pub mqtt_client_id: String,
    pub mqtt_shared_group: String,
    pub mqtt_legacy_topic: String,
    pub mqtt_session_expiry_secs: u32,
    pub mqtt_receive_maximum: u16,
    pub mqtt_max_packet_bytes: u32,
    pub mqtt_keep_alive_secs: u64,
    pub retry_max_backoff_ms: u64,
    pub backfill_horizon_days: models::BackfillHorizon,
    #[serde(flatten)]
    pub bus: BusSettings,
    #[serde(flatten)]
    pub publisher: PublisherSettings,
}

impl ServiceSettings for Settings {
    const DEFAULTS: &'static str = include_str!("defaults.toml");
}

impl Settings {
    pub fn client_id(&self) -> String {
        if !self.mqtt_client_id.is_empty() {
            return self.mqtt_client_id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "local".to_owned());
        // `:` is in no device id, so no device account can be bound to this session
        format!("ingest-mqtt:{host}")
    }

    pub fn endpoint(&self) -> Result<MqttEndpoint, String> {
        let mut endpoint = parse_mqtt_url(&self.mqtt_url)?;
        if !self.mqtt_username.is_empty() {
            endpoint.credentials = Some((self.mqtt_username.clone(), self.mqtt_password.clone()));
        }
        Ok(endpoint)
    }
}
