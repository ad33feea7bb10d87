//! The confirmed, micro-batching publisher used by both ingest services.
//!
//! Callers hand over readings and wait. One background task packs whatever is waiting into one AMQP
//! message (up to `max_batch_readings`; while another awaits its confirm, lingering for more until a
//! confirm comes back), publishes it persistently and mandatory, and answers every caller whose
//! readings it carries once RabbitMQ confirmed it. Up to
//! `max_in_flight_messages` messages await their confirms at once; while all are in flight, waiting
//! requests pile up and the next message is larger, so batches grow with load by themselves.
//!
//! Nothing is buffered without bound: callers wait in a bounded queue, and when the broker is
//! unreachable or blocking publishers they are refused at once, so ingest answers 503 (HTTP) or holds
//! back its PUBACK (MQTT) instead of holding readings in memory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::BasicPublishOptions;
use lapin::{Channel, Confirmation, Connection, Event};
use models::{CommandReport, DeviceCommand, Reading};
use serde::Deserialize;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::metrics::PublisherMetrics;
use crate::topology::READINGS_ROUTING_KEY;
use crate::{Backoff, LIVENESS_CHECK, Topology, connect, declare_topology, wire};

/// The first reconnection waits about this long; later ones back off up to `reconnect_max_backoff_ms`.
const FIRST_RECONNECT: Duration = Duration::from_millis(100);
/// The longest a close waits for RabbitMQ's answer (none comes from a broker that is gone).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Deserialize)]
pub struct PublisherSettings {
    /// After the first waiting request, how long at most to wait for more to share its message;
    /// only while another message awaits its confirm, and no longer than until a confirm comes
    /// back (an idle broker gets each request at once).
    pub publish_linger_ms: u64,
    /// A message carries at most about this many readings (a request's readings are never split).
    pub publish_max_batch_readings: usize,
    /// Messages awaiting RabbitMQ's confirm at once.
    pub publish_max_in_flight: usize,
    /// Requests waiting to be published; beyond this, callers are refused (503) at once.
    pub publish_queue_capacity: usize,
    /// A message not confirmed within this is reported failed to its callers.
    pub publish_confirm_timeout_ms: u64,
    /// Reconnection backs off exponentially up to this.
    pub reconnect_max_backoff_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("RabbitMQ is unavailable: {0}")]
    Unavailable(String),
    #[error("RabbitMQ refused the message")]
    Nacked,
    #[error("RabbitMQ did not confirm the message in time")]
    Timeout,
    #[error("too many readings are waiting to be published")]
    Overloaded,
    #[error("the service is shutting down")]
    ShuttingDown,
}

struct Job {
    content: Content,
    reply: oneshot::Sender<Result<(), PublishError>>,
}

enum Content {
    Readings(Vec<Reading>),
    /// A message published on its own: a payload refused at ingest (kept on the invalid queue for
    /// an operator to inspect), a command, a command report.
    Single(Box<Single>),
}

struct Single {
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
    properties: lapin::BasicProperties,
    /// A message no queue takes is returned, and counts as not confirmed; false only for what may
    /// go unheard (an announcement while no query-api listens).
    mandatory: bool,
}

impl Job {
    fn readings(&self) -> usize {
        match &self.content {
            Content::Readings(r) => r.len(),
            Content::Single(_) => 0,
        }
    }
}

struct State {
    connected: AtomicBool,
    blocked: AtomicBool,
    shutting_down: AtomicBool,
    last_error: Mutex<String>,
    shutdown: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
    metrics: PublisherMetrics,
}

impl State {
    fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::SeqCst);
        self.metrics.connected.set(i64::from(connected));
        if !connected {
            self.set_blocked(false);
        }
    }

    fn set_blocked(&self, blocked: bool) {
        self.blocked.store(blocked, Ordering::SeqCst);
        self.metrics.blocked.set(i64::from(blocked));
    }

    fn record_error(&self, error: impl std::fmt::Display) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = error.to_string();
        }
    }

    fn last_error(&self) -> String {
        self.last_error
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
    }
}

