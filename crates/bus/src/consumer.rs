//! Consuming the readings queue: deliveries with an acknowledgement handle, dead-lettering of what can
//! never be stored, and the queue's depth; and consuming the MQTT queue (broker mode `rabbitmq`).
//! No `lapin` type crosses this module's edge.

use futures_util::StreamExt;
use lapin::message::Delivery as LapinDelivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicPublishOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Acker, Channel, Confirmation, Connection};
use models::{MessageError, Reading};

use crate::connection::start_consuming;
use crate::topology::{INVALID_ROUTING_KEY, REPORTS_ROUTING_KEY};
use crate::wire::{self, ORIGINAL_MESSAGE_ID_HEADER, REASON_HEADER};
use crate::{
    MqttTopology, READINGS_ROUTING_KEY, Topology, connect, declare_mqtt_topology, declare_topology,
    mqtt_topic_of, open_queue_consumer,
};

/// Why consuming stopped; the caller reconnects.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
    #[error("the consumer was cancelled")]
    Cancelled,
    #[error("the connection to RabbitMQ is gone")]
    ConnectionGone,
    #[error("RabbitMQ did not accept the dead letter")]
    DeadLetterNotConfirmed,
}

/// How often a consumer waiting for deliveries, or an ack waiting for its answer, checks that its
/// connection is still there.
pub const LIVENESS_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// The longest a cancel or a close waits for RabbitMQ's answer.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Which of the topology's queues a [`QueueConsumer`] takes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumedQueue {
    /// Readings, for the persister.
    Readings,
    /// Reports about commands (sent, answered), for the persister.
    CommandReports,
    /// Every device's commands, for ingest-mqtt to forward to the MQTT broker.
    MqttCommands,
}

impl ConsumedQueue {
    fn name(self, topology: &Topology) -> &str {
        match self {
            Self::Readings => &topology.readings_queue,
            Self::CommandReports => &topology.reports_queue,
            Self::MqttCommands => &topology.mqtt_commands_queue,
        }
    }

    /// Where [`QueueConsumer::dead_letter`] keeps what can never be handled.
    fn dead_letter_key(self) -> &'static str {
        match self {
            Self::Readings => READINGS_ROUTING_KEY,
            Self::CommandReports => REPORTS_ROUTING_KEY,
            // a command that cannot be forwarded is never kept: the persister re-sends it
            Self::MqttCommands => INVALID_ROUTING_KEY,
        }
    }
}

/// A consumer of one of the topology's queues on its own connection, on a channel in confirm mode
/// (dead letters published on it are confirmed before the original is acknowledged), with at most
/// `prefetch` messages unacknowledged.
pub struct QueueConsumer {
    connection: Connection,
    channel: Channel,
    consumer: lapin::Consumer,
    topology: Topology,
    queue: ConsumedQueue,
}

/// One message taken from the queue; it stays unacknowledged (and returns to the queue should the
/// channel close) until its [`Ack`] is used.
pub struct Delivery {
    body: Vec<u8>,
    message_id: String,
    routing_key: String,
    ack: Ack,
}

/// The acknowledgement owed for a delivery. Acknowledge only once what it carried is durable.
pub struct Ack {
    acker: Acker,
    /// The channel it came on: once that is gone, the delivery is back on the queue.
    channel: Channel,
}

/// Whether the consuming channel is still open: once it is not, every unacknowledged delivery is
/// back on the queue already, and will be delivered again.
#[derive(Clone)]
pub struct ChannelState(Channel);

/// Samples the queue's depth on a channel of its own, so a failed sample cannot close the consuming
/// one.
pub struct QueueDepth {
    channel: Channel,
    queue: String,
}

impl QueueConsumer {
    /// Connects (naming the connection `connection_name` in RabbitMQ's UI), declares the topology,
    /// and starts consuming `queue`.
    pub async fn open(
        amqp_url: &str,
        topology: &Topology,
        queue: ConsumedQueue,
        prefetch: u16,
        connection_name: &str,
    ) -> Result<Self, ConsumeError> {
        let (connection, channel, consumer) = crate::bounded_setup(async {
            let connection = connect(amqp_url, connection_name).await?;
            let channel = connection.create_channel().await?;
            declare_topology(&channel, topology).await?;
            channel.confirm_select(Default::default()).await?;
            let consumer =
                start_consuming(&channel, queue.name(topology), prefetch.max(1), "").await?;
            Ok((connection, channel, consumer))
        })
        .await?;
        Ok(Self {
            connection,
            channel,
            consumer,
            topology: topology.clone(),
            queue,
        })
    }

