//! Consuming: connect (and reconnect), take deliveries, decode them, dead-letter what cannot be
//! decoded, and hand batches to the writers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bus::{Backoff, ConsumedQueue, Delivery, QueueConsumer, QueueDepth};
use models::MessageError;
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinHandle;

use crate::announce::Announcer;
use crate::batch::Batch;
use crate::lag::{Held, HeldMessages};
use crate::metrics::{PersisterMetrics, ReasonLabels};
use crate::settings::Settings;
use crate::writer::Writer;

/// Every reason a readings message is dead-lettered for (the metric's label values, each created
/// at start-up).
pub const DEAD_LETTER_REASONS: [&str; 3] = ["unsupported_version", "malformed", "empty"];

fn dead_letter_reason(error: &MessageError) -> &'static str {
    match error {
        MessageError::UnsupportedVersion(_) => DEAD_LETTER_REASONS[0],
        MessageError::Malformed(_) => DEAD_LETTER_REASONS[1],
        MessageError::Empty => DEAD_LETTER_REASONS[2],
    }
}

/// How often the lag gauge is brought up to date.
const LAG_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// How often the queue's length is sampled for `/metrics`.
const QUEUE_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// The first reconnection waits about this long; later ones back off up to `retry_max_backoff_ms`.
const FIRST_RETRY: Duration = Duration::from_millis(100);

enum SessionEnd {
    Shutdown,
    Lost(String),
}

