//! The accepted input formats, parsed into [`Reading`]s.
//!
//! JSON is first read into a loose shape that accepts any value at any field, so that a wrong type is
//! reported as "`temperature`: must be a number" rather than as a serde message about line and column;
//! then each field is checked by the domain constructors. Only syntax errors come from serde.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::reading::{parse_timestamp_millis, parse_timestamp_rfc3339};
use crate::{DeviceId, MetricName, Metrics, Reading, ReadingId, TimeWindow, ValidationError};

/// `POST /v1/readings` and MQTT device topics take at most this many readings at once.
pub const MAX_READINGS_PER_REQUEST: usize = 1000;

/// An object may have a few fields besides its metrics; beyond this it cannot be valid, and we stop
/// collecting its fields (the body size limit bounds the rest of the work).
const MAX_FIELDS: usize = crate::MAX_METRICS + 8;

/// `POST /data`: the flat seed format, `{"device_id": "raspi-01", "temperature": 25.5, ...}`.
/// Every top-level field other than `device_id`, `ts` and `id` is a metric and must be a number.
pub fn parse_seed_body(body: &[u8], window: TimeWindow) -> Result<Reading, ValidationError> {
    let Top::One(fields) = parse_json(body)? else {
        return Err(ValidationError::new("body", "must be a JSON object"));
    };
    let mut raw = RawReading::default();
    for (key, value) in fields.0 {
        match key.as_ref() {
            "device_id" => raw.device_id = Some(value),
            "ts" => raw.ts = Some(value),
            "id" => raw.id = Some(value),
            _ => match value {
                Value::Scalar(Scalar::Number(n)) => raw.metrics.push((key, Scalar::Number(n))),
                Value::Map(_) if key == "metrics" => {
                    return Err(ValidationError::new(
                        "metrics",
                        "is an object: /data takes flat numeric fields; \
                         send {\"metrics\": {...}} readings to /v1/readings",
                    ));
                }
                other => {
                    return Err(ValidationError::new(
                        key,
                        format!("must be a number (found {})", other.kind()),
                    ));
                }
            },
        }
    }
    if fields.1 {
        return Err(too_many_fields(""));
    }
    raw.into_reading(None, window, true).map_err(|e| {
        if e.field.is_empty() {
            ValidationError::new(
                "body",
                format!(
                    "{}: add a numeric field besides device_id, ts and id",
                    e.reason
                ),
            )
        } else {
            e
        }
    })
}

/// `POST /v1/readings`: one reading or an array of up to [`MAX_READINGS_PER_REQUEST`], each
/// `{"device_id", "ts"?, "id"?, "metrics": {"name": number}}`.
pub fn parse_readings_body(
    body: &[u8],
    window: TimeWindow,
) -> Result<Vec<Reading>, ValidationError> {
    parse_structured(body, None, window)
}

/// MQTT `devices/<id>/readings`: as [`parse_readings_body`], but `device_id` may be left out (it is
/// the topic's device then). Where present it is kept as sent: the caller checks it is the topic's
/// device with [`crate::check_own_readings`], as ingest-http does against the token's.
pub fn parse_device_topic_payload(
    topic_device: &DeviceId,
    payload: &[u8],
    window: TimeWindow,
) -> Result<Vec<Reading>, ValidationError> {
    parse_structured(payload, Some(topic_device), window)
}

fn parse_structured(
    body: &[u8],
    topic_device: Option<&DeviceId>,
    window: TimeWindow,
) -> Result<Vec<Reading>, ValidationError> {
    match parse_json(body)? {
        Top::One(fields) => Ok(vec![structured_reading(fields, topic_device, window)?]),
        Top::Many { items, total } => {
            if total == 0 {
                return Err(ValidationError::new(
                    "body",
                    "must contain at least one reading",
                ));
            }
            if total > MAX_READINGS_PER_REQUEST {
                return Err(ValidationError::new(
                    "body",
                    format!(
                        "at most {MAX_READINGS_PER_REQUEST} readings per request ({total} given)"
                    ),
                ));
            }
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| {
                    let prefix = format!("[{i}]");
                    match item {
                        Some(fields) => structured_reading(fields, topic_device, window),
                        None => Err(ValidationError::new("", "must be a JSON object")),
                    }
                    .map_err(|e| e.within(&prefix))
                })
                .collect()
        }
        Top::Other(kind) => Err(ValidationError::new(
            "body",
            format!("must be a JSON object or an array of objects (found {kind})"),
        )),
    }
}

