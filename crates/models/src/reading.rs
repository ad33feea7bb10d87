use chrono::{DateTime, Duration, SubsecRound, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::{DeviceId, MetricName, ReadingId, ValidationError};

/// At most this many metrics in one reading.
pub const MAX_METRICS: usize = 64;

/// A reading may be stamped at most this far ahead of the server's clock (devices' clocks drift).
pub const MAX_FUTURE_SKEW: Duration = Duration::minutes(5);

/// Readings older than this are refused: a Pi without a real-time clock stamps 1970 until NTP has
/// synchronised, and storing those would scatter readings across decades.
pub const OLDEST_TIMESTAMP: DateTime<Utc> = DateTime::from_timestamp_nanos(946_684_800_000_000_000); // 2000-01-01T00:00:00Z

/// One reading: what a device measured at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub device_id: DeviceId,
    pub id: ReadingId,
    /// Microsecond precision, as PostgreSQL stores it, so what is stored equals what was accepted.
    pub ts: DateTime<Utc>,
    pub metrics: Metrics,
    /// Which of `id` and `ts` the server filled in because the device sent none.
    pub origin: Origin,
}

/// Which parts of a reading the server filled in. A device's own `id` makes the reading's identity
/// (`device_id`, `id`): sent again, with or without a `ts`, it is the same reading. A server-assigned
/// `ts` is not part of what the device said, so a retry that gets a new one is still the same reading.
/// The default (nothing assigned) is the strictest reading of a message, which is why the wire format
/// carries only the `true`s: a message from before this field existed is read as the device's own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Origin {
    /// The device sent no id; the server assigned a UUIDv7, which nothing else can repeat.
    pub id_assigned: bool,
    /// The device sent no time; the reading carries the server's time at ingest.
    pub ts_assigned: bool,
}

/// The named values of one reading: 1–64 metrics, unique names, finite values, sorted by name.
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics(Vec<(MetricName, f64)>);

impl Metrics {
    pub fn new(mut metrics: Vec<(MetricName, f64)>) -> Result<Self, ValidationError> {
        if metrics.is_empty() {
            return Err(ValidationError::new("", "at least one metric is required"));
        }
        if metrics.len() > MAX_METRICS {
            return Err(ValidationError::new(
                "",
                format!(
                    "at most {MAX_METRICS} metrics per reading ({} given)",
                    metrics.len()
                ),
            ));
        }
        if let Some((name, _)) = metrics.iter().find(|(_, value)| !value.is_finite()) {
            return Err(ValidationError::new(
                name.as_str(),
                "must be a finite number",
            ));
        }
        metrics.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(pair) = metrics.windows(2).find(|pair| pair[0].0 == pair[1].0) {
            return Err(ValidationError::new(
                pair[0].0.as_str(),
                "appears more than once",
            ));
        }
        Ok(Self(metrics))
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&MetricName, f64)> {
        self.0.iter().map(|(name, value)| (name, *value))
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.0
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()
            .map(|i| self.0[i].1)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for Metrics {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(name, value)| (name.as_str(), value)))
    }
}

impl<'de> Deserialize<'de> for Metrics {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MetricsVisitor;
        impl<'de> serde::de::Visitor<'de> for MetricsVisitor {
            type Value = Vec<(MetricName, f64)>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of metric names to numbers")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut metrics = Vec::with_capacity(map.size_hint().unwrap_or(4).min(MAX_METRICS));
                while let Some((name, value)) = map.next_entry::<MetricName, f64>()? {
                    if metrics.len() == MAX_METRICS {
                        return Err(serde::de::Error::custom("too many metrics"));
                    }
                    metrics.push((name, value));
                }
                Ok(metrics)
            }
        }
        let metrics = deserializer.deserialize_map(MetricsVisitor)?;
        Metrics::new(metrics).map_err(serde::de::Error::custom)
    }
}

impl Reading {
    /// The timestamp must not be older than [`OLDEST_TIMESTAMP`]. How far ahead of the clock, or how
    /// far behind it (the backfill horizon), it may be is a question of when it is accepted: the
    /// parsers check it against a [`crate::TimeWindow`]. A reading already on the queue (decoded by
    /// the persister) is stored whatever its age.
    pub fn new(
        device_id: DeviceId,
        id: ReadingId,
        ts: DateTime<Utc>,
        metrics: Metrics,
    ) -> Result<Self, ValidationError> {
        let ts = ts.trunc_subsecs(6);
        if ts < OLDEST_TIMESTAMP {
            return Err(ValidationError::new(
                "ts",
                "is before 2000-01-01 (is the device's clock set?)",
            ));
        }
        Ok(Self {
            device_id,
            id,
            ts,
            metrics,
            origin: Origin::default(),
        })
    }

    /// The same reading, saying which of its parts the server filled in.
    pub fn with_origin(self, origin: Origin) -> Self {
        Self { origin, ..self }
    }

    /// Whether the device chose this reading's id, which then identifies it whatever its time.
    pub fn has_device_id(&self) -> bool {
        !self.origin.id_assigned
    }
}

/// `2026-11-25T10:00:00Z`, `2026-11-25T19:00:00.123+09:00`.
pub fn parse_timestamp_rfc3339(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|ts| ts.with_timezone(&Utc).trunc_subsecs(6))
        .map_err(|e| format!("is not an RFC 3339 timestamp ({e})"))
}