pub async fn consume(
    settings: Settings,
    pool: store::PgPool,
    metrics: PersisterMetrics,
    announcer: Announcer,
    amqp_connected: Arc<AtomicBool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let topology = settings.bus.topology();
    let mut backoff = Backoff::new(
        FIRST_RETRY,
        Duration::from_millis(settings.retry_max_backoff_ms),
    );
    loop {
        if *shutdown.borrow() {
            return;
        }
        let opened = QueueConsumer::open(
            &settings.bus.amqp_url,
            &topology,
            ConsumedQueue::Readings,
            settings.prefetch,
            "persister",
        )
        .await;
        let failed = match opened {
            Ok(consumer) => {
                backoff.reset();
                amqp_connected.store(true, Ordering::SeqCst);
                metrics.amqp_connected.set(1);
                tracing::info!(queue = %topology.readings_queue, "consuming");
                let session = Session::start(
                    &settings,
                    &pool,
                    &metrics,
                    &announcer,
                    consumer,
                    &mut shutdown,
                );
                let (end, consumer) = session.await.run().await;
                amqp_connected.store(false, Ordering::SeqCst);
                metrics.amqp_connected.set(0);
                // Closing the channel returns whatever is unacknowledged to the queue.
                consumer.close().await;
                match end {
                    SessionEnd::Shutdown => return,
                    SessionEnd::Lost(why) => {
                        tracing::warn!(error = %why, "lost RabbitMQ; reconnecting")
                    }
                }
                None
            }
            Err(e) => Some(e),
        };
        let delay = backoff.next_delay();
        if let Some(e) = failed {
            tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot consume from RabbitMQ");
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One connection's worth of consuming: what the loop owns, and its steps.
struct Session<'a> {
    consumer: QueueConsumer,
    metrics: &'a PersisterMetrics,
    shutdown: &'a mut watch::Receiver<bool>,
    /// One batch waiting per writer at most: beyond that, deliveries wait in the prefetch window
    /// and then in RabbitMQ, not in our memory.
    batches: mpsc::Sender<Batch>,
    writers: Vec<JoinHandle<()>>,
    sampler: JoinHandle<()>,
    /// The messages in hand, not yet stored: the lag.
    held: Arc<HeldMessages>,
    lag_sampler: JoinHandle<()>,
    linger: Duration,
    max_readings: usize,
}

impl<'a> Session<'a> {
    /// Starts the writers and the queue-depth sampler for this connection.
    async fn start(
        settings: &Settings,
        pool: &store::PgPool,
        metrics: &'a PersisterMetrics,
        announcer: &Announcer,
        consumer: QueueConsumer,
        shutdown: &'a mut watch::Receiver<bool>,
    ) -> Self {
        let writers = settings.db_writers.max(1);
        let (batches, batches_rx) = mpsc::channel::<Batch>(writers);
        let batches_rx = Arc::new(Mutex::new(batches_rx));
        let writers = (0..writers)
            .map(|_| {
                let writer = Writer::new(
                    pool.clone(),
                    metrics.clone(),
                    announcer.clone(),
                    consumer.channel_state(),
                    Duration::from_millis(settings.retry_max_backoff_ms),
                    settings.backfill_horizon_days,
                    shutdown.clone(),
                );
                tokio::spawn(writer.run(batches_rx.clone()))
            })
            .collect();
        let sampler = tokio::spawn(sample_queue_depth(
            consumer.queue_depth().await.ok(),
            metrics.clone(),
        ));
        let held = Arc::new(HeldMessages::default());
        let lag_sampler = tokio::spawn(sample_lag(held.clone(), metrics.clone()));
        Self {
            consumer,
            metrics,
            shutdown,
            batches,
            writers,
            sampler,
            held,
            lag_sampler,
            linger: Duration::from_millis(settings.batch_linger_ms),
            max_readings: settings.batch_max_readings.max(1),
        }
    }

    /// Gathers batches and hands them to the writers until the session ends; then drains.
    async fn run(mut self) -> (SessionEnd, QueueConsumer) {
        let end = loop {
            let (batch, end) = self.gather().await;
            if let Err(lost) = self.hand_over(batch).await {
                break lost;
            }
            if let Some(end) = end {
                break end;
            }
        };
        let consumer = self.drain(&end).await;
        (end, consumer)
    }

    /// Waits for a delivery, then gathers more for the same transaction, up to the batch size or
    /// the linger. Whatever was gathered is returned also when the session ends meanwhile.
    async fn gather(&mut self) -> (Batch, Option<SessionEnd>) {
        let mut batch = Batch {
            readings: Vec::new(),
            acks: Vec::new(),
            held: Held::new(self.held.clone()),
        };
        let first = tokio::select! {
            next = self.consumer.next() => next,
            _ = self.shutdown.changed() => return (batch, Some(SessionEnd::Shutdown)),
        };
        let first = match first {
            Ok(delivery) => delivery,
            Err(e) => return (batch, Some(SessionEnd::Lost(e.to_string()))),
        };
        if let Err(end) = self.take(&mut batch, first).await {
            return (batch, Some(end));
        }
        let until = tokio::time::Instant::now() + self.linger;
        while batch.readings.len() < self.max_readings {
            match tokio::time::timeout_at(until, self.consumer.next()).await {
                Ok(Ok(delivery)) => {
                    if let Err(end) = self.take(&mut batch, delivery).await {
                        return (batch, Some(end));
                    }
                }
                Ok(Err(e)) => return (batch, Some(SessionEnd::Lost(e.to_string()))),
                Err(_) => break,
            }
        }
        (batch, None)
    }

    /// Decodes a delivery into the batch; a message that cannot be decoded is dead-lettered with
    /// the reason and acknowledged, so it never blocks the queue.
    async fn take(&self, batch: &mut Batch, delivery: Delivery) -> Result<(), SessionEnd> {
        let published = delivery.published_at();
        let (error, delivery) = match delivery.into_readings() {
            Ok((readings, ack)) => {
                batch.readings.extend(readings);
                batch.acks.push(ack);
                batch.held.add(published);
                return Ok(());
            }
            Err(undecodable) => undecodable,
        };
        let reason = dead_letter_reason(&error);
        tracing::warn!(%error, message.id = %delivery.message_id(), "dead-lettering a message that cannot be stored");
        self.consumer
            .dead_letter(*delivery, &error.to_string())
            .await
            .map_err(|e| SessionEnd::Lost(format!("cannot dead-letter: {e}")))?;
        self.metrics
            .messages_dead_lettered
            .get_or_create(&ReasonLabels { reason })
            .inc();
        Ok(())
    }

    async fn hand_over(&self, batch: Batch) -> Result<(), SessionEnd> {
        if !batch.readings.is_empty() && self.batches.send(batch).await.is_err() {
            return Err(SessionEnd::Lost("the writers stopped".into()));
        }
        Ok(())
    }

    /// The writers finish the batches they hold (and any queued), acknowledge them, and stop.
    async fn drain(self, end: &SessionEnd) -> QueueConsumer {
        let Self {
            consumer,
            batches,
            writers,
            sampler,
            lag_sampler,
            metrics,
            ..
        } = self;
        if matches!(end, SessionEnd::Shutdown) {
            // Stop deliveries; what was delivered and not batched returns to the queue with the
            // channel.
            consumer.cancel().await;
        }
        drop(batches);
        for task in writers {
            let _ = task.await;
        }
        sampler.abort();
        lag_sampler.abort();
        // The writers are done: this session holds nothing any more.
        metrics.readings_lag_seconds.set(0.0);
        consumer
    }
}

async fn sample_lag(held: Arc<HeldMessages>, metrics: PersisterMetrics) {
    loop {
        let age = held.oldest_age(std::time::SystemTime::now());
        metrics.readings_lag_seconds.set(age.as_secs_f64());
        tokio::time::sleep(LAG_SAMPLE_INTERVAL).await;
    }
}

async fn sample_queue_depth(depth: Option<QueueDepth>, metrics: PersisterMetrics) {
    let Some(depth) = depth else { return };
    while let Ok(messages) = depth.sample().await {
        metrics.queue_messages.set(i64::from(messages));
        tokio::time::sleep(QUEUE_SAMPLE_INTERVAL).await;
    }
}
