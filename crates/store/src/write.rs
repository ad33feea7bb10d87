//! The persister's write path: a batch of readings in one transaction, idempotent under redelivery.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write;

use chrono::{DateTime, NaiveDate, Utc};
use diesel::pg::Pg;
use diesel::pg::data_types::PgInterval;
use diesel::prelude::*;
use diesel::serialize::{IsNull, Output, ToSql};
use diesel::sql_types::{Array, BigInt, Bool, Interval, Jsonb, Nullable, Text, Timestamptz};
use models::{BackfillHorizon, Metrics, Reading};

use crate::StoreError;
use crate::schema::{reading_ids, readings};

/// Rows per INSERT statement: PostgreSQL takes at most 65,535 bind parameters, and a row has 4.
const ROWS_PER_STATEMENT: usize = 10_000;

/// What a write did with each reading of a batch: stored it, found it stored already (a redelivery
/// or a retry of the same reading), or found its identity stored with other content (a conflict,
/// kept in `reading_conflicts`; the first write stays).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteOutcome {
    pub inserted: usize,
    pub duplicates: usize,
    pub conflicting: usize,
}

/// What a write did, and which readings of the batch it actually stored: what the persister
/// announces as stored must leave out a redelivery's repeats.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Written {
    pub outcome: WriteOutcome,
    /// The positions in the batch of the readings that were not stored (duplicates and conflicts),
    /// ascending; empty when all were new, as almost every batch is.
    pub repeats: Vec<usize>,
}

impl Written {
    /// The readings of `batch` (the batch written) this write stored.
    pub fn stored<'a>(&'a self, batch: &'a [Reading]) -> impl Iterator<Item = &'a Reading> + 'a {
        let mut repeats = self.repeats.iter().peekable();
        batch.iter().enumerate().filter_map(move |(i, r)| {
            if repeats.peek() == Some(&&i) {
                repeats.next();
                None
            } else {
                Some(r)
            }
        })
    }
}

/// The days (UTC) whose partition this writer has seen exist (a day's own, or its month's from
/// before daily partitions), so it asks PostgreSQL only about new days; and the backfill horizon,
/// which bounds the days PostgreSQL creates a partition for (see the migrations
/// `bounded_partitions` and `retention`).
#[derive(Debug, Default)]
pub struct KnownPartitions {
    days: HashSet<NaiveDate>,
    horizon: BackfillHorizon,
}

impl KnownPartitions {
    /// Partitions are created for the days from `horizon` ago to tomorrow; readings outside them are
    /// stored in the default partition.
    pub fn with_horizon(horizon: BackfillHorizon) -> Self {
        Self {
            days: HashSet::new(),
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

/// The identity of a reading whose id the device chose (`first_seen` is left to its default, the
/// transaction's time, so that COPY names only these columns).
#[derive(Insertable)]
#[diesel(table_name = reading_ids)]
#[diesel(treat_none_as_default_value = false)]
struct NewIdentity<'a> {
    device_id: &'a str,
    reading_id: &'a str,
    ts: DateTime<Utc>,
    ts_assigned: bool,
}

fn new_identities<'a>(chunk: impl IntoIterator<Item = &'a Reading>) -> Vec<NewIdentity<'a>> {
    chunk
        .into_iter()
        .map(|r| NewIdentity {
            device_id: r.device_id.as_str(),
            reading_id: r.id.as_str(),
            ts: r.ts,
            ts_assigned: r.origin.ts_assigned,
        })
        .collect()
}

/// Stores `batch` in one transaction, each reading once, and updates each device's first/last seen
/// times and metric names.
///
/// A reading is already stored when its identity is: `(device_id, id)` for an id the device chose,
/// within the dedupe window (see the migration `reading_identity`), whatever its time, so a retry
/// that was stamped again by the server is recognised; `(device_id, ts, id)` always. The same
/// identity with other content (other metrics, or another time the device chose) is a conflict: the
/// first write stays and the newcomer is kept in `reading_conflicts` with the reason.
///
/// Almost every batch is new readings only, so it is first written with binary COPY, which costs
/// PostgreSQL a fraction of an INSERT (no statement to parse and plan per batch, no speculative
/// insertion per row). A batch holding a reading already stored makes the COPY fail on a key; the
/// transaction is then rolled back and the batch written again reading by reading's identity
/// (`write_with_repeats`), which skips the repeats and tells duplicates from conflicts.
pub fn write_readings(
    conn: &mut PgConnection,
    batch: &[Reading],
    known: &mut KnownPartitions,
) -> Result<Written, StoreError> {
    write(conn, batch, known, Rollups::Kept)
}

