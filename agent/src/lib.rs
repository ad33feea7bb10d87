//! `sensorhub-agent`: the Raspberry Pi's half of Sensorhub.
//!
//! ```text
//! sources (thermal, IIO, command, file) ─► sampler ─► outbox (SQLite on disk) ─► sender ─► POST /v1/readings
//!                                        each on its own schedule     │ clock: untimed until NTP, then stamped
//! server ─► GET /v1/commands/next ─► commands ─► handler program ─► POST /v1/commands/{id}/result
//! ```
//!
//! With `transport = "mqtt"` the same parts talk through one MQTT connection instead (see
//! `mqtt`): batches published on `devices/<id>/readings`, commands received on
//! `devices/<id>/commands`, answers published on `devices/<id>/commands/<id>/result`. The sender
//! and the commands loop hold a `link::Link`, either way.
//!
//! The outbox is the one shared thing: the sampler appends to it, the sender empties it, the
//! commands loop keeps its ledger in it, and `status` reads it from another process.

pub mod check;
pub mod clock;
pub mod commands;
pub mod config;
pub mod error;
pub mod http;
pub mod link;
pub mod mqtt;
pub mod outbox;
pub mod run;
pub mod sampler;
pub mod sender;
pub mod sources;
pub mod status;
pub mod tls;

use std::sync::{Arc, Mutex, MutexGuard};

pub use error::Error;

/// The outbox, shared by the agent's tasks. Its operations are short local SQLite transactions
/// (a millisecond or so); nothing awaits while holding it.
pub type Shared = Arc<Mutex<outbox::Outbox>>;

/// The outbox, for one operation. A task that panicked while holding it left no half-done
/// transaction (SQLite rolled it back), so a poisoned lock is still good to use.
pub fn lock(outbox: &Shared) -> MutexGuard<'_, outbox::Outbox> {
    outbox
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The agent's one retry backoff: from `min`, doubling (backon's default factor) up to `max`,
/// with jitter, never giving up. Waiting to reach the server, fetching commands and reconnecting
/// to the broker all use it.
pub fn backoff(min: std::time::Duration, max: std::time::Duration) -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::new()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}
