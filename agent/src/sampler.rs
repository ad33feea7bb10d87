//! Taking readings: each source on its own schedule, each reading given its id and time and
//! committed to the outbox before anything else happens to it.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Number, Value};
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::config::Source;
use crate::outbox::Taken;
use crate::sources::{self, Metrics};
use crate::{Shared, lock};

/// The metric the agent reports its outbox's drop count as.
pub const DROPPED_METRIC: &str = "agent_outbox_dropped_total";

/// Reads `source` every `every`, forever; a failing source is logged when it starts and stops
/// failing, not at every tick.
pub async fn sample(source: Source, clock: Clock, outbox: Shared, wake: Arc<Notify>) {
    let what = sources::describe(&source.kind);
    let mut ticks = tokio::time::interval(source.every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        ticks.tick().await;
        match sources::read(&source.kind).await {
            Ok(metrics) => {
                if failing {
                    tracing::info!(source = %what, "the source reads again");
                    failing = false;
                }
                keep(&clock, &outbox, metrics);
                wake.notify_one();
            }
            Err(e) if !failing => {
                tracing::warn!(source = %what, error = %e, "the source cannot be read");
                failing = true;
            }
            Err(e) => {
                tracing::debug!(source = %what, error = %e, "the source still cannot be read")
            }
        }
    }
}

/// Commits one reading to the outbox, stamped now.
pub fn keep(clock: &Clock, outbox: &Shared, metrics: Metrics) {
    let taken = Taken {
        id: uuid::Uuid::new_v4().to_string(),
        boot_id: clock.boot_id().to_owned(),
        at: clock.now(),
        metrics,
    };
    match lock(outbox).append(&taken) {
        Ok(0) => {}
        Ok(dropped) => tracing::warn!(
            dropped,
            "the outbox is full: its oldest readings were dropped to keep this one"
        ),
        // the disk is full or failing: nothing to do but say so; the next reading tries again
        Err(e) => tracing::error!(error = %e, "a reading could not be kept"),
    }
}

/// Every `every`, when the outbox has dropped readings since the last report, sends the count
/// as a reading of the device's own (`agent_outbox_dropped_total`), so the server sees the loss.
pub async fn report_drops(clock: Clock, outbox: Shared, wake: Arc<Notify>, every: Duration) {
    let mut reported = 0;
    let mut ticks = tokio::time::interval(every);
    loop {
        ticks.tick().await;
        let dropped = match lock(&outbox).dropped_total() {
            Ok(dropped) => dropped,
            Err(e) => {
                tracing::error!(error = %e, "the outbox cannot be read");
                continue;
            }
        };
        if dropped != reported {
            let mut metrics = Metrics::new();
            metrics.insert(
                DROPPED_METRIC.to_owned(),
                Value::Number(Number::from(dropped)),
            );
            keep(&clock, &outbox, metrics);
            wake.notify_one();
            reported = dropped;
        }
    }
}
