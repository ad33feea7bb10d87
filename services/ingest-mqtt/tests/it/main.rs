//! ingest-mqtt against a real Mosquitto (a private one per test), RabbitMQ and PostgreSQL, with the
//! persister storing what it publishes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first thing that is not as it must be"
)]

mod commands;
mod input;
mod rabbitmq;
mod readme;
mod security;

use std::collections::HashSet;
use std::time::Duration;

use ingest_mqtt::Settings;
use serde_json::json;
use testkit::mqtt::{Device, Mosquitto};
use testkit::spawn::{self, Running};
use testkit::{AmqpPrefix, TcpProxy, TestDb, count_rows, eventually};

const WAIT: Duration = Duration::from_secs(90);
/// How long a killed ingest-mqtt stays down before its next run: devices go on publishing
/// meanwhile, into its session.
const KILLED_FOR: Duration = Duration::from_millis(500);
/// How long RabbitMQ is kept away, with messages in ingest-mqtt's hands, to show that none is
/// acknowledged meanwhile: nothing marks "none will be", so showing it takes a wait.
const OUTAGE_HELD: Duration = Duration::from_secs(2);

/// A message kept on the invalid queue.
struct Kept {
    /// The MQTT topic it came on.
    topic: Option<String>,
    payload: Vec<u8>,
    /// Why it was refused.
    reason: String,
}

/// One test's stack: its own database, queue names (deleted when it is dropped) and Mosquitto.
struct Stack {
    db: TestDb,
    prefix: AmqpPrefix,
    mosquitto: Mosquitto,
    keys: testkit::TestKeys,
}

impl Stack {
    fn new() -> Self {
        service_kit::telemetry::init_for_tests();
        Self {
            db: TestDb::migrated(),
            prefix: AmqpPrefix::new("mqtt-test"),
            mosquitto: Mosquitto::anonymous(),
            keys: testkit::TestKeys::new(),
        }
    }

    fn settings(&self, client_id: &str) -> Settings {
        spawn::ingest_mqtt_settings(self.mosquitto.port, client_id, &self.prefix)
    }

    /// ingest-mqtt, subscribed: a brand new session only gets what comes after.
    async fn ingest(&self, settings: &Settings) -> Running {
        spawn::ingest_mqtt(settings).await
    }

    async fn persister(&self) -> Running {
        spawn::persister(&spawn::persister_settings(&self.db.url, &self.prefix)).await
    }

    /// ingest-http on this stack's queue and registry.
    async fn ingest_http(&self, _broker: &security::Production) -> Running {
        let mut settings = spawn::ingest_http_settings(
            &self.db.url,
            &self.prefix,
            &self.keys.verifying_key_file(),
        );
        settings.http.http_workers = 1;
        spawn::ingest_http(&settings).await
    }

    /// Takes every message kept on this stack's invalid queue.
    async fn take_invalid(&self) -> Vec<Kept> {
        let conn = bus::connect(&testkit::amqp_url(), "mqtt-test")
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        let topology = bus::Topology::with_prefix(&self.prefix);
        let mut kept = Vec::new();
        while let Some(m) = channel
            .basic_get(
                topology.invalid_queue.as_str().into(),
                bus::lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            let headers = m.delivery.properties.headers().clone().unwrap();
            let header = |name: &str| {
                let value = headers.inner().get(name)?.as_long_string()?;
                Some(value.to_string())
            };
            kept.push(Kept {
                topic: header("x-mqtt-topic"),
                payload: m.delivery.data.clone(),
                reason: header("x-sensorhub-reason").expect("a kept message says why"),
            });
        }
        kept
    }

    fn device(&self, id: &str) -> Device {
        Device::new(&testkit::unique_name(id), self.mosquitto.port)
    }

    fn stored(&self) -> i64 {
        count_rows(&self.db.url, "readings")
    }

    async fn wait_stored(&self, n: i64) {
        testkit::wait_for_exactly(&self.db.url, "readings", n, WAIT).await;
    }

    fn stored_ids(&self, device: &str) -> Vec<String> {
        testkit::stored_readings(&self.db.url, device, 10_000)
            .into_iter()
            .map(|r| r.reading_id)
            .collect()
    }
}

/// Publishes `messages` as `device`, every one acknowledged by the broker, and waits until `stored`
/// readings are in the database at `database_url` and ingest-mqtt has acknowledged every message,
/// valid or not.
async fn publish_until_acknowledged(
    device: &Device,
    messages: Vec<(String, Vec<u8>)>,
    ingest: &Running,
    database_url: &str,
    stored: i64,
) {
    let n = messages.len();
    assert_eq!(device.publish_all(messages, Duration::ZERO, WAIT).await, n);
    testkit::wait_for_exactly(database_url, "readings", stored, WAIT).await;
    eventually(WAIT, &format!("all {n} acknowledged"), || async {
        (ingest.metric("sensorhub_mqtt_messages_acked_total").await == n as f64).then_some(())
    })
    .await;
}

