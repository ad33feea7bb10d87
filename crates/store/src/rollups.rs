//! Rollups: every metric of every device summarised per minute, hour and day (see the migration
//! `rollups`). The writer appends the per-minute summary of what each transaction stored to
//! `rollup_deltas` (`append_deltas`, in that transaction); [`fold`] moves the deltas into the
//! three tables; [`rebuild_day`] recomputes a day from the raw readings; [`plan`] chooses which
//! tables answer a series.

use std::collections::HashMap;
use std::str::FromStr;

use bigdecimal::BigDecimal;
use chrono::{DateTime, Duration, DurationRound, Utc};
use diesel::pg::data_types::PgNumeric;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Double, Nullable, Numeric, Text, Timestamptz};
use models::Reading;

use crate::StoreError;

/// The advisory lock that makes folding and rebuilding take turns (and one folder at a time).
const FOLD_LOCK: i64 = 0x5e45_0001;

/// The entries of the delta rows `d` (one row per writing transaction, its entries in parallel
/// arrays), as rows.
const ENTRIES: &str = "unnest(d.device_ids, d.metrics, d.buckets, d.counts, d.sums, d.mins, d.maxs,
                             d.first_ts, d.last_ts)
                      AS e(device_id, metric, bucket, count, sum, min, max, first_ts, last_ts)";

/// The summary tables, coarsest first: the order a series tries them in.
const COARSEST_FIRST: [Table; 3] = [Table::D1, Table::H1, Table::M1];

pub use crate::retention::{Horizons, Table};

impl Horizons {
    fn of(&self, source: Table) -> Option<DateTime<Utc>> {
        match source {
            Table::Raw => self.raw,
            Table::M1 => self.m1,
            Table::H1 => self.h1,
            Table::D1 => self.d1,
        }
    }

    /// Whether `source` holds everything from `from` on.
    fn complete_from(&self, source: Table, from: DateTime<Utc>) -> bool {
        self.of(source).is_none_or(|horizon| horizon <= from)
    }
}

