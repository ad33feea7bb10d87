//! The one retry shape: exponential, with jitter, capped.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Delays for a loop that retries until it succeeds: each is drawn from `[d/2, d]`, where `d` starts
/// at `initial`, doubles after every failure and stops growing at `max`. The jitter keeps a fleet
/// of services that lost the same peer from retrying in lockstep; `max` is never exceeded.
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        let max = max.max(initial);
        // backon's jitter adds up to the delay itself (d..2d): build half-sized delays so the
        // drawn ones fall in [d/2, d]
        let builder = ExponentialBuilder::new()
            .with_min_delay(initial / 2)
            .with_max_delay(max / 2)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self {
            delays: builder.build(),
            builder,
            max,
        }
    }

    /// The wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.max).min(self.max)
    }

    /// After a success: the next failure waits `initial` (about) again.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_with_jitter_and_stay_under_the_cap() {
        let (initial, max) = (Duration::from_millis(100), Duration::from_millis(1000));
        let mut backoff = Backoff::new(initial, max);
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        let nominal = [100, 200, 400, 800, 1000, 1000, 1000, 1000];
        for (delay, d) in delays.iter().zip(nominal) {
            let d = Duration::from_millis(d);
            assert!(
                *delay >= d / 2 && *delay <= d,
                "{delay:?} outside [{:?}, {d:?}]",
                d / 2
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= initial);
    }

    #[test]
    fn two_loops_do_not_retry_in_lockstep() {
        let max = Duration::from_secs(5);
        let mut a = Backoff::new(Duration::from_millis(100), max);
        let mut b = Backoff::new(Duration::from_millis(100), max);
        let same = (0..10).filter(|_| a.next_delay() == b.next_delay()).count();
        assert!(same < 10);
    }
}