/// The broker's answer to a CONNECT (`None`: no answer within `within`, or the connection failed).
async fn connack(
    events: &mut rumqttc::EventLoop,
    within: Duration,
) -> Option<rumqttc::ConnectReturnCode> {
    let answer = async {
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => {
                    return Some(ack.code);
                }
                Ok(_) => {}
                Err(rumqttc::ConnectionError::ConnectionRefused(code)) => return Some(code),
                Err(_) => return None,
            }
        }
    };
    tokio::time::timeout(within, answer).await.ok().flatten()
}

/// Each `(device, id)` publishes `n` [`device_messages`] of `id`, all at once, on tasks of their
/// own; each task answers how many of its messages the broker acknowledged.
fn publish_at_once(
    devices: impl IntoIterator<Item = (Device, String)>,
    n: usize,
) -> Vec<tokio::task::JoinHandle<usize>> {
    devices
        .into_iter()
        .map(|(device, id)| {
            let messages = device_messages(&id, n);
            tokio::spawn(async move { device.publish_all(messages, Duration::ZERO, WAIT).await })
        })
        .collect()
}

/// Waits for publishes running on tasks of their own (as [`publish_at_once`] starts them): the
/// broker must have acknowledged all `n` messages of each.
async fn all_acknowledged(sends: Vec<tokio::task::JoinHandle<usize>>, n: usize) {
    for send in sends {
        assert_eq!(send.await.unwrap(), n, "every publish acknowledged");
    }
}

/// Each `(device, id)` publishes `n` [`device_messages`] of `id`, all at once; waits until the
/// broker has acknowledged every one and exactly as many readings are in the database at
/// `database_url`.
async fn publish_all_stored(
    devices: impl IntoIterator<Item = (Device, String)>,
    n: usize,
    database_url: &str,
) {
    let sends = publish_at_once(devices, n);
    let total = sends.len() * n;
    all_acknowledged(sends, n).await;
    testkit::wait_for_exactly(database_url, "readings", total as i64, WAIT).await;
}

/// How many messages of `kind` ingest-mqtt refused as invalid.
async fn invalid(ingest: &Running, kind: &str) -> f64 {
    ingest
        .metric(&format!(
            "sensorhub_mqtt_messages_invalid_total{{kind=\"{kind}\"}}"
        ))
        .await
}

/// `n` messages for `device` on its own topic, ids `{device}-{i}`, with times, as a careful Pi sends.
fn device_messages(device: &str, n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let body = json!({"id": format!("{device}-{i}"), "ts": 1_795_000_000_000u64 + i as u64,
                              "metrics": {"t": i as f64 + 0.5}});
            (
                format!("devices/{device}/readings"),
                body.to_string().into_bytes(),
            )
        })
        .collect()
}

/// `n` messages for `device` with ids and no time, as most Pi scripts send: the server stamps each
/// delivery, so a message delivered again carries another time and only its id tells it is the same.
fn untimed_messages(device: &str, n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let body = json!({"id": format!("{device}-{i}"), "metrics": {"t": i as f64 + 0.5}});
            (
                format!("devices/{device}/readings"),
                body.to_string().into_bytes(),
            )
        })
        .collect()
}

#[tokio::test]
async fn the_seed_snippet_and_device_topics_are_stored_exactly() {
    let stack = Stack::new();
    let _persister = stack.persister().await;
    let ingest = stack.ingest(&stack.settings("ingest-a")).await;

    // client.publish("sensor/data", json.dumps({...}), qos=1)
    let seed = json!({"device_id": "raspi-01", "temperature": 25.5, "humidity": 60.3});
    let batch = json!([{"metrics": {"co2": 415}, "id": "c1", "ts": "2026-11-25T01:00:00Z"},
                       {"device_id": "raspi-02", "metrics": {"co2": 416.5}, "id": "c2", "ts": "2026-11-25T01:00:01Z"}]);
    let acked = stack
        .device("raspi")
        .publish_all(
            vec![
                ("sensor/data".into(), seed.to_string().into_bytes()),
                (
                    "devices/raspi-02/readings".into(),
                    batch.to_string().into_bytes(),
                ),
            ],
            Duration::ZERO,
            WAIT,
        )
        .await;
    assert_eq!(acked, 2);
    stack.wait_stored(3).await;
    let r1 = testkit::stored_readings(&stack.db.url, "raspi-01", 10);
    assert_eq!(
        r1[0].metrics,
        json!({"temperature": 25.5, "humidity": 60.3})
    );
    let r2 = testkit::stored_readings(&stack.db.url, "raspi-02", 10);
    assert_eq!(
        r2.iter()
            .map(|r| (r.reading_id.as_str(), r.metrics.clone()))
            .collect::<Vec<_>>(),
        [("c2", json!({"co2": 416.5})), ("c1", json!({"co2": 415.0}))]
    );
    assert_eq!(
        ingest.metric("sensorhub_mqtt_messages_acked_total").await,
        2.0
    );
    ingest.stop().await;
}

