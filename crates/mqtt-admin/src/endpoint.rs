//! Where an MQTT broker is: `mqtt://[user:password@]host[:port]`, as ingest-mqtt's `MQTT_URL` and
//! the admin URL (`SENSORHUB_MQTT_ADMIN_URL`) give it. Here rather than in service-kit so that the
//! admin tool (sensorctl) does not compile an HTTP server to read a URL.

/// Where Mosquitto is, as `mqtt://[user:password@]host[:port]` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttEndpoint {
    pub host: String,
    pub port: u16,
    pub credentials: Option<(String, String)>,
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
