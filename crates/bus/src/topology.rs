use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

/// The names of everything Sensorhub keeps on RabbitMQ, all under one prefix (default `sensorhub`;
/// tests use a unique prefix each).
///
/// ```text
/// <p>.readings (direct exchange) ──"readings"──► <p>.readings (quorum queue) ──► persisters
/// <p>.dead     (direct exchange) ──"readings"──► <p>.readings.dead  (what the persister cannot store)
///                                ──"invalid"───► <p>.invalid        (payloads ingest-mqtt refused)
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub readings_exchange: String,
    pub readings_queue: String,
    pub dead_letter_exchange: String,
    pub dead_readings_queue: String,
    pub invalid_queue: String,
}

pub const READINGS_ROUTING_KEY: &str = "readings";
pub const INVALID_ROUTING_KEY: &str = "invalid";

impl Topology {
    pub fn with_prefix(prefix: &str) -> Self {
        Self {
            readings_exchange: format!("{prefix}.readings"),
            readings_queue: format!("{prefix}.readings"),
            dead_letter_exchange: format!("{prefix}.dead"),
            dead_readings_queue: format!("{prefix}.readings.dead"),
            invalid_queue: format!("{prefix}.invalid"),
        }
    }
}

/// Quorum queues: replicated when RabbitMQ is a cluster, fsynced before confirming, and the queue
/// type RabbitMQ recommends for data that must not be lost.
fn quorum_arguments(dead_letter_exchange: Option<&str>) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    if let Some(dlx) = dead_letter_exchange {
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(dlx.into()),
        );
    }
    args
}

/// Declares the whole topology; safe to call from every service at every connect.
pub async fn declare_topology(channel: &Channel, t: &Topology) -> lapin::Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for exchange in [&t.readings_exchange, &t.dead_letter_exchange] {
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await?;
    }
    let queues = [
        (
            &t.readings_queue,
            Some(t.dead_letter_exchange.as_str()),
            &t.readings_exchange,
            READINGS_ROUTING_KEY,
        ),
        (
            &t.dead_readings_queue,
            None,
            &t.dead_letter_exchange,
            READINGS_ROUTING_KEY,
        ),
        (
            &t.invalid_queue,
            None,
            &t.dead_letter_exchange,
            INVALID_ROUTING_KEY,
        ),
    ];
    for (queue, dlx, exchange, key) in queues {
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::durable(),
                quorum_arguments(dlx),
            )
            .await?;
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// Removes everything (tests clean up after themselves with this).
pub async fn delete_topology(channel: &Channel, t: &Topology) -> lapin::Result<()> {
    for queue in [&t.readings_queue, &t.dead_readings_queue, &t.invalid_queue] {
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    for exchange in [&t.readings_exchange, &t.dead_letter_exchange] {
        channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await?;
    }
    Ok(())
}