#[tokio::test]
async fn ten_thousand_messages_from_ten_devices_are_all_stored_once() {
    let stack = Stack::new();
    let _persister = stack.persister().await;
    let ingest = stack.ingest(&stack.settings("ingest-load")).await;
    let devices = (0..10).map(|d| (stack.device(&format!("pi{d}")), format!("pi-{d}")));
    publish_all_stored(devices, 1000, &stack.db.url).await;
    for d in 0..10 {
        let ids: HashSet<String> = stack.stored_ids(&format!("pi-{d}")).into_iter().collect();
        assert_eq!(ids.len(), 1000);
    }
    assert_eq!(
        ingest
            .metric("sensorhub_mqtt_messages_received_total")
            .await,
        10_000.0,
        "none delivered twice"
    );
    ingest.stop().await;
}

#[tokio::test]
async fn a_killed_ingest_resumes_its_session_and_stores_everything_once() {
    let stack = Stack::new();
    let _persister = stack.persister().await;
    let spawn = || {
        spawn::Binary::start(
            env!("CARGO_BIN_EXE_ingest-mqtt"),
            &[
                (
                    "MQTT_URL",
                    format!("mqtt://127.0.0.1:{}", stack.mosquitto.port),
                ),
                ("MQTT_CLIENT_ID", "ingest-killed".into()),
                ("AMQP_URL", testkit::amqp_url()),
                ("AMQP_PREFIX", stack.prefix.to_string()),
            ],
        )
    };
    let mut first = spawn();
    // the first run creates the session and its subscriptions
    eventually(WAIT, "the first run subscribed", || async {
        let got = stack
            .device("probe")
            .publish_all(device_messages("probe", 1), Duration::ZERO, WAIT)
            .await;
        (got == 1 && stack.stored() == 1).then_some(())
    })
    .await;
    let devices: Vec<_> = (0..3)
        .map(|d| {
            let device = stack.device(&format!("k{d}"));
            // one device with times, two with ids alone (redelivered, those get a new time)
            let messages = if d == 0 {
                device_messages(&format!("k-{d}"), 1000)
            } else {
                untimed_messages(&format!("k-{d}"), 1000)
            };
            tokio::spawn(async move {
                device
                    .publish_all(messages, Duration::from_millis(2), WAIT)
                    .await
            })
        })
        .collect();
    testkit::wait_for_rows(&stack.db.url, "readings", 600, WAIT).await;
    first.kill(); // SIGKILL: messages in flight are neither confirmed nor acknowledged
    let at_kill = stack.stored();
    tokio::time::sleep(KILLED_FOR).await;
    let mut second = spawn();
    all_acknowledged(devices, 1000).await;
    stack.wait_stored(3001).await;
    for d in 0..3 {
        assert_eq!(stack.stored_ids(&format!("k-{d}")).len(), 1000);
    }
    assert!(at_kill < 3001, "the kill came too late to test anything");
    second.kill();
}

#[tokio::test]
async fn while_rabbitmq_is_unreachable_nothing_is_acknowledged_and_everything_arrives_after() {
    let stack = Stack::new();
    let _persister = stack.persister().await;
    let proxy = TcpProxy::start("127.0.0.1:5672").await;
    let mut settings = stack.settings("ingest-outage");
    settings.bus.amqp_url = proxy.amqp_url();
    let ingest = stack.ingest(&settings).await;
    proxy.cut();
    let acked = stack
        .device("o")
        .publish_all(device_messages("o-1", 300), Duration::ZERO, WAIT)
        .await;
    assert_eq!(acked, 300, "Mosquitto holds them");
    eventually(WAIT, "ingest-mqtt to hold messages", || async {
        (ingest.metric("sensorhub_mqtt_messages_in_flight").await > 0.0).then_some(())
    })
    .await;
    tokio::time::sleep(OUTAGE_HELD).await;
    assert_eq!(
        ingest.metric("sensorhub_mqtt_messages_acked_total").await,
        0.0,
        "nothing acknowledged while RabbitMQ is away"
    );
    assert_eq!(stack.stored(), 0);
    proxy.restore();
    stack.wait_stored(300).await;
    assert_eq!(
        ingest.metric("sensorhub_mqtt_messages_acked_total").await,
        300.0
    );
    ingest.stop().await;
}

