//! Retention: how long raw readings and each rollup table keep what they hold, and applying it.
//!
//! The policy (`retention_policy`, see the migration `retention`) has one global row per table and
//! overrides per device, per metric, or per device and metric; the most specific applies. A raw
//! row holds every metric of one reading, so raw takes no per-metric override.
//!
//! Applying it never holds a long lock on `readings`: whole partitions (days, and months from
//! before daily partitions) are detached and dropped under a short `lock_timeout` (skipped when
//! the lock is not had at once, and tried at the next run); what cannot go by partition goes in
//! small deletes by primary key, each its own statement.

use std::fmt;

use chrono::{DateTime, Datelike, Duration, NaiveDate, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Integer, Nullable, Text, Timestamptz};
use models::{DeviceId, MetricName};

use crate::StoreError;

/// Rows deleted per statement.
pub const ROWS_PER_DELETE: i64 = 10_000;
/// How long dropping a partition waits for its lock on `readings` before giving up until the next
/// run: writers queue behind a waiting DETACH, so it must not wait long (and after one such wait,
/// the run tries no other partition: what held the lock most likely still does).
const DROP_LOCK_TIMEOUT: &str = "1s";
/// The advisory lock that lets one applier run at a time (persisters, sensorctl).
const APPLY_LOCK: i64 = 0x5e45_7e7e;
/// The longest keep accepted: 100 years, in hours.
const MAX_KEEP_HOURS: u32 = 100 * 366 * 24;

/// The tables retention applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Raw,
    M1,
    H1,
    D1,
}

impl Table {
    pub const ALL: [Table; 4] = [Table::Raw, Table::M1, Table::H1, Table::D1];

    pub fn as_str(self) -> &'static str {
        match self {
            Table::Raw => "raw",
            Table::M1 => "1m",
            Table::H1 => "1h",
            Table::D1 => "1d",
        }
    }

    pub fn parse(text: &str) -> Result<Self, InvalidPolicy> {
        Table::ALL
            .into_iter()
            .find(|t| t.as_str() == text)
            .ok_or_else(|| {
                InvalidPolicy::new("table", format!("{text:?} is not one of raw, 1m, 1h, 1d"))
            })
    }

    /// The bucket length of a rollup table; none for raw readings.
    pub fn bucket(self) -> Option<Duration> {
        match self {
            Table::Raw => None,
            Table::M1 => Some(Duration::minutes(1)),
            Table::H1 => Some(Duration::hours(1)),
            Table::D1 => Some(Duration::days(1)),
        }
    }

    /// The PostgreSQL table (fixed names, never from input).
    pub(crate) fn relation(self) -> &'static str {
        match self {
            Table::Raw => "readings",
            Table::M1 => "rollups_1m",
            Table::H1 => "rollups_1h",
            Table::D1 => "rollups_1d",
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How long a table keeps what it holds: a whole number of hours (written `12h`, or `30d` when a
/// whole number of days), or forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    Forever,
    Hours(u32),
}

impl Keep {
    /// `30d`, `12h` or `forever`.
    pub fn parse(text: &str) -> Result<Self, InvalidPolicy> {
        if text == "forever" {
            return Ok(Keep::Forever);
        }
        let invalid = |reason: &str| {
            InvalidPolicy::new(
                "keep",
                format!("{text:?}: {reason} (e.g. 30d, 12h or forever)"),
            )
        };
        let (count, per) = match text.strip_suffix('d') {
            Some(days) => (days, 24),
            None => match text.strip_suffix('h') {
                Some(hours) => (hours, 1),
                None => return Err(invalid("a number of days (d) or hours (h) is expected")),
            },
        };
        if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid("a whole number is expected before the unit"));
        }
        let hours = count
            .parse::<u32>()
            .ok()
            .and_then(|n| n.checked_mul(per))
            .filter(|h| *h <= MAX_KEEP_HOURS)
            .ok_or_else(|| invalid("at most 100 years"))?;
        if hours == 0 {
            return Err(invalid("must be more than zero"));
        }
        Ok(Keep::Hours(hours))
    }

    /// The JSON form: null for forever, else as written.
    pub fn to_option_string(self) -> Option<String> {
        match self {
            Keep::Forever => None,
            Keep::Hours(_) => Some(self.to_string()),
        }
    }

    fn from_hours(hours: Option<i32>) -> Self {
        match hours.and_then(|h| u32::try_from(h).ok()) {
            Some(h) if h > 0 => Keep::Hours(h),
            _ => Keep::Forever,
        }
    }

    fn hours(self) -> Option<i32> {
        match self {
            Keep::Forever => None,
            Keep::Hours(h) => i32::try_from(h).ok(),
        }
    }

    /// What is older than this is removed; none when kept forever.
    fn cutoff(self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Keep::Forever => None,
            Keep::Hours(h) => Some(now - Duration::hours(i64::from(h))),
        }
    }
}