/// The first UTC day from which the raw readings of `device` (or of every device) are all still
/// kept: the day after the latest cutoff of the raw retention rules that apply (none: all kept
/// forever). A rebuild must not start before it, or it would replace summaries with sums of what
/// retention left.
pub fn rebuildable_from(
    conn: &mut PgConnection,
    device: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, StoreError> {
    Ok(crate::retention::show(conn)?
        .iter()
        .filter(|r| r.table == crate::retention::Table::Raw)
        .filter(|r| match (device, r.device.as_deref()) {
            (Some(device), Some(named)) => device == named,
            _ => true,
        })
        .filter_map(|r| r.cutoff(now))
        .max()
        .map(|cutoff| ceil(cutoff, Duration::days(1))))
}

/// One piece of a series' range and the table that answers it: `[from, to)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub source: Table,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

/// Which tables answer a series of `bucket`-wide buckets over `[from, to)`: the coarsest table
/// whose buckets fit the series' (a `1h` series from hours or minutes, never days) answers the
/// whole buckets it can, the edges that are not whole buckets of it go to the next finer table,
/// and what no table's buckets fit goes to the raw readings. Every piece is answered exactly, so
/// the numbers are those raw readings give.
///
/// A table is used only if it still holds the whole range (`horizons`). When the raw readings of
/// the range's start are gone (past their retention), no piece is answered from the raw readings,
/// which would be partial: the edges are answered from whole buckets of the finest summary that
/// holds the range, so the first and last points may take in up to one such bucket beyond `from`
/// and `to`.
pub fn plan(
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    bucket: Duration,
    horizons: &Horizons,
) -> Vec<Segment> {
    let fitting: Vec<Table> = COARSEST_FIRST
        .into_iter()
        .filter(|s| s.bucket().is_some_and(|g| divides(g, bucket)))
        .collect();
    let mut usable: Vec<Table> = fitting
        .iter()
        .copied()
        .filter(|s| horizons.complete_from(*s, from))
        .collect();
    let raw_complete = horizons.complete_from(Table::Raw, from);
    if usable.is_empty() && !raw_complete {
        // nothing holds the whole range any more: the table that holds the most of it answers
        let most = fitting
            .iter()
            .copied()
            .chain([Table::Raw])
            .min_by_key(|s| horizons.of(*s));
        usable.extend(most.filter(|s| *s != Table::Raw));
    }
    let bottom = match (raw_complete, usable.last()) {
        (false, Some(&finest)) => finest,
        _ => Table::Raw,
    };
    let mut segments = Vec::new();
    cover(from, to, &usable, bottom, &mut segments);
    segments.sort_by_key(|s| s.from);
    // neighbours from the same table are one range of it
    segments.dedup_by(|next, previous| {
        let joined = previous.source == next.source && previous.to == next.from;
        if joined {
            previous.to = next.to;
        }
        joined
    });
    segments
}

fn divides(granularity: Duration, bucket: Duration) -> bool {
    let (g, b) = (
        granularity.num_microseconds().unwrap_or(i64::MAX),
        bucket.num_microseconds().unwrap_or(0),
    );
    b > 0 && g > 0 && b % g == 0
}

fn cover(
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    tables: &[Table],
    bottom: Table,
    out: &mut Vec<Segment>,
) {
    if from >= to {
        return;
    }
    let Some((&table, finer)) = tables.split_first() else {
        // what is left is not whole buckets of any table: raw readings, or whole buckets of the
        // finest summary when the raw readings are gone
        let (from, to) = match bottom.bucket() {
            None => (from, to),
            Some(g) => (floor(from, g), ceil(to, g)),
        };
        out.push(Segment {
            source: bottom,
            from,
            to,
        });
        return;
    };
    let Some(g) = table.bucket() else {
        return cover(from, to, finer, bottom, out);
    };
    let (whole_from, whole_to) = (ceil(from, g), floor(to, g));
    if whole_from >= whole_to {
        return cover(from, to, finer, bottom, out);
    }
    cover(from, whole_from, finer, bottom, out);
    out.push(Segment {
        source: table,
        from: whole_from,
        to: whole_to,
    });
    cover(whole_to, to, finer, bottom, out);
}

/// Bucket boundaries of minutes, hours and days are those of UTC, as the series' own (aligned to
/// 2000-01-03T00:00Z).
pub(crate) fn floor(t: DateTime<Utc>, g: Duration) -> DateTime<Utc> {
    t.duration_trunc(g).unwrap_or(t)
}

fn ceil(t: DateTime<Utc>, g: Duration) -> DateTime<Utc> {
    let down = floor(t, g);
    if down == t { t } else { down + g }
}

/// One device's metric over one minute, of the readings a transaction stored.
struct Delta {
    count: i64,
    sum: ExactSum,
    min: f64,
    max: f64,
    first_ts: DateTime<Utc>,
    last_ts: DateTime<Utc>,
}

/// The exact sum of numbers as the readings' jsonb holds them: the text serde_json writes for a
/// double (the shortest that reads back as the same double), with that text's scale (`1.0` has one
/// decimal, `1e300` none), which PostgreSQL keeps in a numeric sum and uses to divide an average.
/// `units × 10^-scale` in an i128 while it fits, which is every sum of sensor values; beyond it
/// (`1e300 + 5e-324`), an arbitrary-precision decimal.
#[derive(Debug, Clone, PartialEq)]
enum ExactSum {
    Small { units: i128, scale: i64 },
    Big(BigDecimal),
}

impl ExactSum {
    /// `value` as its jsonb number: written as the readings' JSON writes it (into `text`, a
    /// buffer kept between calls), and read back as a decimal.
    fn of(value: f64, text: &mut Vec<u8>) -> Self {
        text.clear();
        // writing a double into a Vec cannot fail, and every number serde_json writes is a
        // decimal BigDecimal reads
        let _ = serde_json::to_writer(&mut *text, &value);
        let text = std::str::from_utf8(text).unwrap_or_default();
        small(text).unwrap_or_else(|| Self::Big(BigDecimal::from_str(text).unwrap_or_default()))
    }

    fn add(&mut self, other: &Self) {
        if let (Self::Small { units, scale }, Self::Small { units: u, scale: s }) = (&*self, other)
        {
            let to = (*scale).max(*s);
            let sum = rescale(*units, *scale, to)
                .zip(rescale(*u, *s, to))
                .and_then(|(a, b)| a.checked_add(b));
            if let Some(units) = sum {
                *self = Self::Small { units, scale: to };
                return;
            }
        }
        *self = Self::Big(self.big() + other.big());
    }

    fn big(&self) -> BigDecimal {
        match self {
            Self::Small { units, scale } => BigDecimal::new((*units).into(), *scale),
            Self::Big(big) => big.clone(),
        }
    }
}

/// `units × 10^-from` as units of `10^-to` (`to ≥ from`), if that fits.
fn rescale(units: i128, from: i64, to: i64) -> Option<i128> {
    let factor = 10i128.checked_pow(u32::try_from(to - from).ok()?)?;
    units.checked_mul(factor)
}

/// A number as serde_json writes it (`-21.5`, `1.0`, `1e+300`, `5e-324`), as units and scale when
/// they fit an i128 and the scale is not negative (as PostgreSQL's scale never is).
fn small(text: &str) -> Option<ExactSum> {
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (digits, exponent) = match text.split_once('e') {
        Some((digits, exponent)) => (digits, exponent.parse::<i64>().ok()?),
        None => (text, 0),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let mut units: i128 = 0;
    for d in whole.bytes().chain(fraction.bytes()) {
        units = units
            .checked_mul(10)?
            .checked_add(i128::from(d.checked_sub(b'0')?))?;
    }
    let mut scale = i64::try_from(fraction.len()).ok()? - exponent;
    if scale < 0 {
        units = rescale(units, scale, 0)?;
        scale = 0;
    }
    Some(ExactSum::Small {
        units: if negative { -units } else { units },
        scale,
    })
}

/// Appends the per-minute summary of `stored` (the readings this transaction inserted, and only
/// those) to `rollup_deltas`, as one row, in the caller's transaction.
pub(crate) fn append_deltas<'a>(
    conn: &mut PgConnection,
    stored: impl Iterator<Item = &'a Reading>,
) -> Result<(), StoreError> {
    let mut deltas: HashMap<(&str, &str, DateTime<Utc>), Delta> = HashMap::new();
    let mut text = Vec::with_capacity(32);
    for r in stored {
        let minute = floor(r.ts, Duration::minutes(1));
        for (name, value) in r.metrics.iter() {
            let exact = ExactSum::of(value, &mut text);
            match deltas.entry((r.device_id.as_str(), name.as_str(), minute)) {
                std::collections::hash_map::Entry::Occupied(mut slot) => {
                    let d = slot.get_mut();
                    d.count += 1;
                    d.sum.add(&exact);
                    d.min = d.min.min(value);
                    d.max = d.max.max(value);
                    d.first_ts = d.first_ts.min(r.ts);
                    d.last_ts = d.last_ts.max(r.ts);
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(Delta {
                        count: 1,
                        sum: exact,
                        min: value,
                        max: value,
                        first_ts: r.ts,
                        last_ts: r.ts,
                    });
                }
            }
        }
    }
    if deltas.is_empty() {
        return Ok(());
    }
    let n = deltas.len();
    let (mut devices, mut metrics, mut buckets) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut counts, mut sums, mut mins, mut maxs, mut firsts, mut lasts) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for ((device, metric, bucket), d) in deltas {
        devices.push(device);
        metrics.push(metric);
        buckets.push(bucket);
        counts.push(d.count);
        sums.push(PgNumeric::from(d.sum.big()));
        // as PostgreSQL reads the stored number: it has no negative zero
        mins.push(d.min + 0.0);
        maxs.push(d.max + 0.0);
        firsts.push(d.first_ts);
        lasts.push(d.last_ts);
    }
    diesel::sql_query("INSERT INTO rollup_deltas VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)")
        .bind::<Array<Text>, _>(devices)
        .bind::<Array<Text>, _>(metrics)
        .bind::<Array<Timestamptz>, _>(buckets)
        .bind::<Array<BigInt>, _>(counts)
        .bind::<Array<Numeric>, _>(sums)
        .bind::<Array<Double>, _>(mins)
        .bind::<Array<Double>, _>(maxs)
        .bind::<Array<Timestamptz>, _>(firsts)
        .bind::<Array<Timestamptz>, _>(lasts)
        .execute(conn)?;
    Ok(())
}

