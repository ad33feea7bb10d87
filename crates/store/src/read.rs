//! The read queries behind query-api. Pagination is by keyset (the last row's time and id), never by
//! offset, so page 1,000 costs what page 1 does.

use std::collections::{BTreeSet, HashSet};

use chrono::{DateTime, Utc};
use diesel::pg::data_types::PgInterval;
use diesel::prelude::*;
use diesel::sql_types::{Double, Interval, Nullable, Text, Timestamptz};

use crate::StoreError;
use crate::rollups::{self, Table};
use crate::schema::{devices, readings};

#[derive(Debug, Clone, PartialEq, Queryable, Selectable)]
#[diesel(table_name = devices)]
pub struct DeviceSummary {
    pub device_id: String,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    /// Never holds NULL (the persister writes names only); PostgreSQL arrays cannot say so.
    pub metrics: Vec<Option<String>>,
}

pub fn device(
    conn: &mut PgConnection,
    device_id: &str,
) -> Result<Option<DeviceSummary>, StoreError> {
    Ok(devices::table
        .find(device_id)
        .select(DeviceSummary::as_select())
        .first(conn)
        .optional()?)
}

/// Devices by id, after `after` (exclusive), at most `limit`.
/// Devices in id order, after `after`, whose id holds `search` (ignoring case) when one is given.
/// A search reads the whole devices table (one row per device: milliseconds for 10,000).
pub fn find_devices(
    conn: &mut PgConnection,
    search: Option<&str>,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<DeviceSummary>, StoreError> {
    let mut query = devices::table
        .select(DeviceSummary::as_select())
        .order(devices::device_id)
        .limit(limit)
        .into_boxed();
    if let Some(after) = after {
        query = query.filter(devices::device_id.gt(after.to_owned()));
    }
    if let Some(search) = search {
        query = query.filter(devices::device_id.ilike(like_substring(search)));
    }
    Ok(query.load(conn)?)
}

/// A LIKE pattern matching `text` anywhere, its own `%`, `_` and `\` taken literally.
fn like_substring(text: &str) -> String {
    let mut pattern = String::with_capacity(text.len() + 2);
    pattern.push('%');
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

#[derive(Debug, Clone, PartialEq, Queryable)]
pub struct StoredReading {
    pub ts: DateTime<Utc>,
    pub reading_id: String,
    pub metrics: serde_json::Value,
}

/// A page of one device's readings, newest first.
#[derive(Debug, Clone, Default)]
pub struct ReadingsQuery {
    pub device_id: String,
    /// Inclusive.
    pub from: Option<DateTime<Utc>>,
    /// Exclusive.
    pub to: Option<DateTime<Utc>>,
    /// Only readings holding at least one of these metrics (all readings when empty).
    pub metrics: Vec<String>,
    /// Continue after this (ts, reading_id), exclusive, in newest-first order.
    pub before: Option<(DateTime<Utc>, String)>,
    pub limit: i64,
}

pub fn readings_page(
    conn: &mut PgConnection,
    q: &ReadingsQuery,
) -> Result<Vec<StoredReading>, StoreError> {
    let mut query = readings::table
        .filter(readings::device_id.eq(&q.device_id))
        .select((readings::ts, readings::reading_id, readings::metrics))
        .order((readings::ts.desc(), readings::reading_id.desc()))
        .limit(q.limit)
        .into_boxed();
    if let Some(from) = q.from {
        query = query.filter(readings::ts.ge(from));
    }
    if let Some(to) = q.to {
        query = query.filter(readings::ts.lt(to));
    }
    if !q.metrics.is_empty() {
        query = query.filter(readings::metrics.has_any_key(q.metrics.clone()));
    }
    if let Some((ts, id)) = &q.before {
        // `ts <= cursor` alone lets the index bound the scan; the OR breaks ties within a timestamp.
        query = query
            .filter(readings::ts.le(*ts))
            .filter(readings::ts.lt(*ts).or(readings::reading_id.lt(id.clone())));
    }
    Ok(query.load(conn)?)
}

#[derive(Debug, Clone, PartialEq)]
pub struct LatestValue {
    pub metric: String,
    pub ts: DateTime<Utc>,
    pub value: f64,
}

/// The newest value of each of the device's metrics, by metric name.
pub fn latest(conn: &mut PgConnection, device_id: &str) -> Result<Vec<LatestValue>, StoreError> {
    Ok(latest_of(conn, &[device_id.to_owned()])?
        .into_iter()
        .map(|v| LatestValue {
            metric: v.metric,
            ts: v.ts,
            value: v.value,
        })
        .collect())
}

#[derive(Debug, Clone, PartialEq, QueryableByName)]
pub struct DeviceLatestValue {
    #[diesel(sql_type = Text)]
    pub device_id: String,
    #[diesel(sql_type = Text)]
    pub metric: String,
    #[diesel(sql_type = Timestamptz)]
    pub ts: DateTime<Utc>,
    #[diesel(sql_type = Double)]
    pub value: f64,
}

/// [`latest`] of several devices at once (a page of the fleet), by device and metric name.
///
/// `readings` has a partition per day and a default one, and with a default partition PostgreSQL
/// cannot read the partitions newest first: "newest reading" opens every partition's index (400
/// of them with a year of days: half a second for a page of 50 devices). Nearly every metric's
/// newest reading is within a day of its device's newest (`last_seen`), so that day is asked
/// first (run-time pruning leaves a few partitions), and only the metrics not found there are
/// looked for in every partition.
pub fn latest_of(
    conn: &mut PgConnection,
    device_ids: &[String],
) -> Result<Vec<DeviceLatestValue>, StoreError> {
    #[derive(QueryableByName)]
    struct Found {
        #[diesel(sql_type = Text)]
        device_id: String,
        #[diesel(sql_type = Text)]
        metric: String,
        #[diesel(sql_type = Nullable<Timestamptz>)]
        ts: Option<DateTime<Utc>>,
        #[diesel(sql_type = Nullable<Double>)]
        value: Option<f64>,
    }
    let found: Vec<Found> = diesel::sql_query(
        "SELECT d.device_id, m.name AS metric, r.ts, (r.metrics ->> m.name)::float8 AS value
         FROM devices d
         CROSS JOIN LATERAL unnest(d.metrics) AS m(name)
         LEFT JOIN LATERAL (
             SELECT ts, metrics FROM readings
             WHERE device_id = d.device_id AND metrics ? m.name
               AND ts >= d.last_seen - interval '1 day'
             ORDER BY ts DESC, reading_id DESC
             LIMIT 1
         ) r ON true
         WHERE d.device_id = ANY($1)
         ORDER BY d.device_id, m.name",
    )
    .bind::<diesel::sql_types::Array<Text>, _>(device_ids)
    .load(conn)?;
    let older: Vec<String> = found
        .iter()
        .filter(|f| f.ts.is_none())
        .map(|f| f.device_id.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut values: Vec<DeviceLatestValue> = if older.is_empty() {
        Vec::new()
    } else {
        let missing: HashSet<(&str, &str)> = found
            .iter()
            .filter(|f| f.ts.is_none())
            .map(|f| (f.device_id.as_str(), f.metric.as_str()))
            .collect();
        latest_anywhere(conn, &older)?
            .into_iter()
            .filter(|v| missing.contains(&(v.device_id.as_str(), v.metric.as_str())))
            .collect()
    };
    values.extend(found.into_iter().filter_map(|f| {
        Some(DeviceLatestValue {
            ts: f.ts?,
            value: f.value?,
            device_id: f.device_id,
            metric: f.metric,
        })
    }));
    values.sort_by(|a, b| (&a.device_id, &a.metric).cmp(&(&b.device_id, &b.metric)));
    Ok(values)
}

/// The newest value of each metric of `device_ids`, looked for in every partition.
fn latest_anywhere(
    conn: &mut PgConnection,
    device_ids: &[String],
) -> Result<Vec<DeviceLatestValue>, StoreError> {
    Ok(diesel::sql_query(
        "SELECT d.device_id, m.name AS metric, r.ts, (r.metrics ->> m.name)::float8 AS value
         FROM devices d
         CROSS JOIN LATERAL unnest(d.metrics) AS m(name)
         CROSS JOIN LATERAL (
             SELECT ts, metrics FROM readings
             WHERE device_id = d.device_id AND metrics ? m.name
             ORDER BY ts DESC, reading_id DESC
             LIMIT 1
         ) r
         WHERE d.device_id = ANY($1)
         ORDER BY d.device_id, m.name",
    )
    .bind::<diesel::sql_types::Array<Text>, _>(device_ids)
    .load(conn)?)
}

/// How a bucket's values are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    Avg,
    Min,
    Max,
    Sum,
    Count,
}

impl Aggregate {
    pub const NAMES: &'static str = "avg, min, max, sum or count";

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "avg" => Self::Avg,
            "min" => Self::Min,
            "max" => Self::Max,
            "sum" => Self::Sum,
            "count" => Self::Count,
            _ => return None,
        })
    }

    /// The bucket's value as float8, or NULL when it is beyond what a float8 can hold.
    ///
    /// `sum` and `avg` are computed in `numeric`, from the jsonb numbers as stored (jsonb keeps
    /// numbers as numeric): exact, and a numeric sum cannot overflow, where a float8 sum of two values
    /// near 1e308 makes PostgreSQL fail the whole query. An average lies between the smallest and
    /// largest value, so it never overflows a float8; a sum may, and is then NULL (the API says why).
    /// Either may be nearer zero than the smallest float8 (the average of 5e-324 and 0), which
    /// PostgreSQL refuses to convert: it is 0, as a float8 sum would round it.
    /// `min`, `max` and `count` cannot overflow and stay in float8, which is cheaper.
    fn sql(self) -> String {
        match self {
            Self::Avg => to_double("avg((metrics -> $2)::numeric)"),
            Self::Min => "min((metrics ->> $2)::float8)".to_owned(),
            Self::Max => "max((metrics ->> $2)::float8)".to_owned(),
            Self::Sum => to_double("sum((metrics -> $2)::numeric)"),
            Self::Count => "count(*)::float8".to_owned(),
        }
    }

    /// As [`Self::sql`], over partial summaries (`count`, exact `sum`, `min`, `max`): the same
    /// numbers to the last digit, since an average is the `numeric` sum divided by the count, as
    /// PostgreSQL's `avg` computes it.
    fn summary_sql(self) -> String {
        match self {
            Self::Avg => to_double("(sum(sum) / sum(count))"),
            Self::Min => "min(min)".to_owned(),
            Self::Max => "max(max)".to_owned(),
            Self::Sum => to_double("sum(sum)"),
            Self::Count => "sum(count)::float8".to_owned(),
        }
    }
}

