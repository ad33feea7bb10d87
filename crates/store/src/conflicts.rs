//! Readings that came again with a stored identity and other content, kept for an operator (the
//! persister records them; see `write_readings`).

use chrono::{DateTime, Utc};
use diesel::prelude::*;

use crate::StoreError;
use crate::schema::reading_conflicts;

#[derive(Debug, Clone, PartialEq, Queryable, Selectable)]
#[diesel(table_name = reading_conflicts)]
pub struct Conflict {
    pub device_id: String,
    pub reading_id: String,
    /// The conflicting reading's time (the server's when `ts_assigned`).
    pub ts: DateTime<Utc>,
    pub ts_assigned: bool,
    pub metrics: serde_json::Value,
    /// The time of the reading that was stored first, and stays.
    pub stored_ts: DateTime<Utc>,
    pub reason: String,
    pub received_at: DateTime<Utc>,
}

/// The newest `limit` conflicts, of one device or of all.
pub fn recent_conflicts(
    conn: &mut PgConnection,
    device_id: Option<&str>,
    limit: i64,
) -> Result<Vec<Conflict>, StoreError> {
    use reading_conflicts::dsl as c;
    let mut query = c::reading_conflicts
        .select(Conflict::as_select())
        .order((c::received_at.desc(), c::device_id, c::reading_id))
        .limit(limit)
        .into_boxed();
    if let Some(device_id) = device_id {
        query = query.filter(c::device_id.eq(device_id));
    }
    Ok(query.load(conn)?)
}
