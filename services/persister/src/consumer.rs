//! Consuming: connect (and reconnect), take deliveries, decode them, dead-letter what cannot be
//! decoded, and hand batches to the writers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bus::lapin::Acker;
use bus::lapin::message::Delivery;
use bus::lapin::options::{BasicAckOptions, BasicCancelOptions};
use bus::lapin::{Channel, Connection, Consumer};
use bus::{Topology, publish_dead_letter};
use futures_util::StreamExt;
use models::{MessageError, Reading, ReadingBatchMessage};
use tokio::sync::{Mutex, mpsc, watch};

use crate::metrics::{PersisterMetrics, ReasonLabels};
use crate::settings::Settings;
use crate::writer::{self, WriteJob};

/// How often the queue's length is sampled for `/metrics`.
const QUEUE_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// Readings decoded from some messages, and the acknowledgements owed once they are stored.
pub struct Batch {
    pub readings: Vec<Reading>,
    pub ackers: Vec<Acker>,
}

enum SessionEnd {
    Shutdown,
    Lost(String),
}

pub async fn consume(
    settings: Settings,
    pool: store::PgPool,
    metrics: PersisterMetrics,
    amqp_connected: Arc<AtomicBool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let topology = settings.bus.topology();
    let initial_backoff = Duration::from_millis(100);
    let max_backoff = Duration::from_millis(settings.retry_max_backoff_ms.max(100));
    let mut backoff = initial_backoff;
    loop {
        if *shutdown.borrow() {
            return;
        }
        match open(&settings, &topology).await {
            Ok((connection, channel, consumer)) => {
                backoff = initial_backoff;
                amqp_connected.store(true, Ordering::SeqCst);
                metrics.amqp_connected.set(1);
                tracing::info!(queue = %topology.readings_queue, "consuming");
                let end = session(
                    &settings,
                    &topology,
                    &pool,
                    &metrics,
                    &connection,
                    &channel,
                    consumer,
                    &mut shutdown,
                )
                .await;
                amqp_connected.store(false, Ordering::SeqCst);
                metrics.amqp_connected.set(0);
                // Closing the channel returns whatever is unacknowledged to the queue.
                let _ = channel.close(200, "bye".into()).await;
                let _ = connection.close(200, "bye".into()).await;
                match end {
                    SessionEnd::Shutdown => return,
                    SessionEnd::Lost(why) => {
                        tracing::warn!(error = %why, "lost RabbitMQ; reconnecting")
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot consume from RabbitMQ");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(max_backoff);
    }
}

async fn open(
    settings: &Settings,
    topology: &Topology,
) -> bus::lapin::Result<(Connection, Channel, Consumer)> {
    let connection = bus::connect(&settings.bus.amqp_url, "persister").await?;
    let (channel, consumer) =
        bus::open_consumer(&connection, topology, settings.prefetch.max(1), "").await?;
    Ok((connection, channel, consumer))
}

#[allow(clippy::too_many_arguments)]
async fn session(
    settings: &Settings,
    topology: &Topology,
    pool: &store::PgPool,
    metrics: &PersisterMetrics,
    connection: &Connection,
    channel: &Channel,
    mut consumer: Consumer,
    shutdown: &mut watch::Receiver<bool>,
) -> SessionEnd {
    let writers = settings.db_writers.max(1);
    // One batch waiting per writer at most: beyond that, deliveries wait in the prefetch window and
    // then in RabbitMQ, not in our memory.
    let (batches, batches_rx) = mpsc::channel::<WriteJob>(writers);
    let batches_rx = Arc::new(Mutex::new(batches_rx));
    let writer_tasks: Vec<_> = (0..writers)
        .map(|_| {
            tokio::spawn(writer::write_batches(
                batches_rx.clone(),
                pool.clone(),
                metrics.clone(),
                channel.clone(),
                settings.retry_max_backoff_ms,
                settings.backfill_horizon_days,
                shutdown.clone(),
            ))
        })
        .collect();
    let sampler = tokio::spawn(sample_queue_length(
        connection.create_channel().await.ok(),
        topology.readings_queue.clone(),
        metrics.clone(),
    ));

    let linger = Duration::from_millis(settings.batch_linger_ms);
    let max_readings = settings.batch_max_readings.max(1);
    let end = loop {
        let first = tokio::select! {
            next = consumer.next() => next,
            _ = shutdown.changed() => break SessionEnd::Shutdown,
        };
        let mut batch = Batch {
            readings: Vec::new(),
            ackers: Vec::new(),
        };
        let mut deliveries = vec![];
        match first {
            Some(Ok(delivery)) => deliveries.push(delivery),
            Some(Err(e)) => break SessionEnd::Lost(e.to_string()),
            None => break SessionEnd::Lost("the consumer was cancelled".into()),
        }
        if let Err(end) = add(&mut batch, deliveries.drain(..), channel, topology, metrics).await {
            break end;
        }
        // Gather more for the same transaction, up to the batch size or the linger.
        let until = tokio::time::Instant::now() + linger;
        let mut lost = None;
        while batch.readings.len() < max_readings {
            match tokio::time::timeout_at(until, consumer.next()).await {
                Ok(Some(Ok(delivery))) => {
                    if let Err(end) = add(
                        &mut batch,
                        std::iter::once(delivery),
                        channel,
                        topology,
                        metrics,
                    )
                    .await
                    {
                        lost = Some(end);
                        break;
                    }
                }
                Ok(Some(Err(e))) => {
                    lost = Some(SessionEnd::Lost(e.to_string()));
                    break;
                }
                Ok(None) => {
                    lost = Some(SessionEnd::Lost("the consumer was cancelled".into()));
                    break;
                }
                Err(_) => break,
            }
        }
        if !batch.readings.is_empty() && batches.send(WriteJob { batch }).await.is_err() {
            break SessionEnd::Lost("the writers stopped".into());
        }
        if let Some(end) = lost {
            break end;
        }
    };
    if matches!(end, SessionEnd::Shutdown) {
        // Stop deliveries; what was delivered and not batched returns to the queue with the channel.
        let _ = channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await;
    }
    // The writers finish the batches they hold (and any queued), acknowledge them, and stop.
    drop(batches);
    for task in writer_tasks {
        let _ = task.await;
    }
    sampler.abort();
    end
}

/// Decodes deliveries into the batch; a message that cannot be decoded is dead-lettered with the
/// reason and acknowledged, so it never blocks the queue.
async fn add(
    batch: &mut Batch,
    deliveries: impl Iterator<Item = Delivery>,
    channel: &Channel,
    topology: &Topology,
    metrics: &PersisterMetrics,
) -> Result<(), SessionEnd> {
    for delivery in deliveries {
        match ReadingBatchMessage::decode(&delivery.data) {
            Ok(readings) => {
                batch.readings.extend(readings);
                batch.ackers.push(delivery.acker);
            }
            Err(error) => {
                let reason = match error {
                    MessageError::UnsupportedVersion(_) => "unsupported_version",
                    MessageError::Malformed(_) => "malformed",
                    MessageError::Empty => "empty",
                };
                let message_id = delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.to_string())
                    .unwrap_or_default();
                tracing::warn!(%error, message.id = %message_id, "dead-lettering a message that cannot be stored");
                publish_dead_letter(
                    channel,
                    topology,
                    bus::READINGS_ROUTING_KEY,
                    &delivery.data,
                    &error.to_string(),
                    &[("x-original-message-id", &message_id)],
                )
                .await
                .map_err(|e| SessionEnd::Lost(format!("cannot dead-letter: {e}")))?;
                delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(|e| SessionEnd::Lost(e.to_string()))?;
                metrics
                    .messages_dead_lettered
                    .get_or_create(&ReasonLabels { reason })
                    .inc();
            }
        }
    }
    Ok(())
}

async fn sample_queue_length(channel: Option<Channel>, queue: String, metrics: PersisterMetrics) {
    let Some(channel) = channel else { return };
    loop {
        let declared = channel
            .queue_declare(
                queue.as_str().into(),
                bus::lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await;
        match declared {
            Ok(q) => {
                metrics.queue_messages.set(i64::from(q.message_count()));
            }
            Err(_) => return,
        }
        tokio::time::sleep(QUEUE_SAMPLE_INTERVAL).await;
    }
}
