//! Forgetting what is kept only for a while: device-chosen reading identities past the dedupe window,
//! and conflicting readings past their keeping time; and recording that commands not finished by
//! their expiry expired. Small deletes, one after the other, so the
//! write path never waits behind a long lock; every persister runs this, and concurrent deletes of
//! the same rows are harmless (each row is deleted once).

use std::time::Duration;

use store::Expiring;
use tokio::sync::watch;

/// How often the expired rows are looked for. An identity lives at least the window and at most
/// this much longer.
const SWEEP_INTERVAL: Duration = Duration::from_secs(600);
/// Rows deleted per statement.
const ROWS_PER_DELETE: i64 = 10_000;

const DAY: Duration = Duration::from_secs(24 * 3600);

pub async fn forget_expired(
    pool: store::PgPool,
    dedupe_window_days: u32,
    conflicts_kept_days: u32,
    mut shutdown: watch::Receiver<bool>,
) {
    let plan = [
        (Expiring::Identities, DAY * dedupe_window_days),
        (Expiring::Conflicts, DAY * conflicts_kept_days),
    ];
    loop {
        for (what, age) in plan {
            let pool = pool.clone();
            let swept = tokio::task::spawn_blocking(move || sweep(&pool, what, age)).await;
            match swept {
                Ok(Ok(0)) => {}
                Ok(Ok(rows)) => tracing::info!(?what, rows, "forgot expired rows"),
                Ok(Err(e)) => {
                    tracing::warn!(?what, error = %e, "cannot forget expired rows; trying again later")
                }
                Err(e) => tracing::warn!(?what, error = %e, "the forgetting task failed"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(SWEEP_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
    }
}

fn sweep(pool: &store::PgPool, what: Expiring, age: Duration) -> Result<usize, store::StoreError> {
    let mut conn = pool.get()?;
    let mut total = 0;
    loop {
        let rows = store::forget_older_than(&mut conn, what, age, ROWS_PER_DELETE)?;
        total += rows;
        if rows < ROWS_PER_DELETE as usize {
            return Ok(total);
        }
    }
}

/// How often unfinished commands past their expiry are recorded as expired. Apps read such a
/// command as expired from its expiry on regardless (query-api tells it from the time); this writes
/// it down, with its history line, for whatever follows the table.
const COMMAND_EXPIRY_INTERVAL: Duration = Duration::from_secs(5);
/// Commands recorded per transaction.
const COMMANDS_PER_SWEEP: i64 = 1_000;

pub async fn record_expired_commands(pool: store::PgPool, mut shutdown: watch::Receiver<bool>) {
    loop {
        let swept = {
            let pool = pool.clone();
            tokio::task::spawn_blocking(move || expire_commands(&pool)).await
        };
        match swept {
            Ok(Ok(0)) => {}
            Ok(Ok(commands)) => tracing::info!(commands, "recorded expired commands"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot record expired commands; trying again later")
            }
            Err(e) => tracing::warn!(error = %e, "the command expiry task failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(COMMAND_EXPIRY_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
    }
}

fn expire_commands(pool: &store::PgPool) -> Result<usize, store::StoreError> {
    let mut conn = pool.get()?;
    let mut total = 0;
    loop {
        let expired = store::commands::expire_due(&mut conn, COMMANDS_PER_SWEEP)?;
        total += expired;
        if expired < COMMANDS_PER_SWEEP as usize {
            return Ok(total);
        }
    }
}
