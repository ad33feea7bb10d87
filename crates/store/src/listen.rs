//! Change notifications from PostgreSQL (`LISTEN`): a service that keeps a copy of a table (the
//! device registry, the app tokens) learns of a change as soon as it is committed, instead of at its
//! next periodic read. The tables' triggers `NOTIFY` (see the migration `app_tokens`).
//!
//! diesel exposes notifications without blocking (libpq's `PQconsumeInput` + `PQnotifies`), not the
//! connection's socket to wait on, so a thread of its own polls every [`POLL`]: a read of a local
//! socket buffer, no round trip to the server.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};

/// How often the listening thread looks for notifications: the delay they add.
pub const POLL: Duration = Duration::from_millis(20);
/// How often the listening connection is checked with a query: `PQconsumeInput` notices a closed
/// connection but not one that silently went away.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// The first reconnection's delay; it doubles with each failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long dropping a [`Listener`] waits for its thread to end (it looks every [`POLL`]).
const STOP_WAIT: Duration = Duration::from_secs(2);

/// The device registry's channel (table `device_credentials`).
pub const DEVICE_CREDENTIALS_CHANNEL: &str = "sensorhub_device_credentials";
/// The app tokens' channel (table `app_tokens`).
pub const APP_TOKENS_CHANNEL: &str = "sensorhub_app_tokens";
/// New commands (table `commands`, inserts only).
pub const COMMANDS_CHANNEL: &str = "sensorhub_commands";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenEvent {
    /// Listening (again): notifications sent while not listening were missed, so re-read.
    Listening,
    /// Something changed on the channel.
    Changed,
    /// Still listening, nothing changed (at every poll, every few milliseconds): lets the owner stop
    /// the thread soon after it is gone. A thread left polling PostgreSQL while its process exits
    /// was seen to crash the exit (SIGSEGV in libc, after a test binary's last test passed).
    Quiet,
    /// The connection failed; the thread reconnects with a growing delay.
    Lost(String),
}

/// The listening thread, stopped when this is dropped: told to, then waited for (up to 2 s), so
/// that a service that stops leaves no thread polling PostgreSQL behind. One left
/// polling while its process exited was seen to crash the exit (SIGSEGV in libc's exit handlers,
/// after a test binary's last test had passed).
pub struct Listener {
    stop: Arc<AtomicBool>,
    /// Disconnected once the thread has ended (it holds the sender).
    ended: mpsc::Receiver<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.ended.recv_timeout(STOP_WAIT);
    }
}

/// Listens on `channel` of `database_url` from a thread of its own, reconnecting as needed, and
/// tells `on_event` what happens. The thread ends when the returned [`Listener`] is dropped, or
/// when `on_event` returns `Break` (e.g. when what it feeds is gone).
pub fn spawn_listener<F>(
    database_url: String,
    channel: &'static str,
    application_name: &str,
    mut on_event: F,
) -> std::io::Result<Listener>
where
    F: FnMut(ListenEvent) -> ControlFlow<()> + Send + 'static,
{
    let application_name = application_name.replace('\'', "");
    let stop = Arc::new(AtomicBool::new(false));
    let (ending, ended) = mpsc::channel::<()>();
    let stopped = stop.clone();
    let on_event = move |event| {
        if stopped.load(Ordering::SeqCst) {
            return ControlFlow::Break(());
        }
        on_event(event)
    };
    let stopped = stop.clone();
    std::thread::Builder::new()
        .name(format!("listen {channel}"))
        .spawn(move || {
            // dropped last (locals go in reverse order), so that once the owner's wait ends the
            // callback, and all it holds, is gone too
            let _ending = ending;
            let mut on_event = on_event;
            let mut backoff = reconnect_delays();
            loop {
                let outcome = match listen(&database_url, channel, &application_name) {
                    Ok(mut conn) => {
                        backoff = reconnect_delays();
                        if on_event(ListenEvent::Listening).is_break() {
                            return;
                        }
                        follow(&mut conn, &mut on_event)
                    }
                    Err(e) => ControlFlow::Continue(e.to_string()),
                };
                let ControlFlow::Continue(error) = outcome else {
                    return;
                };
                if on_event(ListenEvent::Lost(error)).is_break() {
                    return;
                }
                if !pause(backoff.next().unwrap_or(MAX_BACKOFF), &stopped) {
                    return;
                }
            }
        })?;
    Ok(Listener { stop, ended })
}

/// Sleeps `delay` a [`POLL`] at a time; false (at once) when told to stop meanwhile.
fn pause(delay: Duration, stop: &AtomicBool) -> bool {
    let until = Instant::now() + delay;
    while Instant::now() < until {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep(POLL.min(until.saturating_duration_since(Instant::now())));
    }
    !stop.load(Ordering::SeqCst)
}

/// Delays between reconnections, each drawn from `[d/2, d]` where `d` doubles from
/// [`FIRST_BACKOFF`] to [`MAX_BACKOFF`]: the replicas of a service that lost the database at once
/// do not all come back at once. (backon's jitter adds up to the delay itself, hence the halves.)
fn reconnect_delays() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::new()
        .with_min_delay(FIRST_BACKOFF / 2)
        .with_max_delay(MAX_BACKOFF / 2)
        .with_jitter()
        .without_max_times()
        .build()
}

fn listen(
    database_url: &str,
    channel: &str,
    application_name: &str,
) -> Result<PgConnection, crate::StoreError> {
    let mut conn = PgConnection::establish(database_url)?;
    conn.batch_execute(&format!(
        "SET application_name = '{application_name}'; LISTEN {channel};"
    ))?;
    Ok(conn)
}

/// Polls `conn` until it fails (`Continue` with the error) or `on_event` says stop (`Break`).
fn follow<F>(conn: &mut PgConnection, on_event: &mut F) -> ControlFlow<(), String>
where
    F: FnMut(ListenEvent) -> ControlFlow<()>,
{
    let mut checked = Instant::now();
    loop {
        std::thread::sleep(POLL);
        let mut changed = false;
        for notification in conn.notifications_iter() {
            match notification {
                Ok(_) => changed = true,
                Err(e) => return ControlFlow::Continue(e.to_string()),
            }
        }
        if changed {
            on_event(ListenEvent::Changed)?;
        } else {
            on_event(ListenEvent::Quiet)?;
        }
        if checked.elapsed() >= CHECK_EVERY {
            if let Err(e) = conn.batch_execute("SELECT 1") {
                return ControlFlow::Continue(e.to_string());
            }
            checked = Instant::now();
        }
    }
}
