//! Where readings come from. Each source gives a set of metrics (name → number) when read; the
//! sampler reads each on its own schedule.

use std::path::{Path, PathBuf};
use std::time::Duration;

use models::MetricName;
use serde_json::{Map, Number, Value};

use crate::config::SourceKind;
use crate::error::Error;

/// A reading's metrics: name → number, as sent in `metrics`.
pub type Metrics = Map<String, Value>;

/// The most metrics one reading may carry (the server's limit).
const MAX_METRICS: usize = 64;
/// The most of a program's or file's output that is read.
const MAX_OUTPUT_BYTES: usize = 64 * 1024;

/// Reads `source` once.
pub async fn read(source: &SourceKind) -> Result<Metrics, Error> {
    match source {
        SourceKind::Thermal { zone, metric } => thermal(zone, metric),
        SourceKind::Iio { device, root } => iio(root, device),
        SourceKind::Command { run, timeout } => command(run, *timeout).await,
        SourceKind::File { path } => {
            let text = read_small(path)?;
            parse_output(&text).map_err(|e| Error::Source(format!("{}: {e}", path.display())))
        }
    }
}

/// A short name for logs: what the source is.
pub fn describe(source: &SourceKind) -> String {
    match source {
        SourceKind::Thermal { zone, .. } => format!("thermal {}", zone.display()),
        SourceKind::Iio { device, .. } => format!("iio {device}"),
        SourceKind::Command { run, .. } => format!("command {}", run.join(" ")),
        SourceKind::File { path } => format!("file {}", path.display()),
    }
}

fn read_small(path: &Path) -> Result<String, Error> {
    let bytes =
        std::fs::read(path).map_err(|e| Error::Source(format!("{}: {e}", path.display())))?;
    let bytes = &bytes[..bytes.len().min(MAX_OUTPUT_BYTES)];
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

/// The zone's `temp`, millidegrees Celsius, as degrees.
fn thermal(zone: &Path, metric: &str) -> Result<Metrics, Error> {
    let file = zone.join("temp");
    let text = read_small(&file)?;
    let millis: f64 = text.trim().parse().map_err(|_| {
        Error::Source(format!(
            "{}: {:?} is not a temperature",
            file.display(),
            text.trim()
        ))
    })?;
    let mut metrics = Metrics::new();
    insert(&mut metrics, metric, millis / 1000.0)?;
    Ok(metrics)
}

/// An IIO device's channels. `in_<channel>_input` is already in IIO's units; otherwise
/// `(in_<channel>_raw + offset) × scale`. Units are turned into what people expect: IIO gives
/// millidegrees Celsius, milli-percent and kilopascals; the metrics are `temperature` (°C),
/// `humidity` (%) and `pressure` (hPa); other channels keep their IIO name and unit.
fn iio(root: &Path, device: &str) -> Result<Metrics, Error> {
    let dir = find_iio_device(root, device)?;
    let entries =
        std::fs::read_dir(&dir).map_err(|e| Error::Source(format!("{}: {e}", dir.display())))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    let mut metrics = Metrics::new();
    let mut failures = Vec::new();
    for name in &names {
        let Some(channel) = name.strip_prefix("in_") else {
            continue;
        };
        let value = if let Some(channel) = channel.strip_suffix("_input") {
            number_in(&dir.join(name)).map(|v| (channel, v))
        } else if let Some(channel) = channel.strip_suffix("_raw") {
            // a channel with a processed value is read from that alone
            if names.contains(&format!("in_{channel}_input")) {
                continue;
            }
            raw_channel(&dir, channel).map(|v| (channel, v))
        } else {
            continue;
        };
        match value {
            Ok((channel, value)) => {
                let (metric, value) = iio_metric(channel, value);
                insert(&mut metrics, &metric, value)?;
            }
            // a DHT22 read fails now and then (EIO): the other channels still count
            Err(e) => failures.push(e.to_string()),
        }
    }
    if metrics.is_empty() {
        return Err(Error::Source(if failures.is_empty() {
            format!("{}: no in_*_input or in_*_raw channels", dir.display())
        } else {
            failures.join("; ")
        }));
    }
    Ok(metrics)
}

fn find_iio_device(root: &Path, device: &str) -> Result<PathBuf, Error> {
    if device.starts_with("iio:device") {
        let dir = root.join(device);
        return if dir.is_dir() {
            Ok(dir)
        } else {
            Err(Error::Source(format!("{} does not exist", dir.display())))
        };
    }
    let entries = std::fs::read_dir(root).map_err(|e| {
        Error::Source(format!(
            "{}: {e} (is the sensor's dtoverlay loaded?)",
            root.display()
        ))
    })?;
    for entry in entries.filter_map(|e| e.ok()) {
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == device {
            return Ok(entry.path());
        }
    }
    Err(Error::Source(format!(
        "no IIO device named {device:?} under {} (is its dtoverlay loaded?)",
        root.display()
    )))
}

/// `(raw + offset) × scale`, the scale and offset of the channel or of its type
/// (`in_temp0_raw` may share `in_temp_scale`).
fn raw_channel(dir: &Path, channel: &str) -> Result<f64, Error> {
    let raw = number_in(&dir.join(format!("in_{channel}_raw")))?;
    let kind = channel.trim_end_matches(|c: char| c.is_ascii_digit());
    let shared = |suffix: &str, default: f64| -> Result<f64, Error> {
        for candidate in [
            format!("in_{channel}_{suffix}"),
            format!("in_{kind}_{suffix}"),
        ] {
            let path = dir.join(candidate);
            if path.exists() {
                return number_in(&path);
            }
        }
        Ok(default)
    };
    Ok((raw + shared("offset", 0.0)?) * shared("scale", 1.0)?)
}

fn number_in(path: &Path) -> Result<f64, Error> {
    let text = read_small(path)?;
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| {
            Error::Source(format!(
                "{}: {:?} is not a number",
                path.display(),
                text.trim()
            ))
        })
}

