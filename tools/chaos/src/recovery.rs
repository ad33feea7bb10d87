//! How long a fault held the system up: a counter (readings acknowledged to the devices, readings
//! stored) sampled on a thread of its own while the load runs, and the longest stretch after the
//! fault in which it did not move.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

/// A pause shorter than this is the load's own rhythm, not the fault.
const NOTICEABLE: Duration = Duration::from_millis(500);

/// A counter's samples, taken until [`Watch::finish`].
pub struct Watch {
    samples: Arc<Mutex<Vec<(Instant, u64)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watch {
    /// Samples `count` every `every`; a sample that fails (`None`: a database being failed over)
    /// is skipped, so it counts as no progress.
    pub fn start(every: Duration, mut count: impl FnMut() -> Option<u64> + Send + 'static) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (samples, stop) = (samples.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if let Some(n) = count() {
                        samples
                            .lock()
                            .expect("samples lock")
                            .push((Instant::now(), n));
                    }
                    std::thread::sleep(every);
                }
            })
        };
        Self {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling; how the counter moved after `fault_at`, up to now.
    pub fn finish(mut self, fault_at: Instant) -> Recovery {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let samples = self.samples.lock().expect("samples lock").clone();
        Recovery::from_samples(&samples, fault_at, Instant::now())
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The longest stretch after the fault with no progress, and when progress came back after it.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Recovery {
    /// Seconds of the longest stretch without progress that began at or after the fault.
    pub longest_pause_secs: f64,
    /// Seconds from the fault until progress resumed after that stretch: 0 when it never paused
    /// noticeably, None when it had not resumed by the end of the load.
    pub back_after_secs: Option<f64>,
}

impl Recovery {
    pub fn from_samples(samples: &[(Instant, u64)], fault_at: Instant, end: Instant) -> Self {
        // the count just before the fault is the baseline; the first pause starts at the fault
        let mut last_count = samples
            .iter()
            .take_while(|(t, _)| *t <= fault_at)
            .last()
            .map_or(0, |(_, n)| *n);
        let mut moved_at = fault_at;
        let mut longest = Duration::ZERO;
        let mut back_at = None;
        for (t, n) in samples.iter().filter(|(t, _)| *t > fault_at) {
            if *n > last_count {
                let pause = t.duration_since(moved_at);
                if pause > longest {
                    longest = pause;
                    back_at = Some(*t);
                }
                moved_at = *t;
                last_count = *n;
            }
        }
        let trailing = end.saturating_duration_since(moved_at);
        if trailing > longest && trailing >= NOTICEABLE {
            return Self {
                longest_pause_secs: trailing.as_secs_f64(),
                back_after_secs: None,
            };
        }
        let back_after = if longest < NOTICEABLE {
            Duration::ZERO
        } else {
            back_at.map_or(Duration::ZERO, |t| t.duration_since(fault_at))
        };
        Self {
            longest_pause_secs: longest.as_secs_f64(),
            back_after_secs: Some(back_after.as_secs_f64()),
        }
    }

    /// As the table shows it: when progress came back after the longest pause, and that pause.
    pub fn cell(recovery: Option<&Recovery>) -> String {
        match recovery {
            None => "–".to_owned(),
            Some(Recovery {
                back_after_secs: None,
                ..
            }) => "not during the load".to_owned(),
            Some(Recovery {
                back_after_secs: Some(s),
                ..
            }) if *s == 0.0 => "no pause".to_owned(),
            Some(Recovery {
                back_after_secs: Some(s),
                longest_pause_secs,
            }) => format!("{s:.1} s (paused {longest_pause_secs:.1} s)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(start: Instant, points: &[(u64, u64)]) -> Vec<(Instant, u64)> {
        points
            .iter()
            .map(|(ms, n)| (start + Duration::from_millis(*ms), *n))
            .collect()
    }

    #[test]
    fn the_longest_pause_after_the_fault_and_when_it_ended() {
        let t0 = Instant::now();
        let fault = t0 + Duration::from_millis(1000);
        // progress until the fault, nothing for 3 s, then progress again
        let s = samples(
            t0,
            &[
                (0, 10),
                (900, 20),
                (1100, 20),
                (2000, 20),
                (4000, 30),
                (4100, 40),
            ],
        );
        let r = Recovery::from_samples(&s, fault, t0 + Duration::from_millis(4200));
        assert_eq!(r.back_after_secs, Some(3.0));
        assert!((r.longest_pause_secs - 3.0).abs() < 1e-9);
        assert_eq!(Recovery::cell(Some(&r)), "3.0 s (paused 3.0 s)");
    }

    #[test]
    fn steady_progress_is_no_pause_and_a_pause_to_the_end_is_no_recovery() {
        let t0 = Instant::now();
        let steady = samples(t0, &[(0, 1), (100, 2), (200, 3), (300, 4)]);
        let r = Recovery::from_samples(&steady, t0, t0 + Duration::from_millis(350));
        assert_eq!(Recovery::cell(Some(&r)), "no pause");
        let stuck = samples(t0, &[(0, 1), (100, 2), (200, 2), (3000, 2)]);
        let r = Recovery::from_samples(
            &stuck,
            t0 + Duration::from_millis(150),
            t0 + Duration::from_secs(3),
        );
        assert_eq!(r.back_after_secs, None);
        assert_eq!(Recovery::cell(Some(&r)), "not during the load");
    }
}
