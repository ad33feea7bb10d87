//! What PostgreSQL stored, compared with what the devices were told.

use std::collections::{HashMap, HashSet};

use diesel::sql_types::{BigInt, Text};
use diesel::{QueryableByName, RunQueryDsl};

#[derive(QueryableByName)]
struct StoredReading {
    #[diesel(sql_type = Text)]
    device_id: String,
    #[diesel(sql_type = Text)]
    reading_id: String,
    #[diesel(sql_type = BigInt)]
    copies: i64,
}

/// Readings of one step's devices (ids starting `<tag>-`) in the database.
#[derive(Debug, Default, Clone)]
pub struct Stored {
    /// (device id, reading id) → rows holding it.
    copies: HashMap<(String, String), i64>,
}

/// How many rollups of `devices` (minute, hour and day, over the day around now) differ from
/// what their raw readings give, the deltas not folded yet included.
pub fn rollups_differing(database_url: &str, devices: &[String]) -> anyhow::Result<u64> {
    let mut conn = store::connect(database_url)?;
    let now = chrono::Utc::now();
    let mut differing = 0;
    for device in devices {
        differing += store::rollups::verify(
            &mut conn,
            Some(device),
            now - chrono::Duration::days(1),
            now + chrono::Duration::days(1),
            1_000,
        )?
        .len() as u64;
    }
    Ok(differing)
}

impl Stored {
    pub fn load(database_url: &str, step_tag: &str) -> anyhow::Result<Self> {
        let mut conn = store::connect(database_url)?;
        let rows: Vec<StoredReading> = diesel::sql_query(
            "SELECT device_id, reading_id, count(*) AS copies FROM readings \
             WHERE device_id LIKE $1 GROUP BY device_id, reading_id",
        )
        .bind::<Text, _>(format!("{step_tag}-%"))
        .load(&mut conn)?;
        Ok(Self {
            copies: rows
                .into_iter()
                .map(|r| ((r.device_id, r.reading_id), r.copies))
                .collect(),
        })
    }

    #[cfg(test)]
    pub fn from_rows(rows: &[(&str, &str, i64)]) -> Self {
        Self {
            copies: rows
                .iter()
                .map(|(d, r, n)| (((*d).to_owned(), (*r).to_owned()), *n))
                .collect(),
        }
    }

    /// Distinct readings stored.
    pub fn distinct(&self) -> u64 {
        self.copies.len() as u64
    }

    /// Rows beyond the first of each reading.
    pub fn duplicated(&self) -> u64 {
        self.copies.values().map(|n| (*n - 1).max(0) as u64).sum()
    }

    /// Acknowledged readings that are not stored.
    pub fn missing(&self, acknowledged: &[(String, String)]) -> u64 {
        let acknowledged: HashSet<&(String, String)> = acknowledged.iter().collect();
        acknowledged
            .into_iter()
            .filter(|key| !self.copies.contains_key(*key))
            .count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acked(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(d, r)| ((*d).to_owned(), (*r).to_owned()))
            .collect()
    }

    #[test]
    fn counts_lost_and_duplicated_readings() {
        let stored = Stored::from_rows(&[("d", "1", 1), ("d", "2", 3), ("e", "1", 1)]);
        assert_eq!(stored.distinct(), 3);
        assert_eq!(stored.duplicated(), 2);
        // "e"/"2" was acknowledged and is not there; "e"/"1" was stored without an ack (fine)
        let acknowledged = acked(&[("d", "1"), ("d", "2"), ("e", "2")]);
        assert_eq!(stored.missing(&acknowledged), 1);
        // an acknowledgement counted twice is still one reading
        let twice = acked(&[("e", "2"), ("e", "2")]);
        assert_eq!(stored.missing(&twice), 1);
    }
}
