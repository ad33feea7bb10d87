//! Retention against a real PostgreSQL: what each rule removes, and nothing else.

use chrono::{DateTime, Duration, DurationRound, Utc};
use diesel::prelude::*;
use store::retention::{self, Keep, Table, Target};

use super::{Store, day_partition, month_partition, partition_exists, reading};

fn set(s: &mut Store, table: Table, keep: &str, device: Option<&str>, metric: Option<&str>) {
    let target = Target::new(table, device, metric).unwrap();
    retention::set(&mut s.conn, &target, Keep::parse(keep).unwrap()).unwrap();
}

/// A fixed "now" at noon today: readings at 06:00 of a day are then older than a cutoff of whole
/// days from now, whatever the time the test runs.
fn noon() -> DateTime<Utc> {
    day_partition(0).1 + Duration::hours(12)
}

fn rows_of(s: &Store, device: &str) -> i64 {
    s.rows(&format!("readings WHERE device_id = '{device}'"))
}

/// Writes one reading at 06:00 of each of `days` (relative to today) for each of `devices`.
fn write_days(s: &mut Store, devices: &[&str], days: &[i64]) {
    let batch: Vec<_> = devices
        .iter()
        .flat_map(|device| {
            days.iter().map(move |day| {
                reading(
                    device,
                    &format!("{day}"),
                    day_partition(*day).1 + Duration::hours(6),
                    &[("t", 1.0)],
                )
            })
        })
        .collect();
    s.write(&batch);
}

#[test]
fn whole_days_and_months_past_the_cutoff_are_dropped_and_nothing_else() {
    let mut s = Store::daily();
    // a month partitioned before daily partitions, all of it older than 30 days
    let (month, month_start) = month_partition(-3);
    testkit::execute(
        &mut s.conn,
        &format!(
            "CREATE TABLE {month} PARTITION OF readings FOR VALUES FROM ('{month_start}') TO ('{}')",
            month_partition(-2).1
        ),
    );
    let days = [-40, -35, -31, -30, -29, -5, -1, 0];
    write_days(&mut s, &["a", "b"], &days);
    s.write(&[
        reading("a", "m", month_start + Duration::days(2), &[("t", 1.0)]),
        // held by the default partition (older than the backfill horizon)
        reading("b", "x", noon() - Duration::days(400), &[("t", 1.0)]),
    ]);
    assert_eq!(s.rows("readings"), 18);
    let now = noon();

    // the shipped policy keeps everything
    assert!(retention::apply(&mut s.conn, now).unwrap().is_empty());
    assert_eq!(s.rows("readings"), 18);

    set(&mut s, Table::Raw, "30d", None, None);
    let report = retention::apply(&mut s.conn, now).unwrap();
    let mut dropped: Vec<String> = [-40, -35, -31].map(|d| day_partition(d).0).into();
    dropped.push(month.clone());
    dropped.sort();
    let mut got = report.partitions_dropped.clone();
    got.sort();
    assert_eq!(got, dropped);
    assert!(report.partitions_skipped.is_empty());
    // day -30 ends after the cutoff (noon 30 days ago), so it stays and its 06:00 readings are
    // deleted one by one, as is the default partition's old reading
    assert_eq!(report.rows_deleted.raw, 3);
    assert!(partition_exists(&s.db, &day_partition(-30).0));
    for name in &dropped {
        assert!(!partition_exists(&s.db, name), "{name}");
    }
    // kept: days -29, -5, -1 and today, of both devices
    assert_eq!(rows_of(&s, "a"), 4);
    assert_eq!(rows_of(&s, "b"), 4);
    assert_eq!(s.rows("readings_default"), 0);

    // applying again removes nothing
    let again = retention::apply(&mut s.conn, now).unwrap();
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(s.rows("readings"), 8);
}

