//! Emptying the outbox into the server, oldest first, one batch at a time: a reading leaves the
//! outbox only once the server acknowledged it. After an outage the backlog goes out batch after
//! batch while the sources keep taking new readings beside it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::clock::Clock;
use crate::link::{Link, Sent};
use crate::outbox::Pending;
use crate::{Shared, lock};

/// With nothing to send, how often the clock and the outbox are looked at anyway.
const IDLE_LOOK: Duration = Duration::from_secs(1);

pub struct Sender {
    pub link: Link,
    pub outbox: Shared,
    pub clock: Clock,
    pub wake: Arc<Notify>,
    pub batch: usize,
    pub timeout: Duration,
    pub backoff_max: Duration,
}

/// Where the sender is, between rounds.
struct Round {
    /// Readings per request now: the configured batch, or less while finding the one reading
    /// in a refused batch that the server will never take.
    size: usize,
    backoff: backon::ExponentialBackoff,
    /// Since when the server has not taken anything (for the log).
    failing_since: Option<std::time::Instant>,
    said_clock: bool,
}

impl Sender {
    pub async fn run(self) {
        let mut round = Round {
            size: self.batch,
            backoff: self.backoff(),
            failing_since: None,
            said_clock: false,
        };
        loop {
            self.time_untimed(&mut round);
            let oldest = lock(&self.outbox).oldest(round.size);
            let batch = match oldest {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::error!(error = %e, "the outbox cannot be read");
                    tokio::time::sleep(IDLE_LOOK).await;
                    continue;
                }
            };
            if batch.is_empty() {
                let _ = tokio::time::timeout(IDLE_LOOK, self.wake.notified()).await;
                continue;
            }
            let sent = self.link.send(&batch, self.timeout).await;
            if let Some(wait) = self.settle(&mut round, &batch, sent) {
                // a connection that comes back (MQTT) ends the wait: the broker takes them now
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.link.reconnected() => {}
                }
            }
        }
    }

    fn backoff(&self) -> backon::ExponentialBackoff {
        crate::backoff(Duration::from_secs(1), self.backoff_max)
    }

    /// Stamps what waited for the clock, once it can be believed.
    fn time_untimed(&self, round: &mut Round) {
        let now = self.clock.now();
        match lock(&self.outbox).stamp(&now, self.clock.boot_id()) {
            Ok((stamped, set_aside)) => {
                if stamped > 0 {
                    tracing::info!(
                        stamped,
                        "the clock is synchronised: readings taken before now have their true times"
                    );
                }
                if set_aside > 0 {
                    tracing::warn!(
                        set_aside,
                        "readings of an earlier boot never had a synchronised clock and cannot be timed: set aside"
                    );
                }
            }
            Err(e) => tracing::error!(error = %e, "the outbox cannot be written"),
        }
        if !now.synced && !round.said_clock {
            tracing::warn!(
                wall = %now.wall,
                "the clock is not synchronised (NTP): readings are kept and sent once it is"
            );
        }
        round.said_clock = !now.synced;
    }

    /// Acts on the server's answer to `batch`; how long to wait before the next.
    fn settle(&self, round: &mut Round, batch: &[Pending], sent: Sent) -> Option<Duration> {
        let mut outbox = lock(&self.outbox);
        let kept = match sent {
            Sent::Stored => {
                if let Some(since) = round.failing_since.take() {
                    tracing::info!(
                        after = %humantime::format_duration(Duration::from_secs(since.elapsed().as_secs())),
                        "the server takes readings again"
                    );
                }
                round.size = self.batch;
                round.backoff = self.backoff();
                outbox.remove(batch)
            }
            Sent::Refused(_) | Sent::TooLarge if batch.len() > 1 => {
                // one reading (or its size) spoils the batch: halve until it is found alone
                round.size = (batch.len() / 2).max(1);
                Ok(())
            }
            Sent::Refused(reason) => {
                tracing::warn!(id = %batch[0].id, %reason, "the server refused a reading for good: set aside");
                outbox.reject(&batch[0], &reason)
            }
            Sent::TooLarge => {
                let reason = "larger than the server's body limit";
                tracing::warn!(id = %batch[0].id, reason, "set aside");
                outbox.reject(&batch[0], reason)
            }
            Sent::Failed { error, retry_after } => {
                if round.failing_since.is_none() {
                    tracing::warn!(%error, waiting = batch.len(), "the server cannot take readings now; trying again with backoff");
                    round.failing_since = Some(std::time::Instant::now());
                } else {
                    tracing::debug!(%error, "the server still cannot take readings");
                }
                if let Err(e) = outbox.note_error(&error) {
                    tracing::error!(error = %e, "the outbox cannot be written");
                }
                let wait = round.backoff.next().unwrap_or(self.backoff_max);
                return Some(retry_after.map_or(wait, |r| r.max(wait)));
            }
        };
        match kept {
            Ok(()) => None,
            Err(e) => {
                tracing::error!(error = %e, "the outbox cannot be written");
                Some(IDLE_LOOK)
            }
        }
    }
}