fn structured_reading<'de>(
    (fields, truncated): Fields<'de>,
    topic_device: Option<&DeviceId>,
    window: TimeWindow,
) -> Result<Reading, ValidationError> {
    if truncated {
        return Err(too_many_fields(""));
    }
    let mut raw = RawReading::default();
    let mut metrics_seen = false;
    for (key, value) in fields {
        match key.as_ref() {
            "device_id" => raw.device_id = Some(value),
            "ts" => raw.ts = Some(value),
            "id" => raw.id = Some(value),
            "metrics" => {
                metrics_seen = true;
                match value {
                    Value::Map((entries, truncated)) => {
                        if truncated {
                            return Err(too_many_fields("metrics"));
                        }
                        raw.metrics = entries;
                    }
                    other => {
                        return Err(ValidationError::new(
                            "metrics",
                            format!(
                                "must be an object of metric names to numbers (found {})",
                                other.kind()
                            ),
                        ));
                    }
                }
            }
            _ => {
                return Err(ValidationError::new(
                    key,
                    "is not a known field (expected device_id, ts, id and metrics)",
                ));
            }
        }
    }
    if !metrics_seen {
        return Err(ValidationError::new("metrics", "is required"));
    }
    raw.into_reading(topic_device, window, false).map_err(|e| {
        if e.field.is_empty() {
            e.within("metrics")
        } else {
            e
        }
    })
}

fn too_many_fields(field: &str) -> ValidationError {
    ValidationError::new(
        if field.is_empty() { "body" } else { field },
        format!(
            "has too many fields (at most {} metrics per reading)",
            crate::MAX_METRICS
        ),
    )
}

/// The fields of one reading before they are checked.
#[derive(Default)]
struct RawReading<'de> {
    device_id: Option<Value<'de>>,
    ts: Option<Value<'de>>,
    id: Option<Value<'de>>,
    metrics: Vec<(Cow<'de, str>, Scalar<'de>)>,
}

impl<'de> RawReading<'de> {
    /// `flat_metrics`: metric errors name the metric alone (`temperature`) rather than
    /// `metrics.temperature`, because in the seed format metrics are top-level fields.
    fn into_reading(
        self,
        topic_device: Option<&DeviceId>,
        window: TimeWindow,
        flat_metrics: bool,
    ) -> Result<Reading, ValidationError> {
        // Whose readings these may be is not decided here: see `check_own_readings`.
        let device_id = match (self.device_id, topic_device) {
            (None, Some(topic)) => topic.clone(),
            (None, None) => return Err(ValidationError::new("device_id", "is required")),
            (Some(value), _) => DeviceId::parse(expect_text("device_id", value)?)
                .map_err(|reason| ValidationError::new("device_id", reason))?,
        };
        let origin = crate::Origin {
            id_assigned: self.id.is_none(),
            ts_assigned: self.ts.is_none(),
        };
        let id = match self.id {
            None => ReadingId::generate(),
            Some(value) => ReadingId::parse(expect_text("id", value)?)
                .map_err(|reason| ValidationError::new("id", reason))?,
        };
        let ts = match self.ts {
            None => window.now(),
            Some(Value::Scalar(Scalar::Text(text))) => parse_timestamp_rfc3339(&text)
                .map_err(|reason| ValidationError::new("ts", reason))?,
            Some(Value::Scalar(Scalar::Number(millis))) => parse_timestamp_millis(millis)
                .map_err(|reason| ValidationError::new("ts", reason))?,
            Some(other) => {
                return Err(ValidationError::new(
                    "ts",
                    format!(
                        "must be an RFC 3339 string or epoch milliseconds (found {})",
                        other.kind()
                    ),
                ));
            }
        };
        window.check(ts)?;
        let metric_field = |name: &str| {
            if flat_metrics {
                name.to_owned()
            } else {
                format!("metrics.{name}")
            }
        };
        let mut metrics = Vec::with_capacity(self.metrics.len());
        for (name, value) in self.metrics {
            let Scalar::Number(value) = value else {
                return Err(ValidationError::new(
                    metric_field(&name),
                    format!("must be a number (found {})", value.kind()),
                ));
            };
            let name = MetricName::parse(name.as_ref())
                .map_err(|reason| ValidationError::new(metric_field(&name), reason))?;
            metrics.push((name, value));
        }
        let metrics = Metrics::new(metrics).map_err(|e| {
            if e.field.is_empty() {
                e
            } else {
                ValidationError::new(metric_field(&e.field), e.reason)
            }
        })?;
        Ok(Reading::new(device_id, id, ts, metrics)?.with_origin(origin))
    }
}

