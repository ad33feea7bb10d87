//! The queue's wire shape, in one place: how a readings message is stamped when published, how a
//! delivery is read back, and the headers that say why a message was set aside. The body itself is
//! [`ReadingBatchMessage`]'s format (the `models` crate owns it, so tools can read it without AMQP).

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use models::{CommandReport, MessageError, Reading, ReadingBatchMessage};

/// Why a message was dead-lettered or refused at ingest.
pub const REASON_HEADER: &str = "x-sensorhub-reason";
/// The `message_id` of the message a dead letter was made from.
pub const ORIGINAL_MESSAGE_ID_HEADER: &str = "x-original-message-id";

/// Header values are bounded, so a huge reason cannot make the message itself unpublishable.
const MAX_HEADER_CHARS: usize = 1000;

/// A readings message: persistent, typed, with a fresh id and the publishing service as `app_id`.
/// The id is a UUIDv7, so it also says when the message was published (see [`published_at`]).
pub(crate) fn readings_properties(app_id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ReadingBatchMessage::CONTENT_TYPE.into())
        .with_message_id(uuid::Uuid::now_v7().to_string().into())
        .with_app_id(app_id.to_owned().into())
}

/// When a message was published, from its UUIDv7 `message_id` (millisecond precision); `None` for
/// an id that is not a UUID carrying a time.
pub(crate) fn published_at(message_id: &str) -> Option<std::time::SystemTime> {
    let (secs, nanos) = uuid::Uuid::parse_str(message_id)
        .ok()?
        .get_timestamp()?
        .to_unix();
    Some(std::time::UNIX_EPOCH + std::time::Duration::new(secs, nanos))
}

/// A command: persistent, JSON, living at most `ttl_ms` in any queue.
pub(crate) fn command_properties(ttl_ms: u64) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_expiration(ttl_ms.to_string().into())
}

/// A command report: persistent, typed.
pub(crate) fn report_properties() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(CommandReport::CONTENT_TYPE.into())
}

/// An announcement of stored readings: transient (a live update; the readings are stored already).
pub(crate) fn announcement_properties() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(1)
        .with_content_type(models::StoredAnnouncement::CONTENT_TYPE.into())
}

/// A message set aside (dead letter, or a payload refused at ingest): persistent, with its headers.
pub(crate) fn set_aside_properties<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> BasicProperties {
    let mut table = FieldTable::default();
    for (name, value) in headers {
        let value: String = value.chars().take(MAX_HEADER_CHARS).collect();
        table.insert(name.into(), AMQPValue::LongString(value.into()));
    }
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(table)
}

/// One message body carrying every chunk's readings.
pub(crate) fn encode_readings<'a>(chunks: impl IntoIterator<Item = &'a [Reading]>) -> Vec<u8> {
    ReadingBatchMessage::encode_chunks(chunks)
}

/// The readings a delivered message carries.
pub(crate) fn decode_readings(body: &[u8]) -> Result<Vec<Reading>, MessageError> {
    ReadingBatchMessage::decode(body)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    #[test]
    fn a_readings_message_id_says_when_it_was_published() {
        let before = SystemTime::now() - Duration::from_millis(1);
        let properties = readings_properties("test");
        let id = properties.message_id().as_ref().map(|id| id.to_string());
        let published = published_at(&id.unwrap_or_default()).unwrap();
        assert!(published >= before && published <= SystemTime::now() + Duration::from_millis(1));
        assert_eq!(published_at("not-a-uuid"), None);
        assert_eq!(published_at(&uuid::Uuid::new_v4().to_string()), None);
    }
}
