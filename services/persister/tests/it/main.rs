//! The persister against real RabbitMQ and PostgreSQL: its own database and queue names per test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first thing that is not as it must be"
)]

use std::time::Duration;

use bus::lapin::BasicProperties;
use bus::lapin::options::{BasicGetOptions, BasicPublishOptions};
use bus::{Publisher, Topology};
use models::Reading;
use persister::{Persister, Settings};
use testkit::spawn::{self, Running};
use testkit::{AmqpPrefix, TestDb, count_rows, eventually};

mod commands;

const WAIT: Duration = Duration::from_secs(60);

/// One test's database and queue names (deleted when it is dropped).
struct Fixture {
    db: TestDb,
    prefix: AmqpPrefix,
    topology: Topology,
}

impl Fixture {
    fn new() -> Self {
        service_kit::telemetry::init_for_tests();
        let prefix = AmqpPrefix::new("persister-test");
        Self {
            db: TestDb::migrated(),
            topology: Topology::with_prefix(&prefix),
            prefix,
        }
    }

    /// A fixture with the persister running on it and a publisher to its queue, as most tests
    /// start.
    async fn running() -> (Self, Running, Publisher) {
        let f = Self::new();
        let running = spawn::persister(&f.settings()).await;
        let publisher = f.publisher().await;
        (f, running, publisher)
    }

    fn settings(&self) -> Settings {
        spawn::persister_settings(&self.db.url, &self.prefix)
    }

    /// The persister's own binary, with this fixture's database and queues.
    fn binary(&self, batch_max_readings: usize) -> spawn::Binary {
        spawn::Binary::start(
            env!("CARGO_BIN_EXE_persister"),
            &[
                ("DATABASE_URL", self.db.url.clone()),
                ("AMQP_URL", testkit::amqp_url()),
                ("AMQP_PREFIX", self.prefix.to_string()),
                ("BATCH_MAX_READINGS", batch_max_readings.to_string()),
            ],
        )
    }

    async fn publisher(&self) -> Publisher {
        testkit::connected_publisher(
            &self.topology,
            testkit::publisher_settings(),
            "persister-test",
        )
        .await
    }

    fn stored(&self) -> i64 {
        count_rows(&self.db.url, "readings")
    }

    async fn wait_stored(&self, expected: i64) {
        testkit::wait_for_exactly(&self.db.url, "readings", expected, WAIT).await;
    }

    /// Waits until the persisters have folded every rollup delta, then checks that every summary
    /// equals what the stored readings give.
    async fn wait_folded(&self) {
        let url = self.db.url.clone();
        eventually(WAIT, "every rollup delta folded", || {
            let url = url.clone();
            async move { (count_rows(&url, "rollup_deltas") == 0).then_some(()) }
        })
        .await;
        let mut conn = self.db.connect();
        let differences = store::rollups::verify(
            &mut conn,
            None,
            "2026-11-01T00:00:00Z".parse().unwrap(),
            "2027-01-01T00:00:00Z".parse().unwrap(),
            10,
        )
        .unwrap();
        assert!(differences.is_empty(), "{differences:#?}");
        assert!(count_rows(&self.db.url, "rollups_1d") > 0);
    }

    async fn channel(&self) -> (bus::lapin::Connection, bus::lapin::Channel) {
        let conn = bus::connect(&testkit::amqp_url(), "persister-test")
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        bus::declare_topology(&channel, &self.topology)
            .await
            .unwrap();
        (conn, channel)
    }
}

/// `n` readings of `device`, ids `{tag}-{i}`, one second apart.
fn readings(device: &str, tag: &str, n: usize) -> Vec<Reading> {
    let items: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"device_id":"{device}","id":"{tag}-{i}","ts":{},"metrics":{{"t":{i}.25,"h":-{i}}}}}"#,
                1_795_000_000_000u64 + i as u64 * 1000
            )
        })
        .collect();
    models::parse_readings_body(
        format!("[{}]", items.join(",")).as_bytes(),
        models::TimeWindow::new(chrono::Utc::now(), models::BackfillHorizon::DEFAULT),
    )
    .unwrap()
}