impl fmt::Display for Keep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Keep::Forever => f.write_str("forever"),
            Keep::Hours(h) if h % 24 == 0 => write!(f, "{}d", h / 24),
            Keep::Hours(h) => write!(f, "{h}h"),
        }
    }
}

/// Input a policy cannot take: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidPolicy {
    pub field: &'static str,
    pub reason: String,
}

impl InvalidPolicy {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// What a rule applies to: a table, for every device and metric, or for one device, one metric,
/// or one device's metric. Built only through `new`/`override_of`, so it is always one the policy
/// can hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub table: Table,
    pub device: Option<DeviceId>,
    pub metric: Option<MetricName>,
}

impl Target {
    /// Refuses an invalid device id or metric name, and a per-metric rule for raw readings.
    pub fn new(
        table: Table,
        device: Option<&str>,
        metric: Option<&str>,
    ) -> Result<Self, InvalidPolicy> {
        let device = device
            .map(|d| DeviceId::parse(d).map_err(|reason| InvalidPolicy::new("device", reason)))
            .transpose()?;
        let metric = metric
            .map(|m| MetricName::parse(m).map_err(|reason| InvalidPolicy::new("metric", reason)))
            .transpose()?;
        if table == Table::Raw && metric.is_some() {
            return Err(InvalidPolicy::new(
                "metric",
                "raw readings cannot be kept per metric (a reading holds all its metrics in one \
                 row): set raw for a device or globally, and per-metric retention on 1m, 1h or 1d",
            ));
        }
        Ok(Self {
            table,
            device,
            metric,
        })
    }

    /// An override, which can be removed: the global default cannot (set it to `forever`).
    pub fn override_of(
        table: Table,
        device: Option<&str>,
        metric: Option<&str>,
    ) -> Result<Self, InvalidPolicy> {
        if device.is_none() && metric.is_none() {
            return Err(InvalidPolicy::new(
                "device",
                format!(
                    "the global default of {table} cannot be removed, only changed (set it to \
                     forever to keep everything); name a device or a metric to remove an override"
                ),
            ));
        }
        Self::new(table, device, metric)
    }

    fn device_key(&self) -> &str {
        self.device.as_ref().map_or("", |d| d.as_str())
    }

    fn metric_key(&self) -> &str {
        self.metric.as_ref().map_or("", |m| m.as_str())
    }
}

/// One rule of the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub table: Table,
    /// None: every device (that no more specific rule names).
    pub device: Option<String>,
    /// None: every metric.
    pub metric: Option<String>,
    pub keep: Keep,
}

impl Rule {
    /// `global`, `device=D`, `metric=M` or `device=D metric=M`.
    pub fn scope(&self) -> String {
        match (&self.device, &self.metric) {
            (None, None) => "global".to_owned(),
            (Some(d), None) => format!("device={d}"),
            (None, Some(m)) => format!("metric={m}"),
            (Some(d), Some(m)) => format!("device={d} metric={m}"),
        }
    }

    /// What this rule removes at `now`: raw readings older than this, rollup buckets ending at or
    /// before it (so the table is complete from this rule's horizon on); none when kept forever.
    pub fn cutoff(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.keep.cutoff(now)
    }

    /// Higher is more specific: device and metric, device, metric, global.
    fn rank(&self) -> i32 {
        rank(self.device.is_some(), self.metric.is_some())
    }
}

fn rank(device: bool, metric: bool) -> i32 {
    i32::from(device) * 2 + i32::from(metric)
}

#[derive(QueryableByName)]
struct PolicyRow {
    #[diesel(sql_type = Text)]
    table_name: String,
    #[diesel(sql_type = Text)]
    device_id: String,
    #[diesel(sql_type = Text)]
    metric: String,
    #[diesel(sql_type = Nullable<Integer>)]
    keep_hours: Option<i32>,
}

