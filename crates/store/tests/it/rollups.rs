//! Rollups against a real PostgreSQL: every summary equals what the raw readings give, through
//! repeats, conflicts, late readings, folds and rebuilds; and series answer the same from either.

use chrono::{DateTime, Duration, Utc};
use diesel::PgConnection;
use store::read::{Aggregate, SeriesQuery};
use store::rollups::{self, Table};

use crate::{Store, at, reading};

fn assert_exact(conn: &mut PgConnection) {
    let differences = rollups::verify(
        conn,
        None,
        at("2026-01-01T00:00:00Z"),
        at("2027-01-01T00:00:00Z"),
        10,
    )
    .unwrap();
    assert!(differences.is_empty(), "{differences:#?}");
}

fn fold_all(conn: &mut PgConnection) {
    while rollups::fold(conn, 7).unwrap() == Some(7) {}
}

/// Values whose decimal sums a float sum would get wrong, huge and tiny ones, and whole numbers
/// written with a fraction.
const VALUES: [f64; 8] = [0.1, 0.2, 0.3, 1.0, 1e300, -1e300, 5e-324, 21.5];

fn day_of_readings(device: &str, prefix: &str, t0: DateTime<Utc>) -> Vec<models::Reading> {
    (0..40)
        .map(|i| {
            reading(
                device,
                &format!("{prefix}-{i}"),
                t0 + Duration::seconds(i64::from(i) * 997),
                &[
                    ("t", VALUES[i as usize % VALUES.len()]),
                    ("h", f64::from(i)),
                ],
            )
        })
        .collect()
}

