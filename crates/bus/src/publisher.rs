//! The confirmed, micro-batching publisher used by both ingest services.
//!
//! Callers hand over readings and wait. One background task packs whatever is waiting into one AMQP
//! message (up to `max_batch_readings`, lingering a moment for more), publishes it persistently and
//! mandatory, and answers every caller whose readings it carries once RabbitMQ confirmed it. Up to
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
use lapin::{BasicProperties, Channel, Confirmation, Connection, Event};
use models::{Reading, ReadingBatchMessage};
use serde::Deserialize;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::metrics::PublisherMetrics;
use crate::topology::READINGS_ROUTING_KEY;
use crate::{Topology, connect, declare_topology};

#[derive(Debug, Clone, Deserialize)]
pub struct PublisherSettings {
    /// After the first waiting request, how long to wait for more to share its message.
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
    /// A payload refused at ingest, kept on the invalid queue for an operator to inspect.
    Invalid {
        body: Vec<u8>,
        headers: Vec<(&'static str, String)>,
    },
}

impl Job {
    fn readings(&self) -> usize {
        match &self.content {
            Content::Readings(r) => r.len(),
            Content::Invalid { .. } => 0,
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
            topology,
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
        headers.insert(0, ("x-sensorhub-reason", reason.to_owned()));
        self.submit(Content::Invalid { body, headers }).await
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
    let initial_backoff = Duration::from_millis(100);
    let max_backoff = Duration::from_millis(settings.reconnect_max_backoff_ms.max(100));
    let mut backoff = initial_backoff;
    loop {
        if *shutdown.borrow() {
            return;
        }
        match open(&url, &topology, &connection_name).await {
            Ok((connection, channel)) => {
                backoff = initial_backoff;
                let (lost_tx, lost_rx) = watch::channel(None);
                let lost_tx = Arc::new(lost_tx);
                let watcher = tokio::spawn(watch_connection(
                    connection.events_listener(),
                    state.clone(),
                    lost_tx.clone(),
                ));
                state.set_connected(true);
                tracing::info!(exchange = %topology.readings_exchange, "publisher connected to RabbitMQ");
                let stopped = publish_loop(
                    &channel,
                    &topology,
                    &settings,
                    &state,
                    &mut jobs,
                    (lost_tx, lost_rx),
                    &mut shutdown,
                    &connection_name,
                )
                .await;
                state.set_connected(false);
                watcher.abort();
                match stopped {
                    Stopped::Shutdown => {
                        let _ = channel.close(200, "shutdown".into()).await;
                        let _ = connection.close(200, "shutdown".into()).await;
                        tracing::info!("publisher closed");
                        return;
                    }
                    Stopped::ConnectionLost(why) => {
                        tracing::warn!(error = %why, "publisher lost RabbitMQ; reconnecting");
                        state.record_error(why);
                        let _ = connection.close(200, "reconnecting".into()).await;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot connect to RabbitMQ");
                state.record_error(e);
            }
        }
        // While disconnected, whoever is still waiting is told at once rather than left hanging.
        let retry_at = tokio::time::Instant::now() + backoff;
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
        backoff = (backoff * 2).min(max_backoff);
    }
}

async fn open(
    url: &str,
    topology: &Topology,
    connection_name: &str,
) -> lapin::Result<(Connection, Channel)> {
    let connection = connect(url, connection_name).await?;
    let channel = connection.create_channel().await?;
    declare_topology(&channel, topology).await?;
    channel.confirm_select(Default::default()).await?;
    Ok((connection, channel))
}

/// Follows the connection's events: a failure ends the publish loop; RabbitMQ's flow control
/// (`connection.blocked`) turns callers away until it lifts.
async fn watch_connection(
    mut events: impl futures_util::Stream<Item = Event> + Unpin,
    state: Arc<State>,
    lost: Arc<watch::Sender<Option<String>>>,
) {
    while let Some(event) = events.next().await {
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

#[allow(clippy::too_many_arguments)]
async fn publish_loop(
    channel: &Channel,
    topology: &Topology,
    settings: &PublisherSettings,
    state: &Arc<State>,
    jobs: &mut mpsc::Receiver<Job>,
    (fail, mut lost): (
        Arc<watch::Sender<Option<String>>>,
        watch::Receiver<Option<String>>,
    ),
    shutdown: &mut watch::Receiver<bool>,
    app_id: &str,
) -> Stopped {
    let max_in_flight = settings.publish_max_in_flight.max(1);
    let in_flight = Arc::new(Semaphore::new(max_in_flight));
    let linger = Duration::from_millis(settings.publish_linger_ms);
    let confirm_timeout = Duration::from_millis(settings.publish_confirm_timeout_ms);
    let max_batch = settings.publish_max_batch_readings.max(1);
    let mut draining = false;
    loop {
        if let Some(why) = lost.borrow().clone() {
            return Stopped::ConnectionLost(why);
        }
        let permit = tokio::select! {
            permit = in_flight.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return Stopped::ConnectionLost("publisher semaphore closed".into()),
            },
            _ = lost.changed() => continue,
        };
        let first = if draining {
            match jobs.try_recv() {
                Ok(job) => job,
                Err(_) => {
                    // Everything handed over is published; wait for the last confirms.
                    drop(permit);
                    let _ = in_flight.acquire_many(max_in_flight as u32).await;
                    return Stopped::Shutdown;
                }
            }
        } else {
            tokio::select! {
                job = jobs.recv() => match job {
                    Some(job) => job,
                    None => { draining = true; continue; }
                },
                _ = shutdown.changed() => { draining = true; continue; }
                _ = lost.changed() => continue,
            }
        };
        let mut invalid = Vec::new();
        let mut batch = Vec::new();
        let mut count = 0;
        let mut take = |job: Job, count: &mut usize| match job.content {
            Content::Readings(_) => {
                *count += job.readings();
                batch.push(job);
            }
            Content::Invalid { .. } => invalid.push(job),
        };
        take(first, &mut count);
        while count < max_batch {
            match jobs.try_recv() {
                Ok(job) => take(job, &mut count),
                Err(_) => break,
            }
        }
        if count > 0 && count < max_batch && !linger.is_zero() && !draining {
            let until = tokio::time::Instant::now() + linger;
            while count < max_batch {
                match tokio::time::timeout_at(until, jobs.recv()).await {
                    Ok(Some(job)) => take(job, &mut count),
                    _ => break,
                }
            }
        }
        for job in invalid {
            if let Err(e) = publish_invalid(channel, topology, job, confirm_timeout).await {
                return Stopped::ConnectionLost(e);
            }
        }
        if batch.is_empty() {
            continue;
        }

        let body =
            ReadingBatchMessage::encode_chunks(batch.iter().filter_map(|j| match &j.content {
                Content::Readings(readings) => Some(readings.as_slice()),
                Content::Invalid { .. } => None,
            }));
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(ReadingBatchMessage::CONTENT_TYPE.into())
            .with_message_id(uuid::Uuid::now_v7().to_string().into())
            .with_app_id(app_id.to_owned().into());
        // Handing the frames to lapin's I/O and waiting for the confirm both happen in the task, so
        // the loop is already gathering the next message meanwhile.
        let (metrics, channel, fail) = (state.metrics.clone(), channel.clone(), fail.clone());
        let exchange = topology.readings_exchange.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let published = channel
                .basic_publish(
                    exchange.as_str().into(),
                    READINGS_ROUTING_KEY.into(),
                    // mandatory: a message no queue takes is returned, and counts as not confirmed
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &body,
                    properties,
                )
                .await;
            let confirm = match published {
                Ok(confirm) => confirm,
                Err(e) => {
                    metrics.message("failed");
                    answer(batch, Err(PublishError::Unavailable(e.to_string())));
                    fail.send_replace(Some(e.to_string()));
                    return;
                }
            };
            let outcome = match tokio::time::timeout(confirm_timeout, confirm).await {
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
                    Err(PublishError::Unavailable(e.to_string()))
                }
                Err(_) => {
                    metrics.message("timeout");
                    Err(PublishError::Timeout)
                }
            };
            if outcome.is_ok() {
                metrics.message("confirmed");
                metrics.readings_confirmed.inc_by(count as u64);
                metrics.readings_per_message.observe(count as f64);
                metrics
                    .confirm_seconds
                    .observe(started.elapsed().as_secs_f64());
            }
            answer(batch, outcome);
            drop(permit);
        });
    }
}

/// Invalid payloads are rare: each is published on its own, its confirm awaited in a task.
async fn publish_invalid(
    channel: &Channel,
    topology: &Topology,
    job: Job,
    confirm_timeout: Duration,
) -> Result<(), String> {
    let Content::Invalid { body, headers } = &job.content else {
        return Ok(());
    };
    let mut table = lapin::types::FieldTable::default();
    for (name, value) in headers {
        // bounded, so a huge reason cannot make the message itself unpublishable
        let value: String = value.chars().take(1000).collect();
        table.insert(
            (*name).into(),
            lapin::types::AMQPValue::LongString(value.into()),
        );
    }
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(table);
    let published = channel
        .basic_publish(
            topology.dead_letter_exchange.as_str().into(),
            crate::topology::INVALID_ROUTING_KEY.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            properties,
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
