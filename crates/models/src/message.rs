//! What travels on the queue between the ingest services and the persister: one AMQP message carries a
//! batch of readings, so that many small requests share one publish, one confirm and one ack.

use serde::Deserialize;

use crate::Reading;

/// Bumped on any change the persister must know about; a persister refuses versions it does not know
/// (the message is dead-lettered with the reason, never guessed at).
pub const MESSAGE_VERSION: u32 = 1;

/// `{"v": 1, "readings": [...]}`, each reading as `{"d", "i", "t", "m"}` (see [`Reading`]'s serde).
pub struct ReadingBatchMessage;

#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("unsupported message version {0} (this build reads version {MESSAGE_VERSION})")]
    UnsupportedVersion(u32),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("message carries no readings")]
    Empty,
}

impl ReadingBatchMessage {
    pub const CONTENT_TYPE: &'static str = "application/vnd.sensorhub.readings.v1+json";

    pub fn encode(readings: &[Reading]) -> Vec<u8> {
        Self::encode_chunks(std::iter::once(readings))
    }

    /// One message from the readings of several requests, without gathering them into one Vec.
    pub fn encode_chunks<'a>(chunks: impl IntoIterator<Item = &'a [Reading]>) -> Vec<u8> {
        let mut out = Vec::with_capacity(4096);
        out.extend_from_slice(b"{\"v\":");
        out.extend_from_slice(MESSAGE_VERSION.to_string().as_bytes());
        out.extend_from_slice(b",\"readings\":[");
        let mut first = true;
        for reading in chunks.into_iter().flatten() {
            if !first {
                out.push(b',');
            }
            first = false;
            // Writing our own types to a Vec cannot fail: every key is a string and every float is
            // finite (Metrics refuses anything else).
            let _ = serde_json::to_writer(&mut out, reading);
        }
        out.extend_from_slice(b"]}");
        out
    }

    /// Decodes and re-validates (through the domain types' deserializers) a message body. A
    /// well-formed message is parsed once; only a failure is looked at again, to say why.
    pub fn decode(body: &[u8]) -> Result<Vec<Reading>, MessageError> {
        #[derive(Deserialize)]
        struct Version {
            v: u32,
        }
        #[derive(Deserialize)]
        struct In {
            v: u32,
            readings: Vec<Reading>,
        }
        match serde_json::from_slice::<In>(body) {
            Ok(message) if message.v != MESSAGE_VERSION => {
                Err(MessageError::UnsupportedVersion(message.v))
            }
            Ok(message) if message.readings.is_empty() => Err(MessageError::Empty),
            Ok(message) => Ok(message.readings),
            Err(e) => match serde_json::from_slice::<Version>(body) {
                // another version's readings need not parse as ours
                Ok(version) if version.v != MESSAGE_VERSION => {
                    Err(MessageError::UnsupportedVersion(version.v))
                }
                _ => Err(MessageError::Malformed(e.to_string())),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BackfillHorizon, TimeWindow, parse_readings_body};

    #[test]
    fn batches_round_trip() {
        let window = TimeWindow::new(chrono::Utc::now(), BackfillHorizon::DEFAULT);
        let readings = parse_readings_body(
            br#"[{"device_id":"a","metrics":{"t":1}},{"device_id":"b","id":"x","metrics":{"h":-2.5e-3}}]"#,
            window,
        )
        .unwrap();
        let bytes = ReadingBatchMessage::encode(&readings);
        assert_eq!(ReadingBatchMessage::decode(&bytes).unwrap(), readings);
    }

    #[test]
    fn chunks_make_one_message() {
        let window = TimeWindow::new(chrono::Utc::now(), BackfillHorizon::DEFAULT);
        let a = parse_readings_body(br#"{"device_id":"a","metrics":{"t":1}}"#, window).unwrap();
        let b = parse_readings_body(
            br#"[{"device_id":"b","metrics":{"t":2}},{"device_id":"c","metrics":{"t":3}}]"#,
            window,
        )
        .unwrap();
        let bytes = ReadingBatchMessage::encode_chunks([a.as_slice(), b.as_slice()]);
        let decoded = ReadingBatchMessage::decode(&bytes).unwrap();
        assert_eq!(decoded, [a, b].concat());
    }

    #[test]
    fn undecodable_messages_say_why() {
        assert!(matches!(
            ReadingBatchMessage::decode(b"not json"),
            Err(MessageError::Malformed(_))
        ));
        assert!(matches!(
            ReadingBatchMessage::decode(br#"{"v":2,"readings":[]}"#),
            Err(MessageError::UnsupportedVersion(2))
        ));
        assert!(matches!(
            ReadingBatchMessage::decode(br#"{"v":1,"readings":[]}"#),
            Err(MessageError::Empty)
        ));
        // a reading that breaks a rule is caught by the domain types on the way in
        let bad =
            br#"{"v":1,"readings":[{"d":"bad id","i":"x","t":1795600800000000,"m":{"t":1}}]}"#;
        assert!(matches!(
            ReadingBatchMessage::decode(bad),
            Err(MessageError::Malformed(_))
        ));
    }
}