    /// The next delivery; an error means the session is over (connection lost, consumer cancelled).
    ///
    /// The connection's state is looked at too, every [`LIVENESS_CHECK`]: after a SIGKILL of
    /// RabbitMQ, lapin was seen to log the connection's reset and never end the consumer's stream,
    /// leaving a persister waiting for deliveries on a dead connection, forever.
    pub async fn next(&mut self) -> Result<Delivery, ConsumeError> {
        let (connection, channel) = (&self.connection, &self.channel);
        let delivery = next_while_alive(&mut self.consumer, || {
            connection.status().connected() && channel.status().connected()
        })
        .await?;
        Ok(Delivery::new(delivery, &self.channel))
    }

    pub fn channel_state(&self) -> ChannelState {
        ChannelState(self.channel.clone())
    }

    pub async fn queue_depth(&self) -> Result<QueueDepth, ConsumeError> {
        Ok(QueueDepth {
            channel: self.connection.create_channel().await?,
            queue: self.queue.name(&self.topology).to_owned(),
        })
    }

    /// Keeps a message that can never be stored on the dead-letter queue, with the reason, and
    /// acknowledges it once RabbitMQ confirmed the copy: it never blocks the queue, and is never lost.
    pub async fn dead_letter(&self, delivery: Delivery, reason: &str) -> Result<(), ConsumeError> {
        let properties = wire::set_aside_properties([
            (REASON_HEADER, reason),
            (ORIGINAL_MESSAGE_ID_HEADER, delivery.message_id.as_str()),
        ]);
        let confirm = self
            .channel
            .basic_publish(
                self.topology.dead_letter_exchange.as_str().into(),
                self.queue.dead_letter_key().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &delivery.body,
                properties,
            )
            .await?;
        match confirm.await? {
            Confirmation::Ack(None) => {}
            _ => return Err(ConsumeError::DeadLetterNotConfirmed),
        }
        delivery.ack.acker.ack(BasicAckOptions::default()).await?;
        Ok(())
    }

    /// Stops deliveries; what was delivered and not acknowledged returns to the queue at [`close`].
    ///
    /// [`close`]: QueueConsumer::close
    pub async fn cancel(&self) {
        let cancel = self
            .channel
            .basic_cancel(self.consumer.tag(), BasicCancelOptions::default());
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, cancel).await;
    }

    /// Closes the channel (whatever is unacknowledged returns to the queue) and the connection;
    /// a connection that does not answer within `CLOSE_TIMEOUT` (RabbitMQ gone) is dropped.
    pub async fn close(self) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            let _ = self.channel.close(200, "bye".into()).await;
            let _ = self.connection.close(200, "bye".into()).await;
        })
        .await;
    }
}

/// The consumer's next delivery, looking every [`LIVENESS_CHECK`] while it waits whether its
/// connection is still `alive`: a consumer's stream was seen not to end when RabbitMQ was killed
/// under it.
async fn next_while_alive(
    consumer: &mut lapin::Consumer,
    alive: impl Fn() -> bool,
) -> Result<LapinDelivery, ConsumeError> {
    loop {
        tokio::select! {
            next = consumer.next() => return match next {
                Some(Ok(delivery)) => Ok(delivery),
                Some(Err(e)) => Err(e.into()),
                None => Err(ConsumeError::Cancelled),
            },
            _ = tokio::time::sleep(LIVENESS_CHECK) => {
                if !alive() {
                    return Err(ConsumeError::ConnectionGone);
                }
            }
        }
    }
}

/// A consumer of the MQTT queue of [`MqttTopology`] (broker mode `rabbitmq`) on its own
/// connection, with at most `prefetch` messages unacknowledged; every instance consumes the same
/// queue (competing consumers). Whatever is unacknowledged when it closes or its connection dies
/// goes back to the queue.
pub struct MqttQueueConsumer {
    connection: Connection,
    consumer: lapin::Consumer,
}

/// One message from the MQTT queue; it stays unacknowledged until [`MqttDelivery::ack`].
pub struct MqttDelivery {
    /// The MQTT topic the device published to.
    pub topic: String,
    pub body: Vec<u8>,
    acker: Acker,
}

