//! How a service keeps its copy of a registry (device credentials, app tokens) current: it re-reads
//! what changed every `interval`, at once when PostgreSQL notifies a change, and on demand when a
//! request meets an id the copy does not know, never more often than `min_spacing`, however many
//! ask: so a flood of unknown ids costs the database at most one read per `min_spacing`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

/// Rows are read again from a little before the newest change seen: a transaction that committed
/// late with an earlier `updated_at` is still picked up.
const OVERLAP: chrono::Duration = chrono::Duration::seconds(30);

/// A request waits at most this long for a prompted read; then it is answered with what is known.
const PROMPT_WAIT: Duration = Duration::from_secs(3);

/// Why a registry is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefreshCause {
    /// The first read, or `interval` passed.
    Schedule,
    /// PostgreSQL notified a change (or the listener reconnected and may have missed one).
    Notification,
    /// A request met a device, token or token id the copy does not know.
    UnknownId,
}

impl RefreshCause {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Schedule => "schedule",
            Self::Notification => "notification",
            Self::UnknownId => "unknown_id",
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Rounds {
    started: u64,
    completed: u64,
}

/// Wakes a registry's refresh loop (`follow`) and lets requests wait for a fresh read.
pub struct Follower {
    wake: tokio::sync::Notify,
    cause: Mutex<Option<RefreshCause>>,
    rounds: tokio::sync::watch::Sender<Rounds>,
    min_spacing: Duration,
    listening: AtomicBool,
}

impl Follower {
    pub fn new(min_spacing: Duration) -> Arc<Self> {
        Arc::new(Self {
            wake: tokio::sync::Notify::new(),
            cause: Mutex::new(None),
            rounds: tokio::sync::watch::Sender::new(Rounds::default()),
            min_spacing,
            listening: AtomicBool::new(false),
        })
    }

    fn wake(&self, cause: RefreshCause) {
        if let Ok(mut pending) = self.cause.lock() {
            pending.get_or_insert(cause);
        }
        // a permit is kept when the loop is busy reading: the wake is not lost
        self.wake.notify_one();
    }

    /// PostgreSQL says the registry changed: read it now.
    pub fn changed(&self) {
        self.wake(RefreshCause::Notification);
    }

    /// Whether change notifications are being received (for logs and readiness messages).
    pub fn set_listening(&self, listening: bool) {
        self.listening.store(listening, Ordering::Relaxed);
    }

    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
    }

    /// The change listener (re)connected: changes made while it was away were not notified, so
    /// read now.
    pub fn listening_again(&self) {
        tracing::info!("following registry changes as PostgreSQL notifies them");
        self.set_listening(true);
        self.changed();
    }

    /// The change listener lost its connection: until it is back, changes are seen at the next
    /// scheduled read.
    pub fn listener_lost(&self, error: &str) {
        if self.listening.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                error,
                "lost PostgreSQL change notifications; until they are back, changes are seen at each scheduled read"
            );
        }
    }

    /// Asks for a read and waits until one that started after this call has finished (successful
    /// or not), or `PROMPT_WAIT` passed. Concurrent callers share reads.
    pub async fn read_now(&self) {
        let target = self.rounds.borrow().started + 1;
        let mut rounds = self.rounds.subscribe();
        self.wake(RefreshCause::UnknownId);
        let _ = tokio::time::timeout(PROMPT_WAIT, rounds.wait_for(|r| r.completed >= target)).await;
    }
}

/// Runs `refresh` now, then whenever `interval` passes or `follower` is woken, at most once per
/// `min_spacing`, for as long as the task runs.
pub async fn follow<F, Fut>(follower: Arc<Follower>, interval: Duration, mut refresh: F)
where
    F: FnMut(RefreshCause) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut cause = RefreshCause::Schedule;
    loop {
        let started_at = tokio::time::Instant::now();
        follower.rounds.send_modify(|r| r.started += 1);
        refresh(cause).await;
        follower.rounds.send_modify(|r| r.completed += 1);
        tokio::time::sleep_until(started_at + follower.min_spacing).await;
        cause = tokio::select! {
            _ = tokio::time::sleep_until(started_at + interval) => RefreshCause::Schedule,
            _ = follower.wake.notified() => follower
                .cause
                .lock()
                .ok()
                .and_then(|mut c| c.take())
                .unwrap_or(RefreshCause::Notification),
        };
    }
}

/// How many ids a prompt read did not find are remembered at most: forged traffic with ever new ids
/// cannot grow the memory without bound (past it, reads stay spaced by the follower).
const UNKNOWN_CAPACITY: usize = 10_000;

/// Prompt reads for ids a registry's copy does not know, each id found unknown remembered for
/// `unknown_for` so that the same id asks again only after that.
pub(crate) struct PromptReads {
    follower: Arc<Follower>,
    unknown: Mutex<HashMap<String, Instant>>,
    unknown_for: Duration,
}

impl PromptReads {
    pub(crate) fn new(follower: Arc<Follower>, unknown_for: Duration) -> Self {
        Self {
            follower,
            unknown: Mutex::default(),
            unknown_for,
        }
    }

    /// Has the registry read now and returns true, unless `id` was found unknown lately (false:
    /// the caller answers from its copy without asking).
    pub(crate) async fn read_for(&self, id: &str) -> bool {
        let recently_unknown = self
            .unknown
            .lock()
            .map(|unknown| {
                unknown
                    .get(id)
                    .is_some_and(|at| at.elapsed() < self.unknown_for)
            })
            .unwrap_or(false);
        if recently_unknown {
            return false;
        }
        self.follower.read_now().await;
        true
    }

