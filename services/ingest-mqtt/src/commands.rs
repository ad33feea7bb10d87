//! Commands out: the persister publishes every due command on RabbitMQ's commands exchange; this
//! consumes the queue that takes them all for MQTT (`<prefix>.commands.mqtt`, every replica on the
//! same queue: competing consumers) and publishes each live one on `devices/<id>/commands`:
//! - broker mode `mosquitto`: handed to the MQTT bridge, which publishes it at QoS 1 through its
//!   own session. Once Mosquitto acknowledged that publish (its PUBACK, correlated with the publish
//!   by packet id, see `mosquitto`) and said a subscriber took it, the persister is told it was
//!   sent (a report confirmed by RabbitMQ), and only then is the delivery acknowledged.
//! - broker mode `rabbitmq`: published on the MQTT plugin's exchange as `devices.<id>.commands`
//!   (see [`bus::MqttTopology`]), which reaches the device's subscription queue if it subscribed.
//!   RabbitMQ's confirm is all there is to wait for, and it cannot tell whether a device took it:
//!   the command is reported sent once confirmed.
//!
//! Whatever else happens to a command (no device subscribed, the broker refused it, the MQTT
//! connection was lost before the PUBACK, it expired), the delivery is acknowledged without a
//! report: the persister publishes every unanswered command again every `command_resend_secs` until
//! it is answered or expires, and that re-send is the retry. Requeueing instead would hand the
//! command straight back (to this replica or another) in a tight loop while Mosquitto is away or the
//! device offline, with nothing to pace it; the re-send interval paces it, and the command's expiry
//! ends it. Devices act on a command id once, so a command published twice is harmless.
//!
//! A delivery is left unacknowledged only when the service stops before it was handled, or RabbitMQ's
//! connection is lost: RabbitMQ then delivers it again.

use std::sync::Arc;
use std::time::Duration;

use bus::{ConsumedQueue, Delivery, PublishError, Publisher, QueueConsumer, Topology};
use chrono::{DateTime, Utc};
use models::{Channel, CommandReport, DeviceCommand, DeviceId};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::metrics::{MqttMetrics, OutcomeLabels};
use crate::settings::Settings;
use crate::startup::STOP_GRACE;

/// What can become of a command taken from the queue (the `commands` metric's outcomes, each
/// created at start-up).
pub const OUTCOMES: [&str; 6] = [
    "sent",
    "no_subscriber",
    "refused",
    "failed",
    "expired",
    "undecodable",
];

/// Commands RabbitMQ may hand over unacknowledged: each waits for one MQTT round trip and one
/// confirmed report, and commands are few.
pub(crate) const COMMANDS_PREFETCH: u16 = 32;
const FIRST_RECONNECT_BACKOFF: Duration = Duration::from_millis(100);

/// What the MQTT bridge made of a command it was handed.
#[derive(Debug)]
pub(crate) enum Handed {
    /// Mosquitto acknowledged the publish, and a subscribed session took it (delivered, or queued
    /// for a persistent session that is away).
    Sent,
    /// Mosquitto acknowledged it but no session is subscribed: nobody received it.
    NoSubscriber,
    /// Mosquitto refused it (its PUBACK's reason code): most likely ingest's role may not publish
    /// commands (`sensorctl mqtt init` was not run again after an upgrade).
    Refused(String),
    /// Not acknowledged: the MQTT connection was lost first, or the request could not be queued.
    Failed(String),
    /// Past its expiry by the time it was to be published.
    Expired,
}

/// A command for the MQTT bridge to publish, and where it answers how that went.
pub(crate) struct CommandPublish {
    pub topic: String,
    /// The command exactly as the persister published it (a `DeviceCommand`'s JSON).
    pub payload: Vec<u8>,
    pub expires_at: DateTime<Utc>,
    pub done: oneshot::Sender<Handed>,
}

/// A device's commands topic.
pub(crate) fn commands_topic(device: &DeviceId) -> String {
    format!("devices/{}/commands", device.as_str())
}

/// Why a consuming session ended.
enum Ended {
    Shutdown,
    ConnectionLost(String),
}