/// A handle on the publishing task; clone it freely.
#[derive(Clone)]
pub struct Publisher {
    jobs: mpsc::Sender<Job>,
    state: Arc<State>,
    reply_timeout: Duration,
    topology: Arc<Topology>,
}

impl Publisher {
    /// Starts the publishing task, which connects (and reconnects) in the background.
    pub fn start(
        amqp_url: String,
        topology: Topology,
        settings: PublisherSettings,
        metrics: PublisherMetrics,
        connection_name: String,
    ) -> Self {
        let (jobs, jobs_rx) = mpsc::channel(settings.publish_queue_capacity.max(1));
        let (shutdown, _) = watch::channel(false);
        let state = Arc::new(State {
            connected: AtomicBool::new(false),
            blocked: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            last_error: Mutex::new("not connected yet".to_owned()),
            shutdown,
            task: Mutex::new(None),
            metrics,
        });
        let reply_timeout = Duration::from_millis(
            settings.publish_confirm_timeout_ms + settings.publish_linger_ms + 1_000,
        );
        let task = tokio::spawn(run(
            amqp_url,
            topology.clone(),
            settings,
            state.clone(),
            jobs_rx,
            connection_name,
        ));
        if let Ok(mut slot) = state.task.lock() {
            *slot = Some(task);
        }
        Self {
            jobs,
            state,
            reply_timeout,
            topology: Arc::new(topology),
        }
    }

    /// Returns once RabbitMQ has confirmed a message carrying `readings`; an error means they may or
    /// may not be stored, and the sender should retry (with the same reading ids).
    pub async fn publish(&self, readings: Vec<Reading>) -> Result<(), PublishError> {
        if readings.is_empty() {
            return Ok(());
        }
        self.submit(Content::Readings(readings)).await
    }