#[tokio::test]
async fn two_instances_share_the_load_and_nothing_is_stored_twice() {
    let stack = Stack::new();
    let _persister = stack.persister().await;
    let a = stack.ingest(&stack.settings("ingest-share-a")).await;
    let b = stack.ingest(&stack.settings("ingest-share-b")).await;
    let devices = (0..4).map(|d| (stack.device(&format!("s{d}")), format!("s-{d}")));
    publish_all_stored(devices, 500, &stack.db.url).await;
    let (ra, rb) = (
        a.metric("sensorhub_mqtt_messages_received_total").await,
        b.metric("sensorhub_mqtt_messages_received_total").await,
    );
    assert_eq!(ra + rb, 2000.0, "each message went to one instance");
    assert!(ra > 0.0 && rb > 0.0, "both took a share: {ra} and {rb}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn every_kind_of_bad_payload_is_refused_counted_and_kept_and_the_service_goes_on() {
    let stack = Stack::new();
    let _persister = stack.persister().await;
    let ingest = stack.ingest(&stack.settings("ingest-bad")).await;
    let bad: Vec<(String, Vec<u8>)> = vec![
        ("devices/b-1/readings".into(), b"not json at all".to_vec()),
        (
            "devices/b-1/readings".into(),
            br#"{"metrics": {"t": "warm"}}"#.to_vec(),
        ),
        (
            "devices/b-1/readings".into(),
            br#"{"device_id": "b-2", "metrics": {"t": 1}}"#.to_vec(),
        ),
        ("sensor/data".into(), br#"{"temperature": 20}"#.to_vec()),
        ("sensor/data".into(), vec![0xff, 0x00, 0x13]),
    ];
    let good = device_messages("b-1", 1);
    let mut messages = bad.clone();
    messages.extend(good);
    publish_until_acknowledged(&stack.device("bad"), messages, &ingest, &stack.db.url, 1).await;
    assert_eq!(invalid(&ingest, "not_json").await, 2.0);
    assert_eq!(invalid(&ingest, "invalid_reading").await, 2.0);
    assert_eq!(invalid(&ingest, "device_mismatch").await, 1.0);

    // kept on the invalid queue, with the reason and the topic
    let kept = stack.take_invalid().await;
    assert_eq!(kept.len(), 5);
    for (topic, payload) in bad {
        let found = kept
            .iter()
            .find(|k| k.topic.as_deref() == Some(topic.as_str()) && k.payload == payload);
        assert!(found.is_some(), "{topic} {payload:?} not kept");
    }
    let mismatch = kept
        .iter()
        .find(|k| k.payload.starts_with(br#"{"device_id": "b-2""#))
        .unwrap();
    assert!(mismatch.reason.contains("device_id"), "{}", mismatch.reason);
    ingest.stop().await;
}

/// What an operator alerts on exists from start-up at 0, so an alert on the first increase fires
/// at the first refused payload or failed command; every name carries the `sensorhub_` prefix.
#[tokio::test]
async fn every_watched_counter_is_exported_at_zero_from_the_start() {
    let stack = Stack::new();
    let ingest = stack.ingest(&stack.settings("ingest-zero")).await;
    let text = ingest.metrics().await;
    let mut series: Vec<String> = [
        "sensorhub_mqtt_messages_received_total",
        "sensorhub_mqtt_messages_acked_total",
        "sensorhub_mqtt_publish_retries_total",
        "sensorhub_mqtt_command_answers_total",
        "sensorhub_readings_accepted_total",
    ]
    .map(String::from)
    .into();
    for kind in [
        "not_json",
        "invalid_reading",
        "device_mismatch",
        "topic",
        "invalid_answer",
    ] {
        series.push(format!(
            "sensorhub_mqtt_messages_invalid_total{{kind=\"{kind}\"}}"
        ));
    }
    for outcome in [
        "sent",
        "no_subscriber",
        "refused",
        "failed",
        "expired",
        "undecodable",
    ] {
        series.push(format!(
            "sensorhub_mqtt_commands_total{{outcome=\"{outcome}\"}}"
        ));
    }
    series.extend(testkit::publish_outcome_series());
    testkit::assert_fresh_metrics(&text, &series);
    assert_eq!(
        testkit::sample(&text, "sensorhub_mqtt_connected"),
        Some(1.0)
    );
    ingest.stop().await;
}
