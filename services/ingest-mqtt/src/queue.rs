//! Source `rabbitmq`: devices publish to RabbitMQ's MQTT plugin, which routes their messages into
//! the quorum queue of [`bus::MqttTopology`] and sends each PUBACK only once that queue confirmed
//! it (written to disk on a majority). This consumes the queue over AMQP, every instance on the same
//! queue (competing consumers), and acknowledges a message once [`Forwarder`] had it confirmed. A
//! message in hand when the process or its connection dies goes back to the queue and is delivered
//! again (readings carry their ids, so storing it twice stores it once).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bus::lapin::message::Delivery;
use bus::lapin::options::BasicAckOptions;
use bus::lapin::{Connection, Consumer};
use bus::{MqttTopology, mqtt_topic_of};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::forward::{Forwarded, Forwarder};
use crate::metrics::MqttMetrics;
use crate::settings::Settings;
use crate::startup::STOP_GRACE;

const FIRST_RECONNECT_BACKOFF: Duration = Duration::from_millis(100);

/// Why consuming stopped.
enum Ended {
    Shutdown,
    ConnectionLost(String),
}

/// The consumer's state: where to connect, the messages in hand, and the way out.
pub struct QueueBridge {
    amqp_url: String,
    consumer_tag: String,
    topology: MqttTopology,
    prefetch: u16,
    forwarder: Arc<Forwarder>,
    metrics: MqttMetrics,
    connected: Arc<AtomicBool>,
    shutdown: watch::Receiver<bool>,
    handlers: JoinSet<()>,
    backoff: bus::Backoff,
}

impl QueueBridge {
    pub fn new(
        settings: &Settings,
        consumer_tag: &str,
        forwarder: Arc<Forwarder>,
        metrics: MqttMetrics,
        connected: Arc<AtomicBool>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            amqp_url: settings.bus.amqp_url.clone(),
            consumer_tag: consumer_tag.to_owned(),
            topology: MqttTopology::with_prefix(&settings.bus.amqp_prefix),
            prefetch: settings.mqtt_queue_prefetch.max(1),
            forwarder,
            metrics,
            connected,
            shutdown,
            handlers: JoinSet::new(),
            backoff: bus::Backoff::new(
                FIRST_RECONNECT_BACKOFF,
                Duration::from_millis(settings.retry_max_backoff_ms),
            ),
        }
    }

    /// Consumes until shutdown, reconnecting whenever the connection is lost; then lets the
    /// messages in hand be confirmed and acknowledged (up to [`STOP_GRACE`]) and closes, which
    /// gives whatever is left back to the queue.
    pub async fn run(mut self) {
        loop {
            if *self.shutdown.borrow() {
                break;
            }
            let ended = match self.connect().await {
                Ok((connection, consumer)) => {
                    self.backoff.reset();
                    self.set_connected(true);
                    tracing::info!(queue = %self.topology.readings_queue, "consuming devices' MQTT messages");
                    let ended = self.consume(&connection, consumer).await;
                    self.set_connected(false);
                    if let Ended::Shutdown = ended {
                        self.drain(connection).await;
                        return;
                    }
                    ended
                }
                Err(e) => Ended::ConnectionLost(e.to_string()),
            };
            if let Ended::ConnectionLost(error) = ended {
                let delay = self.backoff.next_delay();
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "cannot consume the MQTT queue");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = self.shutdown.changed() => {}
                }
            }
        }
    }

    /// Connects, declares the MQTT side of the topology (so the plugin has its exchange and the
    /// queue exists before the first device publishes) and starts consuming.
    async fn connect(&self) -> bus::lapin::Result<(Connection, Consumer)> {
        bus::bounded_setup(async {
            let connection = bus::connect(&self.amqp_url, &self.consumer_tag).await?;
            let channel = connection.create_channel().await?;
            bus::declare_mqtt_topology(&channel, &self.topology).await?;
            let _ = channel.close(200, "declared".into()).await;
            let (_channel, consumer) = bus::open_queue_consumer(
                &connection,
                &self.topology.readings_queue,
                self.prefetch,
                &self.consumer_tag,
            )
            .await?;
            Ok((connection, consumer))
        })
        .await
    }

    /// Takes deliveries until the connection is lost or the service stops. The connection's state
    /// is looked at too (see [`bus::LIVENESS_CHECK`]): a consumer's stream was seen not to end
    /// when RabbitMQ was killed under it.
    async fn consume(&mut self, connection: &Connection, mut consumer: Consumer) -> Ended {
        loop {
            while self.handlers.try_join_next().is_some() {}
            tokio::select! {
                delivery = consumer.next() => match delivery {
                    Some(Ok(delivery)) => self.dispatch(delivery),
                    Some(Err(e)) => return Ended::ConnectionLost(e.to_string()),
                    None => return Ended::ConnectionLost("the consumer was cancelled".into()),
                },
                _ = tokio::time::sleep(bus::LIVENESS_CHECK) => {
                    if !connection.status().connected() {
                        return Ended::ConnectionLost("the connection to RabbitMQ is gone".into());
                    }
                }
                _ = self.shutdown.changed() => return Ended::Shutdown,
            }
        }
    }

    /// Hands a message to its own task (the prefetch bounds how many are in hand).
    fn dispatch(&mut self, delivery: Delivery) {
        self.metrics.messages_received.inc();
        let (forwarder, metrics) = (self.forwarder.clone(), self.metrics.clone());
        self.handlers.spawn(async move {
            let topic = mqtt_topic_of(delivery.routing_key.as_str());
            if forwarder.forward(topic.as_bytes(), &delivery.data).await == Forwarded::Confirmed
                && delivery.ack(BasicAckOptions::default()).await.is_ok()
            {
                metrics.messages_acked.inc();
            }
        });
    }

    fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::SeqCst);
        self.metrics.connected.set(i64::from(connected));
    }

    /// Gives the messages in hand up to [`STOP_GRACE`] to be confirmed and acknowledged; closing
    /// the connection then returns the others to the queue.
    async fn drain(&mut self, connection: Connection) {
        let _ = tokio::time::timeout(STOP_GRACE, async {
            while self.handlers.join_next().await.is_some() {}
        })
        .await;
        self.handlers.abort_all();
        while self.handlers.join_next().await.is_some() {}
        let _ = connection.close(200, "ingest-mqtt stopping".into()).await;
    }
}