    /// Keeps a payload refused at ingest on the invalid queue (`<prefix>.invalid`), with the reason
    /// and whatever else identifies it as headers; returns once RabbitMQ confirmed it.
    pub async fn keep_invalid(
        &self,
        body: Vec<u8>,
        reason: &str,
        mut headers: Vec<(&'static str, String)>,
    ) -> Result<(), PublishError> {
        headers.insert(0, (wire::REASON_HEADER, reason.to_owned()));
        let properties =
            wire::set_aside_properties(headers.iter().map(|(name, value)| (*name, value.as_str())));
        self.submit(Content::Single(Box::new(Single {
            exchange: self.topology.dead_letter_exchange.clone(),
            routing_key: crate::topology::INVALID_ROUTING_KEY.to_owned(),
            body,
            properties,
            mandatory: true,
        })))
        .await
    }

    /// Publishes a command for `device` on the commands exchange (routed by device id) with
    /// `command.expires_at` as its TTL; returns once RabbitMQ confirmed it.
    pub async fn publish_command(
        &self,
        device: &str,
        command: &DeviceCommand,
    ) -> Result<(), PublishError> {
        let exchange = self.topology.commands_exchange.clone();
        self.publish_live(exchange, device.to_owned(), command)
            .await
    }

    /// Publishes a command to its device's MQTT topic `devices/<device>/commands` through RabbitMQ's
    /// MQTT plugin (broker mode `rabbitmq`): on the MQTT exchange `mqtt_exchange`, with
    /// `command.expires_at` as its TTL; returns once RabbitMQ confirmed it.
    pub async fn publish_mqtt_command(
        &self,
        mqtt_exchange: &str,
        device: &str,
        command: &DeviceCommand,
    ) -> Result<(), PublishError> {
        let routing_key = crate::topology::routing_key_of(&format!("devices/{device}/commands"));
        self.publish_live(mqtt_exchange.to_owned(), routing_key, command)
            .await
    }

    /// A command, living in any queue only until its expiry; past it, it is never delivered and
    /// nothing is published.
    async fn publish_live(
        &self,
        exchange: String,
        routing_key: String,
        command: &DeviceCommand,
    ) -> Result<(), PublishError> {
        let ttl = (command.expires_at - chrono::Utc::now()).num_milliseconds();
        if ttl <= 0 {
            return Ok(());
        }
        self.submit(Content::Single(Box::new(Single {
            exchange,
            routing_key,
            body: command.encode(),
            properties: wire::command_properties(ttl as u64),
            mandatory: true,
        })))
        .await
    }

    /// Publishes a report about a command on the reports queue; returns once RabbitMQ confirmed it.
    pub async fn publish_report(&self, report: &CommandReport) -> Result<(), PublishError> {
        self.submit(Content::Single(Box::new(Single {
            exchange: String::new(),
            routing_key: self.topology.reports_queue.clone(),
            body: report.encode(),
            properties: wire::report_properties(),
            mandatory: true,
        })))
        .await
    }

    /// Announces a commit's stored readings (a [`models::StoredAnnouncement`] body) on the stored
    /// exchange, for every query-api replica's live view; returns once RabbitMQ confirmed it.
    pub async fn announce_stored(&self, body: Vec<u8>) -> Result<(), PublishError> {
        self.submit(Content::Single(Box::new(Single {
            exchange: self.topology.stored_exchange.clone(),
            routing_key: String::new(),
            body,
            properties: wire::announcement_properties(),
            mandatory: false,
        })))
        .await
    }

    async fn submit(&self, content: Content) -> Result<(), PublishError> {
        if self.state.shutting_down.load(Ordering::SeqCst) {
            return Err(PublishError::ShuttingDown);
        }
        self.check_available()?;
        let (reply, answer) = oneshot::channel();
        self.jobs
            .try_send(Job { content, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => PublishError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => PublishError::ShuttingDown,
            })?;
        match tokio::time::timeout(self.reply_timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(PublishError::Unavailable(
                "the connection to RabbitMQ was lost".into(),
            )),
            Err(_) => Err(PublishError::Timeout),
        }
    }

    /// Ready to publish: connected, and RabbitMQ is not blocking publishers.
    pub fn check_available(&self) -> Result<(), PublishError> {
        if !self.state.connected.load(Ordering::SeqCst) {
            return Err(PublishError::Unavailable(self.state.last_error()));
        }
        if self.state.blocked.load(Ordering::SeqCst) {
            return Err(PublishError::Unavailable(
                "RabbitMQ is blocking publishers (memory or disk alarm)".into(),
            ));
        }
        Ok(())
    }

    pub fn is_connected(&self) -> bool {
        self.state.connected.load(Ordering::SeqCst)
    }

    /// Waits until connected, up to `timeout`; for start-up logs and tests.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.is_connected() {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Graceful stop: refuses new readings, publishes those waiting, waits for their confirms, and
    /// closes the connection.
    pub async fn close(&self) {
        self.state.shutting_down.store(true, Ordering::SeqCst);
        self.state.shutdown.send_replace(true);
        let task = self.state.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

enum Stopped {
    Shutdown,
    ConnectionLost(String),
}

async fn run(
    url: String,
    topology: Topology,
    settings: PublisherSettings,
    state: Arc<State>,
    mut jobs: mpsc::Receiver<Job>,
    connection_name: String,
) {
    let mut shutdown = state.shutdown.subscribe();
    let mut backoff = Backoff::new(
        FIRST_RECONNECT,
        Duration::from_millis(settings.reconnect_max_backoff_ms),
    );
    loop {
        if *shutdown.borrow() {
            return;
        }
        let failed = match open(&url, &topology, &connection_name).await {
            Ok((connection, channel)) => {
                backoff.reset();
                let (lost_tx, lost_rx) = watch::channel(None);
                let lost_tx = Arc::new(lost_tx);
                let watcher = tokio::spawn(watch_connection(
                    connection.events_listener(),
                    (connection.status().clone(), channel.clone()),
                    state.clone(),
                    lost_tx.clone(),
                ));
                state.set_connected(true);
                tracing::info!(exchange = %topology.readings_exchange, "publisher connected to RabbitMQ");
                let max_in_flight = settings.publish_max_in_flight.max(1);
                let stopped = PublishLoop {
                    channel: &channel,
                    topology: &topology,
                    state: &state,
                    jobs: &mut jobs,
                    shutdown: &mut shutdown,
                    app_id: &connection_name,
                    fail: lost_tx,
                    lost: lost_rx,
                    in_flight: Arc::new(Semaphore::new(max_in_flight)),
                    confirm_back: Arc::new(Notify::new()),
                    max_in_flight,
                    linger: Duration::from_millis(settings.publish_linger_ms),
                    confirm_timeout: Duration::from_millis(settings.publish_confirm_timeout_ms),
                    max_batch: settings.publish_max_batch_readings.max(1),
                    draining: false,
                }
                .run()
                .await;
                state.set_connected(false);
                watcher.abort();
                match stopped {
                    Stopped::Shutdown => {
                        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                            let _ = channel.close(200, "shutdown".into()).await;
                            let _ = connection.close(200, "shutdown".into()).await;
                        })
                        .await;
                        tracing::info!("publisher closed");
                        return;
                    }
                    Stopped::ConnectionLost(why) => {
                        tracing::warn!(error = %why, "publisher lost RabbitMQ; reconnecting");
                        state.record_error(why);
                        // Bounded: a close on a connection whose peer is gone may never be
                        // answered, and the publisher would then never reconnect.
                        let _ = tokio::time::timeout(
                            CLOSE_TIMEOUT,
                            connection.close(200, "reconnecting".into()),
                        )
                        .await;
                    }
                }
                None
            }
            Err(e) => Some(e),
        };
        let delay = backoff.next_delay();
        if let Some(e) = failed {
            tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot connect to RabbitMQ");
            state.record_error(e);
        }
        // While disconnected, whoever is still waiting is told at once rather than left hanging.
        let retry_at = tokio::time::Instant::now() + delay;
        loop {
            tokio::select! {
                job = jobs.recv() => match job {
                    Some(job) => {
                        let _ = job.reply.send(Err(PublishError::Unavailable(state.last_error())));
                    }
                    None => return,
                },
                _ = tokio::time::sleep_until(retry_at) => break,
                _ = shutdown.changed() => return,
            }
        }
    }
}

async fn open(
    url: &str,
    topology: &Topology,
    connection_name: &str,
) -> lapin::Result<(Connection, Channel)> {
    crate::bounded_setup(async {
        let connection = connect(url, connection_name).await?;
        let channel = connection.create_channel().await?;
        declare_topology(&channel, topology).await?;
        channel.confirm_select(Default::default()).await?;
        Ok((connection, channel))
    })
    .await
}

/// Follows the connection's events: a failure ends the publish loop; RabbitMQ's flow control
/// (`connection.blocked`) turns callers away until it lifts.
///
/// It also looks at the connection's and the channel's state every [`LIVENESS_CHECK`], as the
/// consumers do ([`crate::QueueConsumer::next`], where lapin was seen not to end a consumer's
/// stream after a SIGKILL of RabbitMQ). Without this, the publisher's only ways to learn its
/// connection died are this event and a failed `basic_publish`; should both be missed, it stays
/// "connected" to a dead connection for good. That is one explanation (not proven: it did not
/// reproduce on demand) of a failure seen under load after a SIGKILL of RabbitMQ: ingest-mqtt, in
/// the durable MQTT mode, took the MQTT queue's messages again on its new consumer connection and
/// held them unconfirmed and unacknowledged (no queue showed them, nothing stored them; they
/// return to the queue when its connection closes). A failed confirm ends the session too.
async fn watch_connection(
    mut events: impl futures_util::Stream<Item = Event> + Unpin,
    (connection, channel): (lapin::ConnectionStatus, Channel),
    state: Arc<State>,
    lost: Arc<watch::Sender<Option<String>>>,
) {
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = tokio::time::sleep(LIVENESS_CHECK) => {
                if connection.connected() && channel.status().connected() {
                    continue;
                }
                lost.send_replace(Some("the connection to RabbitMQ is gone".into()));
                return;
            }
        };
        let Some(event) = event else { break };
        match event {
            Event::Error(e) => {
                lost.send_replace(Some(e.to_string()));
                return;
            }
            Event::ConnectionBlocked(reason) => {
                tracing::warn!(%reason, "RabbitMQ is blocking publishers");
                state.set_blocked(true);
            }
            Event::ConnectionUnblocked => {
                tracing::info!("RabbitMQ no longer blocks publishers");
                state.set_blocked(false);
            }
            _ => {}
        }
    }
    lost.send_replace(Some("the connection to RabbitMQ closed".into()));
}

