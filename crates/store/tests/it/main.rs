//! The store against a real PostgreSQL, a fresh migrated database per test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first thing that is not as it must be"
)]

use chrono::{DateTime, Duration, Utc};
use diesel::PgConnection;
use models::{DeviceId, MetricName, Metrics, Origin, Reading, ReadingId};
use store::read::{Aggregate, ReadingsQuery, SeriesQuery};
use store::{KnownPartitions, WriteOutcome, write_readings};
use testkit::TestDb;

mod commands;
mod retention;
mod rollups;

/// A test's own migrated database, a connection to it, and what its writer knows of the
/// partitions (as one persister would).
struct Store {
    db: TestDb,
    conn: PgConnection,
    known: KnownPartitions,
}

impl Store {
    fn new() -> Self {
        let db = TestDb::migrated();
        let conn = db.connect();
        Self {
            db,
            conn,
            known: KnownPartitions::default(),
        }
    }

    /// A store whose readings all go to daily partitions: the monthly partition the first
    /// migration made (empty here) would otherwise take this month's readings, as it does in a
    /// deployment from before daily partitions.
    fn daily() -> Self {
        let mut s = Self::new();
        testkit::execute(
            &mut s.conn,
            "DO $$ DECLARE p text; BEGIN
                 FOR p IN SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                          WHERE i.inhparent = 'readings'::regclass AND c.relname ~ '^readings_\\d{4}_\\d{2}$'
                 LOOP EXECUTE format('DROP TABLE %I', p); END LOOP;
             END $$",
        );
        s
    }

    /// Writes `batch` as the persister does.
    fn write(&mut self, batch: &[Reading]) -> WriteOutcome {
        write_readings(&mut self.conn, batch, &mut self.known)
            .unwrap()
            .outcome
    }

    fn rows(&self, table: &str) -> i64 {
        testkit::count_rows(&self.db.url, table)
    }
}

fn outcome(inserted: usize, duplicates: usize, conflicting: usize) -> WriteOutcome {
    WriteOutcome {
        inserted,
        duplicates,
        conflicting,
    }
}

fn at(text: &str) -> DateTime<Utc> {
    models::parse_timestamp_rfc3339(text).unwrap()
}

fn reading(device: &str, id: &str, ts: DateTime<Utc>, metrics: &[(&str, f64)]) -> Reading {
    Reading::new(
        DeviceId::parse(device).unwrap(),
        ReadingId::parse(id).unwrap(),
        ts,
        Metrics::new(
            metrics
                .iter()
                .map(|(n, v)| (MetricName::parse(*n).unwrap(), *v))
                .collect(),
        )
        .unwrap(),
    )
    .unwrap()
}

#[test]
fn a_batch_is_stored_once_however_often_it_is_written() {
    let mut s = Store::new();
    let t = at("2026-11-25T10:00:00.123456Z");
    let batch = vec![
        reading(
            "raspi-01",
            "a",
            t,
            &[("temperature", 25.5), ("humidity", 60.3)],
        ),
        reading("raspi-01", "b", t, &[("temperature", 25.6)]),
        reading("raspi-02", "a", t, &[("co2", 415.0)]),
    ];
    assert_eq!(s.write(&batch), outcome(3, 0, 0));
    // a redelivery of the same message, and a batch overlapping it
    assert_eq!(s.write(&batch), outcome(0, 3, 0));
    let overlap = vec![
        batch[0].clone(),
        reading("raspi-01", "c", t, &[("temperature", 1.0)]),
    ];
    assert_eq!(s.write(&overlap), outcome(1, 1, 0));
    assert_eq!(s.rows("readings"), 4);

    let page = testkit::stored_readings(&s.db.url, "raspi-01", 10);
    let a = page.iter().find(|r| r.reading_id == "a").unwrap();
    assert_eq!(a.ts, t, "microseconds survive the round trip");
    assert_eq!(
        a.metrics,
        serde_json::json!({"humidity": 60.3, "temperature": 25.5})
    );
}