/// The exact `numeric` value `exact` as the nearest float8: 0 when it is at most half the smallest
/// float8 (which PostgreSQL refuses to convert rather than round to 0), NULL beyond the largest.
fn to_double(exact: &str) -> String {
    format!(
        "CASE WHEN abs({exact}) <= 2.4703282292062328e-324 THEN 0::float8
              WHEN abs({exact}) <= 1.7976931348623157e308 THEN ({exact})::float8 END"
    )
}

#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    pub start: DateTime<Utc>,
    /// None when the exact result does not fit a float8 (a `sum` beyond ±1.8e308).
    pub value: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct SeriesQuery {
    pub device_id: String,
    pub metric: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub bucket_micros: i64,
    pub aggregate: Aggregate,
}

/// One metric in time buckets aligned to Monday 2000-01-03T00:00:00Z (so `1d` buckets start at
/// midnight UTC and `1w` buckets on Monday, as ISO weeks do), oldest first; buckets without values
/// are left out.
pub fn series(conn: &mut PgConnection, q: &SeriesQuery) -> Result<Vec<Bucket>, StoreError> {
    Ok(series_of(conn, q, &[q.aggregate])?
        .buckets
        .into_iter()
        .map(|b| Bucket {
            start: b.start,
            value: b.values.into_iter().next().flatten(),
        })
        .collect())
}

