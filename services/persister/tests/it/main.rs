//! The persister against real RabbitMQ and PostgreSQL: its own database and queue names per test.

use std::time::Duration;

use bus::lapin::BasicProperties;
use bus::lapin::options::{BasicGetOptions, BasicPublishOptions};
use bus::{Publisher, PublisherMetrics, PublisherSettings, Topology};
use models::Reading;
use persister::{Persister, Settings};
use testkit::{TestDb, count_rows, eventually};

const WAIT: Duration = Duration::from_secs(60);

struct Fixture {
    db: TestDb,
    prefix: String,
    topology: Topology,
}

impl Fixture {
    fn new() -> Self {
        service_kit::telemetry::init_for_tests();
        let prefix = testkit::unique_name("persister-test");
        Self {
            db: TestDb::migrated(),
            topology: Topology::with_prefix(&prefix),
            prefix,
        }
    }

    fn settings(&self) -> Settings {
        let mut s = Settings::defaults();
        s.http_addr = "127.0.0.1:0".into();
        s.database.database_url = self.db.url.clone();
        s.bus.amqp_url = testkit::amqp_url();
        s.bus.amqp_prefix = self.prefix.clone();
        s.batch_linger_ms = 5;
        s.retry_max_backoff_ms = 500;
        s
    }

    async fn publisher(&self) -> Publisher {
        let p = Publisher::start(
            testkit::amqp_url(),
            self.topology.clone(),
            PublisherSettings {
                publish_linger_ms: 1,
                publish_max_batch_readings: 2000,
                publish_max_in_flight: 16,
                publish_queue_capacity: 8192,
                publish_confirm_timeout_ms: 10_000,
                reconnect_max_backoff_ms: 5_000,
            },
            PublisherMetrics::unregistered(),
            "persister-test".into(),
        );
        assert!(
            p.wait_connected(Duration::from_secs(10)).await,
            "RabbitMQ is running"
        );
        p
    }

    fn stored(&self) -> i64 {
        count_rows(&self.db.url, "readings")
    }