/// What the persister announces as stored: the new readings of a batch, never a repeat.
#[test]
fn a_write_names_exactly_the_readings_it_stored() {
    let mut s = Store::new();
    let t = at("2026-11-25T10:00:00Z");
    let first = vec![
        reading("raspi-01", "a", t, &[("temperature", 20.0)]),
        reading("raspi-01", "b", t, &[("temperature", 21.0)]),
    ];
    let written = write_readings(&mut s.conn, &first, &mut s.known).unwrap();
    let ids: Vec<&str> = written.stored(&first).map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["a", "b"], "the fast path stores them all");

    let overlap = vec![
        first[1].clone(),
        reading("raspi-01", "c", t, &[("temperature", 22.0)]),
        reading("raspi-01", "a", t, &[("temperature", 99.0)]),
        reading("raspi-01", "c", t, &[("temperature", 22.0)]),
    ];
    let written = write_readings(&mut s.conn, &overlap, &mut s.known).unwrap();
    assert_eq!(written.outcome, outcome(1, 2, 1));
    let ids: Vec<&str> = written.stored(&overlap).map(|r| r.id.as_str()).collect();
    assert_eq!(
        ids,
        ["c"],
        "a duplicate, a conflict and a repeat within the batch are not stored"
    );
}

#[test]
fn a_reading_twice_in_one_batch_is_stored_once_and_the_batch_is_kept() {
    // The fast path (COPY) fails on the repeat; the batch must still be stored, by the slow path.
    let mut s = Store::new();
    let t = at("2026-11-25T10:00:00Z");
    let r = reading("raspi-01", "twice", t, &[("temperature", 20.0)]);
    let other = reading("raspi-02", "once", t, &[("humidity", 50.0)]);
    assert_eq!(s.write(&[r.clone(), other, r]), outcome(2, 1, 0));
    assert_eq!(s.rows("readings"), 2);
    let devices = store::read::find_devices(&mut s.conn, None, None, 10).unwrap();
    assert_eq!(devices.len(), 2, "devices are updated on the slow path too");
}

/// A reading with the device's id and no time of its own: stamped with `ts` by the server.
fn stamped(device: &str, id: &str, ts: DateTime<Utc>, metrics: &[(&str, f64)]) -> Reading {
    reading(device, id, ts, metrics).with_origin(Origin {
        id_assigned: false,
        ts_assigned: true,
    })
}

/// raspi-01's reading `r-1` (t = 20), sent without a time and stamped `time` by the server.
fn r1_stamped(time: &str) -> Reading {
    stamped("raspi-01", "r-1", at(time), &[("t", 20.0)])
}

#[test]
fn a_devices_id_sent_without_a_time_is_stored_once_however_often_it_is_stamped() {
    let mut s = Store::new();
    let first = r1_stamped("2026-11-25T10:00:00Z");
    assert_eq!(s.write(&[first]), outcome(1, 0, 0));
    // the retry, and a redelivery through another ingest, each stamped later by the server
    for later in ["2026-11-25T10:00:07Z", "2026-11-25T10:03:00Z"] {
        let retry = r1_stamped(later);
        let other = stamped(
            "raspi-01",
            &format!("new-{later}"),
            at(later),
            &[("t", 1.0)],
        );
        assert_eq!(s.write(&[retry, other]), outcome(1, 1, 0));
    }
    assert_eq!(s.rows("readings"), 3);
    // the same id from another device is another reading
    let elsewhere = stamped(
        "raspi-02",
        "r-1",
        at("2026-11-25T10:05:00Z"),
        &[("t", 20.0)],
    );
    assert_eq!(s.write(&[elsewhere]), outcome(1, 0, 0));
    // the device's time on one side and the server's on the other: the same reading
    let timed = reading(
        "raspi-01",
        "r-1",
        at("2026-11-25T09:59:59Z"),
        &[("t", 20.0)],
    );
    assert_eq!(s.write(&[timed]), outcome(0, 1, 0));
    let last_seen: Vec<DateTime<Utc>> = store::read::find_devices(&mut s.conn, None, None, 10)
        .unwrap()
        .into_iter()
        .filter(|d| d.device_id == "raspi-01")
        .map(|d| d.last_seen)
        .collect();
    assert_eq!(
        last_seen,
        [at("2026-11-25T10:03:00Z")],
        "a duplicate does not move last_seen; the new reading beside it did"
    );
}