/// Milliseconds since the Unix epoch, as JavaScript's `Date.now()` and many Pi scripts send.
pub fn parse_timestamp_millis(millis: f64) -> Result<DateTime<Utc>, String> {
    // ±1e15 ms is ±31,000 years: beyond it the value is not a timestamp, and chrono cannot hold it.
    if !millis.is_finite() || millis.abs() > 1e15 {
        return Err("is not a timestamp in epoch milliseconds".into());
    }
    let micros = (millis * 1000.0).round() as i64;
    Utc.timestamp_micros(micros)
        .single()
        .ok_or_else(|| "is not a timestamp in epoch milliseconds".into())
}

/// The queue carries readings in this shape: short keys, microseconds since the epoch, and `ia` / `ta`
/// (id / time assigned by the server) only when true.
#[derive(Serialize, Deserialize)]
struct WireReading {
    d: DeviceId,
    i: ReadingId,
    t: i64,
    m: Metrics,
    #[serde(default)]
    ia: bool,
    #[serde(default)]
    ta: bool,
}

fn is_false(value: &bool) -> bool {
    !*value
}

impl Serialize for Reading {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct WireRef<'a> {
            d: &'a DeviceId,
            i: &'a ReadingId,
            t: i64,
            m: &'a Metrics,
            #[serde(skip_serializing_if = "is_false")]
            ia: bool,
            #[serde(skip_serializing_if = "is_false")]
            ta: bool,
        }
        WireRef {
            d: &self.device_id,
            i: &self.id,
            t: self.ts.timestamp_micros(),
            m: &self.metrics,
            ia: self.origin.id_assigned,
            ta: self.origin.ts_assigned,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Reading {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = WireReading::deserialize(deserializer)?;
        let ts = Utc
            .timestamp_micros(wire.t)
            .single()
            .ok_or_else(|| serde::de::Error::custom("timestamp out of range"))?;
        Reading::new(wire.d, wire.i, ts, wire.m)
            .map(|r| {
                r.with_origin(Origin {
                    id_assigned: wire.ia,
                    ts_assigned: wire.ta,
                })
            })
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> MetricName {
        MetricName::parse(n).unwrap()
    }

    /// `Reading::new` of valid parts: the device `device`, the metrics `metrics`.
    fn reading(
        device: &str,
        id: ReadingId,
        ts: DateTime<Utc>,
        metrics: &[(&str, f64)],
    ) -> Result<Reading, ValidationError> {
        let metrics = metrics.iter().map(|&(n, v)| (name(n), v)).collect();
        Reading::new(
            DeviceId::parse(device).unwrap(),
            id,
            ts,
            Metrics::new(metrics).unwrap(),
        )
    }

    #[test]
    fn metrics_are_sorted_and_looked_up_by_name() {
        let m = Metrics::new(vec![(name("temperature"), 25.5), (name("humidity"), 60.3)]).unwrap();
        let names: Vec<_> = m.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["humidity", "temperature"]);
        assert_eq!(m.get("temperature"), Some(25.5));
        assert_eq!(m.get("co2"), None);
    }

    #[test]
    fn metrics_refuse_empty_duplicate_non_finite_and_too_many() {
        assert!(Metrics::new(vec![]).is_err());
        assert_eq!(
            Metrics::new(vec![(name("a"), 1.0), (name("a"), 2.0)])
                .unwrap_err()
                .field,
            "a"
        );
        assert!(Metrics::new(vec![(name("a"), f64::NAN)]).is_err());
        assert!(Metrics::new(vec![(name("a"), f64::INFINITY)]).is_err());
        let many = (0..65).map(|i| (name(&format!("m{i}")), 1.0)).collect();
        assert!(Metrics::new(many).is_err());
        let most = (0..64).map(|i| (name(&format!("m{i}")), 1.0)).collect();
        assert!(Metrics::new(most).is_ok());
    }

    #[test]
    fn timestamps_parse_from_both_formats_to_the_microsecond() {
        let a = parse_timestamp_rfc3339("2026-11-25T19:00:00.1234567+09:00").unwrap();
        assert_eq!(a.to_rfc3339(), "2026-11-25T10:00:00.123456+00:00");
        let b = parse_timestamp_millis(1_795_600_800_123.0).unwrap();
        assert_eq!(b.timestamp_micros(), 1_795_600_800_123_000);
        assert!(parse_timestamp_rfc3339("yesterday").is_err());
        assert!(parse_timestamp_millis(1e300).is_err());
    }

    #[test]
    fn readings_before_2000_are_refused() {
        let ts = DateTime::from_timestamp(0, 0).unwrap();
        let err = reading("d", ReadingId::generate(), ts, &[("a", 1.0)]).unwrap_err();
        assert_eq!(err.field, "ts");
    }

    #[test]
    fn readings_round_trip_through_the_wire_format_exactly() {
        let ts = parse_timestamp_rfc3339("2026-11-25T10:00:00.000001Z").unwrap();
        let id = ReadingId::parse("r-1").unwrap();
        let r = reading("raspi-01", id, ts, &[("t", 25.5), ("h", 0.1 + 0.2)]).unwrap();
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"d":"raspi-01","i":"r-1","t":1795600800000001,"m":{"h":0.30000000000000004,"t":25.5}}"#
        );
        assert_eq!(serde_json::from_str::<Reading>(&json).unwrap(), r);
    }

    #[test]
    fn what_the_server_filled_in_travels_with_the_reading() {
        let ts = parse_timestamp_rfc3339("2026-11-25T10:00:00Z").unwrap();
        let r = reading("d", ReadingId::generate(), ts, &[("t", 1.0)])
            .unwrap()
            .with_origin(Origin {
                id_assigned: true,
                ts_assigned: true,
            });
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.ends_with(r#","ia":true,"ta":true}"#), "{json}");
        let back = serde_json::from_str::<Reading>(&json).unwrap();
        assert_eq!(back, r);
        assert!(!back.has_device_id());
    }
}
