//! Folding rollup deltas: each write appends, in its transaction, the per-minute summary of the
//! readings it stored to `rollup_deltas` (appending takes no row lock, so writers never wait for
//! each other); this moves them into the minute, hour and day summaries soon after. One persister
//! folds at a time (the others find the turn taken and wait for the next tick); readers add the
//! deltas not folded yet, so how far behind this runs changes how much they add, never the answer.

use std::time::Duration;

use tokio::sync::watch;

use crate::metrics::PersisterMetrics;

/// How often the deltas are folded: often enough that readers, who add the deltas not folded yet,
/// have few to add.
const FOLD_INTERVAL: Duration = Duration::from_secs(1);
/// Delta rows (each a writing transaction's) folded per transaction.
const DELTAS_PER_FOLD: i64 = 500;

pub async fn fold(pool: store::PgPool, metrics: PersisterMetrics, shutdown: watch::Receiver<bool>) {
    crate::housekeeping::repeat(
        FOLD_INTERVAL,
        shutdown,
        "folding rollup deltas",
        move || fold_all(&pool, &metrics),
    )
    .await
}

/// Folds until fewer than a transaction's worth are left, or another persister holds the turn;
/// then says how many wait (a folder that cannot keep up, or fails, shows there).
fn fold_all(pool: &store::PgPool, metrics: &PersisterMetrics) -> Result<(), store::StoreError> {
    let mut conn = pool.get()?;
    while let Some(deltas) = store::rollups::fold(&mut conn, DELTAS_PER_FOLD)? {
        metrics.rollup_deltas_folded.inc_by(deltas as u64);
        if (deltas as i64) < DELTAS_PER_FOLD {
            break;
        }
    }
    metrics
        .rollup_deltas_waiting
        .set(store::rollups::waiting(&mut conn)?);
    Ok(())
}
