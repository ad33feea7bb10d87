use std::time::Duration;

use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer};
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
    tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, properties))
        .await
        .unwrap_or_else(|_| Err(timed_out("accept a connection", CONNECT_TIMEOUT)))
}

/// The longest the set-up of a connection may take (connect, open a channel, declare the topology,
/// start consuming). A broker killed while a service reconnects, or still booting when it does, can
/// leave a set-up step waiting for an answer that never comes: a persister was seen to log
/// "reconnecting" after a SIGKILL of RabbitMQ and never consume again. Past this, the attempt fails
/// and the service's backoff tries again with a new connection.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs a connection's set-up, failing it after [`SETUP_TIMEOUT`].
pub async fn bounded_setup<T>(
    setup: impl std::future::Future<Output = lapin::Result<T>>,
) -> lapin::Result<T> {
    tokio::time::timeout(SETUP_TIMEOUT, setup)
        .await
        .unwrap_or_else(|_| Err(timed_out("finish setting up a connection", SETUP_TIMEOUT)))
}

fn timed_out(what: &str, limit: Duration) -> lapin::Error {
    lapin::Error::from(lapin::ErrorKind::IOError(std::sync::Arc::new(
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("RabbitMQ did not {what} within {limit:?}"),
        ),
    )))
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
    let consumer = start_consuming(&channel, queue, prefetch, consumer_tag).await?;
    Ok((channel, consumer))
}

/// Consumes `queue` (already declared) on `channel`, `prefetch` unacknowledged messages at most.
pub(crate) async fn start_consuming(
    channel: &Channel,
    queue: &str,
    prefetch: u16,
    consumer_tag: &str,
) -> lapin::Result<Consumer> {
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    channel
        .basic_consume(
            queue.into(),
            consumer_tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// The next delivery of a consuming session, or why the session is lost: its consumer failed or
/// was cancelled, or its connection or channel is gone. The latter is looked at every
/// [`crate::LIVENESS_CHECK`], for lapin was seen not to end a consumer's stream after a SIGKILL of
/// RabbitMQ.
pub(crate) async fn next_delivery(
    consumer: &mut Consumer,
    connection: &Connection,
    channel: &Channel,
) -> Result<lapin::message::Delivery, String> {
    use futures_util::StreamExt;
    loop {
        tokio::select! {
            delivery = consumer.next() => return match delivery {
                Some(Ok(delivery)) => Ok(delivery),
                Some(Err(e)) => Err(e.to_string()),
                None => Err("the consumer was cancelled".into()),
            },
            _ = tokio::time::sleep(crate::LIVENESS_CHECK) => {
                if !(connection.status().connected() && channel.status().connected()) {
                    return Err("the connection is gone".into());
                }
            }
        }
    }
}
