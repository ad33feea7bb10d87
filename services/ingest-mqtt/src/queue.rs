//! Source `rabbitmq`: devices publish to RabbitMQ's MQTT plugin, which routes their messages into
//! the quorum queue of [`bus::MqttTopology`] and sends each PUBACK only once that queue confirmed
//! it (written to disk on a majority). This consumes the queue over AMQP, every instance on the same
//! queue (competing consumers), and acknowledges a message once [`Forwarder`] had it confirmed. A
//! message in hand when the process or its connection dies goes back to the queue and is delivered
//! again (readings carry their ids, so storing it twice stores it once).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bus::{ConsumeError, MqttDelivery, MqttQueueConsumer, MqttTopology};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::forward::{Forwarded, Forwarder};
use crate::metrics::MqttMetrics;
use crate::startup::{STOP_GRACE, Source};

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
    pub fn new(source: Source<'_>) -> Self {
        let settings = source.settings;
        Self {
            amqp_url: settings.bus.amqp_url.clone(),
            consumer_tag: source.client_id.to_owned(),
            topology: MqttTopology::with_prefix(&settings.bus.amqp_prefix),
            prefetch: settings.mqtt_queue_prefetch.max(1),
            forwarder: source.forwarder,
            metrics: source.metrics,
            connected: source.ready,
            shutdown: source.shutdown,
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
                Ok(mut consumer) => {
                    self.backoff.reset();
                    self.set_connected(true);
                    tracing::info!(queue = %self.topology.readings_queue, "consuming devices' MQTT messages");
                    let ended = self.consume(&mut consumer).await;
                    self.set_connected(false);
                    if let Ended::Shutdown = ended {
                        self.drain(consumer).await;
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

    /// Connects, declares the MQTT side of the topology and starts consuming (see
    /// [`MqttQueueConsumer::open`]).
    async fn connect(&self) -> Result<MqttQueueConsumer, ConsumeError> {
        MqttQueueConsumer::open(
            &self.amqp_url,
            &self.topology,
            self.prefetch,
            &self.consumer_tag,
        )
        .await
    }

    /// Takes deliveries until the connection is lost (which [`MqttQueueConsumer::next`] also
    /// notices when the consumer's stream does not say so) or the service stops.
    async fn consume(&mut self, consumer: &mut MqttQueueConsumer) -> Ended {
        loop {
            while self.handlers.try_join_next().is_some() {}
            tokio::select! {
                delivery = consumer.next() => match delivery {
                    Ok(delivery) => self.dispatch(delivery),
                    Err(e) => return Ended::ConnectionLost(e.to_string()),
                },
                _ = self.shutdown.changed() => return Ended::Shutdown,
            }
        }
    }

    /// Hands a message to its own task (the prefetch bounds how many are in hand).
    fn dispatch(&mut self, delivery: MqttDelivery) {
        self.metrics.messages_received.inc();
        let (forwarder, metrics) = (self.forwarder.clone(), self.metrics.clone());
        self.handlers.spawn(async move {
            if forwarder
                .forward(delivery.topic.as_bytes(), &delivery.body)
                .await
                == Forwarded::Confirmed
                && delivery.ack().await
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
    async fn drain(&mut self, consumer: MqttQueueConsumer) {
        let _ = tokio::time::timeout(STOP_GRACE, async {
            while self.handlers.join_next().await.is_some() {}
        })
        .await;
        self.handlers.abort_all();
        while self.handlers.join_next().await.is_some() {}
        consumer.close("ingest-mqtt stopping").await;
    }
}
