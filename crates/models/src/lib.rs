//! Sensorhub's domain types, and the one place where input is validated.
//!
//! Every way a reading enters the system (HTTP seed format, HTTP batches, MQTT topics) is parsed here
//! into a [`Reading`], whose parts can only be built through checking constructors: code that holds a
//! `Reading` knows it is valid. The queue message format lives here too, so the ingest services and the
//! persister cannot disagree about it.

mod command;
mod error;
mod ids;
mod live;
mod message;
mod ownership;
mod parse;
mod reading;
mod window;

pub use command::{
    Channel, CommandAnswer, CommandReport, DeviceCommand, MAX_ANSWER_BYTES, Outcome,
    REPORT_VERSION, ReportKind, contains_nul, parse_command_answer,
};
pub use error::{ValidationError, ValidationKind};
pub use ids::{DeviceId, MetricName, ReadingId};
pub use live::{ANNOUNCEMENT_VERSION, StoredAnnouncement, StoredDevice, StoredReading};
pub use message::{MESSAGE_VERSION, MessageError, ReadingBatchMessage};
pub use ownership::{NotOwnReading, check_own_readings};
pub use parse::{
    MAX_READINGS_PER_REQUEST, parse_device_topic_payload, parse_readings_body, parse_seed_body,
};
pub use reading::{
    MAX_FUTURE_SKEW, MAX_METRICS, Metrics, OLDEST_TIMESTAMP, Origin, Reading,
    parse_timestamp_millis, parse_timestamp_rfc3339,
};
pub use window::{BackfillHorizon, TimeWindow};