/// The most aggregates [`series_of`] computes in one pass.
pub const MAX_AGGREGATES: usize = 5;

/// One bucket of several aggregates, in the order they were asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Buckets {
    pub start: DateTime<Utc>,
    /// As [`Bucket::value`], one per aggregate asked for.
    pub values: Vec<Option<f64>>,
}

/// A series, and the coarsest table that answered it.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesAnswer {
    pub source: Table,
    pub buckets: Vec<Buckets>,
}

/// [`series`] with several aggregates of each bucket (up to [`MAX_AGGREGATES`]; `q.aggregate` is
/// not used) from one pass: a chart's min–max band and average cost one scan, not three.
///
/// Answered from the coarsest summaries that can answer it exactly ([`rollups::plan`]): a year of
/// days reads 365 summary rows instead of every reading. The numbers are those the raw readings
/// give, to the last digit: sums and averages are computed in `numeric` from the summaries' exact
/// sums, as from the readings.
pub fn series_of(
    conn: &mut PgConnection,
    q: &SeriesQuery,
    aggregates: &[Aggregate],
) -> Result<SeriesAnswer, StoreError> {
    let horizons = rollup_horizons(conn, q)?;
    let segments = rollups::plan(
        q.from,
        q.to,
        chrono::Duration::microseconds(q.bucket_micros),
        &horizons,
    );
    answer(conn, q, aggregates, &segments)
}