/// An IIO channel's metric name and value in everyday units.
fn iio_metric(channel: &str, value: f64) -> (String, f64) {
    let kind = channel.trim_end_matches(|c: char| c.is_ascii_digit());
    let index = &channel[kind.len()..];
    let (name, value) = match kind {
        "temp" => ("temperature", value / 1000.0),
        "humidityrelative" => ("humidity", value / 1000.0),
        "pressure" => ("pressure", value * 10.0),
        other => (other, value),
    };
    (format!("{name}{index}"), value)
}

/// Runs `run` and reads its output, killing it after `timeout`.
async fn command(run: &[String], timeout: Duration) -> Result<Metrics, Error> {
    let shown = run.join(" ");
    let (program, args) = run
        .split_first()
        .ok_or_else(|| Error::Source("empty command".to_owned()))?;
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Error::Source(format!("{shown}: {e}")))?;
    let output = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| {
            Error::Source(format!(
                "{shown}: no answer within {}",
                humantime::format_duration(timeout)
            ))
        })?
        .map_err(|e| Error::Source(format!("{shown}: {e}")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(Error::Source(format!(
            "{shown}: {} ({})",
            output.status,
            stderr.trim().chars().take(200).collect::<String>()
        )));
    }
    let stdout = &output.stdout[..output.stdout.len().min(MAX_OUTPUT_BYTES)];
    parse_output(&String::from_utf8_lossy(stdout))
        .map_err(|e| Error::Source(format!("{shown}: {e}")))
}

/// A JSON object of numbers (`{"temperature": 21.5}`), or `name=value` lines (blank lines and
/// `#` comments ignored), so any sensor script's output can be used as it is.
pub fn parse_output(text: &str) -> Result<Metrics, String> {
    let text = text.trim();
    let mut metrics = Metrics::new();
    if text.starts_with('{') {
        let object: Map<String, Value> =
            serde_json::from_str(text).map_err(|e| format!("not a JSON object: {e}"))?;
        for (name, value) in object {
            let number = value
                .as_f64()
                .ok_or_else(|| format!("{name}: {value} is not a number"))?;
            insert(&mut metrics, &name, number).map_err(|e| e.to_string())?;
        }
    } else {
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, value) = line
                .split_once('=')
                .ok_or_else(|| format!("{line:?}: not name=value"))?;
            let number: f64 = value
                .trim()
                .parse()
                .map_err(|_| format!("{}: {:?} is not a number", name.trim(), value.trim()))?;
            insert(&mut metrics, name.trim(), number).map_err(|e| e.to_string())?;
        }
    }
    if metrics.is_empty() {
        return Err("no metrics in the output".to_owned());
    }
    Ok(metrics)
}

