//! Commands on the wire, both ways: what a device receives ([`DeviceCommand`]), what it answers
//! ([`parse_command_answer`]), and what the ingest services hand the persister about a command on
//! the reports queue ([`CommandReport`]). The ingest services and the persister share these, so they
//! cannot disagree about them.
//!
//! Delivery is at least once: a device may receive the same command more than once (a re-send while
//! it was offline, a replica restarted before the send was recorded) and must act on a command id
//! once.

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};

use crate::{DeviceId, ValidationError};

/// The largest answer a device may send (`result` and its envelope), the same bound as an app's
/// `args`.
pub const MAX_ANSWER_BYTES: usize = 8192;

/// What a device receives: `{"id", "name", "args", "expires_at"}`, as JSON on every channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceCommand {
    pub id: String,
    pub name: String,
    pub args: serde_json::Value,
    pub expires_at: DateTime<Utc>,
}

impl DeviceCommand {
    pub fn encode(&self) -> Vec<u8> {
        // Our own type with string keys: serialising it cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(body: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(body).map_err(|e| e.to_string())
    }

    /// Whether it may still be delivered: never once its expiry has passed.
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        self.expires_at > now
    }
}

/// How a device says its command went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    Failed,
}

impl Outcome {
    /// As the answer names it (and the command's status after it).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }
}

/// A device's answer to a command: `{"status": "succeeded" | "failed", "result": <any JSON>}`
/// (`result` optional).
#[derive(Debug, Clone, PartialEq)]
pub struct CommandAnswer {
    pub outcome: Outcome,
    pub result: Option<serde_json::Value>,
}

/// Checks a device's answer: JSON, at most [`MAX_ANSWER_BYTES`], a known status, and no NUL
/// character anywhere (PostgreSQL's jsonb cannot hold one).
pub fn parse_command_answer(body: &[u8]) -> Result<CommandAnswer, ValidationError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct In {
        status: String,
        #[serde(default)]
        result: Option<serde_json::Value>,
    }
    if body.len() > MAX_ANSWER_BYTES {
        return Err(ValidationError::new(
            "body",
            format!("an answer may be at most {MAX_ANSWER_BYTES} bytes"),
        ));
    }
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ValidationError::not_json(format!("not JSON: {e}")))?;
    if contains_nul(&value) {
        return Err(ValidationError::new(
            "result",
            "must not contain the NUL character",
        ));
    }
    let answer: In = serde_json::from_value(value).map_err(|e| {
        ValidationError::new("body", format!("expected {{\"status\", \"result\"}}: {e}"))
    })?;
    let outcome = match answer.status.as_str() {
        "succeeded" => Outcome::Succeeded,
        "failed" => Outcome::Failed,
        other => {
            return Err(ValidationError::new(
                "status",
                format!("must be \"succeeded\" or \"failed\" (found {other:?})"),
            ));
        }
    };
    Ok(CommandAnswer {
        outcome,
        result: answer.result.filter(|r| !r.is_null()),
    })
}

/// Whether any string (key or value) in `value` holds a NUL character.
pub fn contains_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(contains_nul),
        serde_json::Value::Object(map) => map
            .iter()
            .any(|(key, v)| key.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

/// Which way a command reached its device, or its answer the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Mqtt,
    Websocket,
    LongPoll,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mqtt => "mqtt",
            Self::Websocket => "websocket",
            Self::LongPoll => "long_poll",
        }
    }
}

/// What happened to a command, as an ingest service saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ReportKind {
    /// Handed to the device's channel (the MQTT broker accepted it at QoS 1, a WebSocket frame was
    /// written, a long-poll answered with it).
    Sent,
    /// The device's answer.
    Answered {
        outcome: Outcome,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result: Option<serde_json::Value>,
    },
}

/// One message on the reports queue: `{"v": 1, "command_id", "device_id", "at", "via", "kind", ...}`.
/// `device_id` is who the ingest service authenticated, never what the device claimed: the
/// persister refuses a report about another device's command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandReport {
    pub command_id: String,
    pub device_id: DeviceId,
    /// When the ingest service saw it happen.
    pub at: DateTime<Utc>,
    pub via: Channel,
    #[serde(flatten)]
    pub kind: ReportKind,
}

