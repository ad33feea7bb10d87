//! What an MQTT message is: readings to publish, a device's answer to a command to report, or a
//! payload to refuse (with the reason).

use models::{Channel, CommandReport, DeviceId, Reading, TimeWindow, ValidationKind};

/// The longest command id a result topic may name: ids are UUIDs; anything much longer is no
/// command's, and would only be refused by the persister after a trip through RabbitMQ.
const MAX_COMMAND_ID_BYTES: usize = 64;

/// Every kind of refused payload (`Classified::Invalid`'s `kind`; the metrics create each at
/// start-up).
pub const INVALID_KINDS: [&str; 5] = [
    "not_json",
    "invalid_reading",
    "device_mismatch",
    "topic",
    "invalid_answer",
];

#[derive(Debug, PartialEq)]
pub enum Classified {
    Readings(Vec<Reading>),
    /// A device's answer to one of its commands, for the persister (which alone checks that the
    /// command is the device's and still open).
    Answer(Box<CommandReport>),
    Invalid {
        kind: &'static str,
        reason: String,
    },
}

fn refused(e: &models::ValidationError) -> Classified {
    let kind = match e.kind {
        ValidationKind::NotJson => "not_json",
        ValidationKind::Invalid => "invalid_reading",
    };
    invalid(kind, e.to_string())
}

fn invalid(kind: &'static str, reason: impl Into<String>) -> Classified {
    Classified::Invalid {
        kind,
        reason: reason.into(),
    }
}

/// `devices/<id>/readings` carries the `/v1/readings` format (device id optional, and if present the
/// topic's); the legacy topic carries the seed's flat format. Times must lie in `window`.
/// `devices/<id>/commands/<command id>/result` carries a device's answer
/// (`{"status", "result"}`): the broker lets a device publish only under its own `devices/<id>/`,
/// so the topic's device id is who answered.
pub fn classify(
    topic: &[u8],
    payload: &[u8],
    legacy_topic: Option<&str>,
    window: TimeWindow,
) -> Classified {
    let Ok(topic) = std::str::from_utf8(topic) else {
        return invalid("topic", "topic: is not UTF-8");
    };
    if legacy_topic == Some(topic) {
        return match models::parse_seed_body(payload, window) {
            Ok(reading) => Classified::Readings(vec![reading]),
            Err(e) => refused(&e),
        };
    }
    let device = match topic.split('/').collect::<Vec<_>>().as_slice() {
        ["devices", device, "readings"] => *device,
        ["devices", device, "commands", command, "result"] => {
            return classify_answer(device, command, payload);
        }
        _ => {
            return invalid(
                "topic",
                format!("topic: {topic:?} is not devices/<id>/readings"),
            );
        }
    };
    let device = match DeviceId::parse(device) {
        Ok(device) => device,
        Err(reason) => return invalid("topic", format!("topic: device id {reason}")),
    };
    let readings = match models::parse_device_topic_payload(&device, payload, window) {
        Ok(readings) => readings,
        Err(e) => return refused(&e),
    };
    match models::check_own_readings(device.as_str(), &readings) {
        Ok(()) => Classified::Readings(readings),
        Err(e) => invalid(
            "device_mismatch",
            format!(
                "readings[{}].device_id: is {:?} but the topic is that of device {:?}",
                e.index, e.found, e.writer
            ),
        ),
    }
}

