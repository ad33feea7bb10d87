//! Properties of the parsers, over arbitrary input: nothing panics, and whatever is accepted obeys
//! every rule (so nothing invalid can reach the queue).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first thing that is not as it must be"
)]

use chrono::{DateTime, Utc};
use models::{
    BackfillHorizon, DeviceId, MAX_FUTURE_SKEW, MAX_METRICS, MetricName, OLDEST_TIMESTAMP, Reading,
    ReadingBatchMessage, ReadingId, TimeWindow, parse_device_topic_payload, parse_readings_body,
    parse_seed_body,
};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

fn now() -> DateTime<Utc> {
    models::parse_timestamp_rfc3339("2026-11-25T10:00:00Z").unwrap()
}

fn window() -> TimeWindow {
    TimeWindow::new(now(), BackfillHorizon::DEFAULT)
}

/// Every rule of a reading, checked from the outside.
fn assert_valid(r: &Reading) {
    assert!(DeviceId::parse(r.device_id.as_str()).is_ok());
    assert!(ReadingId::parse(r.id.as_str()).is_ok());
    // nothing that could change how an id is displayed gets through
    assert!(
        (1..=64).contains(&r.id.as_str().len())
            && r.id.as_str().bytes().all(|b| b.is_ascii_graphic()),
        "{:?}",
        r.id
    );
    assert!((1..=MAX_METRICS).contains(&r.metrics.len()));
    for (name, value) in r.metrics.iter() {
        assert!(MetricName::parse(name.as_str()).is_ok());
        assert!(value.is_finite());
    }
    assert!(r.ts >= OLDEST_TIMESTAMP && r.ts <= now() + MAX_FUTURE_SKEW);
    // the backfill horizon bounds how many monthly partitions readings can ever ask for
    assert!(r.ts >= window().oldest(), "{} is beyond the horizon", r.ts);
    // and it survives the queue unchanged
    let bytes = ReadingBatchMessage::encode(std::slice::from_ref(r));
    assert_eq!(
        ReadingBatchMessage::decode(&bytes).unwrap(),
        vec![r.clone()]
    );
}

fn check_all(bytes: &[u8]) {
    if let Ok(r) = parse_seed_body(bytes, window()) {
        assert_valid(&r);
    }
    if let Ok(readings) = parse_readings_body(bytes, window()) {
        assert!(!readings.is_empty() && readings.len() <= models::MAX_READINGS_PER_REQUEST);
        readings.iter().for_each(assert_valid);
    }
    let topic = DeviceId::parse("raspi-01").unwrap();
    if let Ok(readings) = parse_device_topic_payload(&topic, bytes, window()) {
        assert!(readings.iter().all(|r| r.device_id == topic));
        readings.iter().for_each(assert_valid);
    }
}

/// JSON scalars as devices send them, right and wrong.
fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<f64>()
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        any::<i64>().prop_map(|i| json!(i)),
        (1_700_000_000_000i64..1_900_000_000_000).prop_map(|ms| json!(ms)),
        "[a-zA-Z0-9._ /-]{0,70}".prop_map(Value::String),
        // what a reading id must not hold: bidi controls, zero-width and other invisible or
        // look-alike characters, mixed with what it may
        "[a-z0-9:#+\u{202A}-\u{202E}\u{2066}-\u{2069}\u{200B}-\u{200F}\u{FEFF}\u{00A0}\u{0430}\u{7F}]{1,70}"
            .prop_map(Value::String),
        // times on both sides of the horizon (2025-11-25T10:00:00Z) and of the clock
        (1_764_000_000_000i64..1_764_100_000_000).prop_map(|ms| json!(ms)),
        Just(json!("2025-11-25T09:59:59Z")),
        Just(json!("2025-11-25T10:00:00Z")),
        Just(json!("2026-11-25T09:00:00Z")),
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("device_id".to_owned()),
        Just("ts".to_owned()),
        Just("id".to_owned()),
        Just("metrics".to_owned()),
        "[a-zA-Z0-9._ -]{0,70}",
    ]
}

/// Objects shaped like readings, with any mix of right and wrong fields.
fn object() -> impl Strategy<Value = Value> {
    let metrics = proptest::collection::btree_map("[a-z0-9._ -]{0,8}", scalar(), 0..70)
        .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>()));
    proptest::collection::vec((key(), prop_oneof![scalar(), metrics]), 0..8)
        .prop_map(|fields| Value::Object(fields.into_iter().collect()))
}

/// A reading that is valid but for its id.
fn reading_with_id(id: &str) -> Value {
    json!({"device_id": "raspi-01", "id": id, "metrics": {"t": 1}})
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_and_what_parses_is_valid(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        check_all(&bytes);
    }

    #[test]
    fn reading_shaped_json_never_panics_and_what_parses_is_valid(
        items in proptest::collection::vec(object(), 0..4),
        as_array in any::<bool>(),
    ) {
        let body = if as_array || items.len() != 1 { Value::Array(items) } else { items[0].clone() };
        check_all(body.to_string().as_bytes());
    }

    #[test]
    fn reading_ids_are_accepted_exactly_when_they_are_1_to_64_printable_ascii_characters(
        id in "[ -~\u{80}-\u{FFFF}]{0,70}",
    ) {
        let expected = (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic());
        prop_assert_eq!(ReadingId::parse(id.as_str()).is_ok(), expected);
        let parsed = parse_readings_body(reading_with_id(&id).to_string().as_bytes(), window());
        match parsed {
            Ok(readings) => prop_assert!(expected && readings[0].id.as_str() == id),
            Err(e) => prop_assert!(!expected && e.field == "id", "{}", e),
        }
    }

    #[test]
    fn times_are_accepted_exactly_inside_the_window(
        offset_secs in -(400 * 86_400i64)..600,
        horizon_days in 1i64..400,
    ) {
        let window = TimeWindow::new(now(), BackfillHorizon::days(horizon_days).unwrap());
        let ts = now() + chrono::Duration::seconds(offset_secs);
        let body = json!({"device_id": "a", "ts": ts.to_rfc3339(), "metrics": {"t": 1}});
        let parsed = parse_readings_body(body.to_string().as_bytes(), window);
        let inside = ts >= window.oldest() && ts <= window.newest();
        match parsed {
            Ok(readings) => prop_assert!(inside && readings[0].ts == ts),
            Err(e) => prop_assert!(!inside && e.field == "ts", "{}", e),
        }
    }
}
