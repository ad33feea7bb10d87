//! The persister's write path: a batch of readings in one transaction, idempotent under redelivery.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Write;

use chrono::{DateTime, Datelike, Utc};
use diesel::pg::Pg;
use diesel::pg::data_types::PgInterval;
use diesel::prelude::*;
use diesel::serialize::{IsNull, Output, ToSql};
use diesel::sql_types::{Array, Interval, Jsonb, Text, Timestamptz};
use models::{BackfillHorizon, Metrics, Reading};

use crate::StoreError;
use crate::schema::readings;

/// Rows per INSERT statement: PostgreSQL takes at most 65,535 bind parameters, and a row has 4.
const ROWS_PER_STATEMENT: usize = 10_000;

/// What a write did: readings newly stored, and readings already there (a redelivery or a retry).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteOutcome {
    pub inserted: usize,
    pub duplicates: usize,
}

/// The monthly partitions this writer has seen created (or seen routed to the default partition),
/// so it asks PostgreSQL only about new months; and the backfill horizon, which bounds the months
/// PostgreSQL creates a partition for (see the migration `bounded_partitions`).
#[derive(Debug, Default)]
pub struct KnownPartitions {
    months: HashSet<(i32, u32)>,
    horizon: BackfillHorizon,
}

impl KnownPartitions {
    /// Partitions are created for the months from `horizon` ago to next month; readings outside them
    /// are stored in the default partition.
    pub fn with_horizon(horizon: BackfillHorizon) -> Self {
        Self {
            months: HashSet::new(),
            horizon,
        }
    }
}

/// The metrics of a reading, written as jsonb straight from the domain type (no intermediate
/// `serde_json::Value` per row).
#[derive(Debug, diesel::expression::AsExpression)]
#[diesel(sql_type = Jsonb)]
struct MetricsJson<'a>(&'a Metrics);

impl ToSql<Jsonb, Pg> for MetricsJson<'_> {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> diesel::serialize::Result {
        out.write_all(&[1])?; // jsonb binary format version
        serde_json::to_writer(out, self.0)?;
        Ok(IsNull::No)
    }
}

#[derive(Insertable)]
#[diesel(table_name = readings)]
// binary COPY needs every column given (diesel's COPY support requires this setting)
#[diesel(treat_none_as_default_value = false)]
struct NewReading<'a> {
    device_id: &'a str,
    ts: DateTime<Utc>,
    reading_id: &'a str,
    metrics: MetricsJson<'a>,
}

fn new_rows<'a>(chunk: impl IntoIterator<Item = &'a Reading>) -> Vec<NewReading<'a>> {
    chunk
        .into_iter()
        .map(|r| NewReading {
            device_id: r.device_id.as_str(),
            ts: r.ts,
            reading_id: r.id.as_str(),
            metrics: MetricsJson(&r.metrics),
        })
        .collect()
}

/// Stores `batch` in one transaction: readings already stored are skipped (same device, time and
/// id), and each device's first/last seen times and metric names are updated.
///
/// Almost every batch is new readings only, so it is first written with binary COPY, which costs
/// PostgreSQL a fraction of an INSERT (no statement to parse and plan per batch, no speculative
/// insertion per row). A batch holding a reading already stored (a redelivery, a retry) makes the COPY
/// fail on the key; the transaction is then rolled back and the batch written again with
/// `INSERT ... ON CONFLICT DO NOTHING`, which skips the repeats and counts them.
pub fn write_readings(
    conn: &mut PgConnection,
    batch: &[Reading],
    known: &mut KnownPartitions,
) -> Result<WriteOutcome, StoreError> {
    if batch.is_empty() {
        return Ok(WriteOutcome::default());
    }
    ensure_partitions(conn, batch, known)?;
    let devices = device_updates(batch);
    // In key order, consecutive rows go to the same pages of the primary key index: profiled under
    // HTTP batches, half of PostgreSQL's time was btree insertion (_bt_doinsert) at random places.
    let mut sorted: Vec<&Reading> = batch.iter().collect();
    sorted.sort_unstable_by(|a, b| {
        (a.device_id.as_str(), a.ts, a.id.as_str()).cmp(&(
            b.device_id.as_str(),
            b.ts,
            b.id.as_str(),
        ))
    });
    let copied = conn.transaction::<_, StoreError, _>(|conn| {
        let mut copied = 0;
        for chunk in sorted.chunks(ROWS_PER_STATEMENT) {
            copied += diesel::copy_from(readings::table)
                .from_insertable(new_rows(chunk.iter().copied()))
                .execute(conn)?;
        }
        upsert_devices(conn, &devices)?;
        Ok(copied)
    });
    let inserted = match copied {
        Ok(copied) => copied,
        Err(StoreError::Query(diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::UniqueViolation,
            _,
        ))) => conn.transaction::<_, StoreError, _>(|conn| {
            let mut inserted = 0;
            for chunk in batch.chunks(ROWS_PER_STATEMENT) {
                inserted += diesel::insert_into(readings::table)
                    .values(&new_rows(chunk))
                    .on_conflict_do_nothing()
                    .execute(conn)?;
            }
            upsert_devices(conn, &devices)?;
            Ok(inserted)
        })?,
        Err(e) => return Err(e),
    };
    Ok(WriteOutcome {
        inserted,
        duplicates: batch.len() - inserted,
    })
}

