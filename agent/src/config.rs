//! The agent's one configuration file (TOML), read once at start. Unknown keys are refused, so a
//! typo is an error at `check` rather than a setting silently ignored on the Pi.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use models::{DeviceId, MetricName};
use serde::Deserialize;

use crate::error::Error;

/// Where `run`, `check` and `status` look when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/sensorhub-agent/agent.toml";

/// The most readings one request may carry (`POST /v1/readings` takes up to 1,000).
pub const MAX_BATCH: usize = 1000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub device_id: String,
    pub token_file: PathBuf,
    pub server: Server,
    #[serde(default)]
    pub outbox: Outbox,
    #[serde(default)]
    pub clock: Clock,
    #[serde(default, rename = "source")]
    pub sources: Vec<Source>,
    /// Command name → its handler.
    #[serde(default)]
    pub commands: BTreeMap<String, Handler>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// `POST /v1/readings`, and commands by long-poll.
    Http,
    /// One MQTT connection (client id and user name the device id, password the token): readings
    /// published at QoS 1 on `devices/<id>/readings`, commands received on `devices/<id>/commands`
    /// in a persistent session, answers published on `devices/<id>/commands/<command id>/result`.
    Mqtt,
}

/// `server.mqtt_url`, parsed: `mqtt://host[:1883]` or `mqtts://host[:8883]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl MqttUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        let bad = |why: &str| Err(format!("server.mqtt_url {url:?}: {why}"));
        let (tls, rest) = match url.split_once("://") {
            Some(("mqtt", rest)) => (false, rest),
            Some(("mqtts", rest)) => (true, rest),
            _ => return bad("must start with mqtt:// or mqtts://"),
        };
        let address = rest.trim_end_matches('/');
        if address.contains(['/', '@', '?', '#']) {
            return bad("must be mqtt[s]://host[:port] (the device id and token are the login)");
        }
        let (host, port) = match address.rsplit_once(':') {
            // an IPv6 address without a port ("[::1]") has colons but no port after `]`
            Some((host, port)) if !port.ends_with(']') => match port.parse::<u16>() {
                Ok(port) if port > 0 => (host, port),
                _ => return bad(&format!("bad port {port:?}")),
            },
            _ => (address, if tls { 8883 } else { 1883 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return bad("no host");
        }
        Ok(Self {
            tls,
            host: host.to_owned(),
            port,
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub transport: Transport,
    /// ingest's base URL, e.g. `https://sensorhub.example.com` (transport `http`).
    pub url: Option<String>,
    /// The MQTT broker, e.g. `mqtts://sensorhub.example.com:8883` (transport `mqtt`).
    pub mqtt_url: Option<String>,
    /// A private CA's certificate (PEM) for the server's, beside the system's roots.
    pub ca_file: Option<PathBuf>,
    /// How long one request may take before it counts as failed.
    #[serde(default = "default_request_timeout", with = "humantime_serde_compat")]
    pub timeout: Duration,
    /// The longest wait between attempts while the server cannot be reached (the waits grow
    /// from 1 s, with jitter, so a fleet coming back from an outage does not arrive at once).
    #[serde(default = "default_backoff_max", with = "humantime_serde_compat")]
    pub backoff_max: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outbox {
    #[serde(default = "default_outbox_path")]
    pub path: PathBuf,
    /// At most this many readings wait; beyond, the oldest are dropped and counted.
    #[serde(default = "default_max_readings")]
    pub max_readings: u64,
    /// Readings per request, oldest first.
    #[serde(default = "default_batch")]
    pub batch: usize,
}

impl Default for Outbox {
    fn default() -> Self {
        Self {
            path: default_outbox_path(),
            max_readings: default_max_readings(),
            batch: default_batch(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClockSync {
    /// Trust the clock once the kernel says NTP synchronised it (a Pi has no real-time clock and
    /// boots with the last shutdown's time, or 1970).
    #[default]
    Ntp,
    /// Trust the system clock as it is: a device with a real-time clock, or whose time is set
    /// by other means than NTP.
    System,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Clock {
    #[serde(default)]
    pub sync: ClockSync,
}

/// A source and how often it is read.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "SourceSpec")]
pub struct Source {
    pub kind: SourceKind,
    pub every: Duration,
}

#[derive(Debug, Clone)]
pub enum SourceKind {
    /// The SoC's temperature from a thermal zone (millidegrees Celsius).
    Thermal { zone: PathBuf, metric: String },
    /// A Linux IIO sensor: every `in_*_input` channel (or `_raw` × `_scale` + `_offset`).
    Iio {
        /// Its `name` (e.g. `bme280`) or its directory (`iio:device0`).
        device: String,
        root: PathBuf,
    },
    /// A program whose output is JSON `{"name": number}` or `name=value` lines.
    Command { run: Vec<String>, timeout: Duration },
    /// A file another program keeps up to date, in the same formats.
    File { path: PathBuf },
}

/// A `[[source]]` table as written: `kind` picks the variant, and every variant has `every`.
/// (serde refuses unknown keys only without `flatten`, hence every field spelled out here.)
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
enum SourceSpec {
    Thermal {
        #[serde(with = "humantime_serde_compat")]
        every: Duration,
        #[serde(default = "default_thermal_zone")]
        zone: PathBuf,
        #[serde(default = "default_thermal_metric")]
        metric: String,
    },
    Iio {
        #[serde(with = "humantime_serde_compat")]
        every: Duration,
        device: String,
        #[serde(default = "default_iio_root")]
        root: PathBuf,
    },
    Command {
        #[serde(with = "humantime_serde_compat")]
        every: Duration,
        run: Vec<String>,
        #[serde(default = "default_handler_timeout", with = "humantime_serde_compat")]
        timeout: Duration,
    },
    File {
        #[serde(with = "humantime_serde_compat")]
        every: Duration,
        path: PathBuf,
    },
}

impl From<SourceSpec> for Source {
    fn from(spec: SourceSpec) -> Self {
        let (every, kind) = match spec {
            SourceSpec::Thermal {
                every,
                zone,
                metric,
            } => (every, SourceKind::Thermal { zone, metric }),
            SourceSpec::Iio {
                every,
                device,
                root,
            } => (every, SourceKind::Iio { device, root }),
            SourceSpec::Command {
                every,
                run,
                timeout,
            } => (every, SourceKind::Command { run, timeout }),
            SourceSpec::File { every, path } => (every, SourceKind::File { path }),
        };
        Self { kind, every }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handler {
    pub run: Vec<String>,
    #[serde(default = "default_handler_timeout", with = "humantime_serde_compat")]
    pub timeout: Duration,
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(60)
}
fn default_outbox_path() -> PathBuf {
    PathBuf::from("/var/lib/sensorhub-agent/outbox.db")
}
fn default_max_readings() -> u64 {
    1_000_000
}
fn default_batch() -> usize {
    500
}
fn default_thermal_zone() -> PathBuf {
    PathBuf::from("/sys/class/thermal/thermal_zone0")
}
fn default_thermal_metric() -> String {
    "soc_temperature".to_owned()
}
fn default_iio_root() -> PathBuf {
    PathBuf::from("/sys/bus/iio/devices")
}
fn default_handler_timeout() -> Duration {
    Duration::from_secs(10)
}

/// `"30s"`, `"5m"`, `"1h 30m"`: durations as humans write them.
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("{text:?}: {e} (write e.g. \"30s\")")))
    }
}

impl Config {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        let config: Config =
            toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        config.validate()?;
        Ok(config)
    }

    /// What the types cannot say: ids and names by the server's rules, sane numbers.
    fn validate(&self) -> Result<(), Error> {
        let bad = |what: String| Err(Error::Config(what));
        if let Err(e) = DeviceId::parse(self.device_id.as_str()) {
            return bad(format!("device_id {:?}: {e}", self.device_id));
        }
        match self.server.transport {
            Transport::Http => {
                let Some(url) = &self.server.url else {
                    return bad("server.url: required with transport = \"http\"".to_owned());
                };
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return bad(format!(
                        "server.url {url:?}: must start with http:// or https://"
                    ));
                }
            }
            Transport::Mqtt => {
                if self.server.mqtt_url.is_none() {
                    return bad("server.mqtt_url: required with transport = \"mqtt\"".to_owned());
                }
                self.mqtt_url().map_err(Error::Config)?;
            }
        }
        if self.outbox.batch == 0 || self.outbox.batch > MAX_BATCH {
            return bad(format!("outbox.batch: must be 1 to {MAX_BATCH}"));
        }
        if self.outbox.max_readings < self.outbox.batch as u64 {
            return bad("outbox.max_readings: must be at least outbox.batch".to_owned());
        }
        for (i, source) in self.sources.iter().enumerate() {
            if source.every < Duration::from_millis(100) {
                return bad(format!("source {}: every must be at least 100ms", i + 1));
            }
            match &source.kind {
                SourceKind::Thermal { metric, .. } => {
                    if let Err(e) = MetricName::parse(metric.as_str()) {
                        return bad(format!("source {}: metric {metric:?}: {e}", i + 1));
                    }
                }
                SourceKind::Command { run, .. } if run.is_empty() => {
                    return bad(format!("source {}: run must name a program", i + 1));
                }
                _ => {}
            }
        }
        for (name, handler) in &self.commands {
            if let Err(e) = MetricName::parse(name.as_str()) {
                return bad(format!("commands.{name}: not a command name: {e}"));
            }
            if handler.run.is_empty() {
                return bad(format!("commands.{name}: run must name a program"));
            }
        }
        Ok(())
    }

    /// The server's base URL without a trailing slash (empty without one: transport `mqtt`).
    pub fn base_url(&self) -> &str {
        self.server
            .url
            .as_deref()
            .unwrap_or("")
            .trim_end_matches('/')
    }

    /// `server.mqtt_url`, parsed.
    pub fn mqtt_url(&self) -> Result<MqttUrl, String> {
        MqttUrl::parse(self.server.mqtt_url.as_deref().unwrap_or(""))
    }

    /// Where the transport goes, for people (the log, `check`).
    pub fn server_address(&self) -> &str {
        match self.server.transport {
            Transport::Http => self.base_url(),
            Transport::Mqtt => self.server.mqtt_url.as_deref().unwrap_or(""),
        }
    }

    /// The device's token, read from `token_file` (surrounding whitespace removed).
    pub fn token(&self) -> Result<String, Error> {
        let text = std::fs::read_to_string(&self.token_file).map_err(|e| {
            Error::Config(format!(
                "cannot read token_file {}: {e}",
                self.token_file.display()
            ))
        })?;
        let token = text.trim().to_owned();
        if token.is_empty() {
            return Err(Error::Config(format!(
                "token_file {} is empty",
                self.token_file.display()
            )));
        }
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test stops at the first surprise")]
    use super::*;

    fn parse(text: &str) -> Result<Config, Error> {
        let config: Config = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    const MINIMAL: &str = r#"
device_id = "raspi-01"
token_file = "/tmp/token"
[server]
transport = "http"
url = "http://127.0.0.1:8080/"
"#;

    #[test]
    fn defaults_and_sources() {
        let config = parse(&format!(
            "{MINIMAL}\n[[source]]\nkind = \"thermal\"\nevery = \"30s\"\n[commands.led]\nrun = [\"/bin/led\"]\n"
        ))
        .unwrap();
        assert_eq!(config.base_url(), "http://127.0.0.1:8080");
        assert_eq!(config.outbox.batch, 500);
        assert_eq!(config.sources[0].every, Duration::from_secs(30));
        assert!(matches!(
            &config.sources[0].kind,
            SourceKind::Thermal { metric, .. } if metric == "soc_temperature"
        ));
        assert_eq!(config.commands["led"].timeout, Duration::from_secs(10));
        assert_eq!(config.clock.sync, ClockSync::Ntp);
    }

    #[test]
    fn mistakes_are_named() {
        for (extra, says) in [
            ("colour = \"red\"", "unknown field"),
            ("[outbox]\nbatch = 5000", "outbox.batch"),
            ("[[source]]\nkind = \"thermal\"\nevery = \"soon\"", "soon"),
            ("[[source]]\nkind = \"gps\"\nevery = \"1s\"", "gps"),
            (
                "[[source]]\nkind = \"command\"\nrun = []\nevery = \"1s\"",
                "run must name",
            ),
            ("[commands.\"led on\"]\nrun = [\"x\"]", "led on"),
        ] {
            let error = parse(&format!("{MINIMAL}\n{extra}\n"))
                .unwrap_err()
                .to_string();
            assert!(error.contains(says), "{extra}: {error}");
        }
        let error = parse(&MINIMAL.replace("raspi-01", "raspi 01"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("device_id"), "{error}");
    }

    const MQTT: &str = r#"
device_id = "raspi-01"
token_file = "/tmp/token"
[server]
transport = "mqtt"
"#;

    #[test]
    fn mqtt_needs_a_broker_and_no_url() {
        let config = parse(&format!(
            "{MQTT}mqtt_url = \"mqtts://broker.example.com\"\n"
        ))
        .unwrap();
        assert_eq!(
            config.mqtt_url().unwrap(),
            MqttUrl {
                tls: true,
                host: "broker.example.com".into(),
                port: 8883
            }
        );
        assert_eq!(config.server_address(), "mqtts://broker.example.com");
        let plain = parse(&format!("{MQTT}mqtt_url = \"mqtt://10.0.0.2:1884/\"\n")).unwrap();
        assert_eq!(
            plain.mqtt_url().unwrap(),
            MqttUrl {
                tls: false,
                host: "10.0.0.2".into(),
                port: 1884
            }
        );
        assert_eq!(MqttUrl::parse("mqtt://[::1]").unwrap().host, "::1");
        assert_eq!(MqttUrl::parse("mqtt://[::1]:1885").unwrap().port, 1885);
        for (extra, says) in [
            ("", "server.mqtt_url: required"),
            ("mqtt_url = \"http://broker\"", "mqtt:// or mqtts://"),
            ("mqtt_url = \"mqtt://user:pw@broker\"", "host[:port]"),
            ("mqtt_url = \"mqtt://broker:x\"", "bad port"),
            ("mqtt_url = \"mqtt://\"", "no host"),
        ] {
            let error = parse(&format!("{MQTT}{extra}\n")).unwrap_err().to_string();
            assert!(error.contains(says), "{extra}: {error}");
        }
        let error = parse(&MINIMAL.replace("url = \"http://127.0.0.1:8080/\"", ""))
            .unwrap_err()
            .to_string();
        assert!(error.contains("server.url: required"), "{error}");
    }
}