/// What one step of the loop decided.
enum Next<T> {
    Ready(T),
    /// Something changed meanwhile (the connection, shutdown): start the round again.
    Again,
    Stop(Stopped),
}

/// The readings jobs of one message, and the single messages gathered with them.
struct Gathered {
    readings: Vec<Job>,
    singles: Vec<Job>,
    count: usize,
}

/// One connection's publishing: what the loop owns, and its steps. Each round reserves an in-flight
/// slot, waits for a job, gathers more to share its message, publishes, and leaves the confirm to a
/// task, so the next round is already gathering while RabbitMQ confirms.
struct PublishLoop<'a> {
    channel: &'a Channel,
    topology: &'a Topology,
    state: &'a Arc<State>,
    jobs: &'a mut mpsc::Receiver<Job>,
    shutdown: &'a mut watch::Receiver<bool>,
    app_id: &'a str,
    /// Set by whoever notices the connection failed (the watcher, a publishing task).
    fail: Arc<watch::Sender<Option<String>>>,
    lost: watch::Receiver<Option<String>>,
    in_flight: Arc<Semaphore>,
    /// Woken whenever a message's confirm came back (and its slot is free): ends a linger.
    confirm_back: Arc<Notify>,
    max_in_flight: usize,
    linger: Duration,
    confirm_timeout: Duration,
    max_batch: usize,
    /// Shutdown was asked: publish what was handed over, then stop.
    draining: bool,
}