    async fn wait_stored(&self, expected: i64) {
        testkit::wait_for_exactly(&self.db.url, "readings", expected, WAIT).await;
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

    async fn cleanup(self) {
        testkit::delete_amqp_topology(&self.prefix).await;
    }
}

struct Running {
    ops_port: u16,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn start(settings: &Settings) -> Self {
        let persister = Persister::build(settings).await.expect("persister starts");
        let ops_port = persister.ops_port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(persister.run_until(async {
            let _ = stopped.await;
        }));
        Self {
            ops_port,
            stop,
            task,
        }
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("http://127.0.0.1:{}/metrics", self.ops_port))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    async fn readyz(&self) -> u16 {
        reqwest::get(format!("http://127.0.0.1:{}/readyz", self.ops_port))
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
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
    let f = Fixture::new();
    let running = Running::start(&f.settings()).await;
    let publisher = f.publisher().await;
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
    let page = store::read::readings_page(
        &mut f.db.connect(),
        &store::read::ReadingsQuery {
            device_id: "raspi-01".into(),
            limit: 10,
            ..Default::default()
        },
    )
    .unwrap();
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
        testkit::metric(&text, "messages_dead_lettered_total{reason=\"malformed\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(testkit::metric(&text, "readings_stored_total"), 5.0);

    running.stop().await;
    publisher.close().await;
    f.cleanup().await;
}

#[tokio::test]
async fn a_reading_delivered_twice_is_stored_once() {
    let f = Fixture::new();
    let running = Running::start(&f.settings()).await;
    let publisher = f.publisher().await;
    let batch = readings("raspi-01", "dup", 50);
    publisher.publish(batch.clone()).await.unwrap();
    publisher.publish(batch[10..20].to_vec()).await.unwrap();
    publisher.publish(batch).await.unwrap();
    f.wait_stored(50).await;
    let text = eventually(WAIT, "duplicates counted", || async {
        let text = running.metrics().await;
        (testkit::metric(&text, "readings_duplicate_total") >= 60.0).then_some(text)
    })
    .await;
    assert_eq!(testkit::metric(&text, "readings_duplicate_total"), 60.0);
    running.stop().await;
    publisher.close().await;
    f.cleanup().await;
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
    let f = Fixture::new();
    let running = Running::start(&f.settings()).await;
    let publisher = f.publisher().await;
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
    let text = eventually(WAIT, "the repeat and the conflict counted", || async {
        let text = running.metrics().await;
        (testkit::metric(&text, "readings_conflicting_total") >= 1.0).then_some(text)
    })
    .await;
    assert_eq!(testkit::metric(&text, "readings_stored_total"), 1.0);
    assert_eq!(testkit::metric(&text, "readings_duplicate_total"), 1.0);
    assert_eq!(testkit::metric(&text, "readings_conflicting_total"), 1.0);
    assert_eq!(f.stored(), 1);
    assert_eq!(testkit::count_rows(&f.db.url, "reading_conflicts"), 1);
    running.stop().await;
    publisher.close().await;
    f.cleanup().await;
}

#[tokio::test]
async fn a_database_outage_is_waited_out_and_nothing_is_lost() {
    let f = Fixture::new();
    let running = Running::start(&f.settings()).await;
    let publisher = f.publisher().await;
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
    tokio::time::sleep(Duration::from_secs(1)).await;

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
        testkit::metric(&text, "write_failures_total") >= 1.0,
        "{text}"
    );
    running.stop().await;
    publisher.close().await;
    f.cleanup().await;
}

#[tokio::test]
async fn a_persister_killed_mid_stream_loses_nothing() {
    let f = Fixture::new();
    let publisher = f.publisher().await;
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_persister"))
            .env("HTTP_ADDR", "127.0.0.1:0")
            .env("DATABASE_URL", &f.db.url)
            .env("AMQP_URL", testkit::amqp_url())
            .env("AMQP_PREFIX", &f.prefix)
            .env("BATCH_MAX_READINGS", "500")
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("start the persister binary")
    };
    let mut first = spawn();
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
    eventually(WAIT, "the persister to be part way", || async {
        (f.stored() >= 2000).then_some(())
    })
    .await;
    first.kill().unwrap(); // SIGKILL: no chance to finish its batch or ack
    first.wait().unwrap();
    let at_kill = f.stored();
    sender.await.unwrap();
    let mut second = spawn();
    f.wait_stored(20_000).await;
    second.kill().unwrap();
    second.wait().unwrap();
    assert!(
        at_kill < 20_000,
        "the kill came too late to test anything ({at_kill} stored)"
    );
    publisher.close().await;
    f.cleanup().await;
}

#[tokio::test]
async fn several_persisters_share_the_queue() {
    let f = Fixture::new();
    let mut settings = f.settings();
    settings.prefetch = 4;
    let a = Running::start(&settings).await;
    let b = Running::start(&settings).await;
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
        testkit::metric(&a.metrics().await, "readings_stored_total"),
        testkit::metric(&b.metrics().await, "readings_stored_total"),
    );
    assert_eq!(ma + mb, 2000.0);
    assert!(
        ma > 0.0 && mb > 0.0,
        "both persisters worked: {ma} and {mb}"
    );
    a.stop().await;
    b.stop().await;
    publisher.close().await;
    f.cleanup().await;
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
    let f = Fixture::new();
    let publisher = f.publisher().await;
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_persister"))
            .env("HTTP_ADDR", "127.0.0.1:0")
            .env("DATABASE_URL", &f.db.url)
            .env("AMQP_URL", testkit::amqp_url())
            .env("AMQP_PREFIX", &f.prefix)
            .env("BATCH_MAX_READINGS", "300")
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("start the persister binary")
    };
    for m in 0..100 {
        publisher
            .publish(readings(&format!("pi-{}", m % 3), &format!("m{m}"), 100))
            .await
            .unwrap();
    }
    let mut first = spawn();
    eventually(WAIT, "the persister to be part way", || async {
        (f.stored() >= 1000).then_some(())
    })
    .await;
    let term = std::process::Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let stopped = tokio::task::spawn_blocking(move || first.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(stopped.success(), "a graceful stop exits 0: {stopped:?}");
    let mut second = spawn();
    f.wait_stored(10_000).await;
    second.kill().unwrap();
    second.wait().unwrap();
    publisher.close().await;
    f.cleanup().await;
}

/// What was queued before ingest refused old readings (an attacker's batch spread over the years
/// since 2000) is still stored, in the default partition, and no month's table is made for it.
#[tokio::test]
async fn readings_queued_from_beyond_the_horizon_are_stored_without_new_partitions() {
    let f = Fixture::new();
    let running = Running::start(&f.settings()).await;
    let publisher = f.publisher().await;
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
    assert!(
        !running
            .metrics()
            .await
            .contains("messages_dead_lettered_total 1")
    );
    running.stop().await;
    f.cleanup().await;
}