/// Moves up to `limit` delta rows (each a writing transaction's) into the three summary tables,
/// in one transaction; returns how many, or none when another folder (or a rebuild) holds the
/// turn. Run until it returns less than `limit`.
pub fn fold(conn: &mut PgConnection, limit: i64) -> Result<Option<usize>, StoreError> {
    conn.transaction(|conn| {
        if !try_xact_lock(conn, FOLD_LOCK)? {
            return Ok(None);
        }
        fold_visible(conn, limit).map(Some)
    })
}

/// Folds up to `limit` delta rows this transaction sees, in it (its caller holds the turn).
fn fold_visible(conn: &mut PgConnection, limit: i64) -> Result<usize, StoreError> {
    #[derive(QueryableByName)]
    struct Folded {
        #[diesel(sql_type = BigInt)]
        deltas: i64,
    }
    let folded: Folded = diesel::sql_query(format!(
        "WITH taken AS (
             DELETE FROM rollup_deltas
             WHERE ctid = ANY(ARRAY(SELECT ctid FROM rollup_deltas LIMIT $1))
             RETURNING *
         ), entries AS (
             SELECT e.* FROM taken d, {ENTRIES}
         ), minutes AS ({}), hours AS ({}), days AS ({})
         SELECT count(*) AS deltas FROM taken",
        upsert_from("rollups_1m", "bucket", "entries"),
        upsert_from("rollups_1h", "date_trunc('hour', bucket, 'UTC')", "entries"),
        upsert_from("rollups_1d", "date_trunc('day', bucket, 'UTC')", "entries"),
    ))
    .bind::<BigInt, _>(limit)
    .get_result(conn)?;
    Ok(usize::try_from(folded.deltas).unwrap_or(0))
}