fn expect_text<'de>(field: &str, value: Value<'de>) -> Result<Cow<'de, str>, ValidationError> {
    match value {
        Value::Scalar(Scalar::Text(text)) => Ok(text),
        other => Err(ValidationError::new(
            field,
            format!("must be a string (found {})", other.kind()),
        )),
    }
}

fn parse_json(body: &[u8]) -> Result<Top<'_>, ValidationError> {
    serde_json::from_slice(body)
        .map_err(|e| ValidationError::not_json(format!("is not valid JSON ({e})")))
}

/// A JSON value that is not looked into beyond what a reading can hold.
enum Scalar<'de> {
    Number(f64),
    Text(Cow<'de, str>),
    Other(&'static str),
}

/// A field of a reading object: a scalar, or an object of scalars (the `metrics` field).
enum Value<'de> {
    Scalar(Scalar<'de>),
    Map(Fields<'de, Scalar<'de>>),
}

/// An object's fields in order, and whether there were more than [`MAX_FIELDS`] (then dropped).
type Fields<'de, V = Value<'de>> = (Vec<(Cow<'de, str>, V)>, bool);

/// A request body: one object, or an array (items that are not objects are `None`).
enum Top<'de> {
    One(Fields<'de>),
    Many {
        items: Vec<Option<Fields<'de>>>,
        total: usize,
    },
    Other(&'static str),
}

impl Scalar<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Scalar::Number(_) => "a number",
            Scalar::Text(_) => "a string",
            Scalar::Other(kind) => kind,
        }
    }
}

impl Value<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Value::Scalar(s) => s.kind(),
            Value::Map(_) => "an object",
        }
    }
}

/// Visits any JSON value; `on_map` and `on_seq` decide what objects and arrays become.
macro_rules! scalar_visits {
    ($out:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($out(Scalar::Other("a boolean")))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok($out(Scalar::Number(v as f64)))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok($out(Scalar::Number(v as f64)))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Ok($out(Scalar::Number(v)))
        }
        fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok($out(Scalar::Text(Cow::Borrowed(v))))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok($out(Scalar::Text(Cow::Owned(v.to_owned()))))
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
            Ok($out(Scalar::Text(Cow::Owned(v))))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($out(Scalar::Other("null")))
        }
    };
}

struct ScalarVisitor;
impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    scalar_visits!(|s| s);
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other("an object"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other("an array"))
    }
}
impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

fn collect_fields<'de, A, V>(mut map: A) -> Result<Fields<'de, V>, A::Error>
where
    A: MapAccess<'de>,
    V: Deserialize<'de>,
{
    let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(4).min(MAX_FIELDS));
    let mut truncated = false;
    while let Some(key) = map.next_key::<Cow<'de, str>>()? {
        if fields.len() == MAX_FIELDS {
            truncated = true;
            map.next_value::<IgnoredAny>()?;
        } else {
            fields.push((key, map.next_value::<V>()?));
        }
    }
    Ok((fields, truncated))
}

struct ValueVisitor;
impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    scalar_visits!(Value::Scalar);
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        Ok(Value::Map(collect_fields(map)?))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Value::Scalar(Scalar::Other("an array")))
    }
}
impl<'de> Deserialize<'de> for Value<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

/// One element of a batch array: an object's fields, or `None` for anything else.
struct Item<'de>(Option<Fields<'de>>);
struct ItemVisitor;
impl<'de> Visitor<'de> for ItemVisitor {
    type Value = Item<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    scalar_visits!(|_| Item(None));
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        Ok(Item(Some(collect_fields(map)?)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Item(None))
    }
}
impl<'de> Deserialize<'de> for Item<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ItemVisitor)
    }
}

