//! Query-string parameters, parsed into domain values with errors that name the parameter.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use models::{DeviceId, MetricName};

use crate::error::QueryError;

pub const DEFAULT_LIMIT: i64 = 100;
pub const MAX_LIMIT: i64 = 10_000;
pub const MAX_BUCKETS: i64 = 10_000;

/// The `{id}` of a `/v1/devices/{id}` path. A text that is not a valid device id names no device, so
/// it is a 404 like any unknown device (and never reaches the database: PostgreSQL refuses a NUL
/// byte in text with an error that is not the client's to see).
pub fn device_id(value: String) -> Result<DeviceId, QueryError> {
    DeviceId::parse(value.as_str()).map_err(|_| QueryError::UnknownDevice(value))
}

/// The times a query may name, in epoch milliseconds: RFC 3339's years 0000 to 9999. Beyond them
/// (epoch milliseconds reach ±31,000 years) PostgreSQL cannot hold the time (it refuses times before
/// 4713 BC) and fails the query.
pub const EARLIEST_MILLIS: i64 = -62_167_219_200_000; // 0000-01-01T00:00:00Z
pub const LATEST_MILLIS: i64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z
const EARLIEST_TIME_MICROS: i64 = EARLIEST_MILLIS * 1000;
const LATEST_TIME_MICROS: i64 = LATEST_MILLIS * 1000 + 999;

fn in_supported_range(ts: DateTime<Utc>) -> bool {
    (EARLIEST_TIME_MICROS..=LATEST_TIME_MICROS).contains(&ts.timestamp_micros())
}

/// RFC 3339 or epoch milliseconds, as readings are sent; years 0–9999.
pub fn time(field: &'static str, value: &str) -> Result<DateTime<Utc>, QueryError> {
    let ts = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
        let millis: i64 = value
            .parse()
            .map_err(|_| QueryError::invalid(field, "is not a number of epoch milliseconds"))?;
        models::parse_timestamp_millis(millis as f64)
            .map_err(|reason| QueryError::invalid(field, reason))?
    } else {
        // An unencoded `+09:00` arrives as ` 09:00` (form encoding turns `+` into a space).
        models::parse_timestamp_rfc3339(value)
            .or_else(|e| models::parse_timestamp_rfc3339(&value.replace(' ', "+")).map_err(|_| e))
            .map_err(|reason| QueryError::invalid(field, reason))?
    };
    if !in_supported_range(ts) {
        return Err(QueryError::invalid(
            field,
            "must be between the years 0 and 9999",
        ));
    }
    Ok(ts)
}

pub fn optional_time(
    field: &'static str,
    value: Option<&str>,
) -> Result<Option<DateTime<Utc>>, QueryError> {
    value.map(|v| time(field, v)).transpose()
}

pub fn limit(value: Option<&str>) -> Result<i64, QueryError> {
    let Some(value) = value else {
        return Ok(DEFAULT_LIMIT);
    };
    match value.parse::<i64>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        _ => Err(QueryError::invalid(
            "limit",
            format!("must be a whole number from 1 to {MAX_LIMIT}"),
        )),
    }
}

/// `temperature` or `temperature,humidity`.
pub fn metrics(value: Option<&str>) -> Result<Vec<String>, QueryError> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    value
        .split(',')
        .map(|name| {
            MetricName::parse(name.trim())
                .map(MetricName::into_string)
                .map_err(|reason| QueryError::invalid("metric", reason))
        })
        .collect()
}

/// A position in a device's readings: the last row's time and id, opaque to clients.
pub fn encode_reading_cursor(ts: DateTime<Utc>, reading_id: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}.{reading_id}", ts.timestamp_micros()))
}

pub fn decode_reading_cursor(
    value: Option<&str>,
) -> Result<Option<(DateTime<Utc>, String)>, QueryError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let bad = || QueryError::invalid("cursor", "is not a cursor this API gave out");
    let text = URL_SAFE_NO_PAD
        .decode(value)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(bad)?;
    let (micros, id) = text.split_once('.').ok_or_else(bad)?;
    let ts = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(bad)?;
    // Every stored reading is from 2000 on and has an id of 1-64 characters without control
    // characters (the rule before reading ids became printable ASCII, so cursors into older
    // readings stay valid); anything else is forged, and would make PostgreSQL fail the query
    // (a NUL byte, a time before 4713 BC) rather than find nothing.
    let stored_id = !id.is_empty() && id.chars().count() <= 64 && !id.chars().any(char::is_control);
    if ts < models::OLDEST_TIMESTAMP || !in_supported_range(ts) || !stored_id {
        return Err(bad());
    }
    Ok(Some((ts, id.to_owned())))
}

pub fn encode_device_cursor(device_id: &str) -> String {
    URL_SAFE_NO_PAD.encode(device_id)
}

/// The last device id of the previous page; only a valid device id can be one.
/// A search for devices by part of their id: the id's own alphabet (so it cannot be a pattern).
pub fn device_search(value: Option<&str>) -> Result<Option<String>, QueryError> {
    match value {
        None | Some("") => Ok(None),
        Some(text) => DeviceId::parse(text)
            .map(|id| Some(id.into_string()))
            .map_err(|_| QueryError::invalid("q", "must be 1–64 characters of [A-Za-z0-9._-]")),
    }
}