/// Whether a write appends its rollup deltas: always, but for the benchmark's comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rollups {
    Kept,
    Skipped,
}

/// [`write_readings`] without keeping the rollups: what the benchmark compares the write path
/// with, to show what rollups cost. Never for real readings (the summaries would miss them).
#[doc(hidden)]
pub fn write_readings_without_rollups(
    conn: &mut PgConnection,
    batch: &[Reading],
    known: &mut KnownPartitions,
) -> Result<Written, StoreError> {
    write(conn, batch, known, Rollups::Skipped)
}

fn write(
    conn: &mut PgConnection,
    batch: &[Reading],
    known: &mut KnownPartitions,
    rollups: Rollups,
) -> Result<Written, StoreError> {
    if batch.is_empty() {
        return Ok(Written::default());
    }
    ensure_partitions(conn, batch, known)?;
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
    let mut keyed: Vec<&Reading> = batch.iter().filter(|r| r.has_device_id()).collect();
    keyed.sort_unstable_by(|a, b| {
        (a.device_id.as_str(), a.id.as_str()).cmp(&(b.device_id.as_str(), b.id.as_str()))
    });
    let copied = conn.transaction::<_, StoreError, _>(|conn| {
        for chunk in keyed.chunks(ROWS_PER_STATEMENT) {
            diesel::copy_from(reading_ids::table)
                .from_insertable(new_identities(chunk.iter().copied()))
                .execute(conn)?;
        }
        let mut copied = 0;
        for chunk in sorted.chunks(ROWS_PER_STATEMENT) {
            copied += diesel::copy_from(readings::table)
                .from_insertable(new_rows(chunk.iter().copied()))
                .execute(conn)?;
        }
        upsert_devices(conn, &device_updates(batch.iter()))?;
        if rollups == Rollups::Kept {
            crate::rollups::append_deltas(conn, batch.iter())?;
        }
        Ok(copied)
    });
    match copied {
        Ok(copied) => Ok(Written {
            outcome: WriteOutcome {
                inserted: copied,
                ..WriteOutcome::default()
            },
            repeats: Vec::new(),
        }),
        Err(StoreError::Query(diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::UniqueViolation,
            _,
        ))) => conn.transaction(|conn| write_with_repeats(conn, batch, rollups)),
        Err(e) => Err(e),
    }
}

/// What became of one reading of a batch that holds repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    New,
    Duplicate,
    /// Its identity is stored (or comes earlier in the batch) at `stored_ts`, with other content.
    Conflict {
        stored_ts: DateTime<Utc>,
        reason: &'static str,
    },
}

/// The slow path, for a batch that holds readings already stored: each reading is judged by its
/// identity, in four steps, in the caller's transaction.
fn write_with_repeats(
    conn: &mut PgConnection,
    batch: &[Reading],
    rollups: Rollups,
) -> Result<Written, StoreError> {
    let mut verdicts = judge_within_batch(batch);
    claim_identities(conn, batch, &mut verdicts)?;
    let inserted = insert_new(conn, batch, &mut verdicts)?;
    record_conflicts(conn, batch, &verdicts)?;
    let new = || {
        batch
            .iter()
            .zip(&verdicts)
            .filter(|(_, v)| **v == Verdict::New)
            .map(|(r, _)| r)
    };
    upsert_devices(conn, &device_updates(new()))?;
    if rollups == Rollups::Kept {
        crate::rollups::append_deltas(conn, new())?;
    }
    let conflicting = verdicts
        .iter()
        .filter(|v| matches!(v, Verdict::Conflict { .. }))
        .count();
    let repeats = verdicts
        .iter()
        .enumerate()
        .filter(|(_, v)| **v != Verdict::New)
        .map(|(i, _)| i)
        .collect();
    Ok(Written {
        outcome: WriteOutcome {
            inserted,
            duplicates: batch.len() - inserted - conflicting,
            conflicting,
        },
        repeats,
    })
}

