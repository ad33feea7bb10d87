//! The persister's announcement of what it stored, published after the commit (never before) for
//! live views: query-api relays it to browsers (`GET /v1/live`). It is a notice, not a copy to
//! store: a lost announcement loses nothing but a live update, and every reading in it is in
//! PostgreSQL already.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{MessageError, Metrics, Reading};

/// The version this build writes and reads.
pub const ANNOUNCEMENT_VERSION: u32 = 1;

/// One commit's stored readings, grouped by device in the order of their first reading.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct StoredAnnouncement {
    /// Unique per announcement (a UUIDv7), so a live view can say where it stopped.
    pub id: String,
    pub devices: Vec<StoredDevice>,
}

/// One device's share of an announcement: what a browser gets as one live event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredDevice {
    pub device_id: String,
    pub readings: Vec<StoredReading>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredReading {
    pub id: String,
    pub ts: DateTime<Utc>,
    pub metrics: BTreeMap<String, f64>,
}

#[derive(Serialize)]
struct Out<'a> {
    v: u32,
    id: &'a str,
    devices: Vec<OutDevice<'a>>,
}

#[derive(Serialize)]
struct OutDevice<'a> {
    device_id: &'a str,
    readings: Vec<OutReading<'a>>,
}

#[derive(Serialize)]
struct OutReading<'a> {
    id: &'a str,
    ts: DateTime<Utc>,
    metrics: &'a Metrics,
}

impl StoredAnnouncement {
    pub const CONTENT_TYPE: &'static str = "application/vnd.sensorhub.stored.v1+json";

    /// The announcement of `stored` under a fresh id; `None` when nothing was stored (a batch of
    /// repeats announces nothing).
    pub fn encode<'a>(stored: impl IntoIterator<Item = &'a Reading>) -> Option<Vec<u8>> {
        let mut devices: Vec<OutDevice<'a>> = Vec::new();
        let mut position: std::collections::HashMap<&'a str, usize> = Default::default();
        for reading in stored {
            let device = reading.device_id.as_str();
            let at = *position.entry(device).or_insert_with(|| {
                devices.push(OutDevice {
                    device_id: device,
                    readings: Vec::new(),
                });
                devices.len() - 1
            });
            devices[at].readings.push(OutReading {
                id: reading.id.as_str(),
                ts: reading.ts,
                metrics: &reading.metrics,
            });
        }
        if devices.is_empty() {
            return None;
        }
        let id = uuid::Uuid::now_v7().to_string();
        // our own types into a Vec: every key is a string and every float finite
        serde_json::to_vec(&Out {
            v: ANNOUNCEMENT_VERSION,
            id: &id,
            devices,
        })
        .ok()
    }

    pub fn decode(body: &[u8]) -> Result<Self, MessageError> {
        #[derive(Deserialize)]
        struct Version {
            v: u32,
        }
        match serde_json::from_slice::<Version>(body) {
            Ok(Version { v }) if v != ANNOUNCEMENT_VERSION => {
                return Err(MessageError::UnsupportedVersion(v));
            }
            Ok(_) => {}
            Err(e) => return Err(MessageError::Malformed(e.to_string())),
        }
        serde_json::from_slice(body).map_err(|e| MessageError::Malformed(e.to_string()))
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    reason = "a test stops at the first thing that is not as it must be"
)]
mod tests {
    use super::*;
    use crate::{DeviceId, MetricName, ReadingId};

    fn reading(device: &str, id: &str, value: f64) -> Reading {
        Reading::new(
            DeviceId::parse(device).unwrap(),
            ReadingId::parse(id).unwrap(),
            "2026-11-30T10:00:00.123456Z".parse().unwrap(),
            Metrics::new(vec![(MetricName::parse("t").unwrap(), value)]).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn an_announcement_groups_readings_by_device_and_reads_back() {
        let batch = [
            reading("a", "1", 1.0),
            reading("b", "2", 2.0),
            reading("a", "3", 3.0),
        ];
        let body = StoredAnnouncement::encode(&batch).unwrap();
        let back = StoredAnnouncement::decode(&body).unwrap();
        assert_eq!(back.devices.len(), 2);
        assert_eq!(back.devices[0].device_id, "a");
        let ids: Vec<&str> = back.devices[0]
            .readings
            .iter()
            .map(|r| r.id.as_str())
            .collect();
        assert_eq!(ids, ["1", "3"]);
        assert_eq!(back.devices[1].readings[0].metrics["t"], 2.0);
        assert_eq!(back.devices[0].readings[0].ts, batch[0].ts);
        assert!(StoredAnnouncement::encode(&[]).is_none());
    }

    #[test]
    fn another_version_or_garbage_is_refused() {
        assert!(matches!(
            StoredAnnouncement::decode(br#"{"v":2,"id":"x","devices":[]}"#),
            Err(MessageError::UnsupportedVersion(2))
        ));
        assert!(matches!(
            StoredAnnouncement::decode(b"nope"),
            Err(MessageError::Malformed(_))
        ));
    }
}