/// The commands consumer: where to connect, and what every handler shares.
pub(crate) struct CommandsOut {
    amqp_url: String,
    topology: Topology,
    connection_name: String,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    backoff: bus::Backoff,
}

/// Where commands go out.
pub(crate) enum Outlet {
    /// To the Mosquitto bridge, which publishes them in its session.
    Mosquitto(mpsc::Sender<CommandPublish>),
    /// To the MQTT plugin's exchange of this name.
    Rabbitmq(String),
}

/// What every command's handler uses.
struct Shared {
    publisher: Publisher,
    outlet: Outlet,
    metrics: MqttMetrics,
    max_backoff: Duration,
    shutdown: watch::Receiver<bool>,
}

impl CommandsOut {
    pub fn new(
        settings: &Settings,
        client_id: &str,
        publisher: Publisher,
        outlet: Outlet,
        metrics: MqttMetrics,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let max_backoff = Duration::from_millis(settings.retry_max_backoff_ms);
        Self {
            amqp_url: settings.bus.amqp_url.clone(),
            topology: Topology::with_prefix(&settings.bus.amqp_prefix),
            connection_name: format!("{client_id} commands"),
            shared: Arc::new(Shared {
                publisher,
                outlet,
                metrics,
                max_backoff: max_backoff.max(Duration::from_millis(100)),
                shutdown: shutdown.clone(),
            }),
            shutdown,
            backoff: bus::Backoff::new(FIRST_RECONNECT_BACKOFF, max_backoff),
        }
    }

    /// Consumes until shutdown, reconnecting whenever RabbitMQ's connection is lost.
    pub async fn run(mut self) {
        loop {
            if *self.shutdown.borrow() {
                return;
            }
            let opened = QueueConsumer::open(
                &self.amqp_url,
                &self.topology,
                ConsumedQueue::MqttCommands,
                COMMANDS_PREFETCH,
                &self.connection_name,
            )
            .await;
            let error = match opened {
                Ok(consumer) => {
                    self.backoff.reset();
                    tracing::info!(queue = %self.topology.mqtt_commands_queue, "forwarding commands to MQTT");
                    let mut session = CommandSession {
                        consumer,
                        shared: self.shared.clone(),
                        handlers: JoinSet::new(),
                    };
                    match session.run(&mut self.shutdown).await {
                        Ended::Shutdown => {
                            session.close(STOP_GRACE).await;
                            return;
                        }
                        Ended::ConnectionLost(error) => {
                            session.close(Duration::ZERO).await;
                            error
                        }
                    }
                }
                Err(e) => e.to_string(),
            };
            let delay = self.backoff.next_delay();
            tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "cannot consume the commands queue");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.shutdown.changed() => {}
            }
        }
    }
}

/// One connection's worth of taking commands off the queue.
struct CommandSession {
    consumer: QueueConsumer,
    shared: Arc<Shared>,
    handlers: JoinSet<()>,
}

impl CommandSession {
    /// Takes deliveries until the connection is lost or the service stops.
    async fn run(&mut self, shutdown: &mut watch::Receiver<bool>) -> Ended {
        loop {
            while self.handlers.try_join_next().is_some() {}
            let delivery = tokio::select! {
                next = self.consumer.next() => next,
                _ = shutdown.changed() => return Ended::Shutdown,
            };
            match delivery {
                Ok(delivery) => self.dispatch(delivery).await,
                Err(e) => return Ended::ConnectionLost(e.to_string()),
            }
        }
    }

