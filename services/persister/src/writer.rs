//! Writing: store a batch in one transaction, then acknowledge its messages. Never the other way
//! round, and never acknowledge what is not stored.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bus::lapin::Channel;
use bus::lapin::options::BasicAckOptions;
use store::{KnownPartitions, StoreError, WriteOutcome};
use tokio::sync::{Mutex, mpsc, watch};

use crate::consumer::Batch;
use crate::metrics::PersisterMetrics;

pub struct WriteJob {
    pub batch: Batch,
}

pub async fn write_batches(
    jobs: Arc<Mutex<mpsc::Receiver<WriteJob>>>,
    pool: store::PgPool,
    metrics: PersisterMetrics,
    channel: Channel,
    max_backoff_ms: u64,
    backfill_horizon: models::BackfillHorizon,
    shutdown: watch::Receiver<bool>,
) {
    let known = Arc::new(std::sync::Mutex::new(KnownPartitions::with_horizon(
        backfill_horizon,
    )));
    loop {
        let job = jobs.lock().await.recv().await;
        let Some(job) = job else { return };
        store_then_ack(
            job.batch,
            &pool,
            &known,
            &metrics,
            &channel,
            Duration::from_millis(max_backoff_ms.max(100)),
            shutdown.clone(),
        )
        .await;
    }
}

async fn store_then_ack(
    batch: Batch,
    pool: &store::PgPool,
    known: &Arc<std::sync::Mutex<KnownPartitions>>,
    metrics: &PersisterMetrics,
    channel: &Channel,
    max_backoff: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let Batch { readings, ackers } = batch;
    let readings = Arc::new(readings);
    let mut backoff = Duration::from_millis(100);
    let count = readings.len();
    loop {
        let started = Instant::now();
        let attempt = {
            let (pool, known, readings) = (pool.clone(), known.clone(), readings.clone());
            tokio::task::spawn_blocking(move || -> Result<WriteOutcome, StoreError> {
                let mut conn = pool.get()?;
                let mut known = known
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                store::write_readings(&mut conn, &readings, &mut known)
            })
            .await
        };
        let error = match attempt {
            Ok(Ok(outcome)) => {
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
                ack(ackers, metrics).await;
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("the write task failed: {e}"),
        };
        metrics.write_failures.inc();
        if !channel.status().connected() {
            // The messages are back on the queue already; another delivery will store them.
            tracing::warn!(error = %error, batch.rows = count, "write failed and the channel is gone; the batch will be redelivered");
            return;
        }
        if *shutdown.borrow() {
            tracing::warn!(error = %error, batch.rows = count, "write failed while stopping; the batch stays on the queue");
            return;
        }
        tracing::warn!(error = %error, batch.rows = count, retry_in_ms = backoff.as_millis() as u64, "write failed; retrying");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => {}
        }
        backoff = (backoff * 2).min(max_backoff);
    }
}

async fn ack(ackers: Vec<bus::lapin::Acker>, metrics: &PersisterMetrics) {
    for acker in ackers {
        match acker.ack(BasicAckOptions::default()).await {
            Ok(true) => {
                metrics.messages_acked.inc();
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