#[test]
fn the_same_id_with_other_content_is_a_conflict_kept_once_and_the_first_write_stays() {
    let mut s = Store::new();
    let t = at("2026-11-25T10:00:00Z");
    let first = reading("raspi-01", "r-1", t, &[("t", 20.0)]);
    s.write(&[first]);

    let other_metrics = stamped(
        "raspi-01",
        "r-1",
        at("2026-11-25T10:01:00Z"),
        &[("t", 21.0)],
    );
    let other_time = reading(
        "raspi-01",
        "r-1",
        at("2026-11-25T10:00:01Z"),
        &[("t", 20.0)],
    );
    let same_key_other_metrics = reading("raspi-01", "r-1", t, &[("t", 22.0)]);
    let batch = [other_metrics, other_time, same_key_other_metrics];
    assert_eq!(s.write(&batch), outcome(0, 0, 3));
    // redelivered: counted again, kept once
    assert_eq!(s.write(&batch), outcome(0, 0, 3));
    assert_eq!(s.rows("readings"), 1);
    assert_eq!(s.rows("reading_conflicts"), 3);
    let page = testkit::stored_readings(&s.db.url, "raspi-01", 10);
    assert_eq!(
        page[0].metrics,
        serde_json::json!({"t": 20.0}),
        "the first write stays"
    );

    // within one batch: the first occurrence is stored, the second is the conflict
    let a = stamped("raspi-01", "r-2", t, &[("t", 1.0)]);
    let b = stamped("raspi-01", "r-2", t, &[("t", 2.0)]);
    assert_eq!(s.write(&[a, b]), outcome(1, 0, 1));
    assert_eq!(s.rows("reading_conflicts"), 4);
}

#[test]
fn an_identity_is_forgotten_after_the_dedupe_window() {
    use std::time::Duration;
    use store::Expiring;
    let mut s = Store::new();
    let first = r1_stamped("2026-11-25T10:00:00Z");
    s.write(&[first]);
    let week = Duration::from_secs(7 * 24 * 3600);
    assert_eq!(
        store::forget_older_than(&mut s.conn, Expiring::Identities, week, 100).unwrap(),
        0
    );
    assert_eq!(
        store::forget_older_than(&mut s.conn, Expiring::Identities, Duration::ZERO, 100).unwrap(),
        1
    );
    // past the window, an id without a time is a new reading again (documented)
    let much_later = r1_stamped("2026-11-26T10:00:00Z");
    assert_eq!(s.write(&[much_later]), outcome(1, 0, 0));
    assert_eq!(s.rows("readings"), 2);
}

/// `readings_YYYY_MM_DD` of the day `days` away from today (UTC), and its start.
fn day_partition(days: i64) -> (String, DateTime<Utc>) {
    let day = (Utc::now() + Duration::days(days)).date_naive();
    (
        format!("readings_{}", day.format("%Y_%m_%d")),
        day.and_hms_opt(0, 0, 0).unwrap().and_utc(),
    )
}

/// `readings_YYYY_MM` of the month `months` away from this one, and its start.
fn month_partition(months: i32) -> (String, DateTime<Utc>) {
    use chrono::Datelike;
    let now = Utc::now();
    let index = now.year() * 12 + now.month0() as i32 + months;
    let (year, month) = (index.div_euclid(12), index.rem_euclid(12) as u32 + 1);
    let start = at(&format!("{year:04}-{month:02}-01T00:00:00Z"));
    (format!("readings_{year:04}_{month:02}"), start)
}

