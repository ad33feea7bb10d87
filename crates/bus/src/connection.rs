use std::time::Duration;

use lapin::options::{BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer};
use serde::Deserialize;

use crate::Topology;

/// How long to wait for RabbitMQ to accept a connection before counting the attempt failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where RabbitMQ is and which names to use there.
#[derive(Debug, Clone, Deserialize)]
pub struct BusSettings {
    /// `amqp://user:pass@host:5672/%2f` (add `?heartbeat=10` to notice a dead peer sooner).
    pub amqp_url: String,
    /// Prefix of every exchange and queue name (see [`Topology`]).
    pub amqp_prefix: String,
}

impl BusSettings {
    pub fn topology(&self) -> Topology {
        Topology::with_prefix(&self.amqp_prefix)
    }
}

/// Connects, naming the connection after the service so that RabbitMQ's management UI shows who is who.
pub async fn connect(url: &str, connection_name: &str) -> lapin::Result<Connection> {
    let properties =
        ConnectionProperties::default().with_connection_name(connection_name.to_owned().into());
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, properties)).await {
        Ok(result) => result,
        Err(_) => Err(lapin::Error::from(lapin::ErrorKind::IOError(
            std::sync::Arc::new(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer from RabbitMQ within {CONNECT_TIMEOUT:?}"),
            )),
        ))),
    }
}

/// A channel in confirm mode consuming the readings queue, `prefetch` unacknowledged messages at most.
pub async fn open_consumer(
    connection: &Connection,
    topology: &Topology,
    prefetch: u16,
    consumer_tag: &str,
) -> lapin::Result<(Channel, Consumer)> {
    let channel = connection.create_channel().await?;
    crate::declare_topology(&channel, topology).await?;
    // confirm mode: dead letters published on this channel are confirmed before the original is acked
    channel.confirm_select(Default::default()).await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            topology.readings_queue.as_str().into(),
            consumer_tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((channel, consumer))
}

/// A channel consuming `queue` (already declared), `prefetch` unacknowledged messages at most.
/// Messages left unacknowledged when the channel or connection closes go back to the queue.
pub async fn open_queue_consumer(
    connection: &Connection,
    queue: &str,
    prefetch: u16,
    consumer_tag: &str,
) -> lapin::Result<(Channel, Consumer)> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            consumer_tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((channel, consumer))
}

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
    #[error("RabbitMQ did not accept the dead letter")]
    NotConfirmed,
}

/// Keeps a message that can never be stored (or was refused at ingest) on the dead-letter exchange,
/// with the reason in the `x-sensorhub-reason` header; returns once RabbitMQ confirmed it. The
/// channel must be in confirm mode.
pub async fn publish_dead_letter(
    channel: &Channel,
    topology: &Topology,
    routing_key: &str,
    body: &[u8],
    reason: &str,
    extra_headers: &[(&str, &str)],
) -> Result<(), DeadLetterError> {
    let mut headers = FieldTable::default();
    // header values are bounded so a huge reason cannot make the message itself unpublishable
    let reason: String = reason.chars().take(1000).collect();
    headers.insert(
        "x-sensorhub-reason".into(),
        AMQPValue::LongString(reason.into()),
    );
    for (name, value) in extra_headers {
        let value: String = value.chars().take(1000).collect();
        headers.insert((*name).into(), AMQPValue::LongString(value.into()));
    }
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    let confirm = channel
        .basic_publish(
            topology.dead_letter_exchange.as_str().into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            properties,
        )
        .await?;
    match confirm.await? {
        Confirmation::Ack(None) => Ok(()),
        _ => Err(DeadLetterError::NotConfirmed),
    }
}