/// Every rule, by table, global first, then by device and metric.
pub fn show(conn: &mut PgConnection) -> Result<Vec<Rule>, StoreError> {
    let rows: Vec<PolicyRow> = diesel::sql_query(
        "SELECT table_name, device_id, metric, keep_hours FROM retention_policy
         ORDER BY array_position(ARRAY['raw', '1m', '1h', '1d'], table_name),
                  device_id <> '', metric <> '', device_id, metric",
    )
    .load(conn)?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let table = Table::parse(&r.table_name).ok()?;
            Some(Rule {
                table,
                device: Some(r.device_id).filter(|d| !d.is_empty()),
                metric: Some(r.metric).filter(|m| !m.is_empty()),
                keep: Keep::from_hours(r.keep_hours),
            })
        })
        .collect())
}

/// Sets how long `target` keeps what it holds (adding the override, or changing it).
pub fn set(conn: &mut PgConnection, target: &Target, keep: Keep) -> Result<(), StoreError> {
    diesel::sql_query(
        "INSERT INTO retention_policy (table_name, device_id, metric, keep_hours)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (table_name, device_id, metric)
         DO UPDATE SET keep_hours = EXCLUDED.keep_hours, updated_at = now()",
    )
    .bind::<Text, _>(target.table.as_str())
    .bind::<Text, _>(target.device_key())
    .bind::<Text, _>(target.metric_key())
    .bind::<Nullable<Integer>, _>(keep.hours())
    .execute(conn)?;
    Ok(())
}

/// Removes an override (build it with `Target::override_of`); false when there was none.
pub fn unset(conn: &mut PgConnection, target: &Target) -> Result<bool, StoreError> {
    if target.device.is_none() && target.metric.is_none() {
        return Ok(false);
    }
    let removed = diesel::sql_query(
        "DELETE FROM retention_policy WHERE table_name = $1 AND device_id = $2 AND metric = $3",
    )
    .bind::<Text, _>(target.table.as_str())
    .bind::<Text, _>(target.device_key())
    .bind::<Text, _>(target.metric_key())
    .execute(conn)?;
    Ok(removed > 0)
}

/// For one device's metric, the earliest time from which each table is still complete under the
/// policy that applies to it (None: kept forever).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Horizons {
    pub raw: Option<DateTime<Utc>>,
    pub m1: Option<DateTime<Utc>>,
    pub h1: Option<DateTime<Utc>>,
    pub d1: Option<DateTime<Utc>>,
}

/// The horizons of `device_id`'s `metric` at `now`. Raw readings older than the cutoff are removed
/// one by one, so raw is complete from the cutoff; a rollup bucket is removed whole once it ends at
/// or before the cutoff, so a rollup table is complete from the start of the bucket holding it.
pub fn horizons(
    conn: &mut PgConnection,
    device_id: &str,
    metric: &str,
    now: DateTime<Utc>,
) -> Result<Horizons, StoreError> {
    let rules = show(conn)?;
    let horizon = |table: Table| {
        let cutoff = effective(&rules, table, device_id, metric)?.cutoff(now)?;
        Some(match table.bucket() {
            Some(bucket) => crate::rollups::floor(cutoff, bucket),
            None => cutoff,
        })
    };
    Ok(Horizons {
        raw: horizon(Table::Raw),
        m1: horizon(Table::M1),
        h1: horizon(Table::H1),
        d1: horizon(Table::D1),
    })
}

/// The rule that applies to `device`'s `metric` in `table`: the most specific one naming them.
fn effective<'a>(rules: &'a [Rule], table: Table, device: &str, metric: &str) -> Option<&'a Rule> {
    rules
        .iter()
        .filter(|r| r.table == table)
        .filter(|r| r.device.as_deref().is_none_or(|d| d == device))
        .filter(|r| r.metric.as_deref().is_none_or(|m| m == metric))
        .max_by_key(|r| r.rank())
}

/// What one application of the policy removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// The raw partitions dropped whole.
    pub partitions_dropped: Vec<String>,
    /// Partitions due to be dropped whose lock was not had within the timeout: tried next run.
    pub partitions_skipped: Vec<String>,
    /// Rows deleted one batch at a time, per table.
    pub rows_deleted: RowsDeleted,
}

/// Rows deleted per table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowsDeleted {
    pub raw: u64,
    pub m1: u64,
    pub h1: u64,
    pub d1: u64,
}