/// A device's answer, from its result topic. Every refusal is one kind, `invalid_answer`, whatever
/// was wrong: answers are counted apart from readings.
fn classify_answer(device: &str, command: &str, payload: &[u8]) -> Classified {
    let device = match DeviceId::parse(device) {
        Ok(device) => device,
        Err(reason) => return invalid("topic", format!("topic: device id {reason}")),
    };
    if command.is_empty() || command.len() > MAX_COMMAND_ID_BYTES {
        return invalid(
            "invalid_answer",
            format!("topic: a command id is 1 to {MAX_COMMAND_ID_BYTES} bytes"),
        );
    }
    match models::parse_command_answer(payload) {
        Ok(answer) => Classified::Answer(Box::new(CommandReport::answered(
            command,
            device,
            Channel::Mqtt,
            answer,
        ))),
        Err(e) => invalid("invalid_answer", format!("answer: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> TimeWindow {
        TimeWindow::new(
            models::parse_timestamp_rfc3339("2026-11-25T10:00:00Z").unwrap(),
            models::BackfillHorizon::DEFAULT,
        )
    }

    fn kind(c: Classified) -> &'static str {
        match c {
            Classified::Invalid { kind, .. } => kind,
            Classified::Readings(r) => panic!("accepted {r:?}"),
            Classified::Answer(a) => panic!("accepted {a:?}"),
        }
    }

    #[test]
    fn a_result_topic_takes_its_devices_answer_to_that_command() {
        let c = classify(
            b"devices/raspi-01/commands/c-1/result",
            br#"{"status":"succeeded","result":{"led":"on"}}"#,
            None,
            now(),
        );
        let Classified::Answer(report) = c else {
            panic!("{c:?}")
        };
        assert_eq!(
            (report.command_id.as_str(), report.device_id.as_str()),
            ("c-1", "raspi-01")
        );
        assert_eq!(report.via, Channel::Mqtt);
        assert_eq!(
            report.kind,
            models::ReportKind::Answered {
                outcome: models::Outcome::Succeeded,
                result: Some(serde_json::json!({"led": "on"})),
            }
        );
        for (topic, payload) in [
            (
                &b"devices/raspi-01/commands/c-1/result"[..],
                &b"not json"[..],
            ),
            (
                b"devices/raspi-01/commands/c-1/result",
                br#"{"status":"done"}"#,
            ),
            (
                b"devices/raspi-01/commands//result",
                br#"{"status":"failed"}"#,
            ),
        ] {
            assert_eq!(
                kind(classify(topic, payload, None, now())),
                "invalid_answer"
            );
        }
        assert_eq!(
            kind(classify(
                b"devices/a b/commands/c-1/result",
                br#"{"status":"failed"}"#,
                None,
                now()
            )),
            "topic"
        );
    }

    #[test]
    fn the_seed_topic_takes_the_flat_format() {
        let c = classify(
            b"sensor/data",
            br#"{"device_id": "raspi-01", "temperature": 25.5, "humidity": 60.3}"#,
            Some("sensor/data"),
            now(),
        );
        let Classified::Readings(r) = c else {
            panic!("{c:?}")
        };
        assert_eq!(r[0].device_id.as_str(), "raspi-01");
        assert_eq!(r[0].metrics.get("humidity"), Some(60.3));
    }

    #[test]
    fn device_topics_take_readings_for_that_device() {
        let c = classify(
            b"devices/raspi-01/readings",
            br#"[{"metrics":{"t":1}},{"metrics":{"t":2}}]"#,
            None,
            now(),
        );
        let Classified::Readings(r) = c else {
            panic!("{c:?}")
        };
        assert_eq!(r.len(), 2);
        assert!(r.iter().all(|r| r.device_id.as_str() == "raspi-01"));
    }

    #[test]
    fn every_kind_of_bad_message_is_named() {
        assert_eq!(
            kind(classify(b"devices/a/readings", b"not json", None, now())),
            "not_json"
        );
        assert_eq!(
            kind(classify(
                b"devices/a/readings",
                br#"{"device_id":"b","metrics":{"t":1}}"#,
                None,
                now()
            )),
            "device_mismatch"
        );
        assert_eq!(
            kind(classify(
                b"devices/a/readings",
                br#"{"metrics":{"t":"x"}}"#,
                None,
                now()
            )),
            "invalid_reading"
        );
        assert_eq!(
            kind(classify(
                b"devices/a b/readings",
                br#"{"metrics":{"t":1}}"#,
                None,
                now()
            )),
            "topic"
        );
        assert_eq!(
            kind(classify(
                b"devices/a/other",
                br#"{"metrics":{"t":1}}"#,
                None,
                now()
            )),
            "topic"
        );
        assert_eq!(kind(classify(&[0xff, 0xfe], b"{}", None, now())), "topic");
        assert_eq!(
            kind(classify(
                b"devices/a/readings",
                br#"{"ts":"2001-03-15T00:00:00Z","metrics":{"t":1}}"#,
                None,
                now()
            )),
            "invalid_reading"
        );
        // the legacy topic is just another unexpected topic when turned off
        assert_eq!(
            kind(classify(
                b"sensor/data",
                br#"{"device_id":"a","t":1}"#,
                None,
                now()
            )),
            "topic"
        );
        assert_eq!(
            kind(classify(
                b"sensor/data",
                br#"{"t":1}"#,
                Some("sensor/data"),
                now()
            )),
            "invalid_reading"
        );
    }
}