fn partition_exists(db: &TestDb, name: &str) -> bool {
    use diesel::prelude::*;
    #[derive(QueryableByName)]
    struct Found {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        found: bool,
    }
    diesel::sql_query("SELECT to_regclass($1) IS NOT NULL AS found")
        .bind::<diesel::sql_types::Text, _>(name)
        .get_result::<Found>(&mut db.connect())
        .unwrap()
        .found
}

#[test]
fn readings_in_new_days_within_the_horizon_get_their_partitions_and_old_months_keep_theirs() {
    let mut s = Store::daily();
    let days: Vec<(String, DateTime<Utc>)> = (-1..=1).map(day_partition).collect();
    let mut batch: Vec<Reading> = days
        .iter()
        .enumerate()
        .map(|(i, (_, start))| reading("d", &i.to_string(), *start, &[("t", 1.0)]))
        .collect();
    // a month partitioned before daily partitions: its readings keep going there
    let (month, month_start) = month_partition(-3);
    testkit::execute(
        &mut s.conn,
        &format!(
            "CREATE TABLE {month} PARTITION OF readings FOR VALUES FROM ('{month_start}') TO ('{}')",
            month_partition(-2).1
        ),
    );
    let in_month = month_start + Duration::days(3);
    batch.push(reading("d", "m", in_month, &[("t", 1.0)]));
    s.write(&batch);
    for (partition, _) in &days {
        assert_eq!(s.rows(partition), 1, "{partition}");
    }
    assert_eq!(s.rows(&month), 1);
    assert!(!partition_exists(
        &s.db,
        &format!("readings_{}", in_month.format("%Y_%m_%d"))
    ));
    // a second writer that has not seen these days yet finds them existing
    write_readings(&mut s.conn, &batch, &mut KnownPartitions::default()).unwrap();
    assert_eq!(s.rows("readings"), 4);
    assert_eq!(s.rows("readings_default"), 0);
}

#[test]
fn readings_outside_the_horizon_are_stored_without_creating_partitions() {
    // What an attacker's batch asked for before ingest refused old readings: a day a month, back to
    // 2000. Already queued, such readings must still be stored, but no table is made for them.
    let mut s = Store::daily();
    let (too_old, too_old_start) = day_partition(-400);
    let (too_new, too_new_start) = day_partition(2);
    let (oldest_allowed, oldest_allowed_start) = day_partition(-300);
    let mut batch: Vec<Reading> = (0..300)
        .map(|i| {
            let ts = at("2000-01-01T00:00:00Z") + Duration::days(31 * i);
            reading("spray", &format!("old-{i}"), ts, &[("t", i as f64)])
        })
        .filter(|r| r.ts < too_old_start)
        .collect();
    batch.push(reading(
        "spray",
        "stray",
        too_old_start + Duration::hours(1),
        &[("t", 1.0)],
    ));
    let old_count = batch.len() as i64;
    batch.push(reading("d", "new", too_new_start, &[("t", 1.0)]));
    batch.push(reading(
        "d",
        "edge",
        oldest_allowed_start + Duration::hours(20),
        &[("t", 1.0)],
    ));
    let partitions_before = partitions(&s.db);
    let outcome = s.write(&batch);
    assert_eq!(outcome.inserted, batch.len());
    assert_eq!(s.rows("readings"), old_count + 2);
    assert_eq!(s.rows("readings_default"), old_count + 1);
    assert!(!partition_exists(&s.db, &too_old));
    assert!(!partition_exists(&s.db, &too_new));
    assert!(!partition_exists(&s.db, "readings_2000_01_01"));
    assert!(partition_exists(&s.db, &oldest_allowed));
    assert_eq!(partitions(&s.db), partitions_before + 1);

    // a shorter horizon, configured: readings of 20 days ago go to the default partition too
    let mut week = KnownPartitions::with_horizon(models::BackfillHorizon::days(7).unwrap());
    let (twenty_days_ago, start) = day_partition(-20);
    write_readings(
        &mut s.conn,
        &[reading("d", "w", start, &[("t", 1.0)])],
        &mut week,
    )
    .unwrap();
    assert!(!partition_exists(&s.db, &twenty_days_ago));

    // what the default partition holds reads back like any other reading
    let page = testkit::stored_readings(&s.db.url, "spray", 1_000);
    assert_eq!(page.len() as i64, old_count);
    // and a later, longer horizon cannot strand them: the day is not created while the default
    // partition holds its readings, which stay where they are, and new ones join them
    let mut century = KnownPartitions::with_horizon(models::BackfillHorizon::days(36_525).unwrap());
    let again = vec![
        reading("spray", "later", too_old_start, &[("t", 1.0)]),
        reading("spray", "old-0", at("2000-01-01T00:00:00Z"), &[("t", 0.0)]),
    ];
    let outcome = write_readings(&mut s.conn, &again, &mut century)
        .unwrap()
        .outcome;
    assert_eq!((outcome.inserted, outcome.duplicates), (1, 1));
    assert!(!partition_exists(&s.db, &too_old));
}