impl RowsDeleted {
    pub fn of(&self, table: Table) -> u64 {
        match table {
            Table::Raw => self.raw,
            Table::M1 => self.m1,
            Table::H1 => self.h1,
            Table::D1 => self.d1,
        }
    }

    fn add(&mut self, table: Table, rows: u64) {
        match table {
            Table::Raw => self.raw += rows,
            Table::M1 => self.m1 += rows,
            Table::H1 => self.h1 += rows,
            Table::D1 => self.d1 += rows,
        }
    }
}

impl ApplyReport {
    /// Whether this run removed nothing.
    pub fn is_empty(&self) -> bool {
        self.partitions_dropped.is_empty() && self.rows_deleted == RowsDeleted::default()
    }
}

/// One step of an application, as it happens (for a progress display).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// A raw partition (a day, or a month from before daily partitions) dropped whole.
    Dropped { partition: String },
    /// A partition due to be dropped, left for the next run: its lock was not had in time.
    Skipped { partition: String },
    /// Rows deleted from `table` under the rule of `scope`, older than `cutoff`.
    Deleted {
        table: Table,
        scope: String,
        cutoff: DateTime<Utc>,
        rows: u64,
    },
}

/// Applies the policy at `now`: see `apply_with_progress`.
pub fn apply(conn: &mut PgConnection, now: DateTime<Utc>) -> Result<ApplyReport, StoreError> {
    apply_with_progress(conn, now, |_| {})
}

/// Applies the policy at `now`, telling `progress` each step:
///
/// 1. raw partitions every row of which is older than the longest raw keep of any device are
///    detached and dropped (none while any device keeps raw readings forever);
/// 2. raw readings older than their device's cutoff are deleted in batches (what partitions kept
///    for a device that keeps longer, and the default partition);
/// 3. rollup buckets that end at or before their cutoff are deleted in batches, each rule for the
///    rows it is the most specific rule of.
///
/// Removes nothing twice: run again at the same `now`, it reports nothing removed.
pub fn apply_with_progress(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    mut progress: impl FnMut(&Progress),
) -> Result<ApplyReport, StoreError> {
    let rules = show(conn)?;
    let mut report = ApplyReport::default();
    drop_raw_partitions(conn, &rules, now, &mut report, &mut progress)?;
    // a partition due to be dropped whose lock was not had is dropped next run, not emptied row
    // by row now
    let partitions: Vec<String> = raw_partitions(conn)?
        .into_iter()
        .filter(|p| !report.partitions_skipped.contains(p))
        .collect();
    for table in Table::ALL {
        for rule in rules.iter().filter(|r| r.table == table) {
            let Some(cutoff) = rule.cutoff(now) else {
                continue;
            };
            let rows = delete_under(conn, rule, cutoff, &partitions)?;
            if rows > 0 {
                progress(&Progress::Deleted {
                    table,
                    scope: rule.scope(),
                    cutoff,
                    rows,
                });
                report.rows_deleted.add(table, rows);
            }
        }
    }
    Ok(report)
}

/// `apply_with_progress`, unless another applier holds the lock: then nothing is done (None).
pub fn apply_exclusively(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    progress: impl FnMut(&Progress),
) -> Result<Option<ApplyReport>, StoreError> {
    #[derive(QueryableByName)]
    struct Locked {
        #[diesel(sql_type = Bool)]
        locked: bool,
    }
    let locked = diesel::sql_query("SELECT pg_try_advisory_lock($1) AS locked")
        .bind::<BigInt, _>(APPLY_LOCK)
        .get_result::<Locked>(conn)?
        .locked;
    if !locked {
        return Ok(None);
    }
    let applied = apply_with_progress(conn, now, progress);
    // a session lock: released here, or with the connection if this fails
    let unlocked = diesel::sql_query("SELECT pg_advisory_unlock($1)")
        .bind::<BigInt, _>(APPLY_LOCK)
        .execute(conn);
    let report = applied?;
    unlocked?;
    Ok(Some(report))
}

#[derive(QueryableByName)]
struct Partition {
    #[diesel(sql_type = Text)]
    name: String,
}