#[test]
fn a_device_keeping_longer_stops_drops_and_shorter_devices_lose_only_their_old_rows() {
    let mut s = Store::daily();
    let days = [-60, -40, -5, -1];
    write_days(&mut s, &["long", "short", "other", "brief"], &days);
    set(&mut s, Table::Raw, "30d", None, None);
    set(&mut s, Table::Raw, "90d", Some("long"), None);
    set(&mut s, Table::Raw, "3d", Some("brief"), None);
    let now = noon();
    let report = retention::apply(&mut s.conn, now).unwrap();
    assert_eq!(report.partitions_dropped, Vec::<String>::new());
    for day in days {
        assert!(partition_exists(&s.db, &day_partition(day).0), "{day}");
    }
    // short and other: days -60 and -40 (global 30d); brief: all but -1 (3d); long: nothing
    assert_eq!(report.rows_deleted.raw, 2 + 2 + 3);
    assert_eq!(rows_of(&s, "long"), 4);
    assert_eq!(rows_of(&s, "short"), 2);
    assert_eq!(rows_of(&s, "other"), 2);
    assert_eq!(rows_of(&s, "brief"), 1);
    assert!(retention::apply(&mut s.conn, now).unwrap().is_empty());

    // the override removed, the global default applies to that device again: its two oldest days
    // go by rows, and no partition can go while long keeps 90 days
    let target = Target::override_of(Table::Raw, Some("long"), None).unwrap();
    assert!(retention::unset(&mut s.conn, &target).unwrap());
    assert!(!retention::unset(&mut s.conn, &target).unwrap());
    let report = retention::apply(&mut s.conn, now).unwrap();
    // every device now keeps at most 30 days: the days -60 and -40 are dropped whole
    let mut got = report.partitions_dropped.clone();
    got.sort();
    let mut want: Vec<String> = [-60, -40].map(|d| day_partition(d).0).into();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(report.rows_deleted.raw, 0);
    assert_eq!(rows_of(&s, "long"), 2);
    assert_eq!(s.rows("readings"), 2 + 2 + 2 + 1);
}

fn rollup(s: &mut Store, table: &str, device: &str, metric: &str, bucket: DateTime<Utc>) {
    diesel::sql_query(format!(
        "INSERT INTO {table} (device_id, metric, bucket, count, sum, min, max, first_ts, last_ts)
         VALUES ($1, $2, $3, 1, 1, 1, 1, $3, $3)"
    ))
    .bind::<diesel::sql_types::Text, _>(device)
    .bind::<diesel::sql_types::Text, _>(metric)
    .bind::<diesel::sql_types::Timestamptz, _>(bucket)
    .execute(&mut s.conn)
    .unwrap();
}

fn buckets_of(s: &Store, table: &str, device: &str, metric: &str) -> i64 {
    s.rows(&format!(
        "{table} WHERE device_id = '{device}' AND metric = '{metric}'"
    ))
}