/// Adds the summaries of `source`'s rows (deltas or finer summaries), grouped into `bucket`, to
/// `table`. In key order, so two upserts of overlapping keys cannot deadlock.
fn upsert_from(table: &str, bucket: &str, source: &str) -> String {
    format!(
        "INSERT INTO {table} AS r
             (device_id, metric, bucket, count, sum, min, max, first_ts, last_ts)
         SELECT device_id, metric, {bucket}, sum(count)::bigint, sum(sum), min(min), max(max),
                min(first_ts), max(last_ts)
         FROM {source}
         GROUP BY 1, 2, 3
         ORDER BY 1, 2, 3
         ON CONFLICT (device_id, metric, bucket) DO UPDATE SET
             count = r.count + EXCLUDED.count,
             sum = r.sum + EXCLUDED.sum,
             min = LEAST(r.min, EXCLUDED.min),
             max = GREATEST(r.max, EXCLUDED.max),
             first_ts = LEAST(r.first_ts, EXCLUDED.first_ts),
             last_ts = GREATEST(r.last_ts, EXCLUDED.last_ts)"
    )
}

fn try_xact_lock(conn: &mut PgConnection, key: i64) -> Result<bool, StoreError> {
    #[derive(QueryableByName)]
    struct Taken {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        taken: bool,
    }
    let taken: Taken = diesel::sql_query("SELECT pg_try_advisory_xact_lock($1) AS taken")
        .bind::<BigInt, _>(key)
        .get_result(conn)?;
    Ok(taken.taken)
}

/// How many delta rows (writing transactions) wait to be folded: counted, not unnested, since the
/// persisters ask after every fold.
pub fn waiting(conn: &mut PgConnection) -> Result<i64, StoreError> {
    #[derive(QueryableByName)]
    struct Waiting {
        #[diesel(sql_type = BigInt)]
        deltas: i64,
    }
    let w: Waiting =
        diesel::sql_query("SELECT count(*) AS deltas FROM rollup_deltas").get_result(conn)?;
    Ok(w.deltas)
}

