//! The publisher against a real RabbitMQ, with a topology of its own per test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first thing that is not as it must be"
)]

mod router;

use std::time::Duration;

use bus::lapin::options::{BasicAckOptions, BasicGetOptions};
use bus::{PublishError, Publisher, PublisherMetrics, PublisherSettings, Topology};
use models::{ReadingBatchMessage, parse_readings_body};

/// A topology of its own, deleted when this is dropped (a failing test's too).
struct TestBus {
    topology: Topology,
    channel: bus::lapin::Channel,
    _connection: bus::lapin::Connection,
    _prefix: testkit::AmqpPrefix,
}

impl TestBus {
    async fn new() -> Self {
        let prefix = testkit::AmqpPrefix::new("bus-test");
        let topology = Topology::with_prefix(&prefix);
        let connection = bus::connect(&testkit::amqp_url(), "bus-test")
            .await
            .expect("RabbitMQ is running");
        let channel = connection.create_channel().await.unwrap();
        bus::declare_topology(&channel, &topology).await.unwrap();
        Self {
            topology,
            channel,
            _connection: connection,
            _prefix: prefix,
        }
    }

    /// A publisher to this topology, connected.
    async fn publisher(&self, settings: PublisherSettings) -> Publisher {
        testkit::connected_publisher(&self.topology, settings, "bus-test").await
    }

    /// Every message in the readings queue, decoded.
    async fn drain(&self) -> Vec<Vec<models::Reading>> {
        let mut messages = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(
                self.topology.readings_queue.as_str().into(),
                BasicGetOptions::default(),
            )
            .await
            .unwrap()
        {
            messages.push(ReadingBatchMessage::decode(&message.delivery.data).unwrap());
            message
                .delivery
                .ack(BasicAckOptions::default())
                .await
                .unwrap();
        }
        messages
    }
}

