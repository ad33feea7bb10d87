//! Writing: store a batch in one transaction, then acknowledge its messages. Never the other way
//! round, and never acknowledge what is not stored.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bus::{Backoff, ChannelState};
use models::Reading;
use store::{KnownPartitions, StoreError, WriteOutcome, Written};
use tokio::sync::{Mutex, mpsc, watch};

use crate::announce::Announcer;
use crate::batch::Batch;
use crate::metrics::PersisterMetrics;

/// The first retry of a failed write waits about this long; later ones back off up to the setting.
const FIRST_RETRY: Duration = Duration::from_millis(100);

/// One writing task: takes batches off the shared queue, one at a time, each on its own connection.
pub struct Writer {
    pool: store::PgPool,
    metrics: PersisterMetrics,
    announcer: Announcer,
    /// The channel the batches' messages were delivered on: once closed, they are back on the queue.
    channel: ChannelState,
    max_backoff: Duration,
    /// The partitions this writer knows exist (the write path creates the others).
    known: Arc<std::sync::Mutex<KnownPartitions>>,
    shutdown: watch::Receiver<bool>,
}

impl Writer {
    pub fn new(
        pool: store::PgPool,
        metrics: PersisterMetrics,
        announcer: Announcer,
        channel: ChannelState,
        max_backoff: Duration,
        backfill_horizon: models::BackfillHorizon,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            pool,
            metrics,
            announcer,
            channel,
            max_backoff: max_backoff.max(FIRST_RETRY),
            known: Arc::new(std::sync::Mutex::new(KnownPartitions::with_horizon(
                backfill_horizon,
            ))),
            shutdown,
        }
    }

    /// Until the consumer drops its end of `batches`: what is queued is still written.
    pub async fn run(mut self, batches: Arc<Mutex<mpsc::Receiver<Batch>>>) {
        loop {
            let batch = batches.lock().await.recv().await;
            let Some(batch) = batch else { return };
            self.store_then_ack(batch).await;
        }
    }

    async fn store_then_ack(&mut self, batch: Batch) {
        // `_held` lives until the batch is stored and acknowledged, or given up: its messages count
        // in the lag until then.
        let Batch {
            readings,
            acks,
            held: _held,
        } = batch;
        let readings = Arc::new(readings);
        let count = readings.len();
        let mut backoff = Backoff::new(FIRST_RETRY, self.max_backoff);
        loop {
            let started = Instant::now();
            let error = match self.write(&readings).await {
                Ok(written) => {
                    self.record(&written.outcome, count, started);
                    self.announcer.committed(&readings, written);
                    self.ack(acks).await;
                    return;
                }
                Err(error) => error,
            };
            self.metrics.write_failures.inc();
            if !self.channel.is_open() {
                // The messages are back on the queue already; another delivery will store them.
                tracing::warn!(error = %error, batch.rows = count, "write failed and the channel is gone; the batch will be redelivered");
                return;
            }
            if *self.shutdown.borrow() {
                tracing::warn!(error = %error, batch.rows = count, "write failed while stopping; the batch stays on the queue");
                return;
            }
            let delay = backoff.next_delay();
            tracing::warn!(error = %error, batch.rows = count, retry_in_ms = delay.as_millis() as u64, "write failed; retrying");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.shutdown.changed() => {}
            }
        }
    }

    /// One attempt, in one transaction, off the async threads.
    async fn write(&self, readings: &Arc<Vec<Reading>>) -> Result<Written, String> {
        let (pool, known, readings) = (self.pool.clone(), self.known.clone(), readings.clone());
        let attempt = tokio::task::spawn_blocking(move || -> Result<Written, StoreError> {
            let mut conn = pool.get()?;
            let mut known = known
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            store::write_readings(&mut conn, &readings, &mut known)
        })
        .await;
        match attempt {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("the write task failed: {e}")),
        }
    }

    fn record(&self, outcome: &WriteOutcome, count: usize, started: Instant) {
        let metrics = &self.metrics;
        metrics
            .batch_write_seconds
            .observe(started.elapsed().as_secs_f64());
        metrics.batch_readings.observe(count as f64);
        metrics.readings_stored.inc_by(outcome.inserted as u64);
        metrics.readings_duplicate.inc_by(outcome.duplicates as u64);
        if outcome.conflicting > 0 {
            metrics
                .readings_conflicting
                .inc_by(outcome.conflicting as u64);
            tracing::warn!(
                readings.conflicting = outcome.conflicting,
                "readings came again with the same id and other content; the first stays, the others are kept in reading_conflicts"
            );
        }
    }

    async fn ack(&self, acks: Vec<bus::Ack>) {
        for ack in acks {
            match ack.ack().await {
                Ok(true) => {
                    self.metrics.messages_acked.inc();
                }
                // Stored, but the channel closed before the ack: RabbitMQ delivers the message again,
                // and the store's unique key makes that a no-op.
                Ok(false) | Err(_) => {
                    tracing::warn!(
                        "stored a batch but could not acknowledge it; it will be redelivered and skipped"
                    );
                    return;
                }
            }
        }
    }
}
