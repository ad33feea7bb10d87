//! What the benchmark asks PostgreSQL: rows stored, when sampled readings become visible, and how fast
//! raw binary COPY goes into a table of the same shape as `readings`.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, DurationRound, TimeZone, Utc};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::http::Sample;
use crate::stats::Latencies;

pub fn connect(url: &str) -> anyhow::Result<PgConnection> {
    PgConnection::establish(url)
        .with_context(|| format!("cannot connect to {}", store::redacted(url)))
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// A table name as given on the command line: letters, digits, `_` and one optional schema dot.
pub fn check_table_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    anyhow::ensure!(ok, "not a plain table name: {name}");
    Ok(())
}

pub fn count_rows(conn: &mut PgConnection, table: &str) -> anyhow::Result<i64> {
    let rows: Vec<Count> = diesel::sql_query(format!("SELECT count(*) AS n FROM {table}"))
        .load(conn)
        .with_context(|| format!("counting rows of {table}"))?;
    Ok(rows.first().map_or(0, |c| c.n))
}

/// Empties the tables (a dedicated bench database only: `--reset-db`).
pub fn truncate(conn: &mut PgConnection, tables: &[&str]) -> anyhow::Result<()> {
    conn.batch_execute(&format!("TRUNCATE {}", tables.join(", ")))
        .with_context(|| format!("truncating {}", tables.join(", ")))?;
    Ok(())
}

/// Stored rows over time, polled after the load ended.
pub struct Drained {
    pub stored: i64,
    /// When the count reached `expected`, or last grew when it never did.
    pub last_growth: Instant,
    pub complete: bool,
}

/// Polls `count(*)` until `before + expected` rows are there, or the count has not grown for
/// `stall`, or `timeout` passed.
pub fn wait_stored(
    conn: &mut PgConnection,
    table: &str,
    before: i64,
    expected: i64,
    stall: Duration,
    timeout: Duration,
    mut progress: impl FnMut(i64),
) -> anyhow::Result<Drained> {
    let started = Instant::now();
    let mut stored = count_rows(conn, table)? - before;
    let mut last_growth = Instant::now();
    loop {
        progress(stored);
        if stored >= expected {
            return Ok(Drained {
                stored,
                last_growth,
                complete: true,
            });
        }
        if last_growth.elapsed() > stall || started.elapsed() > timeout {
            return Ok(Drained {
                stored,
                last_growth,
                complete: false,
            });
        }
        std::thread::sleep(Duration::from_millis(200));
        let now = count_rows(conn, table)? - before;
        if now > stored {
            last_growth = Instant::now();
        }
        stored = now;
    }
}

#[derive(QueryableByName)]
struct Found {
    #[diesel(sql_type = Text)]
    reading_id: String,
}

pub struct Visibility {
    pub latencies: Latencies,
    /// Sampled readings never seen in the database within the wait.
    pub unseen: usize,
}