impl PublishLoop<'_> {
    async fn run(mut self) -> Stopped {
        loop {
            if let Some(why) = self.lost.borrow().clone() {
                return Stopped::ConnectionLost(why);
            }
            let permit = match self.reserve().await {
                Next::Ready(permit) => permit,
                Next::Again => continue,
                Next::Stop(stopped) => return stopped,
            };
            let first = match self.next_job().await {
                Next::Ready(job) => job,
                Next::Again => continue,
                Next::Stop(stopped) => {
                    drop(permit);
                    self.await_confirms().await;
                    return stopped;
                }
            };
            let gathered = self.gather(first).await;
            if let Err(why) = self.publish_singles(gathered.singles).await {
                return Stopped::ConnectionLost(why);
            }
            if !gathered.readings.is_empty() {
                self.publish(gathered.readings, gathered.count, permit);
            }
        }
    }

    /// An in-flight slot: at most `max_in_flight` messages await their confirms at once.
    async fn reserve(&mut self) -> Next<OwnedSemaphorePermit> {
        tokio::select! {
            permit = self.in_flight.clone().acquire_owned() => match permit {
                Ok(permit) => Next::Ready(permit),
                Err(_) => Next::Stop(Stopped::ConnectionLost("publisher semaphore closed".into())),
            },
            _ = self.lost.changed() => Next::Again,
        }
    }

    /// The job that starts a message; while draining, only what is already waiting.
    async fn next_job(&mut self) -> Next<Job> {
        if self.draining {
            return match self.jobs.try_recv() {
                Ok(job) => Next::Ready(job),
                // Everything handed over is published.
                Err(_) => Next::Stop(Stopped::Shutdown),
            };
        }
        tokio::select! {
            job = self.jobs.recv() => match job {
                Some(job) => Next::Ready(job),
                None => { self.draining = true; Next::Again }
            },
            _ = self.shutdown.changed() => { self.draining = true; Next::Again }
            _ = self.lost.changed() => Next::Again,
        }
    }

    /// What is waiting joins the first job's message, up to `max_batch` readings; lingering for
    /// more only while another message awaits its confirm (and not while draining), until that
    /// confirm (or any other) comes back or `linger` runs out, whichever is first.
    ///
    /// Lingering pays only under load: while a confirm is outstanding, requests pile up anyway and
    /// a larger message saves the broker work. With nothing in flight, the broker is idle and a
    /// linger would only add itself to an acknowledgement. Ending it when a confirm comes back is
    /// group commit: the next message leaves as soon as the broker has taken the last one, so a
    /// request waits at most one confirm before its own, rather than tokio's 1 ms timer tick (1 to
    /// 2 ms); the figures are in README ("Where an acknowledgement's time goes").
    async fn gather(&mut self, first: Job) -> Gathered {
        let mut gathered = Gathered {
            readings: Vec::new(),
            singles: Vec::new(),
            count: 0,
        };
        gathered.take(first);
        while gathered.count < self.max_batch {
            match self.jobs.try_recv() {
                Ok(job) => gathered.take(job),
                Err(_) => break,
            }
        }
        if gathered.count == 0
            || gathered.count >= self.max_batch
            || self.linger.is_zero()
            || self.draining
        {
            return gathered;
        }
        let notify = self.confirm_back.clone();
        let confirm_back = notify.notified();
        tokio::pin!(confirm_back);
        // registered before looking, so a confirm coming back in between is not missed
        confirm_back.as_mut().enable();
        if !self.confirm_outstanding() {
            return gathered;
        }
        let until = tokio::time::sleep(self.linger);
        tokio::pin!(until);
        while gathered.count < self.max_batch {
            tokio::select! {
                biased;
                _ = &mut confirm_back => break,
                _ = &mut until => break,
                job = self.jobs.recv() => match job {
                    Some(job) => gathered.take(job),
                    None => break,
                },
            }
        }
        gathered
    }

    /// Another message than the one being gathered (whose slot is held) awaits its confirm.
    fn confirm_outstanding(&self) -> bool {
        self.in_flight.available_permits() + 1 < self.max_in_flight
    }

    async fn publish_singles(&self, singles: Vec<Job>) -> Result<(), String> {
        for job in singles {
            publish_single(self.channel, job, self.confirm_timeout).await?;
        }
        Ok(())
    }

    /// Handing the frames to lapin's I/O and waiting for the confirm both happen in a task that
    /// holds the in-flight slot, so the loop is already gathering the next message meanwhile.
    fn publish(&self, batch: Vec<Job>, count: usize, permit: OwnedSemaphorePermit) {
        let body = wire::encode_readings(batch.iter().filter_map(|j| match &j.content {
            Content::Readings(readings) => Some(readings.as_slice()),
            Content::Single(_) => None,
        }));
        let message = InFlight {
            channel: self.channel.clone(),
            exchange: self.topology.readings_exchange.clone(),
            body,
            properties: wire::readings_properties(self.app_id),
            batch,
            count,
            metrics: self.state.metrics.clone(),
            fail: self.fail.clone(),
            confirm_timeout: self.confirm_timeout,
            permit,
            confirm_back: self.confirm_back.clone(),
        };
        tokio::spawn(message.publish_and_confirm());
    }

    /// The last confirms: every in-flight slot free again.
    async fn await_confirms(&self) {
        let _ = self.in_flight.acquire_many(self.max_in_flight as u32).await;
    }
}