#[tokio::test]
async fn readings_are_stored_exactly_and_an_undecodable_message_is_dead_lettered() {
    let (f, running, publisher) = Fixture::running().await;
    let (_conn, channel) = f.channel().await;

    publisher
        .publish(readings("raspi-01", "a", 3))
        .await
        .unwrap();
    // a message no persister can read, between two good ones
    channel
        .basic_publish(
            f.topology.readings_exchange.as_str().into(),
            bus::READINGS_ROUTING_KEY.into(),
            BasicPublishOptions::default(),
            b"this is not a reading batch",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    publisher
        .publish(readings("raspi-02", "b", 2))
        .await
        .unwrap();

    f.wait_stored(5).await;
    let page = testkit::stored_readings(&f.db.url, "raspi-01", 10);
    assert_eq!(page.len(), 3);
    assert_eq!(page[0].reading_id, "a-2");
    assert_eq!(page[0].metrics, serde_json::json!({"h": -2.0, "t": 2.25}));
    assert_eq!(page[0].ts.timestamp_millis(), 1_795_000_002_000);

    let dead = eventually(WAIT, "the dead letter", || async {
        channel
            .basic_get(
                f.topology.dead_readings_queue.as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
    })
    .await;
    assert_eq!(dead.delivery.data, b"this is not a reading batch");
    let headers = dead.delivery.properties.headers().clone().unwrap();
    let reason = headers.inner()["x-sensorhub-reason"]
        .as_long_string()
        .unwrap()
        .to_string();
    assert!(reason.starts_with("malformed message"), "{reason}");
    let text = running.metrics().await;
    assert_eq!(
        testkit::metric(
            &text,
            "sensorhub_messages_dead_lettered_total{reason=\"malformed\"}"
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        testkit::metric(&text, "sensorhub_readings_stored_total"),
        5.0
    );

    running.stop().await;
    publisher.close().await;
}

#[tokio::test]
async fn a_reading_delivered_twice_is_stored_once() {
    let (f, running, publisher) = Fixture::running().await;
    let batch = readings("raspi-01", "dup", 50);
    publisher.publish(batch.clone()).await.unwrap();
    publisher.publish(batch[10..20].to_vec()).await.unwrap();
    publisher.publish(batch).await.unwrap();
    f.wait_stored(50).await;
    let text = running
        .metrics_reaching("sensorhub_readings_duplicate_total", 60.0, WAIT)
        .await;
    assert_eq!(
        testkit::metric(&text, "sensorhub_readings_duplicate_total"),
        60.0
    );
    f.wait_folded().await;
    running.stop().await;
    publisher.close().await;
}

/// `device`'s reading `id` without a time of its own, as an ingest service makes it at `now`.
fn untimed(device: &str, id: &str, value: f64, now: chrono::DateTime<chrono::Utc>) -> Vec<Reading> {
    models::parse_readings_body(
        format!(r#"{{"device_id":"{device}","id":"{id}","metrics":{{"t":{value}}}}}"#).as_bytes(),
        models::TimeWindow::new(now, models::BackfillHorizon::DEFAULT),
    )
    .unwrap()
}

#[tokio::test]
async fn a_reading_queued_again_with_another_time_is_stored_once_and_a_conflict_is_counted() {
    // Two ingest attempts of one reading (a redelivery from the broker, a retry), stamped by the
    // server a few seconds apart; then the same id with another value.
    let (f, running, publisher) = Fixture::running().await;
    let now = chrono::Utc::now();
    publisher
        .publish(untimed("raspi-01", "r-1", 20.0, now))
        .await
        .unwrap();
    let later = now + chrono::Duration::seconds(3);
    publisher
        .publish(untimed("raspi-01", "r-1", 20.0, later))
        .await
        .unwrap();
    publisher
        .publish(untimed("raspi-01", "r-1", 21.0, later))
        .await
        .unwrap();
    let text = running
        .metrics_reaching("sensorhub_readings_conflicting_total", 1.0, WAIT)
        .await;
    assert_eq!(
        testkit::metric(&text, "sensorhub_readings_stored_total"),
        1.0
    );
    assert_eq!(
        testkit::metric(&text, "sensorhub_readings_duplicate_total"),
        1.0
    );
    assert_eq!(
        testkit::metric(&text, "sensorhub_readings_conflicting_total"),
        1.0
    );
    assert_eq!(f.stored(), 1);
    assert_eq!(testkit::count_rows(&f.db.url, "reading_conflicts"), 1);
    running.stop().await;
    publisher.close().await;
}

#[tokio::test]
async fn a_database_outage_is_waited_out_and_nothing_is_lost() {
    let (f, running, publisher) = Fixture::running().await;
    publisher
        .publish(readings("d", "before", 10))
        .await
        .unwrap();
    f.wait_stored(10).await;

    // This test's database goes away (others' stay): no new connections, existing ones killed.
    let mut admin = store::connect(&testkit::admin_database_url()).unwrap();
    let outage = format!(
        "ALTER DATABASE \"{0}\" ALLOW_CONNECTIONS false; \
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{0}'",
        f.db.name
    );
    testkit::execute(&mut admin, &outage);
    for i in 0..5 {
        publisher
            .publish(readings("d", &format!("during{i}"), 20))
            .await
            .unwrap();
    }
    eventually(WAIT, "readiness to report the database", || async {
        (running.readyz().await == 503).then_some(())
    })
    .await;
    // the outage lasts until the persister has tried to write and failed
    running
        .metrics_reaching("sensorhub_write_failures_total", 1.0, WAIT)
        .await;

    testkit::execute(
        &mut admin,
        &format!("ALTER DATABASE \"{}\" ALLOW_CONNECTIONS true", f.db.name),
    );
    f.wait_stored(110).await;
    eventually(WAIT, "readiness to recover", || async {
        (running.readyz().await == 200).then_some(())
    })
    .await;
    let text = running.metrics().await;
    assert!(
        testkit::metric(&text, "sensorhub_write_failures_total") >= 1.0,
        "{text}"
    );
    running.stop().await;
    publisher.close().await;
}

#[tokio::test]
async fn a_persister_killed_mid_stream_loses_nothing() {
    let f = Fixture::new();
    let publisher = f.publisher().await;
    let mut first = f.binary(500);
    // 200 messages of 100 readings, published while the persister works through them
    let sender = {
        let publisher = publisher.clone();
        tokio::spawn(async move {
            for m in 0..200 {
                publisher
                    .publish(readings(&format!("pi-{}", m % 7), &format!("m{m}"), 100))
                    .await
                    .unwrap();
            }
        })
    };
    testkit::wait_for_rows(&f.db.url, "readings", 2000, WAIT).await;
    first.kill(); // SIGKILL: no chance to finish its batch or ack
    let at_kill = f.stored();
    sender.await.unwrap();
    let _second = f.binary(500);
    f.wait_stored(20_000).await;
    assert!(
        at_kill < 20_000,
        "the kill came too late to test anything ({at_kill} stored)"
    );
    publisher.close().await;
}

#[tokio::test]
async fn several_persisters_share_the_queue() {
    let f = Fixture::new();
    let mut settings = f.settings();
    settings.prefetch = 4;
    let a = spawn::persister(&settings).await;
    let b = spawn::persister(&settings).await;
    let publisher = f.publisher().await;
    let mut sends = Vec::new();
    for m in 0..100 {
        let publisher = publisher.clone();
        sends.push(tokio::spawn(async move {
            publisher.publish(readings("d", &format!("s{m}"), 20)).await
        }));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for s in sends {
        s.await.unwrap().unwrap();
    }
    f.wait_stored(2000).await;
    let (ma, mb) = (
        testkit::metric(&a.metrics().await, "sensorhub_readings_stored_total"),
        testkit::metric(&b.metrics().await, "sensorhub_readings_stored_total"),
    );
    assert_eq!(ma + mb, 2000.0);
    assert!(
        ma > 0.0 && mb > 0.0,
        "both persisters worked: {ma} and {mb}"
    );
    // both kept the rollups, and one at a time folded them: every reading counted once
    f.wait_folded().await;
    a.stop().await;
    b.stop().await;
    publisher.close().await;
}

#[tokio::test]
async fn an_unmigrated_database_is_refused_at_start() {
    let f = Fixture::new();
    let empty = TestDb::unmigrated();
    let mut settings = f.settings();
    settings.database.database_url = empty.url.clone();
    let err = Persister::build(&settings).await.err().expect("refused");
    assert!(err.to_string().contains("sensorctl migrate"), "{err}");
}

#[tokio::test]
async fn sigterm_under_load_finishes_its_batches_and_loses_nothing() {
    const MESSAGES: i64 = 100;
    const PER_MESSAGE: i64 = 100;
    let f = Fixture::new();
    let publisher = f.publisher().await;
    for m in 0..MESSAGES {
        publisher
            .publish(readings(
                &format!("pi-{}", m % 3),
                &format!("m{m}"),
                PER_MESSAGE as usize,
            ))
            .await
            .unwrap();
    }
    let first = f.binary(300);
    testkit::wait_for_rows(&f.db.url, "readings", 1000, WAIT).await;
    let stopped = first.terminate(WAIT).await;
    assert!(stopped.success(), "a graceful stop exits 0: {stopped:?}");

    // The drain: every batch it had taken was stored and then acknowledged before it exited. So
    // what is stored and what is still queued add up to everything, exactly: a batch stored but
    // not acknowledged would be queued again (more), one acknowledged but not stored lost (less).
    // Deliveries it held but had not batched go back to the queue as its connection closes: the
    // broker may take a moment to count them ready again, so the sum is polled, not read once.
    let stored = f.stored();
    assert!(
        stored < MESSAGES * PER_MESSAGE,
        "SIGTERM came too late to test a drain ({stored} stored)"
    );
    let mut queued = 0;
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            queued = i64::from(testkit::queued_messages(&f.prefix).await);
            if stored + queued * PER_MESSAGE == MESSAGES * PER_MESSAGE {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        drained.is_ok(),
        "{stored} readings stored and {queued} messages of {PER_MESSAGE} left: not {}",
        MESSAGES * PER_MESSAGE
    );
    assert_eq!(f.stored(), stored, "nothing stored after it exited");

    let _second = f.binary(300);
    f.wait_stored(MESSAGES * PER_MESSAGE).await;
    publisher.close().await;
}

/// What was queued before ingest refused old readings (an attacker's batch spread over the years
/// since 2000) is still stored, in the default partition, and no month's table is made for it.
#[tokio::test]
async fn readings_queued_from_beyond_the_horizon_are_stored_without_new_partitions() {
    let (f, running, publisher) = Fixture::running().await;
    let metrics =
        models::Metrics::new(vec![(models::MetricName::parse("t").unwrap(), 1.0)]).unwrap();
    let old: Vec<Reading> = (0..300)
        .map(|i| {
            let ts = models::OLDEST_TIMESTAMP + chrono::Duration::days(30 * i);
            Reading::new(
                models::DeviceId::parse("spray").unwrap(),
                models::ReadingId::parse(format!("old-{i}")).unwrap(),
                ts,
                metrics.clone(),
            )
            .unwrap()
        })
        .filter(|r| r.ts < chrono::Utc::now() - chrono::Duration::days(400))
        .collect();
    let tables_before = count_rows(&f.db.url, "pg_inherits");
    publisher.publish(old.clone()).await.unwrap();
    f.wait_stored(old.len() as i64).await;
    assert_eq!(count_rows(&f.db.url, "readings_default"), old.len() as i64);
    assert_eq!(
        count_rows(&f.db.url, "pg_inherits"),
        tables_before,
        "no partition was created"
    );
    assert_eq!(
        testkit::metric_sum(
            &running.metrics().await,
            "sensorhub_messages_dead_lettered_total"
        ),
        0.0,
        "nothing was dead-lettered"
    );
    running.stop().await;
}

/// A command not finished by its expiry is recorded as expired by the persister's sweep, once, at
/// its expiry, with its history line.
#[tokio::test]
async fn the_persister_records_expired_commands() {
    let f = Fixture::new();
    let mut conn = f.db.connect();
    store::credentials::register_device(&mut conn, "raspi-01", "token-1").unwrap();
    let issue = |id: &'static str, ttl_secs: i64| store::commands::NewCommand {
        id,
        device_id: "raspi-01",
        name: "led",
        args: &serde_json::Value::Null,
        issued_by: "test",
        ttl: chrono::Duration::seconds(ttl_secs),
    };
    for (id, ttl_secs) in [("short", 1), ("long", 3600)] {
        let issued = store::commands::issue_command(&mut conn, &issue(id, ttl_secs), 10).unwrap();
        assert!(matches!(issued, store::commands::Issued::Issued(_)));
    }
    let running = spawn::persister(&f.settings()).await;
    let (command, history) = eventually(WAIT, "the short command recorded as expired", || {
        let url = f.db.url.clone();
        async move {
            let mut conn = store::connect(&url).unwrap();
            let (command, history) = store::commands::command(&mut conn, "short").unwrap()?;
            (command.stored_status == "expired").then_some((command, history))
        }
    })
    .await;
    assert_eq!(command.finished_at, Some(command.expires_at));
    let statuses: Vec<&str> = history.iter().map(|e| e.status.as_str()).collect();
    assert_eq!(statuses, ["pending", "expired"]);
    assert_eq!(history[1].at, command.expires_at);
    let (long, _) = store::commands::command(&mut conn, "long")
        .unwrap()
        .unwrap();
    assert_eq!(
        long.stored_status, "pending",
        "a command within its ttl is left alone"
    );
    running.stop().await;
}

/// What an operator alerts on exists from start-up at 0, so an alert on the first increase fires
/// at the first dead letter or refused command report; the lag and the queue start at 0; every
/// name carries the `sensorhub_` prefix.
#[tokio::test]
async fn every_watched_counter_is_exported_at_zero_from_the_start() {
    let f = Fixture::new();
    let running = spawn::persister(&f.settings()).await;
    let text = running.metrics().await;
    let mut series: Vec<String> = [
        "sensorhub_readings_stored_total",
        "sensorhub_readings_duplicate_total",
        "sensorhub_readings_conflicting_total",
        "sensorhub_write_failures_total",
        "sensorhub_commands_published_total",
        "sensorhub_command_publish_failures_total",
        "sensorhub_queue_messages",
        "sensorhub_readings_lag_seconds",
        "sensorhub_retention_partitions_dropped_total",
        "sensorhub_retention_skipped_total",
        "sensorhub_rollup_deltas_waiting",
        "sensorhub_rollup_deltas_folded_total",
    ]
    .map(String::from)
    .into();
    for reason in ["unsupported_version", "malformed", "empty"] {
        series.push(format!(
            "sensorhub_messages_dead_lettered_total{{reason=\"{reason}\"}}"
        ));
    }
    for outcome in [
        "recorded",
        "unchanged",
        "no_such_command",
        "not_the_devices",
        "expired",
        "finished",
        "undecodable",
    ] {
        series.push(format!(
            "sensorhub_command_reports_total{{outcome=\"{outcome}\"}}"
        ));
    }
    for table in ["raw", "1m", "1h", "1d"] {
        series.push(format!(
            "sensorhub_retention_rows_deleted_total{{table=\"{table}\"}}"
        ));
    }
    series.extend(testkit::publish_outcome_series());
    testkit::assert_fresh_metrics(&text, &series);
    running.stop().await;
}

/// The lag gauge shows how long the oldest message in hand has waited since its publish: while
/// PostgreSQL is away, the persister holds its batch and the age grows; once stored, it is 0.
#[tokio::test]
async fn the_lag_grows_while_a_batch_cannot_be_stored() {
    let (f, running, publisher) = Fixture::running().await;
    let mut admin = store::connect(&testkit::admin_database_url()).unwrap();
    testkit::execute(
        &mut admin,
        &format!(
            "ALTER DATABASE \"{0}\" ALLOW_CONNECTIONS false; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{0}'",
            f.db.name
        ),
    );
    publisher.publish(readings("d", "held", 5)).await.unwrap();
    running
        .metrics_reaching("sensorhub_readings_lag_seconds", 3.0, WAIT)
        .await;
    testkit::execute(
        &mut admin,
        &format!("ALTER DATABASE \"{}\" ALLOW_CONNECTIONS true", f.db.name),
    );
    f.wait_stored(5).await;
    eventually(WAIT, "the lag to return to 0", || async {
        (running.metric("sensorhub_readings_lag_seconds").await == 0.0).then_some(())
    })
    .await;
    running.stop().await;
    publisher.close().await;
}

/// The persister applies the retention policy as it starts (and every `retention_interval_secs`),
/// and counts what it removed.
#[tokio::test]
async fn the_persister_applies_the_retention_policy_and_counts_it() {
    let f = Fixture::new();
    let mut conn = f.db.connect();
    let old = Reading::new(
        models::DeviceId::parse("d").unwrap(),
        models::ReadingId::parse("old").unwrap(),
        // in readings_default (beyond the backfill horizon), which is never dropped whole: deleted
        // by rows, whatever day the test runs
        chrono::Utc::now() - chrono::Duration::days(400),
        models::Metrics::new(vec![(models::MetricName::parse("t").unwrap(), 1.0)]).unwrap(),
    )
    .unwrap();
    store::write_readings(&mut conn, &[old], &mut store::KnownPartitions::default()).unwrap();
    let raw = store::retention::Target::new(store::retention::Table::Raw, None, None).unwrap();
    store::retention::set(&mut conn, &raw, store::retention::Keep::Hours(24)).unwrap();
    let running = spawn::persister(&f.settings()).await;
    running
        .metrics_reaching(
            "sensorhub_retention_rows_deleted_total{table=\"raw\"}",
            1.0,
            WAIT,
        )
        .await;
    assert_eq!(count_rows(&f.db.url, "readings"), 0);
    running.stop().await;
}