/// Step 1: a reading repeated within the batch is judged against its first occurrence there.
fn judge_within_batch(batch: &[Reading]) -> Vec<Verdict> {
    let mut first_of: HashMap<(&str, &str), &Reading> = HashMap::new();
    let mut seen_keys: HashSet<(&str, DateTime<Utc>, &str)> = HashSet::new();
    batch
        .iter()
        .map(|r| {
            if r.has_device_id() {
                match first_of.entry((r.device_id.as_str(), r.id.as_str())) {
                    Entry::Occupied(first) => compare(first.get(), r),
                    Entry::Vacant(slot) => {
                        slot.insert(r);
                        Verdict::New
                    }
                }
            } else if seen_keys.insert((r.device_id.as_str(), r.ts, r.id.as_str())) {
                Verdict::New
            } else {
                // a server-assigned id repeats only when the same message is delivered again
                Verdict::Duplicate
            }
        })
        .collect()
}

/// How `again` relates to `stored`, a reading of the same identity: the same reading when it says
/// the same (the metrics, and the time unless either time was the server's), a conflict otherwise.
fn compare(stored: &Reading, again: &Reading) -> Verdict {
    compare_content(&stored.metrics, stored.ts, stored.origin.ts_assigned, again)
}

fn compare_content(
    stored_metrics: &Metrics,
    stored_ts: DateTime<Utc>,
    stored_ts_assigned: bool,
    again: &Reading,
) -> Verdict {
    let times_differ = !stored_ts_assigned && !again.origin.ts_assigned && stored_ts != again.ts;
    if *stored_metrics != again.metrics {
        Verdict::Conflict {
            stored_ts,
            reason: "the same id was stored with other metrics",
        }
    } else if times_differ {
        Verdict::Conflict {
            stored_ts,
            reason: "the same id was stored with another time",
        }
    } else {
        Verdict::Duplicate
    }
}

#[derive(QueryableByName)]
struct StoredIdentity {
    #[diesel(sql_type = Text)]
    device_id: String,
    #[diesel(sql_type = Text)]
    reading_id: String,
    #[diesel(sql_type = Timestamptz)]
    ts: DateTime<Utc>,
    #[diesel(sql_type = Bool)]
    ts_assigned: bool,
    /// The stored reading's metrics; none when it has gone (deleted by hand, or by retention).
    #[diesel(sql_type = Nullable<Text>)]
    metrics: Option<String>,
}

