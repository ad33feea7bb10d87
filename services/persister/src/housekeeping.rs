//! Forgetting what is kept only for a while: device-chosen reading identities past the dedupe window,
//! and conflicting readings past their keeping time; and recording that commands not finished by
//! their expiry expired. Small statements, one after the other, so the write path never waits
//! behind a long lock; every persister runs this, and concurrent runs are harmless (each row is
//! deleted, or each command recorded, once).

use std::time::Duration;

use store::{Expiring, StoreError};
use tokio::sync::watch;

/// How often the expired rows are looked for. An identity lives at least the window and at most
/// this much longer.
const SWEEP_INTERVAL: Duration = Duration::from_secs(600);
/// Rows deleted per statement.
const ROWS_PER_DELETE: i64 = 10_000;

/// How often unfinished commands past their expiry are recorded as expired. Apps read such a
/// command as expired from its expiry on regardless (query-api tells it from the time); this writes
/// it down, with its history line, for whatever follows the table.
const COMMAND_EXPIRY_INTERVAL: Duration = Duration::from_secs(5);
/// Commands recorded per transaction.
const COMMANDS_PER_SWEEP: i64 = 1_000;

const DAY: Duration = Duration::from_secs(24 * 3600);

pub async fn forget_expired(
    pool: store::PgPool,
    dedupe_window_days: u32,
    conflicts_kept_days: u32,
    shutdown: watch::Receiver<bool>,
) {
    let plan = [
        (Expiring::Identities, DAY * dedupe_window_days),
        (Expiring::Conflicts, DAY * conflicts_kept_days),
    ];
    every(SWEEP_INTERVAL, shutdown, "forgot expired rows", move || {
        let mut conn = pool.get()?;
        let mut rows = 0;
        for (what, age) in plan {
            rows += in_batches(ROWS_PER_DELETE, || {
                store::forget_older_than(&mut conn, what, age, ROWS_PER_DELETE)
            })?;
        }
        Ok(rows)
    })
    .await
}

pub async fn record_expired_commands(pool: store::PgPool, shutdown: watch::Receiver<bool>) {
    every(
        COMMAND_EXPIRY_INTERVAL,
        shutdown,
        "recorded expired commands",
        move || {
            let mut conn = pool.get()?;
            in_batches(COMMANDS_PER_SWEEP, || {
                store::commands::expire_due(&mut conn, COMMANDS_PER_SWEEP)
            })
        },
    )
    .await
}

/// Runs `job` on a blocking thread now and then every `interval` until shutdown, logging how many
/// rows it handled as `done`; a failure is logged and tried again at the next turn.
async fn every<F>(interval: Duration, shutdown: watch::Receiver<bool>, done: &'static str, job: F)
where
    F: Fn() -> Result<usize, StoreError> + Clone + Send + 'static,
{
    repeat(interval, shutdown, done, move || {
        let rows = job()?;
        if rows > 0 {
            tracing::info!(rows, "{done}");
        }
        Ok(())
    })
    .await
}

/// Runs `job` on a blocking thread now and then every `interval` until shutdown; a failure is
/// logged as `task`'s and tried again at the next turn. The persister's periodic work (forgetting,
/// expiring, folding rollups, applying retention) all runs this way.
pub(crate) async fn repeat<F>(
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
    task: &'static str,
    job: F,
) where
    F: Fn() -> Result<(), StoreError> + Clone + Send + 'static,
{
    loop {
        match tokio::task::spawn_blocking(job.clone()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, task, "failed; trying again later"),
            Err(e) => tracing::warn!(error = %e, task, "the task failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Repeats `step`, which handles at most `batch` rows, until one handles fewer; how many in all.
fn in_batches(
    batch: i64,
    mut step: impl FnMut() -> Result<usize, StoreError>,
) -> Result<usize, StoreError> {
    let mut total = 0;
    loop {
        let rows = step()?;
        total += rows;
        if (rows as i64) < batch {
            return Ok(total);
        }
    }
}