/// Adds a metric, by the server's rules: a valid name, a finite value, at most 64.
fn insert(metrics: &mut Metrics, name: &str, value: f64) -> Result<(), Error> {
    MetricName::parse(name).map_err(|e| Error::Source(format!("metric {name:?}: {e}")))?;
    let number = Number::from_f64(value)
        .ok_or_else(|| Error::Source(format!("{name}: {value} is not a finite number")))?;
    if metrics.len() >= MAX_METRICS && !metrics.contains_key(name) {
        return Err(Error::Source(format!("more than {MAX_METRICS} metrics")));
    }
    metrics.insert(name.to_owned(), Value::Number(number));
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test stops at the first surprise")]
    use super::*;
    use serde_json::json;

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("agent-src-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn outputs_in_both_formats() {
        assert_eq!(
            Value::Object(parse_output(r#" {"temperature": 21.5, "co2": 415} "#).unwrap()),
            json!({"temperature": 21.5, "co2": 415.0})
        );
        assert_eq!(
            Value::Object(parse_output("# a DHT22\ntemperature=21.5\n\nhumidity = 40\n").unwrap()),
            json!({"temperature": 21.5, "humidity": 40.0})
        );
        for (bad, says) in [
            ("", "no metrics"),
            ("{\"t\": \"warm\"}", "not a number"),
            ("t=warm", "not a number"),
            ("just text", "not name=value"),
            ("bad name=1", "metric"),
            ("t=inf", "finite"),
        ] {
            let error = parse_output(bad).unwrap_err();
            assert!(error.contains(says), "{bad:?}: {error}");
        }
    }

    #[tokio::test]
    async fn thermal_zone_in_degrees() {
        let zone = temp_dir();
        std::fs::write(zone.join("temp"), "48312\n").unwrap();
        let source = SourceKind::Thermal {
            zone: zone.clone(),
            metric: "soc_temperature".into(),
        };
        assert_eq!(
            Value::Object(read(&source).await.unwrap()),
            json!({"soc_temperature": 48.312})
        );
    }

    /// A BME280 as the kernel's bmp280 driver shows it, found by name, and a raw channel.
    #[tokio::test]
    async fn iio_device_by_name_in_everyday_units() {
        let root = temp_dir();
        let other = root.join("iio:device0");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("name"), "ads1015\n").unwrap();
        let bme = root.join("iio:device1");
        std::fs::create_dir_all(&bme).unwrap();
        for (file, text) in [
            ("name", "bme280"),
            ("in_temp_input", "21370"),
            ("in_humidityrelative_input", "40512"),
            ("in_pressure_input", "101.325"),
            ("in_voltage0_raw", "100"),
            ("in_voltage_scale", "0.5"),
            ("in_voltage_offset", "2"),
            ("sampling_frequency", "1"),
        ] {
            std::fs::write(bme.join(file), format!("{text}\n")).unwrap();
        }
        let source = SourceKind::Iio {
            device: "bme280".into(),
            root: root.clone(),
        };
        let metrics = read(&source).await.unwrap();
        assert_eq!(metrics["temperature"], json!(21.37));
        assert_eq!(metrics["humidity"], json!(40.512));
        assert!((metrics["pressure"].as_f64().unwrap() - 1013.25).abs() < 1e-9);
        assert_eq!(metrics["voltage0"], json!(51.0));
        let missing = SourceKind::Iio {
            device: "dht22".into(),
            root,
        };
        let error = read(&missing).await.unwrap_err().to_string();
        assert!(error.contains("dtoverlay"), "{error}");
    }

    #[tokio::test]
    async fn a_command_its_failure_and_its_timeout() {
        let run = |script: &str| SourceKind::Command {
            run: vec!["sh".into(), "-c".into(), script.into()],
            timeout: Duration::from_millis(500),
        };
        assert_eq!(
            Value::Object(read(&run("echo t=1.5")).await.unwrap()),
            json!({"t": 1.5})
        );
        let failed = read(&run("echo broken >&2; exit 3")).await.unwrap_err();
        assert!(failed.to_string().contains("broken"), "{failed}");
        let slow = read(&run("sleep 5")).await.unwrap_err();
        assert!(slow.to_string().contains("no answer"), "{slow}");
    }
}