/// Step 2: the batch's new device-chosen identities are claimed in `reading_ids`; a reading whose
/// identity was there already is judged against the stored reading. A concurrent writer's claim of
/// the same identity makes this wait for its commit, and then see it.
fn claim_identities(
    conn: &mut PgConnection,
    batch: &[Reading],
    verdicts: &mut [Verdict],
) -> Result<(), StoreError> {
    let mut candidates: Vec<usize> = (0..batch.len())
        .filter(|&i| verdicts[i] == Verdict::New && batch[i].has_device_id())
        .collect();
    // in key order, as the fast path's COPY: two writers claiming overlapping identities then take
    // their row locks in the same order and cannot deadlock
    candidates.sort_unstable_by(|&a, &b| {
        (batch[a].device_id.as_str(), batch[a].id.as_str())
            .cmp(&(batch[b].device_id.as_str(), batch[b].id.as_str()))
    });
    if candidates.is_empty() {
        return Ok(());
    }
    let devices: Vec<&str> = candidates
        .iter()
        .map(|&i| batch[i].device_id.as_str())
        .collect();
    let ids: Vec<&str> = candidates.iter().map(|&i| batch[i].id.as_str()).collect();
    let times: Vec<DateTime<Utc>> = candidates.iter().map(|&i| batch[i].ts).collect();
    let assigned: Vec<bool> = candidates
        .iter()
        .map(|&i| batch[i].origin.ts_assigned)
        .collect();
    #[derive(QueryableByName)]
    struct Claimed {
        #[diesel(sql_type = Text)]
        device_id: String,
        #[diesel(sql_type = Text)]
        reading_id: String,
    }
    let claimed: Vec<Claimed> = diesel::sql_query(
        "INSERT INTO reading_ids (device_id, reading_id, ts, ts_assigned)
         SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::bool[])
         ON CONFLICT DO NOTHING
         RETURNING device_id, reading_id",
    )
    .bind::<Array<Text>, _>(&devices)
    .bind::<Array<Text>, _>(&ids)
    .bind::<Array<Timestamptz>, _>(&times)
    .bind::<Array<Bool>, _>(&assigned)
    .load(conn)?;
    let claimed: HashSet<(&str, &str)> = claimed
        .iter()
        .map(|c| (c.device_id.as_str(), c.reading_id.as_str()))
        .collect();
    let taken: Vec<usize> = candidates
        .into_iter()
        .filter(|&i| !claimed.contains(&(batch[i].device_id.as_str(), batch[i].id.as_str())))
        .collect();
    if taken.is_empty() {
        return Ok(());
    }
    let devices: Vec<&str> = taken.iter().map(|&i| batch[i].device_id.as_str()).collect();
    let ids: Vec<&str> = taken.iter().map(|&i| batch[i].id.as_str()).collect();
    let stored: Vec<StoredIdentity> = diesel::sql_query(
        "SELECT i.device_id, i.reading_id, i.ts, i.ts_assigned, r.metrics::text AS metrics
         FROM unnest($1::text[], $2::text[]) AS k(device_id, reading_id)
         JOIN reading_ids i USING (device_id, reading_id)
         LEFT JOIN readings r
           ON r.device_id = i.device_id AND r.ts = i.ts AND r.reading_id = i.reading_id",
    )
    .bind::<Array<Text>, _>(&devices)
    .bind::<Array<Text>, _>(&ids)
    .load(conn)?;
    let stored: HashMap<(&str, &str), &StoredIdentity> = stored
        .iter()
        .map(|s| ((s.device_id.as_str(), s.reading_id.as_str()), s))
        .collect();
    for i in taken {
        let r = &batch[i];
        verdicts[i] = match stored.get(&(r.device_id.as_str(), r.id.as_str())) {
            Some(StoredIdentity {
                ts,
                ts_assigned,
                metrics: Some(metrics),
                ..
            }) => match serde_json::from_str::<Metrics>(metrics) {
                Ok(metrics) => compare_content(&metrics, *ts, *ts_assigned, r),
                Err(_) => Verdict::Duplicate,
            },
            // the stored reading is gone: there is nothing to tell it from, and its identity holds
            _ => Verdict::Duplicate,
        };
    }
    Ok(())
}

