use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
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