/// Ack-to-queryable latency: looks sampled readings up by their key (one query for all pending, so
/// the database pays an index probe per pending reading) until each is visible.
/// Blocking; ends when the sender side is closed and nothing is pending, or `wait` after it closed.
pub fn watch_visibility(
    conn: &mut PgConnection,
    mut samples: mpsc::UnboundedReceiver<Sample>,
    wait: Duration,
) -> anyhow::Result<Visibility> {
    let mut pending: HashMap<String, Sample> = HashMap::new();
    let mut latencies = Latencies::default();
    let mut closed_at: Option<Instant> = None;
    loop {
        loop {
            match samples.try_recv() {
                Ok(s) => {
                    pending.insert(s.reading_id.clone(), s);
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed_at.get_or_insert_with(Instant::now);
                    break;
                }
            }
        }
        if let Some(at) = closed_at
            && (pending.is_empty() || at.elapsed() > wait)
        {
            break;
        }
        if pending.is_empty() {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        let polled = Instant::now();
        let values: Vec<String> = pending
            .values()
            .map(|s| {
                format!(
                    "('{}', '{}'::timestamptz, '{}')",
                    s.device_id,
                    millis_rfc3339(s.ts_millis),
                    s.reading_id
                )
            })
            .collect();
        let found: Vec<Found> = diesel::sql_query(format!(
            "SELECT r.reading_id FROM (VALUES {}) AS v(device_id, ts, reading_id) \
             JOIN readings r ON r.device_id = v.device_id AND r.ts = v.ts AND r.reading_id = v.reading_id",
            values.join(",")
        ))
        .load(conn)
        .context("looking up sampled readings")?;
        for f in found {
            if let Some(sample) = pending.remove(&f.reading_id) {
                // Seen by this poll: visible at the latest when the poll began (the resolution is
                // one poll interval, a few ms).
                latencies.record(polled.saturating_duration_since(sample.acked_at));
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(Visibility {
        latencies,
        unseen: pending.len(),
    })
}

fn millis_rfc3339(millis: i64) -> String {
    Utc.timestamp_millis_opt(millis)
        .single()
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

diesel::table! {
    loadgen_copy_ceiling (device_id, ts, reading_id) {
        device_id -> Text,
        ts -> Timestamptz,
        reading_id -> Text,
        metrics -> Jsonb,
    }
}

#[derive(Insertable)]
#[diesel(table_name = loadgen_copy_ceiling)]
#[diesel(treat_none_as_default_value = false)]
struct CopyRow {
    device_id: String,
    ts: DateTime<Utc>,
    reading_id: String,
    metrics: serde_json::Value,
}

/// Creates the ceiling's table: the columns, key and monthly partitioning of `readings`.
pub fn create_copy_table(conn: &mut PgConnection) -> anyhow::Result<()> {
    let now = Utc::now();
    let month = now.format("%Y-%m-01").to_string();
    conn.batch_execute(&format!(
        "DROP TABLE IF EXISTS loadgen_copy_ceiling;
         CREATE TABLE loadgen_copy_ceiling (
             device_id  text        NOT NULL,
             ts         timestamptz NOT NULL,
             reading_id text        NOT NULL,
             metrics    jsonb       NOT NULL,
             PRIMARY KEY (device_id, ts, reading_id)
         ) PARTITION BY RANGE (ts);
         CREATE TABLE loadgen_copy_ceiling_now PARTITION OF loadgen_copy_ceiling
             FOR VALUES FROM ('{month}'::date - interval '1 month') TO ('{month}'::date + interval '2 month');"
    ))
    .context("creating the COPY ceiling table")?;
    Ok(())
}

pub fn drop_copy_table(conn: &mut PgConnection) -> anyhow::Result<()> {
    conn.batch_execute("DROP TABLE IF EXISTS loadgen_copy_ceiling")?;
    Ok(())
}

pub fn truncate_copy_table(conn: &mut PgConnection) -> anyhow::Result<()> {
    conn.batch_execute("TRUNCATE loadgen_copy_ceiling")?;
    Ok(())
}

/// One connection COPYing `rows_per_copy` rows at a time (each COPY its own transaction) until
/// `deadline`; returns the rows copied. The rows are built once; each COPY moves their time by a
/// microsecond, so every row is new.
pub fn copy_until(
    url: &str,
    worker: usize,
    rows_per_copy: usize,
    fleet: usize,
    deadline: std::time::Instant,
) -> anyhow::Result<u64> {
    let mut conn = connect(url)?;
    let base = Utc::now() - chrono::Duration::seconds(worker as i64 * 3600);
    let mut rows: Vec<CopyRow> = (0..rows_per_copy)
        .map(|i| CopyRow {
            device_id: crate::http::device_name(i % fleet.max(1)),
            ts: base,
            reading_id: format!("copy-w{worker}-{i}"),
            metrics: serde_json::json!({"humidity": 40.0 + (i % 300) as f64 / 10.0,
                                         "temperature": 15.0 + (i % 200) as f64 / 10.0}),
        })
        .collect();
    rounds_until(deadline, base, |_, ts| {
        for row in &mut rows {
            row.ts = ts;
        }
        let n = diesel::copy_from(loadgen_copy_ceiling::table)
            .from_insertable(&rows)
            .execute(&mut conn)
            .context("COPY")?;
        Ok(n as u64)
    })
}

/// The persister's own write path (`store::write_readings`: partitions, the idempotent insert, the
/// devices upsert, one transaction per batch) on one connection, batches of `batch` readings over
/// `fleet` devices, until `deadline`; returns the readings stored. Needs a migrated database it may
/// write to (`--reset-db`).
pub fn write_path_until(
    url: &str,
    worker: usize,
    batch: usize,
    fleet: usize,
    rollups: bool,
    deadline: std::time::Instant,
) -> anyhow::Result<u64> {
    let mut conn = connect(url)?;
    let mut known = store::KnownPartitions::default();
    let base = Utc::now() - chrono::Duration::seconds(worker as i64 * 3600 + 60);
    let metric = |name: &str| models::MetricName::parse(name).map_err(anyhow::Error::msg);
    let (temperature, humidity) = (metric("temperature")?, metric("humidity")?);
    let mut readings = Vec::with_capacity(batch);
    for i in 0..batch {
        let metrics = models::Metrics::new(vec![
            (temperature.clone(), 15.0 + (i % 200) as f64 / 10.0),
            (humidity.clone(), 40.0 + (i % 300) as f64 / 10.0),
        ])
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        readings.push(
            models::Reading::new(
                models::DeviceId::parse(crate::http::device_name(i % fleet.max(1)))
                    .map_err(anyhow::Error::msg)?,
                models::ReadingId::parse(format!("wp-w{worker}-{i}"))
                    .map_err(anyhow::Error::msg)?,
                base,
                metrics,
            )
            .map_err(|e| anyhow::anyhow!("{e:?}"))?,
        );
    }
    rounds_until(deadline, base, |round, ts| {
        // every reading new: its time moves by a microsecond each round, and its id (the device's
        // own, so the identity is recorded as a Pi's is) names the round
        for (i, r) in readings.iter_mut().enumerate() {
            r.ts = ts;
            r.id = models::ReadingId::parse(format!("wp-w{worker}-r{round}-{i}"))
                .map_err(anyhow::Error::msg)?;
        }
        let written = if rollups {
            store::write_readings(&mut conn, &readings, &mut known)
        } else {
            store::write_readings_without_rollups(&mut conn, &readings, &mut known)
        }
        .map_err(|e| anyhow::anyhow!("write_readings: {e}"))?;
        Ok(written.outcome.inserted as u64)
    })
}

/// The device whose year the series workload charts.
pub const YEAR_DEVICE: &str = "bench-year";

/// A year of [`YEAR_DEVICE`]'s readings, one a minute up to now (525,600), written as the
/// persister writes them (so the rollups are kept as in production), 10,000 at a time.
pub fn write_year(url: &str, counter: &std::sync::atomic::AtomicU64) -> anyhow::Result<()> {
    let mut conn = connect(url)?;
    let mut known = store::KnownPartitions::default();
    let end = Utc::now().duration_trunc(chrono::Duration::minutes(1))?;
    let minutes: i64 = 525_600;
    let device = models::DeviceId::parse(YEAR_DEVICE).map_err(anyhow::Error::msg)?;
    let temperature = models::MetricName::parse("temperature").map_err(anyhow::Error::msg)?;
    let mut written = 0u64;
    let mut batch = Vec::with_capacity(10_000);
    for m in 0..minutes {
        let ts = end - chrono::Duration::minutes(minutes - m);
        // a daily swing and some noise, with two decimals as a sensor gives
        let swing = 5.0 * ((m % 1440) as f64 / 1440.0 * std::f64::consts::TAU).sin();
        let value = ((20.0 + swing + (m % 7) as f64 / 10.0) * 100.0).round() / 100.0;
        let metrics = models::Metrics::new(vec![(temperature.clone(), value)])
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        batch.push(
            models::Reading::new(
                device.clone(),
                models::ReadingId::parse(format!("y{m}")).map_err(anyhow::Error::msg)?,
                ts,
                metrics,
            )
            .map_err(|e| anyhow::anyhow!("{e:?}"))?,
        );
        if batch.len() == 10_000 || m == minutes - 1 {
            written += store::write_readings(&mut conn, &batch, &mut known)
                .map_err(|e| anyhow::anyhow!("write_readings: {e}"))?
                .outcome
                .inserted as u64;
            counter.store(written, std::sync::atomic::Ordering::Relaxed);
            batch.clear();
        }
    }
    Ok(())
}

/// Folds every rollup delta into the summaries (the persister does it within a second; this
/// does not wait for it).
pub fn fold_rollups(url: &str, counter: &std::sync::atomic::AtomicU64) -> anyhow::Result<()> {
    let mut conn = connect(url)?;
    let mut folded = 0u64;
    loop {
        match store::rollups::fold(&mut conn, 50_000)? {
            Some(n) => {
                folded += n as u64;
                counter.store(folded, std::sync::atomic::Ordering::Relaxed);
                if n < 50_000 {
                    break;
                }
            }
            // the persister is folding: wait for its turn to end
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    Ok(())
}

/// Milliseconds of each of `times` one-year series of [`YEAR_DEVICE`] (daily buckets; min, max
/// and average, as the dashboard's chart asks), from the summaries or from the raw readings.
pub fn time_year_series(
    url: &str,
    from_summaries: bool,
    times: usize,
    counter: &std::sync::atomic::AtomicU64,
) -> anyhow::Result<Vec<f64>> {
    use store::read::{Aggregate, SeriesQuery};
    let mut conn = connect(url)?;
    let to = Utc::now();
    let q = SeriesQuery {
        device_id: YEAR_DEVICE.into(),
        metric: "temperature".into(),
        from: to - chrono::Duration::days(365),
        to,
        bucket_micros: 86_400_000_000,
        aggregate: Aggregate::Avg,
    };
    let aggregates = [Aggregate::Min, Aggregate::Max, Aggregate::Avg];
    let mut timings = Vec::with_capacity(times);
    for i in 0..times {
        let started = std::time::Instant::now();
        let answer = if from_summaries {
            store::read::series_of(&mut conn, &q, &aggregates)?
        } else {
            store::read::series_of_raw(&mut conn, &q, &aggregates)?
        };
        timings.push(started.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(
            answer.buckets.len() >= 365,
            "the one-year series has {} buckets",
            answer.buckets.len()
        );
        counter.store(i as u64 + 1, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(timings)
}

/// `round(n, ts)` for n = 0, 1, … until `deadline`, `ts` moving a microsecond a round from `base`
/// (so a round that writes the same rows again writes new ones); the sum of what the rounds counted.
fn rounds_until(
    deadline: std::time::Instant,
    base: DateTime<Utc>,
    mut round: impl FnMut(i64, DateTime<Utc>) -> anyhow::Result<u64>,
) -> anyhow::Result<u64> {
    let mut counted = 0u64;
    let mut n: i64 = 0;
    while std::time::Instant::now() < deadline {
        counted += round(n, base + chrono::Duration::microseconds(n))?;
        n += 1;
    }
    Ok(counted)
}

/// Registers devices `pi-00000`.. of a fleet of `fleet` in Sensorhub's registry (again, where an
/// earlier run registered them) and returns their tokens, signed with the key in `keys_dir`.
pub fn register_fleet(
    url: &str,
    keys_dir: &std::path::Path,
    fleet: usize,
) -> anyhow::Result<Vec<String>> {
    let signer = auth::TokenSigner::from_file(&keys_dir.join(auth::SIGNING_KEY_FILE))?;
    let mut conn = connect(url)?;
    let now = chrono::Utc::now().timestamp();
    (0..fleet)
        .map(|i| {
            let device = crate::http::device_name(i);
            let claims = auth::Claims::device(&device, now);
            store::credentials::revoke_device(&mut conn, &device)?;
            store::credentials::register_device(&mut conn, &device, &claims.jti)?;
            Ok(signer.sign(&claims)?)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain() {
        assert!(check_table_name("sensor_data").is_ok());
        assert!(check_table_name("public.readings").is_ok());
        assert!(check_table_name("x; drop table y").is_err());
    }

    #[test]
    fn sample_times_are_exact_milliseconds() {
        assert_eq!(
            millis_rfc3339(1_764_064_800_123),
            "2025-11-25T10:00:00.123Z"
        );
    }
}