impl MqttQueueConsumer {
    /// Connects (the connection and the consumer named `consumer_tag`), declares the MQTT side of
    /// the topology (so the plugin has its exchange and the queue exists before the first device
    /// publishes) and starts consuming, all within [`crate::SETUP_TIMEOUT`].
    pub async fn open(
        amqp_url: &str,
        topology: &MqttTopology,
        prefetch: u16,
        consumer_tag: &str,
    ) -> Result<Self, ConsumeError> {
        let (connection, consumer) = crate::bounded_setup(async {
            let connection = connect(amqp_url, consumer_tag).await?;
            let channel = connection.create_channel().await?;
            declare_mqtt_topology(&channel, topology).await?;
            let _ = channel.close(200, "declared".into()).await;
            let (_channel, consumer) = open_queue_consumer(
                &connection,
                &topology.readings_queue,
                prefetch,
                consumer_tag,
            )
            .await?;
            Ok((connection, consumer))
        })
        .await?;
        Ok(Self {
            connection,
            consumer,
        })
    }

    /// The next message; an error means the session is over (connection lost, consumer
    /// cancelled). The connection's state is looked at every [`LIVENESS_CHECK`] while it waits.
    pub async fn next(&mut self) -> Result<MqttDelivery, ConsumeError> {
        let connection = &self.connection;
        let delivery =
            next_while_alive(&mut self.consumer, || connection.status().connected()).await?;
        Ok(MqttDelivery {
            topic: mqtt_topic_of(delivery.routing_key.as_str()),
            body: delivery.data,
            acker: delivery.acker,
        })
    }

    /// Closes the connection, saying `reason`: what is unacknowledged returns to the queue. A
    /// connection that does not answer within `CLOSE_TIMEOUT` (RabbitMQ gone) is dropped.
    pub async fn close(self, reason: &str) {
        let _ =
            tokio::time::timeout(CLOSE_TIMEOUT, self.connection.close(200, reason.into())).await;
    }
}

impl MqttDelivery {
    /// Whether the acknowledgement reached RabbitMQ (if not, the message is delivered again).
    pub async fn ack(self) -> bool {
        self.acker.ack(BasicAckOptions::default()).await.is_ok()
    }
}

impl Delivery {
    fn new(delivery: LapinDelivery, channel: &Channel) -> Self {
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string())
            .unwrap_or_default();
        Self {
            body: delivery.data,
            message_id,
            routing_key: delivery.routing_key.to_string(),
            ack: Ack {
                acker: delivery.acker,
                channel: channel.clone(),
            },
        }
    }
}

impl Delivery {
    /// The readings the message carries, and its acknowledgement; or, for a message that can never
    /// be decoded, why, with the delivery back (to dead-letter it).
    pub fn into_readings(self) -> Result<(Vec<Reading>, Ack), (MessageError, Box<Delivery>)> {
        match wire::decode_readings(&self.body) {
            Ok(readings) => Ok((readings, self.ack)),
            Err(error) => Err((error, Box::new(self))),
        }
    }

    /// The publisher's `message_id` (empty when it set none).
    pub fn message_id(&self) -> &str {
        &self.message_id
    }

    /// When the message was published, read from its id (a readings message's is a UUIDv7);
    /// `None` for an id that carries no time.
    pub fn published_at(&self) -> Option<std::time::SystemTime> {
        wire::published_at(&self.message_id)
    }

    /// The routing key it was published with (a command's: its device id).
    pub fn routing_key(&self) -> &str {
        &self.routing_key
    }

    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// Its acknowledgement, for a message handled whole (a report, a command); the body goes with
    /// it.
    pub fn into_parts(self) -> (Vec<u8>, Ack) {
        (self.body, self.ack)
    }
}

impl Ack {
    /// `Ok(true)` once acknowledged; `Ok(false)` or an error when the channel closed first (the
    /// message is then delivered again).
    ///
    /// Like [`QueueConsumer::next`], it looks at the channel every [`LIVENESS_CHECK`] while it
    /// waits: an ack sent as RabbitMQ was killed was seen to wait for an answer forever, holding the
    /// persister's writer, and so its session, on a dead connection.
    pub async fn ack(self) -> Result<bool, ConsumeError> {
        let acked = self.acker.ack(BasicAckOptions::default());
        tokio::pin!(acked);
        loop {
            tokio::select! {
                result = &mut acked => return Ok(result?),
                _ = tokio::time::sleep(LIVENESS_CHECK) => {
                    if !self.channel.status().connected() {
                        return Err(ConsumeError::ConnectionGone);
                    }
                }
            }
        }
    }
}

impl ChannelState {
    pub fn is_open(&self) -> bool {
        self.0.status().connected()
    }
}

impl QueueDepth {
    /// Messages waiting in the queue now.
    pub async fn sample(&self) -> Result<u32, ConsumeError> {
        let queue = self
            .channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(queue.message_count())
    }
}
