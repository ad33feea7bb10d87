//! Broker mode `rabbitmq`: devices publish to RabbitMQ's MQTT plugin (a private node per test,
//! the whole stack on it), ingest-mqtt consumes the quorum queue it routes them into.

use std::collections::HashSet;
use std::time::Duration;

use ingest_mqtt::{IngestMqtt, MqttBroker, Settings};
use testkit::mqtt::Device;
use testkit::rabbitmq::{MqttAuth, RabbitMqtt};
use testkit::{TestDb, count_rows, eventually};

use crate::{Running, WAIT, device_messages};

pub struct DurableStack {
    pub db: TestDb,
    pub prefix: String,
    pub node: RabbitMqtt,
}

impl DurableStack {
    pub fn new(auth: MqttAuth) -> Self {
        service_kit::telemetry::init_for_tests();
        let prefix = testkit::unique_name("mqtt-durable");
        Self {
            db: TestDb::migrated(),
            node: RabbitMqtt::start(&prefix, auth),
            prefix,
        }
    }

    pub fn settings(&self, consumer: &str) -> Settings {
        let mut s = Settings::defaults();
        s.http_addr = "127.0.0.1:0".into();
        s.mqtt_broker = MqttBroker::Rabbitmq;
        s.mqtt_client_id = consumer.into();
        s.amqp_url = self.node.amqp_url();
        s.amqp_prefix = self.prefix.clone();
        s.retry_max_backoff_ms = 500;
        s
    }

    pub async fn ingest(&self, settings: &Settings) -> Running {
        let ingest = IngestMqtt::build(settings).unwrap();
        let ops_port = ingest.ops_port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(ingest.run_until(async {
            let _ = stopped.await;
        }));
        eventually(WAIT, "ingest-mqtt consuming", || async {
            let r = reqwest::get(format!("http://127.0.0.1:{ops_port}/readyz"))
                .await
                .ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        Running {
            ops_port,
            stop,
            task,
        }
    }

    pub async fn persister(&self) -> tokio::sync::oneshot::Sender<()> {
        let mut settings = persister::Settings::defaults();
        settings.http_addr = "127.0.0.1:0".into();
        settings.database_url = self.db.url.clone();
        settings.amqp_url = self.node.amqp_url();
        settings.amqp_prefix = self.prefix.clone();
        settings.batch_linger_ms = 5;
        let p = persister::Persister::build(&settings).await.unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(p.run_until(async {
            let _ = stopped.await;
        }));
        stop
    }

    /// An anonymous MQTT client of this node.
    pub fn device(&self, name: &str) -> Device {
        Device::new(&testkit::unique_name(name), self.node.mqtt_port)
    }

    pub fn stored(&self) -> i64 {
        count_rows(&self.db.url, "readings")
    }

    pub async fn wait_stored(&self, n: i64) {
        testkit::wait_for_exactly(&self.db.url, "readings", n, WAIT).await;
    }

    pub fn stored_ids(&self, device: &str) -> HashSet<String> {
        store::read::readings_page(
            &mut self.db.connect(),
            &store::read::ReadingsQuery {
                device_id: device.into(),
                limit: 10_000,
                ..Default::default()
            },
        )
        .unwrap()
        .into_iter()
        .map(|r| r.reading_id)
        .collect()
    }

    /// Takes every message waiting in `queue` of this node: (routing key, body).
    pub async fn take_all(&self, queue: &str) -> Vec<(String, Vec<u8>)> {
        let conn = bus::connect(&self.node.amqp_url(), "mqtt-test")
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        let mut taken = Vec::new();
        while let Some(m) = channel
            .basic_get(
                queue.into(),
                bus::lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            taken.push((m.delivery.routing_key.to_string(), m.delivery.data.clone()));
        }
        taken
    }
}

#[tokio::test]
async fn two_consumers_forward_every_acknowledged_message_exactly_once_and_nothing_unrouted_is_dropped()
 {
    let stack = DurableStack::new(MqttAuth::Anonymous);
    let _persister = stack.persister().await;
    let a = stack.ingest(&stack.settings("ingest-durable-a")).await;
    let b = stack.ingest(&stack.settings("ingest-durable-b")).await;
    let sends: Vec<_> = (0..4)
        .map(|d| {
            let device = stack.device(&format!("r{d}"));
            // one device id with a dot: the plugin turns `/` into `.`, the id keeps its own
            let messages = device_messages(&format!("r.{d}"), 500);
            tokio::spawn(async move { device.publish_all(messages, Duration::ZERO, WAIT).await })
        })
        .collect();
    for send in sends {
        assert_eq!(send.await.unwrap(), 500, "every publish acknowledged");
    }
    stack.wait_stored(2000).await;
    for d in 0..4 {
        assert_eq!(stack.stored_ids(&format!("r.{d}")).len(), 500);
    }
    let (ra, rb) = (
        a.metric("mqtt_messages_received_total").await,
        b.metric("mqtt_messages_received_total").await,
    );
    assert_eq!(ra + rb, 2000.0, "each message went to one consumer, once");
    assert!(ra > 0.0 && rb > 0.0, "both took a share: {ra} and {rb}");
    eventually(WAIT, "every message acknowledged", || async {
        let acked = a.metric("mqtt_messages_acked_total").await
            + b.metric("mqtt_messages_acked_total").await;
        (acked == 2000.0).then_some(())
    })
    .await;

    // a topic no binding matches: acknowledged by the broker, and kept, not dropped
    let acked = stack
        .device("stray")
        .publish_all(
            vec![("elsewhere/x".into(), b"kept".to_vec())],
            Duration::ZERO,
            WAIT,
        )
        .await;
    assert_eq!(acked, 1);
    let topology = bus::MqttTopology::with_prefix(&stack.prefix);
    let unrouted = stack.take_all(&topology.unrouted_queue).await;
    assert_eq!(unrouted, [("elsewhere.x".to_owned(), b"kept".to_vec())]);
    assert!(
        stack.take_all(&topology.readings_queue).await.is_empty(),
        "nothing left behind"
    );
    assert_eq!(stack.stored(), 2000);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_bad_payload_on_the_durable_broker_is_kept_as_invalid_with_its_topic() {
    let stack = DurableStack::new(MqttAuth::Anonymous);
    let _persister = stack.persister().await;
    let ingest = stack.ingest(&stack.settings("ingest-durable-bad")).await;
    let mut messages = vec![(
        "devices/bad-1/readings".to_owned(),
        b"not json at all".to_vec(),
    )];
    messages.extend(device_messages("bad-1", 1));
    assert_eq!(
        stack
            .device("bad")
            .publish_all(messages, Duration::ZERO, WAIT)
            .await,
        2
    );
    stack.wait_stored(1).await;
    eventually(WAIT, "both acknowledged", || async {
        (ingest.metric("mqtt_messages_acked_total").await == 2.0).then_some(())
    })
    .await;
    assert_eq!(
        ingest
            .metric("mqtt_messages_invalid_total{kind=\"not_json\"}")
            .await,
        1.0
    );
    let invalid = stack
        .take_all(&bus::Topology::with_prefix(&stack.prefix).invalid_queue)
        .await;
    assert_eq!(invalid.len(), 1);
    assert_eq!(invalid[0].1, b"not json at all");
    ingest.stop().await;
}