/// Step 3: the readings still judged new are inserted; one whose `(device_id, ts, id)` is stored
/// already (a redelivery, or a device-chosen identity older than the dedupe window) is judged
/// against the stored reading.
fn insert_new(
    conn: &mut PgConnection,
    batch: &[Reading],
    verdicts: &mut [Verdict],
) -> Result<usize, StoreError> {
    let new: Vec<usize> = (0..batch.len())
        .filter(|&i| verdicts[i] == Verdict::New)
        .collect();
    let mut rows: Vec<(String, DateTime<Utc>, String)> = Vec::new();
    for chunk in new.chunks(ROWS_PER_STATEMENT) {
        rows.extend(
            diesel::insert_into(readings::table)
                .values(&new_rows(chunk.iter().map(|&i| &batch[i])))
                .on_conflict_do_nothing()
                .returning((readings::device_id, readings::ts, readings::reading_id))
                .load::<(String, DateTime<Utc>, String)>(conn)?,
        );
    }
    let inserted: HashSet<(&str, DateTime<Utc>, &str)> = rows
        .iter()
        .map(|(device, ts, id)| (device.as_str(), *ts, id.as_str()))
        .collect();
    let repeated: Vec<usize> = new
        .into_iter()
        .filter(|&i| {
            let r = &batch[i];
            !inserted.contains(&(r.device_id.as_str(), r.ts, r.id.as_str()))
        })
        .collect();
    if repeated.is_empty() {
        return Ok(inserted.len());
    }
    let devices: Vec<&str> = repeated
        .iter()
        .map(|&i| batch[i].device_id.as_str())
        .collect();
    let times: Vec<DateTime<Utc>> = repeated.iter().map(|&i| batch[i].ts).collect();
    let ids: Vec<&str> = repeated.iter().map(|&i| batch[i].id.as_str()).collect();
    #[derive(QueryableByName)]
    struct Stored {
        #[diesel(sql_type = Text)]
        device_id: String,
        #[diesel(sql_type = Timestamptz)]
        ts: DateTime<Utc>,
        #[diesel(sql_type = Text)]
        reading_id: String,
        #[diesel(sql_type = Text)]
        metrics: String,
    }
    let stored: Vec<Stored> = diesel::sql_query(
        "SELECT r.device_id, r.ts, r.reading_id, r.metrics::text AS metrics
         FROM unnest($1::text[], $2::timestamptz[], $3::text[]) AS k(device_id, ts, reading_id)
         JOIN readings r USING (device_id, ts, reading_id)",
    )
    .bind::<Array<Text>, _>(&devices)
    .bind::<Array<Timestamptz>, _>(&times)
    .bind::<Array<Text>, _>(&ids)
    .load(conn)?;
    let stored: HashMap<(&str, DateTime<Utc>, &str), &str> = stored
        .iter()
        .map(|s| {
            (
                (s.device_id.as_str(), s.ts, s.reading_id.as_str()),
                s.metrics.as_str(),
            )
        })
        .collect();
    for i in repeated {
        let r = &batch[i];
        let key = (r.device_id.as_str(), r.ts, r.id.as_str());
        verdicts[i] = match stored.get(&key).map(|m| serde_json::from_str::<Metrics>(m)) {
            // same time and id: only the metrics can differ
            Some(Ok(metrics)) => compare_content(&metrics, r.ts, true, r),
            _ => Verdict::Duplicate,
        };
    }
    Ok(inserted.len())
}

/// Step 4: conflicting readings are kept with their reason, each distinct content once (a
/// redelivery of the same conflicting reading adds nothing).
fn record_conflicts(
    conn: &mut PgConnection,
    batch: &[Reading],
    verdicts: &[Verdict],
) -> Result<(), StoreError> {
    let conflicts: Vec<(&Reading, DateTime<Utc>, &str)> = batch
        .iter()
        .zip(verdicts)
        .filter_map(|(r, v)| match *v {
            Verdict::Conflict { stored_ts, reason } => Some((r, stored_ts, reason)),
            _ => None,
        })
        .collect();
    if conflicts.is_empty() {
        return Ok(());
    }
    let devices: Vec<&str> = conflicts.iter().map(|c| c.0.device_id.as_str()).collect();
    let ids: Vec<&str> = conflicts.iter().map(|c| c.0.id.as_str()).collect();
    let times: Vec<DateTime<Utc>> = conflicts.iter().map(|c| c.0.ts).collect();
    let assigned: Vec<bool> = conflicts.iter().map(|c| c.0.origin.ts_assigned).collect();
    let metrics: Vec<MetricsJson> = conflicts
        .iter()
        .map(|c| MetricsJson(&c.0.metrics))
        .collect();
    let stored_times: Vec<DateTime<Utc>> = conflicts.iter().map(|c| c.1).collect();
    let reasons: Vec<&str> = conflicts.iter().map(|c| c.2).collect();
    // a time the server assigned is not part of what the device said, so not of the variant
    diesel::sql_query(
        "INSERT INTO reading_conflicts
             (device_id, reading_id, variant, ts, ts_assigned, metrics, stored_ts, reason)
         SELECT c.device_id, c.reading_id,
                md5(c.metrics::text || CASE WHEN c.ts_assigned THEN ''
                                            ELSE (extract(epoch FROM c.ts) * 1000000)::bigint::text END),
                c.ts, c.ts_assigned, c.metrics, c.stored_ts, c.reason
         FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::bool[], $5::jsonb[],
                     $6::timestamptz[], $7::text[])
              AS c(device_id, reading_id, ts, ts_assigned, metrics, stored_ts, reason)
         ON CONFLICT DO NOTHING",
    )
    .bind::<Array<Text>, _>(&devices)
    .bind::<Array<Text>, _>(&ids)
    .bind::<Array<Timestamptz>, _>(&times)
    .bind::<Array<Bool>, _>(&assigned)
    .bind::<Array<Jsonb>, _>(&metrics)
    .bind::<Array<Timestamptz>, _>(&stored_times)
    .bind::<Array<Text>, _>(&reasons)
    .execute(conn)?;
    Ok(())
}