/// The range a partition named by `sensorhub_ensure_readings_partition` holds:
/// `readings_YYYY_MM_DD` a day, `readings_YYYY_MM` a month. None for any other name (the default
/// partition, or one made by hand), which is never dropped.
fn partition_range(name: &str) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let rest = name.strip_prefix("readings_")?;
    let parts: Vec<&str> = rest.split('_').collect();
    let number = |s: &str, len: usize| {
        (s.len() == len && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u32>().ok())
            .flatten()
    };
    let (start, end) = match parts.as_slice() {
        [y, m, d] => {
            let year = i32::try_from(number(y, 4)?).ok()?;
            let day = NaiveDate::from_ymd_opt(year, number(m, 2)?, number(d, 2)?)?;
            (day, day.succ_opt()?)
        }
        [y, m] => {
            let year = i32::try_from(number(y, 4)?).ok()?;
            let first = NaiveDate::from_ymd_opt(year, number(m, 2)?, 1)?;
            let (year, month) = if first.month() == 12 {
                (first.year() + 1, 1)
            } else {
                (first.year(), first.month() + 1)
            };
            (first, NaiveDate::from_ymd_opt(year, month, 1)?)
        }
        _ => return None,
    };
    Some((
        start.and_hms_opt(0, 0, 0)?.and_utc(),
        end.and_hms_opt(0, 0, 0)?.and_utc(),
    ))
}

fn partition_end(name: &str) -> Option<DateTime<Utc>> {
    partition_range(name).map(|(_, end)| end)
}

/// The partitions of `readings`, by name.
fn raw_partitions(conn: &mut PgConnection) -> Result<Vec<String>, StoreError> {
    let partitions: Vec<Partition> = diesel::sql_query(
        "SELECT c.relname AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'readings'::regclass ORDER BY c.relname",
    )
    .load(conn)?;
    Ok(partitions.into_iter().map(|p| p.name).collect())
}

fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Step 1: partitions past the longest raw keep of any device.
fn drop_raw_partitions(
    conn: &mut PgConnection,
    rules: &[Rule],
    now: DateTime<Utc>,
    report: &mut ApplyReport,
    progress: &mut impl FnMut(&Progress),
) -> Result<(), StoreError> {
    // The global rule applies to every device without an override, future ones included: the
    // longest keep is at least its.
    let mut longest = Some(Duration::zero());
    for rule in rules.iter().filter(|r| r.table == Table::Raw) {
        longest = match (longest, rule.keep) {
            (Some(l), Keep::Hours(h)) => Some(l.max(Duration::hours(i64::from(h)))),
            _ => None,
        };
    }
    let Some(longest) = longest else {
        return Ok(());
    };
    let cutoff = now - longest;
    let mut timed_out = false;
    for partition in raw_partitions(conn)? {
        if partition_end(&partition).is_none_or(|end| end > cutoff) {
            continue;
        }
        let dropped = if timed_out {
            Err(None)
        } else {
            drop_partition(conn, &partition).map_err(Some)
        };
        match dropped {
            Ok(()) => {
                progress(&Progress::Dropped {
                    partition: partition.clone(),
                });
                report.partitions_dropped.push(partition);
            }
            Err(e) if e.as_ref().is_none_or(is_lock_timeout) => {
                timed_out = true;
                tracing::warn!(partition = %partition,
                    "retention: the partition's lock was not had in time; trying at the next run");
                progress(&Progress::Skipped {
                    partition: partition.clone(),
                });
                report.partitions_skipped.push(partition);
            }
            Err(Some(e)) => return Err(e),
            Err(None) => {}
        }
    }
    Ok(())
}

/// Detaches and drops one partition in one short transaction that gives up on its locks quickly.
fn drop_partition(conn: &mut PgConnection, name: &str) -> Result<(), StoreError> {
    conn.transaction::<_, StoreError, _>(|conn| {
        diesel::sql_query(format!("SET LOCAL lock_timeout = '{DROP_LOCK_TIMEOUT}'"))
            .execute(conn)?;
        // the name comes from pg_class and matched partition_end's pattern; quoted all the same
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        diesel::sql_query(format!("ALTER TABLE readings DETACH PARTITION {quoted}"))
            .execute(conn)?;
        diesel::sql_query(format!("DROP TABLE {quoted}")).execute(conn)?;
        Ok(())
    })
}

fn is_lock_timeout(e: &StoreError) -> bool {
    matches!(e, StoreError::Query(diesel::result::Error::DatabaseError(_, info))
        if info.message().starts_with("canceling statement due to lock timeout"))
}