#[test]
fn rollups_lose_whole_buckets_per_rule_the_most_specific_winning() {
    let mut s = Store::new();
    let now = noon() + Duration::minutes(30);
    let hour = now.duration_trunc(Duration::hours(1)).unwrap();
    let ages = [30, 15, 7, 3, 1];
    for device in ["d", "e"] {
        for metric in ["t", "co2"] {
            for age in ages {
                rollup(
                    &mut s,
                    "rollups_1h",
                    device,
                    metric,
                    hour - Duration::days(age),
                );
            }
            rollup(
                &mut s,
                "rollups_1m",
                device,
                metric,
                hour - Duration::days(3),
            );
            rollup(
                &mut s,
                "rollups_1m",
                device,
                metric,
                hour - Duration::hours(1),
            );
            rollup(
                &mut s,
                "rollups_1d",
                device,
                metric,
                hour - Duration::days(900),
            );
        }
    }
    set(&mut s, Table::H1, "10d", None, None);
    set(&mut s, Table::H1, "20d", Some("d"), None);
    set(&mut s, Table::H1, "5d", None, Some("co2"));
    set(&mut s, Table::H1, "forever", Some("d"), Some("co2"));
    set(&mut s, Table::M1, "2d", None, None);
    set(&mut s, Table::Raw, "12h", Some("e"), None);

    let report = retention::apply(&mut s.conn, now).unwrap();
    // 1h: (e, t) keeps 10 days: 3 of 5 buckets; (e, co2) 5 days: 2; (d, t) 20 days: 4; (d, co2) all
    assert_eq!(buckets_of(&s, "rollups_1h", "e", "t"), 3);
    assert_eq!(buckets_of(&s, "rollups_1h", "e", "co2"), 2);
    assert_eq!(buckets_of(&s, "rollups_1h", "d", "t"), 4);
    assert_eq!(buckets_of(&s, "rollups_1h", "d", "co2"), 5);
    assert_eq!(report.rows_deleted.h1, 2 + 3 + 1);
    // 1m: 2 days everywhere; 1d: forever
    assert_eq!(report.rows_deleted.m1, 4);
    assert_eq!(s.rows("rollups_1m"), 4);
    assert_eq!(report.rows_deleted.d1, 0);
    assert_eq!(s.rows("rollups_1d"), 4);
    assert!(retention::apply(&mut s.conn, now).unwrap().is_empty());

    // horizons: where each table is complete from, for one device's metric
    let h = |s: &mut Store, device: &str, metric: &str| {
        retention::horizons(&mut s.conn, device, metric, now).unwrap()
    };
    let minute = |t: DateTime<Utc>| t.duration_trunc(Duration::minutes(1)).unwrap();
    let hour_of = |t: DateTime<Utc>| t.duration_trunc(Duration::hours(1)).unwrap();
    let e_t = h(&mut s, "e", "t");
    assert_eq!(e_t.raw, Some(now - Duration::hours(12)));
    assert_eq!(e_t.m1, Some(minute(now - Duration::days(2))));
    assert_eq!(e_t.h1, Some(hour_of(now - Duration::days(10))));
    assert_eq!(e_t.d1, None);
    assert_eq!(
        h(&mut s, "e", "co2").h1,
        Some(hour_of(now - Duration::days(5)))
    );
    let d_t = h(&mut s, "d", "t");
    assert_eq!(d_t.h1, Some(hour_of(now - Duration::days(20))));
    assert_eq!(d_t.raw, None);
    assert_eq!(h(&mut s, "d", "co2").h1, None);
    assert_eq!(
        h(&mut s, "x", "co2").h1,
        Some(hour_of(now - Duration::days(5)))
    );
}

#[test]
fn the_policy_refuses_what_it_cannot_honour() {
    let mut s = Store::new();
    let e = Target::new(Table::Raw, None, Some("t")).unwrap_err();
    assert_eq!(e.field, "metric");
    assert!(e.reason.contains("per metric"), "{e}");
    assert_eq!(
        Target::new(Table::H1, Some("bad id!"), None)
            .unwrap_err()
            .field,
        "device"
    );
    assert_eq!(Table::parse("2h").unwrap_err().field, "table");
    assert_eq!(
        Target::override_of(Table::M1, None, None)
            .unwrap_err()
            .field,
        "device"
    );
    // nor does the database take one
    let refused = diesel::sql_query(
        "INSERT INTO retention_policy (table_name, metric, keep_hours) VALUES ('raw', 't', 1)",
    )
    .execute(&mut s.conn);
    assert!(refused.is_err());
    // shipped: forever everywhere
    let rules = retention::show(&mut s.conn).unwrap();
    assert_eq!(rules.len(), 4);
    assert!(
        rules
            .iter()
            .all(|r| r.keep == Keep::Forever && r.scope() == "global")
    );
}

#[test]
fn a_partition_whose_lock_is_not_had_in_time_is_left_for_the_next_run() {
    let mut s = Store::daily();
    write_days(&mut s, &["a"], &[-41, -40, -1]);
    set(&mut s, Table::Raw, "30d", None, None);
    // a long reader of readings: DETACH must wait for it, and gives up after its lock timeout,
    // trying no other partition in that run (nor emptying them row by row)
    let mut reader = s.db.connect();
    testkit::execute(&mut reader, "BEGIN; SELECT count(*) FROM readings;");
    let due = [day_partition(-41).0, day_partition(-40).0];
    let report = retention::apply(&mut s.conn, noon()).unwrap();
    assert_eq!(report.partitions_skipped, due);
    assert!(report.is_empty(), "{report:?}");
    assert_eq!(s.rows("readings"), 3);
    testkit::execute(&mut reader, "COMMIT");
    let report = retention::apply(&mut s.conn, noon()).unwrap();
    assert_eq!(report.partitions_dropped, due);
    assert_eq!(s.rows("readings"), 1);
}