/// What is kept only for a while, and forgotten in small batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiring {
    /// Device-chosen identities (`reading_ids`), kept for the dedupe window after first stored.
    Identities,
    /// Conflicting readings kept for an operator (`reading_conflicts`).
    Conflicts,
}

/// Forgets, at most `limit` at a time, what was recorded more than `age` ago; returns how many. Run
/// until it returns less than `limit`: each call is its own short statement, so neither table is
/// locked for long.
pub fn forget_older_than(
    conn: &mut PgConnection,
    what: Expiring,
    age: std::time::Duration,
    limit: i64,
) -> Result<usize, StoreError> {
    let age = PgInterval::from_microseconds(i64::try_from(age.as_micros()).unwrap_or(i64::MAX));
    let sql = match what {
        Expiring::Identities => {
            "DELETE FROM reading_ids WHERE ctid = ANY(ARRAY(
                 SELECT ctid FROM reading_ids WHERE first_seen < now() - $1 LIMIT $2))"
        }
        Expiring::Conflicts => {
            "DELETE FROM reading_conflicts WHERE ctid = ANY(ARRAY(
                 SELECT ctid FROM reading_conflicts WHERE received_at < now() - $1 LIMIT $2))"
        }
    };
    Ok(diesel::sql_query(sql)
        .bind::<Interval, _>(age)
        .bind::<BigInt, _>(limit)
        .execute(conn)?)
}

/// Where PostgreSQL keeps readings of days it may not create a partition for.
const DEFAULT_PARTITION: &str = "readings_default";

/// Creates missing daily partitions in their own short transactions, before the batch's: creating
/// a partition locks the parent table, which must not be held while the batch is written. PostgreSQL
/// creates only the days from the horizon ago to tomorrow (a month that has a partition of its own,
/// from before daily partitions, keeps it); readings of other days (queued before ingest refused
/// them) go to the default partition, so they are stored all the same.
///
/// A day retention has dropped since this writer saw it is still "known": its late readings go to
/// the default partition, and the next retention run removes them.
fn ensure_partitions(
    conn: &mut PgConnection,
    batch: &[Reading],
    known: &mut KnownPartitions,
) -> Result<(), StoreError> {
    let mut days: BTreeMap<NaiveDate, DateTime<Utc>> = BTreeMap::new();
    for reading in batch {
        let day = reading.ts.date_naive();
        if !known.days.contains(&day) {
            days.entry(day).or_insert(reading.ts);
        }
    }
    let horizon = PgInterval::from_days(i32::try_from(known.horizon.as_days()).unwrap_or(i32::MAX));
    for (day, ts) in days {
        let partition: String =
            diesel::select(ensure_readings_partition(ts, horizon)).get_result(conn)?;
        // A day sent to the default partition is asked about again next time: it may become
        // creatable (tomorrow's, as the clock moves on), and such stragglers are rare.
        if partition != DEFAULT_PARTITION {
            known.days.insert(day);
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

fn device_updates<'a>(readings: impl Iterator<Item = &'a Reading>) -> Vec<DeviceUpdate<'a>> {
    let mut by_device: BTreeMap<&str, DeviceUpdate> = BTreeMap::new();
    for r in readings {
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
    if devices.is_empty() {
        return Ok(());
    }
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