impl Gathered {
    fn take(&mut self, job: Job) {
        match job.content {
            Content::Readings(_) => {
                self.count += job.readings();
                self.readings.push(job);
            }
            Content::Single(_) => self.singles.push(job),
        }
    }
}

/// One readings message on its way: published, then confirmed (or not), then every caller it
/// carries answered, and its in-flight slot freed.
struct InFlight {
    channel: Channel,
    exchange: String,
    body: Vec<u8>,
    properties: lapin::BasicProperties,
    batch: Vec<Job>,
    count: usize,
    metrics: PublisherMetrics,
    fail: Arc<watch::Sender<Option<String>>>,
    confirm_timeout: Duration,
    permit: OwnedSemaphorePermit,
    confirm_back: Arc<Notify>,
}

impl InFlight {
    async fn publish_and_confirm(self) {
        let started = Instant::now();
        let published = self
            .channel
            .basic_publish(
                self.exchange.as_str().into(),
                READINGS_ROUTING_KEY.into(),
                // mandatory: a message no queue takes is returned, and counts as not confirmed
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &self.body,
                self.properties.clone(),
            )
            .await;
        let confirm = match published {
            Ok(confirm) => confirm,
            Err(e) => {
                self.metrics.message("failed");
                answer(self.batch, Err(PublishError::Unavailable(e.to_string())));
                self.fail.send_replace(Some(e.to_string()));
                return;
            }
        };
        let outcome = self.confirmed(confirm).await;
        if outcome.is_ok() {
            let metrics = &self.metrics;
            metrics.message("confirmed");
            metrics.readings_confirmed.inc_by(self.count as u64);
            metrics.readings_per_message.observe(self.count as f64);
            metrics
                .confirm_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        answer(self.batch, outcome);
        drop(self.permit);
        self.confirm_back.notify_waiters();
    }

    /// RabbitMQ's answer, within the confirm timeout, counted by outcome.
    async fn confirmed(&self, confirm: lapin::PublisherConfirm) -> Result<(), PublishError> {
        let metrics = &self.metrics;
        match tokio::time::timeout(self.confirm_timeout, confirm).await {
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(_)))) => {
                metrics.message("unroutable");
                Err(PublishError::Unavailable(
                    "no queue took the message (is the topology declared?)".into(),
                ))
            }
            Ok(Ok(Confirmation::Nack(_))) => {
                metrics.message("nacked");
                Err(PublishError::Nacked)
            }
            Ok(Ok(Confirmation::NotRequested)) => {
                metrics.message("failed");
                Err(PublishError::Unavailable(
                    "channel not in confirm mode".into(),
                ))
            }
            Ok(Err(e)) => {
                metrics.message("failed");
                // lapin fails a pending confirm when its channel or connection fails: this
                // session is over, whether or not the connection's event said so.
                self.fail.send_replace(Some(e.to_string()));
                Err(PublishError::Unavailable(e.to_string()))
            }
            Err(_) => {
                metrics.message("timeout");
                Err(PublishError::Timeout)
            }
        }
    }
}

