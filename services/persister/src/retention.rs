//! Applying the retention policy (`store::retention`) every `retention_interval_secs`: one
//! persister at a time (an advisory lock; the others skip their turn), in small statements, so the
//! write path never waits long. What it removes is counted and logged.

use std::time::Duration;

use tokio::sync::watch;

use crate::metrics::{PersisterMetrics, TableLabels};

pub async fn apply_periodically(
    pool: store::PgPool,
    interval_secs: u64,
    metrics: PersisterMetrics,
    shutdown: watch::Receiver<bool>,
) {
    let interval = Duration::from_secs(interval_secs.max(1));
    crate::housekeeping::repeat(interval, shutdown, "applying retention", move || {
        apply_once(&pool, &metrics)
    })
    .await
}

fn apply_once(pool: &store::PgPool, metrics: &PersisterMetrics) -> Result<(), store::StoreError> {
    let mut conn = pool.get()?;
    let started = std::time::Instant::now();
    let Some(report) = store::retention::apply_exclusively(&mut conn, chrono::Utc::now(), |_| {})?
    else {
        tracing::debug!("retention is being applied by another persister; skipped");
        return Ok(());
    };
    for table in store::retention::Table::ALL {
        metrics
            .retention_rows_deleted
            .get_or_create(&TableLabels {
                table: table.as_str(),
            })
            .inc_by(report.rows_deleted.of(table));
    }
    metrics
        .retention_partitions_dropped
        .inc_by(report.partitions_dropped.len() as u64);
    metrics
        .retention_skipped
        .inc_by(report.partitions_skipped.len() as u64);
    if !report.is_empty() || !report.partitions_skipped.is_empty() {
        tracing::info!(
            partitions.dropped = ?report.partitions_dropped,
            partitions.skipped = ?report.partitions_skipped,
            rows.raw = report.rows_deleted.raw,
            rows.m1 = report.rows_deleted.m1,
            rows.h1 = report.rows_deleted.h1,
            rows.d1 = report.rows_deleted.d1,
            duration_ms = started.elapsed().as_millis() as u64,
            "retention applied"
        );
    }
    Ok(())
}
