//! Consuming the readings queue: deliveries with an acknowledgement handle, dead-lettering of what can
//! never be stored, and the queue's depth. No `lapin` type crosses this module's edge.

use futures_util::StreamExt;
use lapin::message::Delivery as LapinDelivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Acker, Channel, Confirmation, Connection};
use models::{MessageError, Reading};

use crate::wire::{self, ORIGINAL_MESSAGE_ID_HEADER, REASON_HEADER};
use crate::{READINGS_ROUTING_KEY, Topology, connect, declare_topology};

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

/// A consumer of the readings queue on its own connection, on a channel in confirm mode (dead
/// letters published on it are confirmed before the original is acknowledged), with at most
/// `prefetch` messages unacknowledged.
pub struct ReadingsConsumer {
    connection: Connection,
    channel: Channel,
    consumer: lapin::Consumer,
    topology: Topology,
}

/// One message taken from the queue; it stays unacknowledged (and returns to the queue should the
/// channel close) until its [`Ack`] is used.
pub struct Delivery {
    body: Vec<u8>,
    message_id: String,
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

impl ReadingsConsumer {
    /// Connects (naming the connection `connection_name` in RabbitMQ's UI), declares the topology,
    /// and starts consuming.
    pub async fn open(
        amqp_url: &str,
        topology: &Topology,
        prefetch: u16,
        connection_name: &str,
    ) -> Result<Self, ConsumeError> {
        let (connection, channel, consumer) = crate::bounded_setup(async {
            let connection = connect(amqp_url, connection_name).await?;
            let channel = connection.create_channel().await?;
            declare_topology(&channel, topology).await?;
            channel.confirm_select(Default::default()).await?;
            channel
                .basic_qos(prefetch.max(1), BasicQosOptions::default())
                .await?;
            let consumer = channel
                .basic_consume(
                    topology.readings_queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok((connection, channel, consumer))
        })
        .await?;
        Ok(Self {
            connection,
            channel,
            consumer,
            topology: topology.clone(),
        })
    }

    /// The next delivery; an error means the session is over (connection lost, consumer cancelled).
    ///
    /// The connection's state is looked at too, every [`LIVENESS_CHECK`]: after a SIGKILL of
    /// RabbitMQ, lapin was seen to log the connection's reset and never end the consumer's stream,
    /// leaving a persister waiting for deliveries on a dead connection, forever.
    pub async fn next(&mut self) -> Result<Delivery, ConsumeError> {
        loop {
            tokio::select! {
                next = self.consumer.next() => return match next {
                    Some(Ok(delivery)) => Ok(Delivery::new(delivery, &self.channel)),
                    Some(Err(e)) => Err(e.into()),
                    None => Err(ConsumeError::Cancelled),
                },
                _ = tokio::time::sleep(LIVENESS_CHECK) => {
                    if !self.connection.status().connected() || !self.channel.status().connected() {
                        return Err(ConsumeError::ConnectionGone);
                    }
                }
            }
        }
    }

    pub fn channel_state(&self) -> ChannelState {
        ChannelState(self.channel.clone())
    }

    pub async fn queue_depth(&self) -> Result<QueueDepth, ConsumeError> {
        Ok(QueueDepth {
            channel: self.connection.create_channel().await?,
            queue: self.topology.readings_queue.clone(),
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
                READINGS_ROUTING_KEY.into(),
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
    /// [`close`]: ReadingsConsumer::close
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
}

impl Ack {
    /// `Ok(true)` once acknowledged; `Ok(false)` or an error when the channel closed first (the
    /// message is then delivered again).
    ///
    /// Like [`ReadingsConsumer::next`], it looks at the channel every [`LIVENESS_CHECK`] while it
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