/// Where PostgreSQL keeps readings of months it may not create a partition for.
const DEFAULT_PARTITION: &str = "readings_default";

/// Creates missing monthly partitions in their own short transactions, before the batch's: creating
/// a partition locks the parent table, which must not be held while the batch is written. PostgreSQL
/// creates only the months from the horizon ago to next month; readings of other months (queued
/// before ingest refused them) go to the default partition, so they are stored all the same.
fn ensure_partitions(
    conn: &mut PgConnection,
    batch: &[Reading],
    known: &mut KnownPartitions,
) -> Result<(), StoreError> {
    let mut months: BTreeMap<(i32, u32), DateTime<Utc>> = BTreeMap::new();
    for reading in batch {
        let month = (reading.ts.year(), reading.ts.month());
        if !known.months.contains(&month) {
            months.entry(month).or_insert(reading.ts);
        }
    }
    let horizon = PgInterval::from_days(i32::try_from(known.horizon.as_days()).unwrap_or(i32::MAX));
    for (month, ts) in months {
        let partition: String =
            diesel::select(ensure_readings_partition(ts, horizon)).get_result(conn)?;
        // A month sent to the default partition is asked about again next time: it may become
        // creatable (next month, as the clock moves on), and such stragglers are rare.
        if partition != DEFAULT_PARTITION {
            known.months.insert(month);
        }
    }
    Ok(())
}

diesel::define_sql_function! {
    #[sql_name = "sensorhub_ensure_readings_partition"]
    fn ensure_readings_partition(at: Timestamptz, horizon: Interval) -> diesel::sql_types::Text;
}

struct DeviceUpdate<'a> {
    device_id: &'a str,
    first_seen: DateTime<Utc>,
    last_seen: DateTime<Utc>,
    metrics: BTreeSet<&'a str>,
}

fn device_updates(batch: &[Reading]) -> Vec<DeviceUpdate<'_>> {
    let mut by_device: BTreeMap<&str, DeviceUpdate> = BTreeMap::new();
    for r in batch {
        let update = by_device
            .entry(r.device_id.as_str())
            .or_insert_with(|| DeviceUpdate {
                device_id: r.device_id.as_str(),
                first_seen: r.ts,
                last_seen: r.ts,
                metrics: BTreeSet::new(),
            });
        update.first_seen = update.first_seen.min(r.ts);
        update.last_seen = update.last_seen.max(r.ts);
        update
            .metrics
            .extend(r.metrics.iter().map(|(name, _)| name.as_str()));
    }
    // BTreeMap order: every writer locks device rows in the same order, so concurrent persisters
    // cannot deadlock on them.
    by_device.into_values().collect()
}

/// One statement for all the batch's devices; rows change only when something moved. The devices go
/// as four arrays (metric names comma-joined: names never hold a comma), which PostgreSQL unnests
/// far more cheaply than it parses a JSON document; the metric names are merged only when the batch
/// brings a new one.
fn upsert_devices(conn: &mut PgConnection, devices: &[DeviceUpdate]) -> Result<(), StoreError> {
    let ids: Vec<&str> = devices.iter().map(|d| d.device_id).collect();
    let first_seen: Vec<DateTime<Utc>> = devices.iter().map(|d| d.first_seen).collect();
    let last_seen: Vec<DateTime<Utc>> = devices.iter().map(|d| d.last_seen).collect();
    let metrics: Vec<String> = devices
        .iter()
        .map(|d| d.metrics.iter().copied().collect::<Vec<_>>().join(","))
        .collect();
    diesel::sql_query(
        "INSERT INTO devices AS d (device_id, first_seen, last_seen, metrics)
         SELECT u.device_id, u.first_seen, u.last_seen, string_to_array(u.metrics, ',')
         FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::text[])
              AS u(device_id, first_seen, last_seen, metrics)
         ORDER BY u.device_id
         ON CONFLICT (device_id) DO UPDATE SET
             first_seen = LEAST(d.first_seen, EXCLUDED.first_seen),
             last_seen = GREATEST(d.last_seen, EXCLUDED.last_seen),
             metrics = CASE WHEN EXCLUDED.metrics <@ d.metrics THEN d.metrics
                       ELSE ARRAY(SELECT DISTINCT m FROM unnest(d.metrics || EXCLUDED.metrics) AS m ORDER BY m)
                       END
         WHERE EXCLUDED.first_seen < d.first_seen
            OR EXCLUDED.last_seen > d.last_seen
            OR NOT (EXCLUDED.metrics <@ d.metrics)",
    )
    .bind::<Array<Text>, _>(ids)
    .bind::<Array<Timestamptz>, _>(first_seen)
    .bind::<Array<Timestamptz>, _>(last_seen)
    .bind::<Array<Text>, _>(metrics)
    .execute(conn)?;
    Ok(())
}