/// How many delta rows (writing transactions) wait to be folded, and the oldest minute they hold.
pub fn backlog(conn: &mut PgConnection) -> Result<(i64, Option<DateTime<Utc>>), StoreError> {
    #[derive(QueryableByName)]
    struct Backlog {
        #[diesel(sql_type = BigInt)]
        deltas: i64,
        #[diesel(sql_type = Nullable<Timestamptz>)]
        oldest: Option<DateTime<Utc>>,
    }
    let b: Backlog = diesel::sql_query(
        "SELECT count(*) AS deltas,
                (SELECT min(b) FROM rollup_deltas d, unnest(d.buckets) AS b) AS oldest
         FROM rollup_deltas",
    )
    .get_result(conn)?;
    Ok((b.deltas, b.oldest))
}

/// What [`rebuild_day`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rebuilt {
    /// Minute summaries written.
    pub minutes: usize,
}

/// Recomputes the summaries of the UTC day starting at `day` (of `device`, or of every device)
/// from the raw readings, safely while readings are being written: in one transaction that sees
/// one snapshot, it folds the deltas of the readings in that snapshot, forgets the day's summaries,
/// and sums the snapshot's readings again; readings committed after the snapshot keep their deltas,
/// which the folder adds later. Waits for a fold in progress.
pub fn rebuild_day(
    conn: &mut PgConnection,
    device: Option<&str>,
    day: DateTime<Utc>,
) -> Result<Rebuilt, StoreError> {
    let day = floor(day, Duration::days(1));
    let next = day + Duration::days(1);
    // a session lock, taken before the transaction's snapshot: a fold that commits while this waits
    // is then seen by it (a transaction lock would be taken after the snapshot, and the deltas that
    // fold deleted would make the delete below fail to serialize)
    diesel::sql_query("SELECT pg_advisory_lock($1)")
        .bind::<BigInt, _>(FOLD_LOCK)
        .execute(conn)?;
    let result = conn
        .build_transaction()
        .repeatable_read()
        .run(|conn| rebuild_in_snapshot(conn, device, day, next));
    diesel::sql_query("SELECT pg_advisory_unlock($1)")
        .bind::<BigInt, _>(FOLD_LOCK)
        .execute(conn)?;
    result
}

fn rebuild_in_snapshot(
    conn: &mut PgConnection,
    device: Option<&str>,
    day: DateTime<Utc>,
    next: DateTime<Utc>,
) -> Result<Rebuilt, StoreError> {
    let of_device = "($3::text IS NULL OR device_id = $3)";
    // what the folder has not moved yet is in the snapshot's readings: folded now, it is then
    // forgotten with the rest of the day's summaries
    while fold_visible(conn, 1_000)? == 1_000 {}
    for table in ["rollups_1m", "rollups_1h", "rollups_1d"] {
        diesel::sql_query(format!(
            "DELETE FROM {table} WHERE bucket >= $1 AND bucket < $2 AND {of_device}"
        ))
        .bind::<Timestamptz, _>(day)
        .bind::<Timestamptz, _>(next)
        .bind::<Nullable<Text>, _>(device)
        .execute(conn)?;
    }
    let minutes = diesel::sql_query(format!(
        "INSERT INTO rollups_1m (device_id, metric, bucket, count, sum, min, max, first_ts, last_ts)
         {}
         ORDER BY 1, 2, 3",
        summarise_readings("minute")
    ))
    .bind::<Timestamptz, _>(day)
    .bind::<Timestamptz, _>(next)
    .bind::<Nullable<Text>, _>(device)
    .execute(conn)?;
    for (table, bucket, finer) in [
        (
            "rollups_1h",
            "date_trunc('hour', bucket, 'UTC')",
            "rollups_1m",
        ),
        (
            "rollups_1d",
            "date_trunc('day', bucket, 'UTC')",
            "rollups_1h",
        ),
    ] {
        let day_of_finer = format!(
            "(SELECT * FROM {finer} WHERE bucket >= $1 AND bucket < $2 AND {of_device}) AS f"
        );
        diesel::sql_query(upsert_from(table, bucket, &day_of_finer))
            .bind::<Timestamptz, _>(day)
            .bind::<Timestamptz, _>(next)
            .bind::<Nullable<Text>, _>(device)
            .execute(conn)?;
    }
    Ok(Rebuilt { minutes })
}

