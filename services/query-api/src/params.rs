//! Query-string parameters, parsed into domain values with errors that name the parameter.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use models::MetricName;

use crate::error::QueryError;

pub const DEFAULT_LIMIT: i64 = 100;
pub const MAX_LIMIT: i64 = 10_000;
pub const MAX_BUCKETS: i64 = 10_000;

/// The times a query may name, in epoch milliseconds: RFC 3339's years 0000 to 9999. Beyond them
/// (epoch milliseconds reach ±31,000 years) PostgreSQL cannot hold the time and fails the query.
pub const EARLIEST_MILLIS: i64 = -62_167_219_200_000; // 0000-01-01T00:00:00Z
pub const LATEST_MILLIS: i64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z

/// RFC 3339 or epoch milliseconds, as readings are sent.
pub fn time(field: &'static str, value: &str) -> Result<DateTime<Utc>, QueryError> {
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
        let millis: i64 = value
            .parse()
            .map_err(|_| QueryError::invalid(field, "is not a number of epoch milliseconds"))?;
        if !(EARLIEST_MILLIS..=LATEST_MILLIS).contains(&millis) {
            return Err(QueryError::invalid(
                field,
                "must be a time between the years 0000 and 9999",
            ));
        }
        return models::parse_timestamp_millis(millis as f64)
            .map_err(|reason| QueryError::invalid(field, reason));
    }
    // An unencoded `+09:00` arrives as ` 09:00` (form encoding turns `+` into a space).
    models::parse_timestamp_rfc3339(value)
        .or_else(|e| models::parse_timestamp_rfc3339(&value.replace(' ', "+")).map_err(|_| e))
        .map_err(|reason| QueryError::invalid(field, reason))
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
    Ok(Some((ts, id.to_owned())))
}

pub fn encode_device_cursor(device_id: &str) -> String {
    URL_SAFE_NO_PAD.encode(device_id)
}

pub fn decode_device_cursor(value: Option<&str>) -> Result<Option<String>, QueryError> {
    value
        .map(|v| {
            URL_SAFE_NO_PAD
                .decode(v)
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
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
        assert!(time("from", &EARLIEST_MILLIS.to_string()).is_ok());
        assert!(time("from", &LATEST_MILLIS.to_string()).is_ok());
        assert!(time("from", &(EARLIEST_MILLIS - 1).to_string()).is_err());
        assert!(time("from", &(LATEST_MILLIS + 1).to_string()).is_err());
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