    /// Reads the command; one that can never be published (not a command, not a device's) is
    /// set aside on the invalid queue, an expired one acknowledged and dropped; a live one is
    /// handed to a task of its own (the prefetch bounds how many).
    async fn dispatch(&mut self, delivery: Delivery) {
        let read = DeviceId::parse(delivery.routing_key())
            .map_err(|e| format!("routing key: device id {e}"))
            .and_then(|device| Ok((device, DeviceCommand::decode(delivery.body())?)));
        let (device, command) = match read {
            Ok(read) => read,
            Err(reason) => {
                self.shared.count("undecodable");
                tracing::warn!(%reason, "a command that cannot be published; set aside");
                if let Err(e) = self
                    .consumer
                    .dead_letter(delivery, &format!("undecodable command: {reason}"))
                    .await
                {
                    // unacknowledged, it comes back on the next connection
                    tracing::warn!(error = %e, "cannot set a command aside");
                }
                return;
            }
        };
        if !command.is_live(Utc::now()) {
            self.shared.count("expired");
            let (_, ack) = delivery.into_parts();
            let _ = ack.ack().await;
            return;
        }
        let shared = self.shared.clone();
        self.handlers
            .spawn(async move { shared.deliver(device, command, delivery).await });
    }

    /// Gives the handlers up to `grace` to finish, ends the others (their deliveries go back to
    /// the queue), and closes the connection.
    async fn close(mut self, grace: Duration) {
        let _ = tokio::time::timeout(grace, async {
            while self.handlers.join_next().await.is_some() {}
        })
        .await;
        self.handlers.abort_all();
        while self.handlers.join_next().await.is_some() {}
        self.consumer.close().await;
    }
}

impl Shared {
    fn count(&self, outcome: &'static str) {
        self.metrics
            .commands
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// One command: published to the device's MQTT topic, the `sent` report confirmed when a
    /// subscriber took it, then acknowledged (see the module's documentation for the rest).
    async fn deliver(&self, device: DeviceId, command: DeviceCommand, delivery: Delivery) {
        let (payload, ack) = delivery.into_parts();
        let handed = match &self.outlet {
            Outlet::Mosquitto(to_broker) => {
                let (done, handed) = oneshot::channel();
                let publish = CommandPublish {
                    topic: commands_topic(&device),
                    payload,
                    expires_at: command.expires_at,
                    done,
                };
                // The bridge gone, or gone before answering, means the service is stopping: left
                // unacknowledged, the command is delivered again (here after a restart, or to a
                // replica).
                if to_broker.send(publish).await.is_err() {
                    return;
                }
                let Ok(handed) = handed.await else {
                    return;
                };
                handed
            }
            Outlet::Rabbitmq(_) if !command.is_live(Utc::now()) => Handed::Expired,
            Outlet::Rabbitmq(exchange) => {
                match self
                    .publisher
                    .publish_mqtt_command(exchange, device.as_str(), &command)
                    .await
                {
                    Ok(()) => Handed::Sent,
                    Err(PublishError::ShuttingDown) => return,
                    Err(e) => Handed::Failed(e.to_string()),
                }
            }
        };
        match handed {
            Handed::Sent => {
                let report = CommandReport::sent(&command.id, device, Channel::Mqtt);
                if !self.report_until_confirmed(&report).await {
                    return;
                }
                self.count("sent");
            }
            Handed::NoSubscriber => {
                tracing::debug!(command = %command.id, device = %device, "no session subscribed to the device's commands; the persister sends it again");
                self.count("no_subscriber");
            }
            Handed::Refused(reason) => {
                tracing::error!(command = %command.id, %reason, "Mosquitto refused a command (may ingest-mqtt's role publish devices/+/commands? run `sensorctl mqtt init`)");
                self.count("refused");
            }
            Handed::Failed(reason) => {
                tracing::warn!(command = %command.id, %reason, "a command not accepted by the broker; the persister sends it again");
                self.count("failed");
            }
            Handed::Expired => self.count("expired"),
        }
        let _ = ack.ack().await;
    }

    /// The report published and confirmed, retried while RabbitMQ is away; false when stopping
    /// first.
    async fn report_until_confirmed(&self, report: &CommandReport) -> bool {
        let mut backoff = bus::Backoff::new(Duration::from_millis(50), self.max_backoff);
        loop {
            match self.publisher.publish_report(report).await {
                Ok(()) => return true,
                Err(PublishError::ShuttingDown) => return false,
                Err(_) if *self.shutdown.borrow() => return false,
                Err(e) => {
                    self.metrics.publish_retries.inc();
                    tracing::debug!(error = %e, "RabbitMQ unavailable; holding a command's report");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }
}
