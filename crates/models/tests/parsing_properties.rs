//! Properties of the parsers, over arbitrary input: nothing panics, and whatever is accepted obeys
//! every rule (so nothing invalid can reach the queue).

use chrono::{DateTime, Utc};
use models::{
    DeviceId, MAX_FUTURE_SKEW, MAX_METRICS, MetricName, OLDEST_TIMESTAMP, Reading,
    ReadingBatchMessage, ReadingId, parse_device_topic_payload, parse_readings_body,
    parse_seed_body,
};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

fn now() -> DateTime<Utc> {
    models::parse_timestamp_rfc3339("2026-11-25T10:00:00Z").unwrap()
}

/// Every rule of a reading, checked from the outside.
fn assert_valid(r: &Reading) {
    assert!(DeviceId::parse(r.device_id.as_str()).is_ok());
    assert!(ReadingId::parse(r.id.as_str()).is_ok());
    assert!((1..=MAX_METRICS).contains(&r.metrics.len()));
    for (name, value) in r.metrics.iter() {
        assert!(MetricName::parse(name.as_str()).is_ok());
        assert!(value.is_finite());
    }
    assert!(r.ts >= OLDEST_TIMESTAMP && r.ts <= now() + MAX_FUTURE_SKEW);
    // and it survives the queue unchanged
    let bytes = ReadingBatchMessage::encode(std::slice::from_ref(r));
    assert_eq!(
        ReadingBatchMessage::decode(&bytes).unwrap(),
        vec![r.clone()]
    );
}

fn check_all(bytes: &[u8]) {
    if let Ok(r) = parse_seed_body(bytes, now()) {
        assert_valid(&r);
    }
    if let Ok(readings) = parse_readings_body(bytes, now()) {
        assert!(!readings.is_empty() && readings.len() <= models::MAX_READINGS_PER_REQUEST);
        readings.iter().for_each(assert_valid);
    }
    let topic = DeviceId::parse("raspi-01").unwrap();
    if let Ok(readings) = parse_device_topic_payload(&topic, bytes, now()) {
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
}