/// The UTC days that hold raw readings (of `device`, or of any), between `from` and `to`.
pub fn days_with_readings(
    conn: &mut PgConnection,
    device: Option<&str>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<DateTime<Utc>>, StoreError> {
    #[derive(QueryableByName)]
    struct Day {
        #[diesel(sql_type = Timestamptz)]
        day: DateTime<Utc>,
    }
    // one index probe a day, not a scan of every reading: the next reading at or after each day
    let days: Vec<Day> = diesel::sql_query(
        "WITH RECURSIVE day(d) AS (
             SELECT date_trunc('day', min(ts), 'UTC') FROM readings
             WHERE ts >= $1 AND ts < $2 AND ($3::text IS NULL OR device_id = $3)
             UNION ALL
             SELECT (SELECT date_trunc('day', min(ts), 'UTC') FROM readings
                     WHERE ts >= day.d + interval '1 day' AND ts < $2
                       AND ($3::text IS NULL OR device_id = $3))
             FROM day WHERE day.d IS NOT NULL
         )
         SELECT d AS day FROM day WHERE d IS NOT NULL",
    )
    .bind::<Timestamptz, _>(from)
    .bind::<Timestamptz, _>(to)
    .bind::<Nullable<Text>, _>(device)
    .load(conn)?;
    Ok(days.into_iter().map(|d| d.day).collect())
}

/// The summaries by `unit` (`minute`, `hour`, `day`) of the raw readings in `[$1, $2)` of the
/// device `$3` (or of every device when it is NULL), as columns named as the rollup tables' are:
/// what a rebuild writes and what `verify` compares with.
fn summarise_readings(unit: &str) -> String {
    format!(
        "SELECT r.device_id, m.key AS metric, date_trunc('{unit}', r.ts, 'UTC') AS bucket,
                count(*) AS count, sum(m.value::numeric) AS sum,
                min(m.value::float8) AS min, max(m.value::float8) AS max,
                min(r.ts) AS first_ts, max(r.ts) AS last_ts
         FROM readings r, jsonb_each(r.metrics) AS m
         WHERE r.ts >= $1 AND r.ts < $2 AND ($3::text IS NULL OR r.device_id = $3)
         GROUP BY 1, 2, 3"
    )
}

/// A summary that differs from what the raw readings give.
#[derive(Debug, Clone, PartialEq, QueryableByName)]
pub struct Mismatch {
    #[diesel(sql_type = Text)]
    pub table: String,
    #[diesel(sql_type = Text)]
    pub device_id: String,
    #[diesel(sql_type = Text)]
    pub metric: String,
    #[diesel(sql_type = Timestamptz)]
    pub bucket: DateTime<Utc>,
    /// What the summary (with the deltas not folded yet) says, and what the raw readings say:
    /// `count sum min max first last`, or nothing where there is no row.
    #[diesel(sql_type = Nullable<Text>)]
    pub summary: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    pub raw: Option<String>,
}