    /// A read did not find `id`.
    pub(crate) fn still_unknown(&self, id: &str) {
        if let Ok(mut unknown) = self.unknown.lock() {
            if unknown.len() >= UNKNOWN_CAPACITY {
                unknown.retain(|_, at| at.elapsed() < self.unknown_for);
            }
            if unknown.len() < UNKNOWN_CAPACITY {
                unknown.insert(id.to_owned(), Instant::now());
            }
        }
    }
}

/// How far a registry's copy has got: for incremental reads and readiness.
#[derive(Default)]
pub(crate) struct Progress {
    newest: Option<DateTime<Utc>>,
    loaded_at: Option<Instant>,
    last_error: Option<String>,
}

impl Progress {
    pub(crate) fn is_loaded(&self) -> bool {
        self.loaded_at.is_some()
    }

    /// Whether the last read failed (what is known may be stale).
    pub(crate) fn failing(&self) -> bool {
        self.last_error.is_some()
    }

    /// Where the next read starts.
    pub(crate) fn since(&self) -> Option<DateTime<Utc>> {
        self.newest.map(|t| t - OVERLAP)
    }

    pub(crate) fn applied(&mut self, newest: Option<DateTime<Utc>>) {
        if let Some(newest) = newest {
            self.newest = Some(self.newest.map_or(newest, |n| n.max(newest)));
        }
        self.loaded_at = Some(Instant::now());
        self.last_error = None;
    }

    pub(crate) fn failed(&mut self, error: String) {
        self.last_error = Some(error);
    }

    /// [`Progress::applied`], through the lock a registry keeps its progress behind.
    pub(crate) fn record_applied(progress: &Mutex<Self>, newest: Option<DateTime<Utc>>) {
        if let Ok(mut progress) = progress.lock() {
            progress.applied(newest);
        }
    }

    /// [`Progress::failed`], through the lock a registry keeps its progress behind.
    pub(crate) fn record_failed(progress: &Mutex<Self>, error: String) {
        if let Ok(mut progress) = progress.lock() {
            progress.failed(error);
        }
    }

    /// Read at least once, and recently (changes are being followed).
    pub(crate) fn health(&self, what: &str, max_age: Duration) -> Result<(), String> {
        match (self.loaded_at, &self.last_error) {
            (None, Some(e)) => Err(format!("{what} not loaded: {e}")),
            (None, None) => Err(format!("{what} not loaded yet")),
            (Some(at), error) if at.elapsed() > max_age => Err(format!(
                "{what} last refreshed {}s ago{}",
                at.elapsed().as_secs(),
                error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
            )),
            _ => Ok(()),
        }
    }
}

/// An in-memory copy of a database table that a [`Follower`] keeps fresh (the device registry,
/// the app tokens): read incrementally from `since`, changes applied in order.
pub trait Followed: Send + Sync + 'static {
    /// One row as the database has it now.
    type Change;
    /// What is followed, for logs.
    const WHAT: &'static str;
    /// Where the next read starts.
    fn since(&self) -> Option<DateTime<Utc>>;
    fn apply(&self, changes: Vec<Self::Change>);
    /// A read failed: the last copy is kept, and the failure shows in readiness.
    fn failed(&self, error: String);
}

/// Refreshes `copy` with what `load(since, cause)` returns: now, every `interval`, and whenever
/// `follower` is woken (a change notified, a request meeting an unknown id), for as long as the
/// task runs. Failures keep the last known copy.
pub async fn keep_fresh<T, F, Fut>(
    copy: Arc<T>,
    follower: Arc<Follower>,
    interval: Duration,
    load: F,
) where
    T: Followed,
    F: Fn(Option<DateTime<Utc>>, RefreshCause) -> Fut,
    Fut: Future<Output = Result<Vec<T::Change>, String>>,
{
    follow(follower, interval, |cause| {
        let copy = copy.clone();
        let loaded = load(copy.since(), cause);
        async move {
            match loaded.await {
                Ok(changes) => copy.apply(changes),
                Err(e) => {
                    tracing::warn!(error = %e, what = T::WHAT, "cannot refresh; keeping the last copy");
                    copy.failed(e);
                }
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn many_askers_share_few_reads() {
        let follower = Follower::new(Duration::from_millis(100));
        let reads = Arc::new(AtomicU32::new(0));
        let counted = reads.clone();
        tokio::spawn(follow(
            follower.clone(),
            Duration::from_secs(60),
            move |_| {
                counted.fetch_add(1, Ordering::SeqCst);
                async { tokio::time::sleep(Duration::from_millis(5)).await }
            },
        ));
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(reads.load(Ordering::SeqCst), 1, "the first read at once");
        let askers: Vec<_> = (0..1000)
            .map(|_| {
                let f = follower.clone();
                tokio::spawn(async move { f.read_now().await })
            })
            .collect();
        for asker in askers {
            asker.await.unwrap();
        }
        assert_eq!(
            reads.load(Ordering::SeqCst),
            2,
            "one more read for them all"
        );
        // asking again after that read waits for the next one, spaced
        let before = tokio::time::Instant::now();
        follower.read_now().await;
        assert_eq!(reads.load(Ordering::SeqCst), 3);
        assert!(before.elapsed() <= Duration::from_millis(110));
    }
}
