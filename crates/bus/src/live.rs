//! A query-api replica's feed of what the persisters stored, for its live views.
//!
//! Each replica declares a queue of its own (`<prefix>.stored.<uuid>`: exclusive, auto-delete, not
//! durable, bounded) bound to the fanout exchange `<prefix>.stored`, so every replica gets every
//! announcement. A background task hands each one to the replica as [`FeedEvent::Stored`] and
//! acknowledges it. The queue is bounded (`MAX_WAITING`, oldest dropped first): a replica that
//! cannot keep up loses live updates, never memory. After a lost connection the task reconnects
//! with a new queue and says so with [`FeedEvent::Gap`]: what was announced in between is gone,
//! and the live views must catch up from PostgreSQL.

use std::sync::Mutex;
use std::time::Duration;

use lapin::options::{BasicAckOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, watch};

use crate::connection::{next_delivery, start_consuming};
use crate::topology::declare_stored_exchange;
use crate::{Backoff, Topology, connect};

/// Announcements waiting in the replica's queue at most; past it RabbitMQ drops the oldest.
const MAX_WAITING: i64 = 10_000;
/// Unacknowledged deliveries at once.
const PREFETCH: u16 = 64;
const FIRST_RECONNECT: Duration = Duration::from_millis(100);

/// What the feed hands its replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedEvent {
    /// A [`models::StoredAnnouncement`] body, as published.
    Stored(Vec<u8>),
    /// The feed reconnected: announcements made while it was away are lost to it.
    Gap,
}

/// The feed's background task; dropping the receiver of its events stops it too.
pub struct LiveFeed {
    connected: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl LiveFeed {
    /// Starts the feed: it connects (and reconnects) in the background, naming its connection
    /// `connection_name` in RabbitMQ's UI, and sends what it receives to `events`; `connected`
    /// reads 1 while it is connected.
    pub fn start(
        amqp_url: String,
        topology: Topology,
        connection_name: String,
        events: mpsc::Sender<FeedEvent>,
        connected_gauge: Gauge,
    ) -> Self {
        let (connected_tx, connected) = watch::channel(false);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(
            Feed {
                url: amqp_url,
                queue: format!(
                    "{}.{}",
                    topology.stored_exchange,
                    uuid::Uuid::new_v4().simple()
                ),
                topology,
                connection_name,
                connected: connected_tx,
                connected_gauge,
                events,
            }
            .run(stop_rx),
        );
        Self {
            connected,
            stop,
            task: Mutex::new(Some(task)),
        }
    }

    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Stops the task and closes the connection (RabbitMQ deletes the queue with it).
    pub async fn close(&self) {
        self.stop.send_replace(true);
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

struct Feed {
    url: String,
    queue: String,
    topology: Topology,
    connection_name: String,
    connected: watch::Sender<bool>,
    connected_gauge: Gauge,
    events: mpsc::Sender<FeedEvent>,
}

enum Ended {
    Stopped,
    Lost(String),
}

impl Feed {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(FIRST_RECONNECT, Duration::from_secs(5));
        let mut first = true;
        loop {
            if *stop.borrow() {
                return;
            }
            match self.open().await {
                Ok((connection, channel, consumer)) => {
                    backoff.reset();
                    self.connected.send_replace(true);
                    self.connected_gauge.set(1);
                    tracing::info!(queue = %self.queue, "live feed connected to RabbitMQ");
                    if !first && self.events.send(FeedEvent::Gap).await.is_err() {
                        return;
                    }
                    let ended = self.serve(&connection, &channel, consumer, &mut stop).await;
                    self.connected.send_replace(false);
                    self.connected_gauge.set(0);
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        connection.close(200, "bye".into()),
                    )
                    .await;
                    match ended {
                        Ended::Stopped => return,
                        Ended::Lost(why) => {
                            tracing::warn!(error = %why, "live feed lost RabbitMQ; reconnecting");
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "live feed cannot connect to RabbitMQ"),
            }
            // whatever is announced until the next connection is lost to this replica
            first = false;
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = stop.changed() => return,
            }
        }
    }

    async fn open(&self) -> lapin::Result<(Connection, Channel, lapin::Consumer)> {
        crate::bounded_setup(async {
            let connection = connect(&self.url, &self.connection_name).await?;
            let channel = connection.create_channel().await?;
            declare_stored_exchange(&channel, &self.topology).await?;
            let mut arguments = FieldTable::default();
            arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(MAX_WAITING));
            channel
                .queue_declare(
                    self.queue.as_str().into(),
                    QueueDeclareOptions {
                        exclusive: true,
                        auto_delete: true,
                        durable: false,
                        ..Default::default()
                    },
                    arguments,
                )
                .await?;
            channel
                .queue_bind(
                    self.queue.as_str().into(),
                    self.topology.stored_exchange.as_str().into(),
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let consumer = start_consuming(&channel, &self.queue, PREFETCH, "").await?;
            Ok((connection, channel, consumer))
        })
        .await
    }

    async fn serve(
        &self,
        connection: &Connection,
        channel: &Channel,
        mut consumer: lapin::Consumer,
        stop: &mut watch::Receiver<bool>,
    ) -> Ended {
        loop {
            tokio::select! {
                next = next_delivery(&mut consumer, connection, channel) => {
                    let delivery = match next {
                        Ok(delivery) => delivery,
                        Err(why) => return Ended::Lost(why),
                    };
                    if self.events.send(FeedEvent::Stored(delivery.data)).await.is_err() {
                        return Ended::Stopped;
                    }
                    if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                        return Ended::Lost(e.to_string());
                    }
                }
                _ = stop.changed() => return Ended::Stopped,
            }
        }
    }
}