#[test]
fn summaries_equal_the_raw_readings_through_repeats_conflicts_late_readings_and_folds() {
    let mut s = Store::new();
    let t0 = at("2026-11-20T22:10:00.5Z");
    let batch = day_of_readings("d1", "a", t0);
    s.write(&batch[..20]);
    s.write(&batch[20..]);
    // half folded, half not: readers and verify add the deltas not folded yet
    assert_eq!(rollups::fold(&mut s.conn, 1).unwrap(), Some(1));
    assert_eq!(s.rows("rollup_deltas"), 1);
    assert_exact(&mut s.conn);

    // the same batch again (a redelivery) and with one reading changed (a conflict): nothing counted
    s.write(&batch);
    let mut conflicting = batch[..3].to_vec();
    conflicting[0] = reading("d1", "a-0", t0, &[("t", 99.0)]);
    s.write(&conflicting);
    // late readings of another day, a week back, and a backfill of a second device mixed with repeats
    let mut late = day_of_readings("d1", "late", t0 - Duration::days(7));
    late.extend(day_of_readings("d2", "b", t0 - Duration::hours(30)));
    late.extend(batch[10..20].iter().cloned());
    s.write(&late);
    assert_exact(&mut s.conn);
    fold_all(&mut s.conn);
    assert_exact(&mut s.conn);
    assert_eq!(s.rows("rollup_deltas"), 0);

    // the counts are the stored readings', no more
    let mut conn = s.db.connect();
    let minute_counts: i64 = diesel::RunQueryDsl::get_result::<Count>(
        diesel::sql_query("SELECT sum(count)::bigint AS n FROM rollups_1m WHERE metric = 't'"),
        &mut conn,
    )
    .unwrap()
    .n;
    assert_eq!(minute_counts, s.rows("readings"));
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

#[test]
fn series_give_the_numbers_of_the_raw_readings_whichever_table_answers() {
    let mut s = Store::new();
    let t0 = at("2026-11-10T13:47:12.25Z");
    let mut readings = Vec::new();
    for day in 0..4 {
        readings.extend(day_of_readings(
            "d",
            &format!("r{day}"),
            t0 + Duration::hours(29 * day),
        ));
    }
    s.write(&readings);
    fold_all(&mut s.conn);
    // and some not folded
    s.write(&day_of_readings("d", "fresh", t0 + Duration::hours(50)));

    let aggregates = [
        Aggregate::Avg,
        Aggregate::Min,
        Aggregate::Max,
        Aggregate::Sum,
        Aggregate::Count,
    ];
    for (bucket, from, to, source) in [
        (
            Duration::days(1),
            t0 - Duration::hours(3),
            t0 + Duration::days(6),
            Table::D1,
        ),
        (Duration::hours(2), t0, t0 + Duration::days(3), Table::H1),
        (Duration::minutes(30), t0, t0 + Duration::days(2), Table::M1),
        (
            Duration::seconds(20),
            t0,
            t0 + Duration::days(1),
            Table::Raw,
        ),
    ] {
        let query = SeriesQuery {
            device_id: "d".into(),
            metric: "t".into(),
            from,
            to,
            bucket_micros: bucket.num_microseconds().unwrap(),
            aggregate: Aggregate::Avg,
        };
        let answer = store::read::series_of(&mut s.conn, &query, &aggregates).unwrap();
        assert_eq!(answer.source, source, "{bucket}");
        assert_eq!(answer.buckets, raw_series(&mut s.conn, &query), "{bucket}");
        assert!(!answer.buckets.is_empty());
    }
}

/// The series as the raw readings give it, computed here from them directly.
fn raw_series(conn: &mut PgConnection, q: &SeriesQuery) -> Vec<store::read::Buckets> {
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Timestamptz)]
        start: DateTime<Utc>,
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Double>)]
        avg: Option<f64>,
        #[diesel(sql_type = diesel::sql_types::Double)]
        min: f64,
        #[diesel(sql_type = diesel::sql_types::Double)]
        max: f64,
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Double>)]
        sum: Option<f64>,
        #[diesel(sql_type = diesel::sql_types::Double)]
        count: f64,
    }
    use diesel::sql_types::{Interval, Text, Timestamptz};
    let rows: Vec<Row> = diesel::RunQueryDsl::load(
        diesel::sql_query(
            "SELECT date_bin($1, ts, TIMESTAMPTZ '2000-01-03 00:00:00+00') AS start,
                    avg((metrics -> 't')::numeric)::float8 AS avg,
                    min((metrics ->> 't')::float8) AS min, max((metrics ->> 't')::float8) AS max,
                    CASE WHEN abs(sum((metrics -> 't')::numeric)) <= 1.7976931348623157e308
                         THEN sum((metrics -> 't')::numeric)::float8 END AS sum,
                    count(*)::float8 AS count
             FROM readings WHERE device_id = $2 AND ts >= $3 AND ts < $4 AND metrics ? 't'
             GROUP BY 1 ORDER BY 1",
        )
        .bind::<Interval, _>(diesel::pg::data_types::PgInterval::from_microseconds(
            q.bucket_micros,
        ))
        .bind::<Text, _>(&q.device_id)
        .bind::<Timestamptz, _>(q.from)
        .bind::<Timestamptz, _>(q.to),
        conn,
    )
    .unwrap();
    rows.into_iter()
        .map(|r| store::read::Buckets {
            start: r.start,
            values: vec![r.avg, Some(r.min), Some(r.max), r.sum, Some(r.count)],
        })
        .collect()
}