/// [`series_of`] from the raw readings alone, whatever summaries could answer: what the benchmark
/// compares the summaries with.
pub fn series_of_raw(
    conn: &mut PgConnection,
    q: &SeriesQuery,
    aggregates: &[Aggregate],
) -> Result<SeriesAnswer, StoreError> {
    let whole = rollups::Segment {
        source: Table::Raw,
        from: q.from,
        to: q.to,
    };
    answer(conn, q, aggregates, &[whole])
}

fn answer(
    conn: &mut PgConnection,
    q: &SeriesQuery,
    aggregates: &[Aggregate],
    segments: &[rollups::Segment],
) -> Result<SeriesAnswer, StoreError> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Timestamptz)]
        start: DateTime<Utc>,
        #[diesel(sql_type = Nullable<Double>)]
        v0: Option<f64>,
        #[diesel(sql_type = Nullable<Double>)]
        v1: Option<f64>,
        #[diesel(sql_type = Nullable<Double>)]
        v2: Option<f64>,
        #[diesel(sql_type = Nullable<Double>)]
        v3: Option<f64>,
        #[diesel(sql_type = Nullable<Double>)]
        v4: Option<f64>,
    }
    let aggregates = &aggregates[..aggregates.len().min(MAX_AGGREGATES)];
    let source = segments
        .iter()
        .map(|s| s.source)
        .max()
        .unwrap_or(Table::Raw);
    // the columns not asked for are NULL: the row's shape is fixed, its work is what was asked
    let raw_only = segments.iter().all(|s| s.source == Table::Raw);
    let columns: Vec<String> = (0..MAX_AGGREGATES)
        .map(|i| match aggregates.get(i) {
            Some(a) if raw_only => format!("{} AS v{i}", a.sql()),
            Some(a) => format!("{} AS v{i}", a.summary_sql()),
            None => format!("NULL::float8 AS v{i}"),
        })
        .collect();
    let sql = if raw_only {
        format!(
            "SELECT date_bin($1, ts, TIMESTAMPTZ '2000-01-03 00:00:00+00') AS start, {}
             FROM readings
             WHERE device_id = $3 AND ts >= $4 AND ts < $5 AND metrics ? $2
             GROUP BY 1
             ORDER BY 1",
            columns.join(", ")
        )
    } else {
        let parts: Vec<String> = segments
            .iter()
            .enumerate()
            .map(|(i, s)| rollups::segment_sql(s.source, 4 + 2 * i, 5 + 2 * i))
            .collect();
        format!(
            "SELECT date_bin($1, bucket, TIMESTAMPTZ '2000-01-03 00:00:00+00') AS start, {}
             FROM ({}) AS s
             GROUP BY 1
             ORDER BY 1",
            columns.join(", "),
            parts.join(" UNION ALL ")
        )
    };
    let mut query = diesel::sql_query(sql)
        .into_boxed::<diesel::pg::Pg>()
        .bind::<Interval, _>(PgInterval::from_microseconds(q.bucket_micros))
        .bind::<Text, _>(q.metric.clone())
        .bind::<Text, _>(q.device_id.clone());
    if raw_only {
        query = query
            .bind::<Timestamptz, _>(q.from)
            .bind::<Timestamptz, _>(q.to);
    } else {
        for s in segments {
            query = query
                .bind::<Timestamptz, _>(s.from)
                .bind::<Timestamptz, _>(s.to);
        }
    }
    let rows: Vec<Row> = query.load(conn)?;
    let buckets = rows
        .into_iter()
        .map(|r| {
            let mut values = vec![r.v0, r.v1, r.v2, r.v3, r.v4];
            values.truncate(aggregates.len());
            Buckets {
                start: r.start,
                values,
            }
        })
        .collect();
    Ok(SeriesAnswer { source, buckets })
}

/// From when on each table holds all of the series' metric, as the retention policy says.
fn rollup_horizons(
    conn: &mut PgConnection,
    q: &SeriesQuery,
) -> Result<rollups::Horizons, StoreError> {
    crate::retention::horizons(conn, &q.device_id, &q.metric, Utc::now())
}