/// The aggregates `agg` names: one, or up to five distinct ones, comma-separated.
pub fn aggregates(value: &str) -> Result<Vec<store::read::Aggregate>, QueryError> {
    let invalid = || {
        QueryError::invalid(
            "agg",
            format!(
                "must be one of {}, or up to {} distinct ones separated by commas",
                store::read::Aggregate::NAMES,
                store::read::MAX_AGGREGATES
            ),
        )
    };
    let mut aggregates = Vec::new();
    for name in value.split(',') {
        let aggregate = store::read::Aggregate::parse(name).ok_or_else(invalid)?;
        if aggregates.contains(&aggregate) || aggregates.len() == store::read::MAX_AGGREGATES {
            return Err(invalid());
        }
        aggregates.push(aggregate);
    }
    Ok(aggregates)
}

/// `true` or `false` (absent: false).
pub fn flag(field: &'static str, value: Option<&str>) -> Result<bool, QueryError> {
    match value {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(_) => Err(QueryError::invalid(field, "must be true or false")),
    }
}

pub fn decode_device_cursor(value: Option<&str>) -> Result<Option<String>, QueryError> {
    value
        .map(|v| {
            URL_SAFE_NO_PAD
                .decode(v)
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .and_then(|text| DeviceId::parse(text).ok())
                .map(DeviceId::into_string)
                .ok_or_else(|| QueryError::invalid("cursor", "is not a cursor this API gave out"))
        })
        .transpose()
}

/// `10s`, `1m`, `15m`, `1h`, `1d`, `1w` → microseconds.
pub fn bucket(value: &str) -> Result<i64, QueryError> {
    let bad = || {
        QueryError::invalid(
            "bucket",
            "must be a whole number and a unit: s, m, h, d or w (e.g. 10s, 5m, 1h, 1d)",
        )
    };
    let split = value.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (count, unit) = value.split_at(split);
    let count: i64 = count.parse().map_err(|_| bad())?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    let secs = count.checked_mul(unit_secs).ok_or_else(bad)?;
    if !(1..=366 * 86_400).contains(&secs) {
        return Err(QueryError::invalid(
            "bucket",
            "must be between 1 second and 366 days",
        ));
    }
    Ok(secs * 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_in_both_formats_and_survive_form_encoding() {
        let a = time("from", "2026-11-25T19:00:00+09:00").unwrap();
        let b = time("from", "2026-11-25T19:00:00 09:00").unwrap();
        let c = time("from", "1795600800000").unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert!(time("from", "soon").is_err());
        assert!(time("from", "0000-01-01T00:00:00Z").is_ok());
        assert!(time("from", "9999-12-31T23:59:59.999999Z").is_ok());
        for beyond in ["-1000000000000000", "1000000000000000", "-62167219200001"] {
            let Err(QueryError::InvalidParameter { field, .. }) = time("from", beyond) else {
                panic!("{beyond} accepted");
            };
            assert_eq!(field, "from");
        }
    }

    #[test]
    fn path_device_ids_that_name_no_device_are_unknown() {
        assert_eq!(device_id("pi-1".into()).unwrap().as_str(), "pi-1");
        for bad in ["a\0b", "a b", "", "a/b", "\u{202E}x"] {
            assert!(
                matches!(device_id(bad.into()), Err(QueryError::UnknownDevice(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn limits_are_bounded() {
        assert_eq!(limit(None).unwrap(), 100);
        assert_eq!(limit(Some("10000")).unwrap(), 10_000);
        for bad in ["0", "10001", "-1", "ten", ""] {
            assert!(limit(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn cursors_round_trip_and_refuse_forgeries() {
        let ts = time("t", "2026-11-25T10:00:00.000001Z").unwrap();
        let c = encode_reading_cursor(ts, "id.with.dots");
        assert_eq!(
            decode_reading_cursor(Some(&c)).unwrap(),
            Some((ts, "id.with.dots".to_owned()))
        );
        assert!(decode_reading_cursor(Some("!!")).is_err());
        assert!(decode_reading_cursor(Some(&URL_SAFE_NO_PAD.encode("x.y"))).is_err());
        let d = encode_device_cursor("raspi-01");
        assert_eq!(decode_device_cursor(Some(&d)).unwrap().unwrap(), "raspi-01");
        // well-formed but impossible: a NUL byte, a time PostgreSQL cannot hold, before 2000
        for forged in [
            format!("{}.a\0b", ts.timestamp_micros()),
            "-300000000000000000.x".to_owned(),
            "0.x".to_owned(),
            format!("{}.", ts.timestamp_micros()),
        ] {
            assert!(
                decode_reading_cursor(Some(&URL_SAFE_NO_PAD.encode(&forged))).is_err(),
                "{forged:?}"
            );
        }
        // an id stored before ids became printable ASCII still pages on
        let old = encode_reading_cursor(ts, "café");
        assert!(decode_reading_cursor(Some(&old)).is_ok());
        assert!(decode_device_cursor(Some(&URL_SAFE_NO_PAD.encode("a\0b"))).is_err());
    }

    #[test]
    fn buckets_parse_to_microseconds() {
        assert_eq!(bucket("10s").unwrap(), 10_000_000);
        assert_eq!(bucket("1m").unwrap(), 60_000_000);
        assert_eq!(bucket("1h").unwrap(), 3_600_000_000);
        assert_eq!(bucket("1d").unwrap(), 86_400_000_000);
        for bad in [
            "",
            "s",
            "10",
            "0s",
            "1y",
            "1.5h",
            "-1h",
            "367d",
            "99999999999999999999s",
        ] {
            assert!(bucket(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn metric_lists_are_checked() {
        assert_eq!(metrics(Some("a,b")).unwrap(), ["a", "b"]);
        assert!(metrics(Some("a,,b")).is_err());
        assert!(metrics(Some("a b")).is_err());
    }
}
