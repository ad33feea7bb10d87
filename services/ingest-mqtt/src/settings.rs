use std::path::Path;

use bus::PublisherSettings;
use serde::Deserialize;
use service_kit::telemetry::LogFormat;

/// Every setting of ingest-mqtt; README's configuration table documents each.
#[derive(Clone, Deserialize)]
pub struct Settings {
    pub http_addr: String,
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
    pub amqp_url: String,
    pub amqp_prefix: String,
    #[serde(flatten)]
    pub publisher: PublisherSettings,
    pub log_format: LogFormat,
}

/// Where Mosquitto is, from `mqtt_url` and the credential settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttEndpoint {
    pub host: String,
    pub port: u16,
    pub credentials: Option<(String, String)>,
}

impl Settings {
    pub const DEFAULTS: &'static str = include_str!("defaults.toml");

    pub fn load(file: Option<&Path>) -> Result<Self, service_kit::config::ConfigError> {
        service_kit::config::load(Self::DEFAULTS, file)
    }

    pub fn defaults() -> Self {
        service_kit::config::load(Self::DEFAULTS, None).expect("built-in defaults parse")
    }

    pub fn client_id(&self) -> String {
        if !self.mqtt_client_id.is_empty() {
            return self.mqtt_client_id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "local".to_owned());
        format!("ingest-mqtt-{host}")
    }

    pub fn endpoint(&self) -> Result<MqttEndpoint, String> {
        let mut endpoint = parse_mqtt_url(&self.mqtt_url)?;
        if !self.mqtt_username.is_empty() {
            endpoint.credentials = Some((self.mqtt_username.clone(), self.mqtt_password.clone()));
        }
        Ok(endpoint)
    }
}

/// `mqtt://[user:password@]host[:port]` (also `tcp://`).
pub fn parse_mqtt_url(url: &str) -> Result<MqttEndpoint, String> {
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .ok_or_else(|| {
            format!(
                "mqtt_url {url:?} must start with mqtt:// (TLS is terminated in front of Mosquitto)"
            )
        })?;
    let rest = rest.trim_end_matches('/');
    let (credentials, address) = match rest.rsplit_once('@') {
        Some((userinfo, address)) => {
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            (Some((user.to_owned(), password.to_owned())), address)
        }
        None => (None, rest),
    };
    let (host, port) = match address.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse()
                .map_err(|_| format!("mqtt_url {url:?}: bad port {port:?}"))?,
        ),
        None => (address, 1883),
    };
    if host.is_empty() {
        return Err(format!("mqtt_url {url:?} has no host"));
    }
    Ok(MqttEndpoint {
        host: host.to_owned(),
        port,
        credentials,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_urls_parse() {
        assert_eq!(
            parse_mqtt_url("mqtt://127.0.0.1:1884").unwrap(),
            MqttEndpoint {
                host: "127.0.0.1".into(),
                port: 1884,
                credentials: None
            }
        );
        assert_eq!(parse_mqtt_url("tcp://broker").unwrap().port, 1883);
        assert_eq!(
            parse_mqtt_url("mqtt://ingest:s3cret@mosquitto:1883")
                .unwrap()
                .credentials,
            Some(("ingest".into(), "s3cret".into()))
        );
        assert!(parse_mqtt_url("mqtts://x").is_err());
        assert!(parse_mqtt_url("mqtt://:1").is_err());
        assert!(parse_mqtt_url("mqtt://x:port").is_err());
    }
}
