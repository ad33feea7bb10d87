//! After each commit, the persister announces what it stored on the stored exchange, where every
//! query-api replica relays it to the browsers watching (`GET /v1/live`). After the commit, never
//! before: a view never shows a reading that is not stored. An announcement is a notice, not a
//! copy: it is built and published off the writer's path, and one that cannot be published at once
//! (RabbitMQ away, too many waiting) is dropped and counted. The readings are stored; a live view
//! that misses one catches up from PostgreSQL.

use std::sync::Arc;

use models::{Reading, StoredAnnouncement};
use store::Written;
use tokio::sync::{Semaphore, mpsc};

use crate::metrics::PersisterMetrics;

/// Commits waiting to be announced; past this, announcements are dropped (and counted). Each holds
/// its batch (up to `batch_max_readings`, about a megabyte at the default) until it is encoded, so
/// this bounds what a slow RabbitMQ can make the persister hold.
const WAITING: usize = 32;
/// Announcements awaiting RabbitMQ's confirm at once.
const IN_FLIGHT: usize = 16;

/// The writers' handle; clone it freely.
#[derive(Clone)]
pub struct Announcer {
    commits: mpsc::Sender<Commit>,
    metrics: PersisterMetrics,
}

struct Commit {
    batch: Arc<Vec<Reading>>,
    written: Written,
}

impl Announcer {
    /// Starts the announcing task; it ends once every handle is dropped and what waits is published.
    pub fn start(
        publisher: bus::Publisher,
        metrics: PersisterMetrics,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (commits, waiting) = mpsc::channel(WAITING);
        let task = tokio::spawn(announce(waiting, publisher, metrics.clone()));
        (Self { commits, metrics }, task)
    }

    /// Announces the readings of `batch` that `written` stored. Never waits.
    pub fn committed(&self, batch: &Arc<Vec<Reading>>, written: Written) {
        if written.outcome.inserted == 0 {
            return;
        }
        let commit = Commit {
            batch: batch.clone(),
            written,
        };
        if self.commits.try_send(commit).is_err() {
            self.metrics.announcements_dropped.inc();
        }
    }
}

async fn announce(
    mut waiting: mpsc::Receiver<Commit>,
    publisher: bus::Publisher,
    metrics: PersisterMetrics,
) {
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(commit) = waiting.recv().await {
        let Some(body) = StoredAnnouncement::encode(commit.written.stored(&commit.batch)) else {
            continue;
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let (publisher, metrics) = (publisher.clone(), metrics.clone());
        tokio::spawn(async move {
            match publisher.announce_stored(body).await {
                Ok(()) => {
                    metrics.announcements_published.inc();
                }
                Err(e) => {
                    metrics.announcements_dropped.inc();
                    tracing::debug!(error = %e, "an announcement of stored readings was dropped");
                }
            }
            drop(permit);
        });
    }
    // the last ones, before the publisher closes
    let _ = in_flight.acquire_many(IN_FLIGHT as u32).await;
}