fn partitions(db: &TestDb) -> i64 {
    use diesel::prelude::*;
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    diesel::sql_query(
        "SELECT count(*) AS n FROM pg_inherits WHERE inhparent = 'readings'::regclass",
    )
    .get_result::<Count>(&mut db.connect())
    .unwrap()
    .n
}

#[test]
fn database_errors_are_transient_only_when_the_database_cannot_serve_now() {
    use diesel::connection::SimpleConnection;
    let db = TestDb::migrated();
    let mut conn = db.connect();
    // bad input reaching the database is not an outage
    let nul = store::read::device(&mut conn, "a\0b").unwrap_err();
    assert!(!nul.is_transient(), "{nul}");
    let out_of_range = store::read::readings_page(
        &mut conn,
        &ReadingsQuery {
            device_id: "d".into(),
            before: Some((
                DateTime::from_timestamp(-300_000_000_000, 0).unwrap(),
                "x".into(),
            )),
            limit: 1,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(!out_of_range.is_transient(), "{out_of_range}");
    // a statement timeout is
    conn.batch_execute("SET statement_timeout = 50").unwrap();
    let slow = diesel::RunQueryDsl::execute(diesel::sql_query("SELECT pg_sleep(1)"), &mut conn)
        .map_err(store::StoreError::from)
        .unwrap_err();
    assert!(slow.is_transient(), "{slow}");
    // and so is a database that cannot be reached
    let Err(unreachable) = store::connect("postgres://postgres@127.0.0.1:1/none") else {
        panic!("connected to a closed port");
    };
    assert!(unreachable.is_transient(), "{unreachable}");
}

#[test]
fn devices_track_first_and_last_seen_and_metric_names() {
    let mut s = Store::new();
    let t = at("2026-11-25T10:00:00Z");
    s.write(&[reading("d1", "1", t, &[("t", 1.0)])]);
    s.write(&[
        reading("d1", "2", t - Duration::hours(1), &[("h", 1.0)]),
        reading(
            "d1",
            "3",
            t + Duration::hours(1),
            &[("t", 1.0), ("co2", 1.0)],
        ),
        reading("d0", "1", t, &[("x", 1.0)]),
    ]);
    let d1 = store::read::device(&mut s.conn, "d1").unwrap().unwrap();
    assert_eq!(d1.first_seen, t - Duration::hours(1));
    assert_eq!(d1.last_seen, t + Duration::hours(1));
    assert_eq!(
        d1.metrics,
        [Some("co2".into()), Some("h".into()), Some("t".into())]
    );
    let all = store::read::find_devices(&mut s.conn, None, None, 10).unwrap();
    assert_eq!(
        all.iter().map(|d| d.device_id.as_str()).collect::<Vec<_>>(),
        ["d0", "d1"]
    );
    let after = store::read::find_devices(&mut s.conn, None, Some("d0"), 10).unwrap();
    assert_eq!(after.len(), 1);
    assert!(
        store::read::device(&mut s.conn, "nobody")
            .unwrap()
            .is_none()
    );
}

#[test]
fn pages_follow_the_keyset_through_equal_timestamps() {
    let mut s = Store::new();
    let t = at("2026-11-25T10:00:00Z");
    // 5 readings at the same instant and 5 a second apart: ties must not be lost or repeated
    let mut batch: Vec<Reading> = (0..5)
        .map(|i| reading("d", &format!("same-{i}"), t, &[("t", i as f64)]))
        .collect();
    batch.extend((0..5).map(|i| {
        reading(
            "d",
            &format!("step-{i}"),
            t + Duration::seconds(i + 1),
            &[("t", 0.0)],
        )
    }));
    s.write(&batch);
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = store::read::readings_page(
            &mut s.conn,
            &ReadingsQuery {
                device_id: "d".into(),
                limit: 3,
                before: before.clone(),
                ..Default::default()
            },
        )
        .unwrap();
        if page.is_empty() {
            break;
        }
        before = page.last().map(|r| (r.ts, r.reading_id.clone()));
        seen.extend(page.into_iter().map(|r| r.reading_id));
    }
    assert_eq!(
        seen,
        [
            "step-4", "step-3", "step-2", "step-1", "step-0", "same-4", "same-3", "same-2",
            "same-1", "same-0"
        ]
    );
}

/// Metric `t` of device `d` in minutes over the hour from `t0`.
fn minute_series(db: &TestDb, t0: DateTime<Utc>, aggregate: Aggregate) -> Vec<store::read::Bucket> {
    store::read::series(
        &mut db.connect(),
        &SeriesQuery {
            device_id: "d".into(),
            metric: "t".into(),
            from: t0,
            to: t0 + Duration::hours(1),
            bucket_micros: 60_000_000,
            aggregate,
        },
    )
    .unwrap()
}

#[test]
fn latest_and_series_compute_exact_values() {
    let mut s = Store::new();
    let t0 = at("2026-11-25T10:00:00Z");
    let batch = vec![
        reading("d", "1", t0, &[("t", 1.0), ("h", 50.0)]),
        reading("d", "2", t0 + Duration::seconds(30), &[("t", 3.0)]),
        reading("d", "3", t0 + Duration::seconds(61), &[("t", 10.0)]),
        reading("d", "4", t0 + Duration::seconds(119), &[("t", 20.0)]),
        reading("d", "5", t0 + Duration::seconds(300), &[("h", 40.0)]),
        reading("other", "1", t0, &[("t", 1000.0)]),
    ];
    s.write(&batch);

    let latest = store::read::latest(&mut s.conn, "d").unwrap();
    let pairs: Vec<_> = latest
        .iter()
        .map(|v| (v.metric.as_str(), v.value, v.ts))
        .collect();
    assert_eq!(
        pairs,
        [
            ("h", 40.0, t0 + Duration::seconds(300)),
            ("t", 20.0, t0 + Duration::seconds(119))
        ]
    );

    let series = |aggregate| {
        minute_series(&s.db, t0, aggregate)
            .into_iter()
            .map(|b| (b.start, b.value.unwrap()))
            .collect::<Vec<_>>()
    };
    let minute = |m| t0 + Duration::minutes(m);
    for (aggregate, first, second) in [
        (Aggregate::Avg, 2.0, 15.0),
        (Aggregate::Min, 1.0, 10.0),
        (Aggregate::Max, 3.0, 20.0),
        (Aggregate::Sum, 4.0, 30.0),
        (Aggregate::Count, 2.0, 2.0),
    ] {
        assert_eq!(
            series(aggregate),
            [(minute(0), first), (minute(1), second)],
            "{aggregate:?}"
        );
    }

    // metrics whose newest reading is days older than the device's newest are found all the same
    s.write(&[reading("d", "6", t0 + Duration::days(3), &[("co2", 415.0)])]);
    let ids = ["d".to_owned(), "other".to_owned()];
    let latest: Vec<_> = store::read::latest_of(&mut s.conn, &ids)
        .unwrap()
        .into_iter()
        .map(|v| (v.device_id, v.metric, v.value))
        .collect();
    let expected = [
        ("d", "co2", 415.0),
        ("d", "h", 40.0),
        ("d", "t", 20.0),
        ("other", "t", 1000.0),
    ]
    .map(|(d, m, v)| (d.to_owned(), m.to_owned(), v));
    assert_eq!(latest, expected);
}

#[test]
fn sums_beyond_a_double_are_none_and_averages_of_huge_values_are_exact() {
    let mut s = Store::new();
    let t0 = at("2026-11-25T10:00:00Z");
    let batch = vec![
        reading("d", "1", t0, &[("t", 1e308)]),
        reading("d", "2", t0 + Duration::seconds(1), &[("t", 1e308)]),
        reading("d", "3", t0 + Duration::seconds(2), &[("t", f64::MAX)]),
        reading("d", "4", t0 + Duration::minutes(1), &[("t", -1e308)]),
        reading(
            "d",
            "5",
            t0 + Duration::minutes(1) + Duration::seconds(1),
            &[("t", 1e308)],
        ),
        reading("d", "6", t0 + Duration::minutes(2), &[("t", 0.1)]),
        reading(
            "d",
            "7",
            t0 + Duration::minutes(2) + Duration::seconds(1),
            &[("t", 0.2)],
        ),
    ];
    s.write(&batch);
    let series = |aggregate| {
        minute_series(&s.db, t0, aggregate)
            .into_iter()
            .map(|b| b.value)
            .collect::<Vec<_>>()
    };
    // minute 0 overflows a double; minute 1 cancels out exactly; minute 2 is exact in decimal
    assert_eq!(series(Aggregate::Sum), [None, Some(0.0), Some(0.3)]);
    let averages = series(Aggregate::Avg);
    assert_eq!(averages[1], Some(0.0));
    assert_eq!(averages[2], Some(0.15));
    let first = averages[0].unwrap();
    let expected = 1e308 / 3.0 * 2.0 + f64::MAX / 3.0;
    assert!((first - expected).abs() < 1e294, "{first} vs {expected}");
    assert_eq!(
        series(Aggregate::Max),
        [Some(f64::MAX), Some(1e308), Some(0.2)]
    );
    assert_eq!(series(Aggregate::Count), [Some(3.0), Some(2.0), Some(2.0)]);
}

#[test]
fn an_unmigrated_database_is_refused_with_the_command_that_fixes_it() {
    let db = TestDb::unmigrated();
    let mut conn = db.connect();
    let err = store::check_migrated(&mut conn).unwrap_err();
    assert!(err.to_string().contains("sensorctl migrate"), "{err}");
    assert!(!store::run_migrations(&mut conn).unwrap().is_empty());
    store::check_migrated(&mut conn).unwrap();
}

/// A dropped listener leaves no thread behind: once the drop returns, the thread, and the callback
/// with all it holds, are gone (one left polling PostgreSQL while its process exited crashed the
/// exit).
#[test]
fn a_dropped_listener_leaves_no_thread_behind() {
    use std::ops::ControlFlow;
    use std::sync::mpsc::{TryRecvError, channel};
    use store::listen::{APP_TOKENS_CHANNEL, ListenEvent, spawn_listener};

    let db = TestDb::migrated();
    let (events, heard) = channel();
    let listener = spawn_listener(db.url.clone(), APP_TOKENS_CHANNEL, "test", move |event| {
        let _ = events.send(event);
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(
        heard.recv_timeout(std::time::Duration::from_secs(10)),
        Ok(ListenEvent::Listening)
    );
    drop(listener);
    loop {
        match heard.try_recv() {
            Ok(_) => continue,
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => panic!("the listener's thread outlived its drop"),
        }
    }
}
