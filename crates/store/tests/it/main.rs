//! The store against a real PostgreSQL, a fresh migrated database per test.

use chrono::{DateTime, Duration, Utc};
use models::{DeviceId, MetricName, Metrics, Reading, ReadingId};
use store::read::{Aggregate, ReadingsQuery, SeriesQuery};
use store::{KnownPartitions, WriteOutcome, write_readings};
use testkit::TestDb;

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
    let db = TestDb::migrated();
    let mut conn = db.connect();
    let mut known = KnownPartitions::default();
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
    let first = write_readings(&mut conn, &batch, &mut known).unwrap();
    assert_eq!(
        first,
        WriteOutcome {
            inserted: 3,
            duplicates: 0
        }
    );
    // a redelivery of the same message, and a batch overlapping it
    let again = write_readings(&mut conn, &batch, &mut known).unwrap();
    assert_eq!(
        again,
        WriteOutcome {
            inserted: 0,
            duplicates: 3
        }
    );
    let overlap = vec![
        batch[0].clone(),
        reading("raspi-01", "c", t, &[("temperature", 1.0)]),
    ];
    let third = write_readings(&mut conn, &overlap, &mut known).unwrap();
    assert_eq!(
        third,
        WriteOutcome {
            inserted: 1,
            duplicates: 1
        }
    );
    assert_eq!(testkit::count_rows(&db.url, "readings"), 4);

    let page = store::read::readings_page(
        &mut conn,
        &ReadingsQuery {
            device_id: "raspi-01".into(),
            limit: 10,
            ..Default::default()
        },
    )
    .unwrap();
    let a = page.iter().find(|r| r.reading_id == "a").unwrap();
    assert_eq!(a.ts, t, "microseconds survive the round trip");
    assert_eq!(
        a.metrics,
        serde_json::json!({"humidity": 60.3, "temperature": 25.5})
    );
}

#[test]
fn a_reading_twice_in_one_batch_is_stored_once_and_the_batch_is_kept() {
    // The fast path (COPY) fails on the repeat; the batch must still be stored, by the slow path.
    let db = TestDb::migrated();
    let mut conn = db.connect();
    let mut known = KnownPartitions::default();
    let t = at("2026-11-25T10:00:00Z");
    let r = reading("raspi-01", "twice", t, &[("temperature", 20.0)]);
    let other = reading("raspi-02", "once", t, &[("humidity", 50.0)]);
    let outcome = write_readings(&mut conn, &[r.clone(), other, r], &mut known).unwrap();
    assert_eq!(
        outcome,
        WriteOutcome {
            inserted: 2,
            duplicates: 1
        }
    );
    assert_eq!(testkit::count_rows(&db.url, "readings"), 2);
    let devices = store::read::list_devices(&mut conn, None, 10).unwrap();
    assert_eq!(devices.len(), 2, "devices are updated on the slow path too");
}

#[test]
fn readings_in_new_months_get_their_partitions() {
    let db = TestDb::migrated();
    let mut conn = db.connect();
    let mut known = KnownPartitions::default();
    let batch = vec![
        reading("d", "1", at("2024-02-29T23:59:59Z"), &[("t", 1.0)]),
        reading("d", "2", at("2024-03-01T00:00:00Z"), &[("t", 2.0)]),
        reading("d", "3", at("2031-01-01T00:00:00Z"), &[("t", 3.0)]),
    ];
    write_readings(&mut conn, &batch, &mut known).unwrap();
    for partition in ["readings_2024_02", "readings_2024_03", "readings_2031_01"] {
        assert_eq!(testkit::count_rows(&db.url, partition), 1, "{partition}");
    }
    // a second writer that has not seen these months yet finds them existing
    write_readings(&mut conn, &batch, &mut KnownPartitions::default()).unwrap();
    assert_eq!(testkit::count_rows(&db.url, "readings"), 3);
}

#[test]
fn devices_track_first_and_last_seen_and_metric_names() {
    let db = TestDb::migrated();
    let mut conn = db.connect();
    let mut known = KnownPartitions::default();
    let t = at("2026-11-25T10:00:00Z");
    write_readings(
        &mut conn,
        &[reading("d1", "1", t, &[("t", 1.0)])],
        &mut known,
    )
    .unwrap();
    write_readings(
        &mut conn,
        &[
            reading("d1", "2", t - Duration::hours(1), &[("h", 1.0)]),
            reading(
                "d1",
                "3",
                t + Duration::hours(1),
                &[("t", 1.0), ("co2", 1.0)],
            ),
            reading("d0", "1", t, &[("x", 1.0)]),
        ],
        &mut known,
    )
    .unwrap();
    let d1 = store::read::device(&mut conn, "d1").unwrap().unwrap();
    assert_eq!(d1.first_seen, t - Duration::hours(1));
    assert_eq!(d1.last_seen, t + Duration::hours(1));
    assert_eq!(
        d1.metrics,
        [Some("co2".into()), Some("h".into()), Some("t".into())]
    );
    let all = store::read::list_devices(&mut conn, None, 10).unwrap();
    assert_eq!(
        all.iter().map(|d| d.device_id.as_str()).collect::<Vec<_>>(),
        ["d0", "d1"]
    );
    let after = store::read::list_devices(&mut conn, Some("d0"), 10).unwrap();
    assert_eq!(after.len(), 1);
    assert!(store::read::device(&mut conn, "nobody").unwrap().is_none());
}

#[test]
fn pages_follow_the_keyset_through_equal_timestamps() {
    let db = TestDb::migrated();
    let mut conn = db.connect();
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
    write_readings(&mut conn, &batch, &mut KnownPartitions::default()).unwrap();
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = store::read::readings_page(
            &mut conn,
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

#[test]
fn latest_and_series_compute_exact_values() {
    let db = TestDb::migrated();
    let mut conn = db.connect();
    let t0 = at("2026-11-25T10:00:00Z");
    let batch = vec![
        reading("d", "1", t0, &[("t", 1.0), ("h", 50.0)]),
        reading("d", "2", t0 + Duration::seconds(30), &[("t", 3.0)]),
        reading("d", "3", t0 + Duration::seconds(61), &[("t", 10.0)]),
        reading("d", "4", t0 + Duration::seconds(119), &[("t", 20.0)]),
        reading("d", "5", t0 + Duration::seconds(300), &[("h", 40.0)]),
        reading("other", "1", t0, &[("t", 1000.0)]),
    ];
    write_readings(&mut conn, &batch, &mut KnownPartitions::default()).unwrap();

    let latest = store::read::latest(&mut conn, "d").unwrap();
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
        .into_iter()
        .map(|b| (b.start, b.value))
        .collect::<Vec<_>>()
    };
    let minute = |m| t0 + Duration::minutes(m);
    assert_eq!(
        series(Aggregate::Avg),
        [(minute(0), 2.0), (minute(1), 15.0)]
    );
    assert_eq!(
        series(Aggregate::Min),
        [(minute(0), 1.0), (minute(1), 10.0)]
    );
    assert_eq!(
        series(Aggregate::Max),
        [(minute(0), 3.0), (minute(1), 20.0)]
    );
    assert_eq!(
        series(Aggregate::Sum),
        [(minute(0), 4.0), (minute(1), 30.0)]
    );
    assert_eq!(
        series(Aggregate::Count),
        [(minute(0), 2.0), (minute(1), 2.0)]
    );
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