struct TopVisitor;
impl<'de> Visitor<'de> for TopVisitor {
    type Value = Top<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object or array")
    }
    scalar_visits!(|s: Scalar<'de>| Top::Other(s.kind()));
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        Ok(Top::One(collect_fields(map)?))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items =
            Vec::with_capacity(seq.size_hint().unwrap_or(16).min(MAX_READINGS_PER_REQUEST));
        let mut total = 0;
        loop {
            if total < MAX_READINGS_PER_REQUEST {
                match seq.next_element::<Item<'de>>()? {
                    Some(item) => items.push(item.0),
                    None => break,
                }
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                break;
            }
            total += 1;
        }
        Ok(Top::Many { items, total })
    }
}
impl<'de> Deserialize<'de> for Top<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TopVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use chrono::{DateTime, Utc};

    use crate::BackfillHorizon;

    fn now() -> DateTime<Utc> {
        parse_timestamp_rfc3339("2026-11-25T10:00:00Z").unwrap()
    }

    fn window() -> TimeWindow {
        TimeWindow::new(now(), BackfillHorizon::DEFAULT)
    }

    fn seed(body: &str) -> Result<Reading, ValidationError> {
        parse_seed_body(body.as_bytes(), window())
    }

    fn batch(body: &str) -> Result<Vec<Reading>, ValidationError> {
        parse_readings_body(body.as_bytes(), window())
    }

    fn refused(result: Result<impl fmt::Debug, ValidationError>) -> (String, String) {
        let e = result.expect_err("should be refused");
        (e.field, e.reason)
    }

    #[test]
    fn the_seed_snippet_parses_with_server_time_and_a_generated_id() {
        let r =
            seed(r#"{"device_id": "raspi-01", "temperature": 25.5, "humidity": 60.3}"#).unwrap();
        assert_eq!(r.device_id.as_str(), "raspi-01");
        assert_eq!(r.ts, now());
        assert_eq!(r.metrics.get("temperature"), Some(25.5));
        assert_eq!(r.metrics.get("humidity"), Some(60.3));
        assert_eq!(r.metrics.len(), 2);
        assert_eq!(r.id.as_str().len(), 36, "a UUID: {}", r.id);
        assert_eq!(
            r.origin,
            crate::Origin {
                id_assigned: true,
                ts_assigned: true
            }
        );
    }

    #[test]
    fn a_reading_says_which_of_its_id_and_time_the_server_filled_in() {
        let origin = |body: &str| batch(body).unwrap()[0].origin;
        let given = r#""device_id":"d","metrics":{"t":1}"#;
        assert_eq!(
            origin(&format!(r#"{{{given},"id":"r1","ts":1795600740000}}"#)),
            crate::Origin::default()
        );
        assert_eq!(
            origin(&format!(r#"{{{given},"id":"r1"}}"#)),
            crate::Origin {
                id_assigned: false,
                ts_assigned: true
            }
        );
        assert!(!batch(&format!(r#"{{{given}}}"#)).unwrap()[0].has_device_id());
    }

    #[test]
    fn seed_format_takes_any_numeric_fields_and_optional_ts_and_id() {
        let r = seed(
            r#"{"device_id":"raspi-01","co2":415,"pressure":1013.2,"ts":1795600740000,"id":"r7"}"#,
        )
        .unwrap();
        assert_eq!(r.metrics.get("co2"), Some(415.0));
        assert_eq!(r.metrics.get("pressure"), Some(1013.2));
        assert_eq!(r.ts.to_rfc3339(), "2026-11-25T09:59:00+00:00");
        assert_eq!(r.id.as_str(), "r7");
    }

    #[test]
    fn seed_format_names_the_offending_field() {
        assert_eq!(
            seed(r#"{"temperature": 1}"#).unwrap_err().field,
            "device_id"
        );
        assert_eq!(
            refused(seed(r#"{"device_id":"a","temperature":"25.5"}"#)),
            (
                "temperature".into(),
                "must be a number (found a string)".into()
            )
        );
        assert_eq!(seed(r#"{"device_id":"a"}"#).unwrap_err().field, "body");
        assert_eq!(
            seed(r#"{"device_id":"a b","t":1}"#).unwrap_err().field,
            "device_id"
        );
        assert_eq!(
            seed(r#"{"device_id":5,"t":1}"#).unwrap_err().field,
            "device_id"
        );
        assert_eq!(
            seed(r#"{"device_id":"a","bad name":1}"#).unwrap_err().field,
            "bad name"
        );
        assert_eq!(
            seed(r#"{"device_id":"a","t":null}"#).unwrap_err().field,
            "t"
        );
        assert_eq!(
            seed(r#"{"device_id":"a","t":1,"ts":"later"}"#)
                .unwrap_err()
                .field,
            "ts"
        );
        assert_eq!(
            seed(r#"{"device_id":"a","t":1,"id":""}"#)
                .unwrap_err()
                .field,
            "id"
        );
        assert_eq!(
            seed(r#"[{"device_id":"a","t":1}]"#).unwrap_err().field,
            "body"
        );
        assert_eq!(seed(r#"{"device_id":"a","t":1"#).unwrap_err().field, "body");
        assert_eq!(seed("").unwrap_err().field, "body");
        assert_eq!(
            seed(r#"{"device_id":"a","metrics":{"t":1}}"#)
                .unwrap_err()
                .field,
            "metrics"
        );
    }

    #[test]
    fn timestamps_more_than_five_minutes_ahead_are_refused() {
        assert!(seed(r#"{"device_id":"a","t":1,"ts":"2026-11-25T10:04:59Z"}"#).is_ok());
        assert!(seed(r#"{"device_id":"a","t":1,"ts":"2026-11-25T10:05:00Z"}"#).is_ok());
        let (field, reason) = refused(seed(
            r#"{"device_id":"a","t":1,"ts":"2026-11-25T10:05:01Z"}"#,
        ));
        assert_eq!(field, "ts");
        assert!(reason.contains("future"), "{reason}");
    }

    #[test]
    fn timestamps_older_than_the_backfill_horizon_are_refused() {
        // the default horizon: 365 days before 2026-11-25T10:00:00Z
        assert!(seed(r#"{"device_id":"a","t":1,"ts":"2025-11-25T10:00:00Z"}"#).is_ok());
        let (field, reason) = refused(seed(
            r#"{"device_id":"a","t":1,"ts":"2025-11-25T09:59:59Z"}"#,
        ));
        assert_eq!(field, "ts");
        assert!(reason.contains("365 days"), "{reason}");
        // as epoch milliseconds, and inside a batch
        let body = r#"[{"device_id":"a","metrics":{"t":1}},{"device_id":"a","ts":946684800000,"metrics":{"t":1}}]"#;
        assert_eq!(refused(batch(body)).0, "[1].ts");
        // a shorter horizon, configured
        let week = TimeWindow::new(now(), BackfillHorizon::days(7).unwrap());
        let body = br#"{"device_id":"a","ts":"2026-11-17T10:00:00Z","metrics":{"t":1}}"#;
        assert!(parse_readings_body(body, window()).is_ok());
        assert_eq!(parse_readings_body(body, week).unwrap_err().field, "ts");
        let topic = DeviceId::parse("a").unwrap();
        assert_eq!(
            parse_device_topic_payload(&topic, body, week)
                .unwrap_err()
                .field,
            "ts"
        );
    }

    #[test]
    fn reading_ids_that_could_spoof_a_display_are_refused() {
        for id in [r"r\u202egnp.exe", r"a\u200bb", "a b", r"caf\u00e9"] {
            let body = format!(r#"{{"device_id":"a","id":"{id}","metrics":{{"t":1}}}}"#);
            let (field, reason) = refused(batch(&body));
            assert_eq!(field, "id", "{id}");
            assert!(reason.contains("printable ASCII"), "{reason}");
        }
        assert!(
            batch(r#"{"device_id":"a","id":"2026-11-25T09:00:00+01:00#3","metrics":{"t":1}}"#)
                .is_ok()
        );
    }

    #[test]
    fn numbers_too_large_for_a_double_are_refused() {
        assert_eq!(
            seed(r#"{"device_id":"a","t":1e400}"#).unwrap_err().field,
            "body"
        );
    }

    #[test]
    fn batches_take_one_object_or_an_array() {
        let one = batch(r#"{"device_id":"a","metrics":{"t":1.5}}"#).unwrap();
        assert_eq!(one.len(), 1);
        let two = batch(
            r#"[{"device_id":"a","id":"x","ts":"2026-11-25T09:00:00Z","metrics":{"t":1}},
                {"device_id":"b","metrics":{"t":2,"h":3}}]"#,
        )
        .unwrap();
        assert_eq!(two.len(), 2);
        assert_eq!(two[0].id.as_str(), "x");
        assert_eq!(two[1].metrics.get("h"), Some(3.0));
    }

    #[test]
    fn batch_errors_name_the_item_and_field() {
        let body = r#"[{"device_id":"a","metrics":{"t":1}},{"device_id":"a","metrics":{"t":"x"}}]"#;
        assert_eq!(refused(batch(body)).0, "[1].metrics.t");
        assert_eq!(refused(batch(r#"[1]"#)).0, "[0]");
        assert_eq!(refused(batch(r#"[]"#)).0, "body");
        assert_eq!(refused(batch(r#"{"device_id":"a"}"#)).0, "metrics");
        assert_eq!(
            refused(batch(r#"{"device_id":"a","metrics":{}}"#)).0,
            "metrics"
        );
        assert_eq!(
            refused(batch(r#"{"device_id":"a","metrics":[1]}"#)).0,
            "metrics"
        );
        assert_eq!(
            refused(batch(r#"{"device_id":"a","metrics":{"t":1},"x":1}"#)).0,
            "x"
        );
        assert_eq!(
            refused(batch(r#"{"device_id":"a","metrics":{"t":1,"t":2}}"#)).0,
            "metrics.t"
        );
        assert_eq!(refused(batch(r#""text""#)).0, "body");
    }

    #[test]
    fn batches_hold_at_most_a_thousand_readings() {
        let item = r#"{"device_id":"a","metrics":{"t":1}}"#;
        let body = |n: usize| format!("[{}]", vec![item; n].join(","));
        assert_eq!(batch(&body(1000)).unwrap().len(), 1000);
        let (field, reason) = refused(batch(&body(1001)));
        assert_eq!(field, "body");
        assert!(reason.contains("1001"), "{reason}");
    }

    #[test]
    fn too_many_metrics_are_refused_without_collecting_them_all() {
        let metrics: Vec<String> = (0..200).map(|i| format!("\"m{i}\":1")).collect();
        let body = format!(r#"{{"device_id":"a","metrics":{{{}}}}}"#, metrics.join(","));
        assert_eq!(refused(batch(&body)).0, "metrics");
        let flat = format!(r#"{{"device_id":"a",{}}}"#, metrics.join(","));
        assert_eq!(refused(seed(&flat)).0, "body");
    }

    #[test]
    fn device_topics_fill_in_the_device_id_and_the_one_ownership_rule_checks_it() {
        let topic = DeviceId::parse("raspi-01").unwrap();
        let r = parse_device_topic_payload(&topic, br#"{"metrics":{"t":1}}"#, window()).unwrap();
        assert_eq!(r[0].device_id, topic);
        let same = br#"{"device_id":"raspi-01","metrics":{"t":1}}"#;
        let r = parse_device_topic_payload(&topic, same, window()).unwrap();
        assert!(crate::check_own_readings("raspi-01", &r).is_ok());
        let other = br#"[{"device_id":"raspi-01","metrics":{"t":1}},{"device_id":"raspi-02","metrics":{"t":1}}]"#;
        let r = parse_device_topic_payload(&topic, other, window()).unwrap();
        let e = crate::check_own_readings("raspi-01", &r).unwrap_err();
        assert_eq!((e.found.as_str(), e.index), ("raspi-02", 1));
        assert_eq!(
            seed("not json").unwrap_err().kind,
            crate::ValidationKind::NotJson
        );
        // without a topic, the device id stays required
        assert_eq!(refused(batch(r#"{"metrics":{"t":1}}"#)).0, "device_id");
    }

    #[test]
    fn escaped_strings_are_unescaped() {
        let r = seed(r#"{"device_id":"rasp\u0069-01","t":1}"#).unwrap();
        assert_eq!(r.device_id.as_str(), "raspi-01");
    }
}
