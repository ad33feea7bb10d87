//! The progress line: what runs, for how long, and how many readings were acknowledged so far.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use system::numbers::readable;

#[derive(Clone)]
pub struct Progress {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<(String, Instant)>,
    counter: Arc<AtomicU64>,
    tty: bool,
}

impl Progress {
    /// Starts the ticker: on a terminal the line is redrawn four times a second; otherwise a line is
    /// printed every ten seconds.
    pub fn start() -> Self {
        let progress = Self {
            inner: Arc::new(Inner {
                state: Mutex::new((String::new(), Instant::now())),
                counter: Arc::new(AtomicU64::new(0)),
                tty: std::io::stderr().is_terminal(),
            }),
        };
        let ticker = progress.clone();
        tokio::spawn(async move {
            let every = if ticker.inner.tty {
                Duration::from_millis(250)
            } else {
                Duration::from_secs(10)
            };
            loop {
                tokio::time::sleep(every).await;
                ticker.draw();
            }
        });
        progress
    }

    /// A new phase; returns the counter its readings are counted with (reset to 0).
    pub fn phase(&self, label: impl Into<String>) -> Arc<AtomicU64> {
        if let Ok(mut state) = self.inner.state.lock() {
            *state = (label.into(), Instant::now());
        }
        self.inner.counter.store(0, Ordering::Relaxed);
        self.draw();
        self.inner.counter.clone()
    }

    fn draw(&self) {
        let Ok(state) = self.inner.state.lock() else {
            return;
        };
        let (label, since) = &*state;
        if label.is_empty() {
            return;
        }
        let n = self.inner.counter.load(Ordering::Relaxed);
        let secs = since.elapsed().as_secs_f64();
        let rate = if secs > 0.0 { n as f64 / secs } else { 0.0 };
        let line = format!(
            "{label}  {secs:5.1} s  {} ({}/s)",
            readable(n as f64),
            readable(rate)
        );
        let mut err = std::io::stderr().lock();
        if self.inner.tty {
            let _ = write!(err, "\r\x1b[K{line}");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    /// Prints a line of its own (a result, a warning) without mangling the progress line.
    pub fn say(&self, text: &str) {
        let mut err = std::io::stderr().lock();
        if self.inner.tty {
            let _ = write!(err, "\r\x1b[K");
        }
        let _ = writeln!(err, "{text}");
    }

    pub fn done(&self) {
        if let Ok(mut state) = self.inner.state.lock() {
            state.0.clear();
        }
        if self.inner.tty {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
    }
}