/// Now, to the microsecond: what PostgreSQL keeps of a time, so a report's time reads back equal.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// Bumped on any change the persister must know about (as [`crate::MESSAGE_VERSION`] for readings).
pub const REPORT_VERSION: u32 = 1;

impl CommandReport {
    pub const CONTENT_TYPE: &'static str = "application/vnd.sensorhub.command-report.v1+json";

    pub fn sent(command_id: &str, device_id: DeviceId, via: Channel) -> Self {
        Self {
            command_id: command_id.to_owned(),
            device_id,
            at: now(),
            via,
            kind: ReportKind::Sent,
        }
    }

    pub fn answered(
        command_id: &str,
        device_id: DeviceId,
        via: Channel,
        answer: CommandAnswer,
    ) -> Self {
        Self {
            command_id: command_id.to_owned(),
            device_id,
            at: now(),
            via,
            kind: ReportKind::Answered {
                outcome: answer.outcome,
                result: answer.result,
            },
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Out<'a> {
            v: u32,
            #[serde(flatten)]
            report: &'a CommandReport,
        }
        serde_json::to_vec(&Out {
            v: REPORT_VERSION,
            report: self,
        })
        .unwrap_or_default()
    }

    pub fn decode(body: &[u8]) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Version {
            v: u32,
        }
        let version: Version = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        if version.v != REPORT_VERSION {
            return Err(format!(
                "unsupported report version {} (this build reads version {REPORT_VERSION})",
                version.v
            ));
        }
        serde_json::from_slice(body).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pi() -> DeviceId {
        DeviceId::parse("pi-1").unwrap()
    }

    #[test]
    fn answers_are_checked() {
        let ok = parse_command_answer(br#"{"status":"succeeded","result":{"led":"on"}}"#).unwrap();
        assert_eq!(ok.outcome, Outcome::Succeeded);
        assert_eq!(ok.result, Some(serde_json::json!({"led": "on"})));
        let bare = parse_command_answer(br#"{"status":"failed"}"#).unwrap();
        assert_eq!((bare.outcome, bare.result), (Outcome::Failed, None));
        for (body, field) in [
            (&br#"{"status":"done"}"#[..], "status"),
            (br#"{"result":1}"#, "body"),
            (br#"{"status":"failed","extra":1}"#, "body"),
            (br#"{"status":"failed","result":"a\u0000b"}"#, "result"),
            (b"nope", "body"),
        ] {
            let error = parse_command_answer(body).unwrap_err();
            assert_eq!(error.field, field, "{}", String::from_utf8_lossy(body));
        }
        let huge = format!(
            r#"{{"status":"failed","result":"{}"}}"#,
            "x".repeat(MAX_ANSWER_BYTES)
        );
        assert!(parse_command_answer(huge.as_bytes()).is_err());
    }

    #[test]
    fn reports_round_trip() {
        let answer = parse_command_answer(br#"{"status":"failed","result":[1,2]}"#).unwrap();
        for report in [
            CommandReport::sent("c1", pi(), Channel::Mqtt),
            CommandReport::answered("c1", pi(), Channel::LongPoll, answer),
        ] {
            assert_eq!(CommandReport::decode(&report.encode()).unwrap(), report);
        }
        assert!(
            CommandReport::decode(br#"{"v":2}"#)
                .unwrap_err()
                .contains("version 2")
        );
        let bad_device = br#"{"v":1,"command_id":"c","device_id":"bad id","at":"2026-11-30T00:00:00Z","via":"mqtt","kind":"sent"}"#;
        assert!(CommandReport::decode(bad_device).is_err());
    }

    #[test]
    fn commands_round_trip_and_expire() {
        let now = Utc::now();
        let command = DeviceCommand {
            id: "c1".into(),
            name: "led".into(),
            args: serde_json::json!({"on": true}),
            expires_at: now,
        };
        assert_eq!(DeviceCommand::decode(&command.encode()).unwrap(), command);
        assert!(!command.is_live(now));
        assert!(command.is_live(now - chrono::Duration::seconds(1)));
    }
}