/// Compares every summary of readings in `[from, to)` (of `device`, or of every device), the
/// deltas not folded yet included, with what the raw readings give; returns the first `limit`
/// differences. The range is widened to whole UTC days, so that every summary it covers is whole.
/// Meaningful where retention has not removed raw readings.
pub fn verify(
    conn: &mut PgConnection,
    device: Option<&str>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<Mismatch>, StoreError> {
    let (from, to) = (floor(from, Duration::days(1)), ceil(to, Duration::days(1)));
    let mut found = Vec::new();
    for (table, unit) in [
        ("rollups_1m", "minute"),
        ("rollups_1h", "hour"),
        ("rollups_1d", "day"),
    ] {
        let sql = format!(
            "WITH raw AS ({raw}), summary AS (
                 SELECT device_id, metric, bucket, sum(count) AS count, sum(sum) AS sum,
                        min(min) AS min, max(max) AS max,
                        min(first_ts) AS first_ts, max(last_ts) AS last_ts
                 FROM (SELECT device_id, metric, bucket, count, sum, min, max, first_ts, last_ts
                       FROM {table}
                       UNION ALL
                       SELECT e.device_id, e.metric, date_trunc('{unit}', e.bucket, 'UTC'),
                              e.count, e.sum, e.min, e.max, e.first_ts, e.last_ts
                       FROM rollup_deltas d, {ENTRIES}) AS s
                 WHERE bucket >= $1 AND bucket < $2
                   AND ($3::text IS NULL OR device_id = $3)
                 GROUP BY 1, 2, 3
             )
             SELECT '{table}' AS table, device_id, metric, bucket,
                    CASE WHEN s.count IS NOT NULL THEN
                         concat_ws(' ', s.count, s.sum, s.min, s.max, s.first_ts, s.last_ts) END
                         AS summary,
                    CASE WHEN r.count IS NOT NULL THEN
                         concat_ws(' ', r.count, r.sum, r.min, r.max, r.first_ts, r.last_ts) END
                         AS raw
             FROM raw r FULL JOIN summary s USING (device_id, metric, bucket)
             WHERE (r.count, r.sum, r.min, r.max, r.first_ts, r.last_ts)
                   IS DISTINCT FROM (s.count, s.sum, s.min, s.max, s.first_ts, s.last_ts)
             ORDER BY device_id, metric, bucket
             LIMIT $4",
            raw = summarise_readings(unit)
        );
        found.extend(
            diesel::sql_query(sql)
                .bind::<Timestamptz, _>(from)
                .bind::<Timestamptz, _>(to)
                .bind::<Nullable<Text>, _>(device)
                .bind::<BigInt, _>(limit)
                .load::<Mismatch>(conn)?,
        );
    }
    Ok(found)
}