#[test]
fn a_rebuild_recomputes_a_day_from_the_raw_readings_and_keeps_what_came_after() {
    let mut s = Store::new();
    let t0 = at("2026-11-12T08:00:00Z");
    s.write(&day_of_readings("d", "a", t0));
    s.write(&day_of_readings("e", "a", t0));
    fold_all(&mut s.conn);
    // a reading changed by hand: the summaries no longer match
    testkit::execute(
        &mut s.conn,
        "UPDATE readings SET metrics = '{\"t\": 5.5}' WHERE device_id = 'd' AND reading_id = 'a-3'",
    );
    assert!(
        !rollups::verify(&mut s.conn, None, t0, t0 + Duration::days(1), 10)
            .unwrap()
            .is_empty()
    );
    // readings written after the rebuild's snapshot stay counted: their deltas are folded later
    s.write(&day_of_readings("d", "later", t0 + Duration::minutes(7)));
    let days =
        rollups::days_with_readings(&mut s.conn, Some("d"), t0, t0 + Duration::days(3)).unwrap();
    assert_eq!(days.len(), 1);
    rollups::rebuild_day(&mut s.conn, Some("d"), days[0]).unwrap();
    s.write(&day_of_readings("d", "after", t0 + Duration::minutes(9)));
    assert_exact(&mut s.conn);
    fold_all(&mut s.conn);
    assert_exact(&mut s.conn);
    // another device's summaries were not touched, and are still right
    rollups::rebuild_day(&mut s.conn, None, days[0]).unwrap();
    assert_exact(&mut s.conn);
}

#[test]
fn past_the_raw_retention_series_come_from_the_summaries_with_the_same_numbers() {
    use store::retention::{Keep, Target};
    let mut s = Store::new();
    let t0 = Utc::now() - Duration::days(5);
    s.write(&day_of_readings("d", "old", t0));
    s.write(&day_of_readings(
        "d",
        "new",
        Utc::now() - Duration::hours(12),
    ));
    fold_all(&mut s.conn);
    let query = SeriesQuery {
        device_id: "d".into(),
        metric: "t".into(),
        from: t0 - Duration::days(1),
        to: Utc::now(),
        bucket_micros: Duration::hours(1).num_microseconds().unwrap(),
        aggregate: Aggregate::Avg,
    };
    let aggregates = [Aggregate::Avg, Aggregate::Count, Aggregate::Sum];
    let before = store::read::series_of(&mut s.conn, &query, &aggregates).unwrap();
    assert_eq!(before.source, Table::H1);

    // raw readings kept 2 days: the old day's are removed, its summaries stay
    let raw = Target::new(Table::Raw, None, None).unwrap();
    store::retention::set(&mut s.conn, &raw, Keep::parse("2d").unwrap()).unwrap();
    store::retention::apply(&mut s.conn, Utc::now()).unwrap();
    assert_eq!(s.rows("readings"), 40);
    let after = store::read::series_of(&mut s.conn, &query, &aggregates).unwrap();
    // the range starts before the raw retention: whole hours only, never partial raw data
    assert_eq!(after.source, Table::H1);
    assert_eq!(after.buckets, before.buckets);
    // and a rebuild leaves the days retention has begun on alone
    let days =
        rollups::days_with_readings(&mut s.conn, None, t0 - Duration::days(1), Utc::now()).unwrap();
    assert!(days.iter().all(|d| *d > t0), "{days:?}");
}

#[test]
fn an_average_nearer_zero_than_a_double_can_hold_is_zero_not_an_error() {
    let mut s = Store::new();
    let t0 = at("2026-11-10T10:00:00Z");
    s.write(&[
        reading("d", "a", t0, &[("t", 5e-324)]),
        reading("d", "b", t0 + Duration::seconds(1), &[("t", 0.0)]),
        reading("d", "c", t0 + Duration::seconds(2), &[("t", 0.0)]),
    ]);
    for (bucket, source) in [
        (Duration::minutes(1), Table::M1),
        (Duration::seconds(10), Table::Raw),
    ] {
        let query = SeriesQuery {
            device_id: "d".into(),
            metric: "t".into(),
            from: t0,
            to: t0 + Duration::minutes(1),
            bucket_micros: bucket.num_microseconds().unwrap(),
            aggregate: Aggregate::Avg,
        };
        let answer =
            store::read::series_of(&mut s.conn, &query, &[Aggregate::Avg, Aggregate::Sum]).unwrap();
        assert_eq!(answer.source, source);
        assert_eq!(answer.buckets[0].values, [Some(0.0), Some(5e-324)]);
    }
}
