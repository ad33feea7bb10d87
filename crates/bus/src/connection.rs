use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer};
use serde::Deserialize;

use crate::Topology;

/// How long to wait for RabbitMQ to accept a connection before counting the attempt failed. With
/// several addresses, each gets its share (at least [`MIN_CONNECT_TIMEOUT_PER_ADDRESS`]), so one
/// node that black-holes connections (partitioned, or its host gone) does not hide the others.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const MIN_CONNECT_TIMEOUT_PER_ADDRESS: Duration = Duration::from_secs(3);

/// Where RabbitMQ is and which names to use there.
#[derive(Debug, Clone, Deserialize)]
pub struct BusSettings {
    /// `amqp://user:pass@host:5672/%2f` (add `?heartbeat=10` to notice a dead peer sooner), or the
    /// nodes of a cluster, comma-separated: `amqp://u:p@rabbit1:5672/%2f,amqp://u:p@rabbit2:5672/%2f`
    /// (see [`connect`]).
    pub amqp_url: String,
    /// Prefix of every exchange and queue name (see [`Topology`]).
    pub amqp_prefix: String,
}

impl BusSettings {
    pub fn topology(&self) -> Topology {
        Topology::with_prefix(&self.amqp_prefix)
    }
}

/// The addresses of `urls`: one AMQP URL, or several separated by commas (a cluster's nodes).
pub fn amqp_addresses(urls: &str) -> Vec<&str> {
    urls.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .collect()
}

/// Where the next connection of this process tries first: each connection starts one address
/// further on, so a process's connections spread over a cluster's nodes, and a reconnect after a
/// node died starts at another node instead of waiting on the dead one first.
static NEXT_ADDRESS: AtomicUsize = AtomicUsize::new(0);

/// Connects to RabbitMQ at `urls` (one address, or a cluster's nodes comma-separated; each tried in
/// turn until one accepts), naming the connection after the service so that RabbitMQ's management
/// UI shows who is who.
///
/// Any node of a cluster will do: a quorum queue is reached from every node, and a node cut off
/// from the majority closes its clients' connections (`pause_minority`), which then reconnect here.
pub async fn connect(urls: &str, connection_name: &str) -> lapin::Result<Connection> {
    let addresses = amqp_addresses(urls);
    let Some(count) = std::num::NonZeroUsize::new(addresses.len()) else {
        return Err(io_error(
            std::io::ErrorKind::InvalidInput,
            "AMQP_URL holds no address".to_owned(),
        ));
    };
    let per_address = (CONNECT_TIMEOUT / count.get() as u32).max(MIN_CONNECT_TIMEOUT_PER_ADDRESS);
    let first = NEXT_ADDRESS.fetch_add(1, Ordering::Relaxed) % count;
    let mut last_error = None;
    for offset in 0..count.get() {
        let url = addresses[(first + offset) % count];
        match connect_one(url, connection_name, per_address).await {
            Ok(connection) => return Ok(connection),
            Err(e) => {
                if count.get() > 1 {
                    tracing::warn!(node = %without_credentials(url), error = %e, "RabbitMQ node refused; trying the next");
                }
                last_error = Some(e);
            }
        }
    }
    Err(last_error.unwrap_or_else(|| io_error(std::io::ErrorKind::Other, "no address".into())))
}

async fn connect_one(
    url: &str,
    connection_name: &str,
    limit: Duration,
) -> lapin::Result<Connection> {
    let properties =
        ConnectionProperties::default().with_connection_name(connection_name.to_owned().into());
    tokio::time::timeout(limit, Connection::connect(url, properties))
        .await
        .unwrap_or_else(|_| Err(timed_out("accept a connection", limit)))
}

/// `url` with its user and password left out, for logs.
fn without_credentials(url: &str) -> &str {
    match url.rsplit_once('@') {
        Some((_, host_and_rest)) => host_and_rest,
        None => url,
    }
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
    io_error(
        std::io::ErrorKind::TimedOut,
        format!("RabbitMQ did not {what} within {limit:?}"),
    )
}

fn io_error(kind: std::io::ErrorKind, message: String) -> lapin::Error {
    lapin::Error::from(lapin::ErrorKind::IOError(std::sync::Arc::new(
        std::io::Error::new(kind, message),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_split_on_commas_and_logged_without_credentials() {
        assert_eq!(
            amqp_addresses("amqp://u:p@a:5672/%2f, amqp://u:p@b:5673/%2f,"),
            ["amqp://u:p@a:5672/%2f", "amqp://u:p@b:5673/%2f"]
        );
        assert_eq!(amqp_addresses("amqp://a/%2f"), ["amqp://a/%2f"]);
        assert!(amqp_addresses(" ").is_empty());
        assert_eq!(without_credentials("amqp://u:p@a:5672/%2f"), "a:5672/%2f");
        assert_eq!(without_credentials("amqp://a:5672"), "amqp://a:5672");
    }
}