/// The SQL of one segment's rows, each a partial summary (`bucket`, `count`, `sum`, `min`, `max`)
/// of the metric `$2` of the device `$3`, with its bounds as the parameters `$lo` and `$hi`. A
/// summary table's segment takes in the deltas not folded yet, so it is exact at any moment.
pub(crate) fn segment_sql(source: Table, lo: usize, hi: usize) -> String {
    match source {
        Table::Raw => format!(
            "SELECT ts AS bucket, 1::bigint AS count, (metrics -> $2)::numeric AS sum,
                    (metrics ->> $2)::float8 AS min, (metrics ->> $2)::float8 AS max
             FROM readings
             WHERE device_id = $3 AND ts >= ${lo} AND ts < ${hi} AND metrics ? $2"
        ),
        summary => format!(
            "SELECT bucket, count, sum, min, max FROM {table}
             WHERE device_id = $3 AND metric = $2 AND bucket >= ${lo} AND bucket < ${hi}
             UNION ALL
             SELECT e.bucket, e.count, e.sum, e.min, e.max FROM rollup_deltas d, {ENTRIES}
             WHERE e.device_id = $3 AND e.metric = $2 AND e.bucket >= ${lo} AND e.bucket < ${hi}",
            table = summary.relation()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_summed_exactly_with_the_scale_of_their_json_text() {
        let text = &mut Vec::new();
        let of = |v: f64, text: &mut Vec<u8>| ExactSum::of(v, text);
        for value in [
            0.1,
            21.5,
            1.0,
            -0.0,
            1e300,
            5e-324,
            -1.5e-7,
            123456789.125,
            f64::MAX,
        ] {
            let json = serde_json::to_string(&value).unwrap();
            assert_eq!(
                of(value, text).big(),
                BigDecimal::from_str(&json).unwrap(),
                "{json}"
            );
        }
        let mut sum = of(0.1, text);
        sum.add(&of(0.2, text));
        assert_eq!(sum, ExactSum::Small { units: 3, scale: 1 });
        sum.add(&of(1.0, text));
        assert_eq!(sum.big().to_string(), "1.3");
        // a whole number written with a decimal keeps it, as PostgreSQL's numeric does
        assert_eq!(
            of(1.0, text),
            ExactSum::Small {
                units: 10,
                scale: 1
            }
        );
        assert_eq!(
            of(1.5e-7, text),
            ExactSum::Small {
                units: 15,
                scale: 8
            }
        );
        // beyond an i128: arbitrary precision, still exact
        let mut huge = of(1e300, text);
        huge.add(&of(5e-324, text));
        huge.add(&of(-1e300, text));
        assert_eq!(huge.big(), BigDecimal::from_str("5e-324").unwrap());
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn seg(source: Table, from: &str, to: &str) -> Segment {
        Segment {
            source,
            from: at(from),
            to: at(to),
        }
    }

    #[test]
    fn whole_buckets_come_from_the_coarsest_table_and_edges_from_finer_ones() {
        let plan = plan(
            at("2026-01-01T10:30:15Z"),
            at("2026-01-04T12:00:00Z"),
            Duration::days(1),
            &Horizons::default(),
        );
        assert_eq!(
            plan,
            vec![
                seg(Table::Raw, "2026-01-01T10:30:15Z", "2026-01-01T10:31:00Z"),
                seg(Table::M1, "2026-01-01T10:31:00Z", "2026-01-01T11:00:00Z"),
                seg(Table::H1, "2026-01-01T11:00:00Z", "2026-01-02T00:00:00Z"),
                seg(Table::D1, "2026-01-02T00:00:00Z", "2026-01-04T00:00:00Z"),
                seg(Table::H1, "2026-01-04T00:00:00Z", "2026-01-04T12:00:00Z"),
            ]
        );
    }

    #[test]
    fn a_table_whose_buckets_do_not_fit_the_series_is_not_used() {
        // 15-minute buckets: minutes only; 10-second buckets: raw only
        let (from, to) = (at("2026-01-01T00:00:00Z"), at("2026-01-03T00:00:00Z"));
        assert_eq!(
            plan(from, to, Duration::minutes(15), &Horizons::default()),
            vec![seg(
                Table::M1,
                "2026-01-01T00:00:00Z",
                "2026-01-03T00:00:00Z"
            )]
        );
        assert_eq!(
            plan(from, to, Duration::seconds(10), &Horizons::default()),
            vec![seg(
                Table::Raw,
                "2026-01-01T00:00:00Z",
                "2026-01-03T00:00:00Z"
            )]
        );
    }

    #[test]
    fn past_the_raw_retention_edges_are_whole_buckets_of_the_finest_summary_kept() {
        let horizons = Horizons {
            raw: Some(at("2026-06-01T00:00:00Z")),
            m1: Some(at("2026-05-01T00:00:00Z")),
            ..Horizons::default()
        };
        // the range starts before the minutes' horizon too: hours are the finest kept
        assert_eq!(
            plan(
                at("2026-01-01T10:30:15Z"),
                at("2026-01-03T00:00:00Z"),
                Duration::days(1),
                &horizons
            ),
            vec![
                seg(Table::H1, "2026-01-01T10:00:00Z", "2026-01-02T00:00:00Z"),
                seg(Table::D1, "2026-01-02T00:00:00Z", "2026-01-03T00:00:00Z"),
            ]
        );
        // when no table holds the whole range any more, the one that holds the most of it answers
        assert_eq!(
            plan(
                at("2026-04-01T00:00:00Z"),
                at("2026-04-02T00:00:00Z"),
                Duration::minutes(1),
                &horizons
            ),
            vec![seg(
                Table::M1,
                "2026-04-01T00:00:00Z",
                "2026-04-02T00:00:00Z"
            )]
        );
        // within the raw retention, raw readings answer what summaries cannot
        assert_eq!(
            plan(
                at("2026-06-02T00:00:30Z"),
                at("2026-06-02T00:02:00Z"),
                Duration::minutes(1),
                &horizons
            ),
            vec![
                seg(Table::Raw, "2026-06-02T00:00:30Z", "2026-06-02T00:01:00Z"),
                seg(Table::M1, "2026-06-02T00:01:00Z", "2026-06-02T00:02:00Z"),
            ]
        );
    }
}
