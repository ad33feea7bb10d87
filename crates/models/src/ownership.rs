//! Who may write what: a device writes only as itself, on every channel. ingest-http checks the
//! readings of a request against its token's device, ingest-mqtt those of a message against its
//! topic's device (which the broker lets only that device publish to), both with this one rule.

use crate::Reading;

/// A reading that names a device other than the one writing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device_id {found:?} is not the writing device's ({writer:?})")]
pub struct NotOwnReading {
    /// The device writing (the token's, or the topic's).
    pub writer: String,
    /// The device the reading names.
    pub found: String,
    /// Where the reading is in what was sent.
    pub index: usize,
}

/// Every reading must be `writer`'s own.
pub fn check_own_readings(writer: &str, readings: &[Reading]) -> Result<(), NotOwnReading> {
    match readings.iter().position(|r| r.device_id.as_str() != writer) {
        None => Ok(()),
        Some(index) => Err(NotOwnReading {
            writer: writer.to_owned(),
            found: readings[index].device_id.as_str().to_owned(),
            index,
        }),
    }
}