fn readings(device: &str, n: usize) -> Vec<models::Reading> {
    let items: Vec<String> = (0..n)
        .map(|i| format!(r#"{{"device_id":"{device}","id":"{i}","metrics":{{"t":{i}.5}}}}"#))
        .collect();
    parse_readings_body(
        format!("[{}]", items.join(",")).as_bytes(),
        models::TimeWindow::new(chrono::Utc::now(), models::BackfillHorizon::DEFAULT),
    )
    .unwrap()
}

/// `requests` publishes at once, of `per_request` readings each (device `d{i}` for the `i`th), on
/// tasks of their own.
fn publish_at_once(
    publisher: &Publisher,
    requests: usize,
    per_request: usize,
) -> Vec<tokio::task::JoinHandle<Result<(), PublishError>>> {
    (0..requests)
        .map(|i| {
            let publisher = publisher.clone();
            tokio::spawn(async move {
                publisher
                    .publish(readings(&format!("d{i}"), per_request))
                    .await
            })
        })
        .collect()
}

fn start(url: String, topology: &Topology, settings: PublisherSettings) -> Publisher {
    Publisher::start(
        url,
        topology.clone(),
        settings,
        PublisherMetrics::unregistered(),
        "bus-test".into(),
    )
}

#[tokio::test]
async fn a_confirmed_publish_is_in_the_queue_exactly() {
    let bus = TestBus::new().await;
    let publisher = bus.publisher(testkit::publisher_settings()).await;
    let sent = readings("raspi-01", 3);
    publisher.publish(sent.clone()).await.unwrap();
    let received: Vec<_> = bus.drain().await.into_iter().flatten().collect();
    assert_eq!(received, sent);
    publisher.close().await;
}

#[tokio::test]
async fn concurrent_requests_share_messages_and_each_is_answered() {
    let bus = TestBus::new().await;
    let settings = PublisherSettings {
        publish_linger_ms: 20,
        publish_max_in_flight: 1,
        ..testkit::publisher_settings()
    };
    let publisher = bus.publisher(settings).await;
    let tasks = publish_at_once(&publisher, 200, 1);
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let messages = bus.drain().await;
    let total: usize = messages.iter().map(Vec::len).sum();
    assert_eq!(total, 200, "every reading arrives once");
    assert!(
        messages.len() < 50,
        "200 requests in {} messages: they should share",
        messages.len()
    );
    publisher.close().await;
}

/// Requests a millisecond apart, with a linger far longer than a confirm: each that comes while
/// a message awaits its confirm lingers, and must be published once that confirm is back rather
/// than after the whole linger.
#[tokio::test]
async fn a_linger_ends_when_the_outstanding_confirm_comes_back() {
    let bus = TestBus::new().await;
    let settings = PublisherSettings {
        publish_linger_ms: 10_000,
        ..testkit::publisher_settings()
    };
    let publisher = bus.publisher(settings).await;
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let publisher = publisher.clone();
        tasks.push(tokio::spawn(async move {
            publisher.publish(readings(&format!("d{i}"), 1)).await
        }));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "100 requests took {took:?}: a request lingered for the whole 10 s"
    );
    let stored: usize = bus.drain().await.iter().map(Vec::len).sum();
    assert_eq!(stored, 100, "every reading arrives once");
    publisher.close().await;
}

#[tokio::test]
async fn an_unreachable_broker_is_refused_at_once_not_buffered() {
    // nothing listens on port 1 of localhost
    let topology = Topology::with_prefix(&testkit::unique_name("bus-test"));
    let publisher = start(
        "amqp://guest:guest@127.0.0.1:1/%2f".into(),
        &topology,
        testkit::publisher_settings(),
    );
    let started = std::time::Instant::now();
    let err = publisher.publish(readings("d", 1)).await.unwrap_err();
    assert!(matches!(err, PublishError::Unavailable(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(!publisher.is_connected());
    publisher.close().await;
}

#[tokio::test]
async fn a_missing_queue_is_an_error_not_a_silent_loss() {
    let bus = TestBus::new().await;
    let publisher = bus.publisher(testkit::publisher_settings()).await;
    // someone deletes the queue behind the publisher's back: the message is unroutable
    bus.channel
        .queue_delete(
            bus.topology.readings_queue.as_str().into(),
            Default::default(),
        )
        .await
        .unwrap();
    let err = publisher.publish(readings("d", 1)).await.unwrap_err();
    assert!(matches!(err, PublishError::Unavailable(_)), "{err:?}");
    publisher.close().await;
}

#[tokio::test]
async fn close_publishes_what_was_handed_over_then_refuses() {
    let bus = TestBus::new().await;
    let settings = PublisherSettings {
        publish_linger_ms: 50,
        ..testkit::publisher_settings()
    };
    let publisher = bus.publisher(settings).await;
    let waiting = publish_at_once(&publisher, 20, 5);
    tokio::time::sleep(Duration::from_millis(5)).await;
    publisher.close().await;
    let mut confirmed = 0;
    for task in waiting {
        if task.await.unwrap().is_ok() {
            confirmed += 5;
        }
    }
    assert_eq!(
        confirmed, 100,
        "requests handed over before close are published"
    );
    let stored: usize = bus.drain().await.iter().map(Vec::len).sum();
    assert_eq!(
        stored, confirmed,
        "every confirmed reading is in the queue, and only those"
    );
    assert_eq!(
        publisher.publish(readings("late", 1)).await,
        Err(PublishError::ShuttingDown)
    );
}

#[tokio::test]
async fn refused_payloads_are_kept_on_the_invalid_queue_with_their_reason() {
    let bus = TestBus::new().await;
    let publisher = bus.publisher(testkit::publisher_settings()).await;
    let (good, bad) = tokio::join!(
        publisher.publish(readings("d", 2)),
        publisher.keep_invalid(
            b"{not json".to_vec(),
            "body: is not valid JSON",
            vec![("x-mqtt-topic", "sensor/data".into())]
        ),
    );
    good.unwrap();
    bad.unwrap();
    let kept = bus
        .channel
        .basic_get(
            bus.topology.invalid_queue.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("the invalid payload is kept");
    assert_eq!(kept.delivery.data, b"{not json");
    let headers = kept.delivery.properties.headers().clone().unwrap();
    let header = |name: &str| headers.inner()[name].as_long_string().unwrap().to_string();
    assert_eq!(header("x-sensorhub-reason"), "body: is not valid JSON");
    assert_eq!(header("x-mqtt-topic"), "sensor/data");
    assert_eq!(
        bus.drain().await.concat().len(),
        2,
        "the readings went to the readings queue"
    );
    publisher.close().await;
}

/// A cluster's addresses: a node that refuses (nothing listens on port 1) is skipped, whichever
/// address this process's rotation starts at.
#[tokio::test]
async fn connect_skips_a_dead_node_of_several() {
    let urls = format!(
        "amqp://guest:guest@127.0.0.1:1/%2f, {}",
        testkit::amqp_url()
    );
    for _ in 0..2 {
        let connection = bus::connect(&urls, "bus-test-cluster")
            .await
            .expect("the live node accepts");
        assert!(connection.status().connected());
    }
    let error = bus::connect("amqp://guest:guest@127.0.0.1:1/%2f,", "bus-test-cluster")
        .await
        .expect_err("no node listens");
    assert!(!error.to_string().is_empty());
    assert!(bus::connect(" , ", "bus-test-cluster").await.is_err());
}