/// Steps 2 and 3: deletes, `ROWS_PER_DELETE` at a time, what `rule` removes at `cutoff`: the rows
/// it names (its device, its metric) that no more specific rule names, older than the cutoff (raw)
/// or in buckets ending at or before it (rollups).
///
/// Raw rows are deleted partition by partition (those that can hold rows older than the cutoff,
/// the default one included), each batch by its rows' ctid within that partition: one statement
/// on the parent would join the batch back to every old partition, reading all of them again for
/// each batch.
fn delete_under(
    conn: &mut PgConnection,
    rule: &Rule,
    cutoff: DateTime<Utc>,
    raw_partitions: &[String],
) -> Result<u64, StoreError> {
    let (relations, older, before, metric_of_row) = match rule.table.bucket() {
        None => (
            raw_partitions
                .iter()
                .filter(|p| partition_range(p).is_none_or(|(start, _)| start < cutoff))
                .map(|p| quoted(p))
                .collect::<Vec<_>>(),
            "r.ts < $1",
            cutoff,
            "''",
        ),
        Some(bucket) => (
            vec![rule.table.relation().to_owned()],
            "r.bucket <= $1",
            cutoff - bucket,
            "r.metric",
        ),
    };
    let mut total = 0u64;
    for relation in relations {
        // $2/$3: the rule's device and metric ('' for any); $4 its rank; $5 the table
        let sql = format!(
            "DELETE FROM {relation} WHERE ctid = ANY(ARRAY(
                 SELECT ctid FROM {relation} r
                 WHERE {older}
                   AND ($2 = '' OR r.device_id = $2)
                   AND ($3 = '' OR {metric_of_row} = $3)
                   AND NOT EXISTS (
                       SELECT 1 FROM retention_policy p
                       WHERE p.table_name = $5
                         AND p.device_id IN ('', r.device_id)
                         AND p.metric IN ('', {metric_of_row})
                         AND (CASE WHEN p.device_id <> '' THEN 2 ELSE 0 END
                              + CASE WHEN p.metric <> '' THEN 1 ELSE 0 END) > $4)
                 LIMIT $6))"
        );
        loop {
            let rows = diesel::sql_query(&sql)
                .bind::<Timestamptz, _>(before)
                .bind::<Text, _>(rule.device.as_deref().unwrap_or(""))
                .bind::<Text, _>(rule.metric.as_deref().unwrap_or(""))
                .bind::<Integer, _>(rule.rank())
                .bind::<Text, _>(rule.table.as_str())
                .bind::<BigInt, _>(ROWS_PER_DELETE)
                .execute(conn)?;
            total += rows as u64;
            if (rows as i64) < ROWS_PER_DELETE {
                break;
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_parse_and_print() {
        assert_eq!(Keep::parse("30d"), Ok(Keep::Hours(720)));
        assert_eq!(Keep::parse("12h"), Ok(Keep::Hours(12)));
        assert_eq!(Keep::parse("forever"), Ok(Keep::Forever));
        assert_eq!(Keep::parse("48h").unwrap().to_string(), "2d");
        assert_eq!(Keep::parse("36h").unwrap().to_string(), "36h");
        for bad in [
            "",
            "0d",
            "30",
            "d",
            "-1d",
            "1.5d",
            "30m",
            "1w",
            " 3d",
            "99999999d",
        ] {
            let e = Keep::parse(bad).unwrap_err();
            assert_eq!(e.field, "keep", "{bad}");
        }
    }

    #[test]
    fn partition_names_give_their_ends() {
        let at = |s: &str| models::parse_timestamp_rfc3339(s).unwrap();
        assert_eq!(
            partition_end("readings_2026_11_30"),
            Some(at("2026-12-01T00:00:00Z"))
        );
        assert_eq!(
            partition_end("readings_2026_12"),
            Some(at("2027-01-01T00:00:00Z"))
        );
        assert_eq!(partition_end("readings_default"), None);
        assert_eq!(partition_end("readings_2026_13_01"), None);
        assert_eq!(partition_end("readings_26_11"), None);
    }

    #[test]
    fn buckets_start_on_their_boundaries() {
        let at = |s: &str| models::parse_timestamp_rfc3339(s).unwrap();
        let t = at("2026-11-30T10:17:42.5Z");
        assert_eq!(
            crate::rollups::floor(t, Duration::minutes(1)),
            at("2026-11-30T10:17:00Z")
        );
        assert_eq!(
            crate::rollups::floor(t, Duration::days(1)),
            at("2026-11-30T00:00:00Z")
        );
    }
}
