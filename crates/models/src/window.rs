//! Which reading times are accepted at ingest: not older than the backfill horizon, not more than
//! [`MAX_FUTURE_SKEW`] ahead of the server's clock.

use chrono::{DateTime, Duration, Utc};
use serde::Deserialize;

use crate::{MAX_FUTURE_SKEW, OLDEST_TIMESTAMP, ValidationError};

/// How far back a reading may be stamped when it is sent: a Pi that was offline uploads what it
/// measured meanwhile, but every month a reading falls in becomes a partition of the `readings`
/// table, so a device able to send any time since 2000 could make the database create hundreds of
/// tables. Whole days, at least one; 365 unless configured (`backfill_horizon_days`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "i64")]
pub struct BackfillHorizon {
    days: u32,
}

impl BackfillHorizon {
    pub const DEFAULT: Self = Self { days: 365 };

    /// Beyond this the horizon reaches past 2000 (never accepted anyway): 100 years.
    const MAX_DAYS: i64 = 36_525;

    pub fn days(days: i64) -> Result<Self, String> {
        if !(1..=Self::MAX_DAYS).contains(&days) {
            return Err(format!(
                "backfill horizon must be from 1 to {} days (got {days})",
                Self::MAX_DAYS
            ));
        }
        // in range, so it fits
        Ok(Self { days: days as u32 })
    }

    pub fn as_days(self) -> u32 {
        self.days
    }

    pub fn as_duration(self) -> Duration {
        Duration::days(i64::from(self.days))
    }
}

impl Default for BackfillHorizon {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<i64> for BackfillHorizon {
    type Error = String;
    fn try_from(days: i64) -> Result<Self, String> {
        Self::days(days)
    }
}

/// The times a reading may carry when it is accepted at `now`: from `now` minus the backfill
/// horizon (never before [`OLDEST_TIMESTAMP`]) to `now` plus [`MAX_FUTURE_SKEW`]. A reading without
/// a time gets `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeWindow {
    now: DateTime<Utc>,
    horizon: BackfillHorizon,
}

impl TimeWindow {
    pub fn new(now: DateTime<Utc>, horizon: BackfillHorizon) -> Self {
        Self { now, horizon }
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.now
    }

    /// The oldest accepted time (inclusive).
    pub fn oldest(&self) -> DateTime<Utc> {
        self.now
            .checked_sub_signed(self.horizon.as_duration())
            .map_or(OLDEST_TIMESTAMP, |t| t.max(OLDEST_TIMESTAMP))
    }

    /// The newest accepted time (inclusive).
    pub fn newest(&self) -> DateTime<Utc> {
        self.now + MAX_FUTURE_SKEW
    }

    /// Refuses `ts` (as the field `ts`) when it is outside the window.
    pub fn check(&self, ts: DateTime<Utc>) -> Result<(), ValidationError> {
        if ts > self.newest() {
            return Err(ValidationError::new(
                "ts",
                "is more than 5 minutes in the future (is the device's clock right?)",
            ));
        }
        if ts < self.oldest() {
            let reason = if ts < OLDEST_TIMESTAMP {
                "is before 2000-01-01 (is the device's clock set?)".to_owned()
            } else {
                format!(
                    "is more than {} days old: older readings are not accepted (the backfill horizon)",
                    self.horizon.as_days()
                )
            };
            return Err(ValidationError::new("ts", reason));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        crate::parse_timestamp_rfc3339(text).unwrap()
    }

    #[test]
    fn the_window_spans_the_horizon_back_and_five_minutes_ahead() {
        let window = TimeWindow::new(at("2026-11-30T12:00:00Z"), BackfillHorizon::DEFAULT);
        assert_eq!(window.oldest(), at("2025-11-30T12:00:00Z"));
        assert_eq!(window.newest(), at("2026-11-30T12:05:00Z"));
        assert!(window.check(at("2025-11-30T12:00:00Z")).is_ok());
        assert!(window.check(at("2026-11-30T12:05:00Z")).is_ok());
        let old = window.check(at("2025-11-30T11:59:59.999999Z")).unwrap_err();
        assert_eq!(old.field, "ts");
        assert!(old.reason.contains("365 days"), "{}", old.reason);
        assert_eq!(
            window
                .check(at("2026-11-30T12:05:00.000001Z"))
                .unwrap_err()
                .field,
            "ts"
        );
        let ancient = window.check(at("1970-01-01T00:00:00Z")).unwrap_err();
        assert!(ancient.reason.contains("2000"), "{}", ancient.reason);
    }

    #[test]
    fn a_horizon_beyond_2000_stops_at_2000() {
        let window = TimeWindow::new(
            at("2026-11-30T12:00:00Z"),
            BackfillHorizon::days(36_525).unwrap(),
        );
        assert_eq!(window.oldest(), OLDEST_TIMESTAMP);
    }

    #[test]
    fn horizons_are_whole_days_from_one_to_a_century() {
        assert_eq!(BackfillHorizon::default().as_days(), 365);
        assert!(BackfillHorizon::days(1).is_ok());
        for bad in [0, -1, 36_526, i64::MAX] {
            assert!(BackfillHorizon::days(bad).is_err(), "{bad}");
        }
        #[derive(Deserialize)]
        struct Settings {
            backfill_horizon_days: BackfillHorizon,
        }
        let ok: Settings = serde_json::from_str(r#"{"backfill_horizon_days": 30}"#).unwrap();
        assert_eq!(ok.backfill_horizon_days.as_days(), 30);
        assert!(serde_json::from_str::<Settings>(r#"{"backfill_horizon_days": 0}"#).is_err());
    }
}