/// Single messages (refused payloads, commands, reports) are few next to readings: each is
/// published on its own, its confirm awaited in a task.
async fn publish_single(
    channel: &Channel,
    job: Job,
    confirm_timeout: Duration,
) -> Result<(), String> {
    let Content::Single(single) = &job.content else {
        return Ok(());
    };
    let published = channel
        .basic_publish(
            single.exchange.as_str().into(),
            single.routing_key.as_str().into(),
            BasicPublishOptions {
                mandatory: single.mandatory,
                ..Default::default()
            },
            &single.body,
            single.properties.clone(),
        )
        .await;
    match published {
        Ok(confirm) => {
            tokio::spawn(async move {
                let outcome = match tokio::time::timeout(confirm_timeout, confirm).await {
                    Ok(Ok(Confirmation::Ack(None))) => Ok(()),
                    Ok(Ok(_)) => Err(PublishError::Nacked),
                    Ok(Err(e)) => Err(PublishError::Unavailable(e.to_string())),
                    Err(_) => Err(PublishError::Timeout),
                };
                let _ = job.reply.send(outcome);
            });
            Ok(())
        }
        Err(e) => {
            let _ = job
                .reply
                .send(Err(PublishError::Unavailable(e.to_string())));
            Err(e.to_string())
        }
    }
}

fn answer(batch: Vec<Job>, outcome: Result<(), PublishError>) {
    for job in batch {
        // the caller may have given up waiting; nothing to do then
        let _ = job.reply.send(outcome.clone());
    }
}
