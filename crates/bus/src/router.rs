//! The commands an ingest-http replica's devices wait for, routed to the replica that holds them.
//!
//! Each replica declares one queue of its own (`<prefix>.commands.http.<uuid>`: exclusive,
//! auto-delete, not durable) and binds it to the commands exchange with a device id while at least
//! one of its long-polls or WebSockets waits for that device; the last one to leave unbinds it. A
//! consumer task hands every delivered command to the local subscribers of its routing key and
//! acknowledges it: a command no one here waits for any more is dropped (the persister publishes an
//! unanswered command again). After a lost connection the task reconnects, declares the queue
//! anew and binds every device still subscribed.
//!
//! [`DeviceCommands::subscribe`] returns once the binding is in place, so a caller that subscribes
//! first and reads the database second misses no command issued in between.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{BasicAckOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use models::DeviceCommand;
use tokio::sync::{mpsc, oneshot, watch};

use crate::connection::{next_delivery, start_consuming};
use crate::{Backoff, Topology, connect, declare_topology};

/// Commands waiting for one subscriber at most; more are dropped (they are sent again).
const SUBSCRIBER_CAPACITY: usize = 16;
/// Unacknowledged deliveries on the replica's queue at once.
const PREFETCH: u16 = 64;
/// How long a subscription waits for the router's connection before it is refused.
const CONNECTED_WAIT: Duration = Duration::from_secs(5);
/// The first reconnection waits about this long.
const FIRST_RECONNECT: Duration = Duration::from_millis(100);
/// The longest a bind may take before the subscription is refused.
const BIND_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a subscription could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouterError {
    #[error("commands cannot be routed now: {0}")]
    Unavailable(String),
    #[error("the command router is stopped")]
    Stopped,
}

/// One replica's command router; clone it freely (every clone is the same router).
#[derive(Clone)]
pub struct DeviceCommands {
    shared: Arc<Shared>,
}

struct Shared {
    /// device id → its local subscribers.
    subscribers: Mutex<HashMap<String, HashMap<u64, mpsc::Sender<DeviceCommand>>>>,
    next_id: AtomicU64,
    control: mpsc::UnboundedSender<Control>,
    connected: watch::Receiver<bool>,
    queue: String,
    stop: watch::Sender<bool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

enum Control {
    Bind(String, oneshot::Sender<Result<(), RouterError>>),
    Unbind(String),
}

/// A subscription to one device's commands; dropping it leaves (the last one out unbinds).
pub struct Subscription {
    shared: Arc<Shared>,
    device: String,
    id: u64,
    commands: mpsc::Receiver<DeviceCommand>,
}

impl DeviceCommands {
    /// Starts the router: it connects (and reconnects) in the background, naming its connection
    /// `connection_name` in RabbitMQ's UI.
    pub fn start(amqp_url: String, topology: Topology, connection_name: String) -> Self {
        let queue = format!(
            "{}.http.{}",
            topology.commands_exchange,
            uuid::Uuid::new_v4().simple()
        );
        let (control, control_rx) = mpsc::unbounded_channel();
        let (connected_tx, connected) = watch::channel(false);
        let (stop, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            subscribers: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            control,
            connected,
            queue,
            stop,
            task: Mutex::new(None),
        });
        let task = tokio::spawn(
            Session {
                url: amqp_url,
                topology,
                connection_name,
                shared: Arc::downgrade(&shared),
                queue: shared.queue.clone(),
                connected: connected_tx,
                bound: HashSet::new(),
            }
            .run(control_rx, stop_rx),
        );
        if let Ok(mut slot) = shared.task.lock() {
            *slot = Some(task);
        }
        Self { shared }
    }

    /// The replica's own queue.
    pub fn queue(&self) -> &str {
        &self.shared.queue
    }

    pub fn is_connected(&self) -> bool {
        *self.shared.connected.borrow()
    }

    /// Subscribes to `device`'s commands; returns once this replica's queue is bound to them (or
    /// refuses, when RabbitMQ cannot be reached within a few seconds).
    pub async fn subscribe(&self, device: &str) -> Result<Subscription, RouterError> {
        let mut connected = self.shared.connected.clone();
        let waited = tokio::time::timeout(CONNECTED_WAIT, connected.wait_for(|c| *c)).await;
        match waited {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Err(RouterError::Stopped),
            Err(_) => {
                return Err(RouterError::Unavailable("not connected to RabbitMQ".into()));
            }
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, commands) = mpsc::channel(SUBSCRIBER_CAPACITY);
        let (reply, bound) = oneshot::channel();
        {
            let mut subscribers = self
                .shared
                .subscribers
                .lock()
                .map_err(|_| RouterError::Stopped)?;
            subscribers
                .entry(device.to_owned())
                .or_default()
                .insert(id, tx);
            // under the lock, so binds and unbinds reach the task in the order of the map's changes
            self.shared
                .control
                .send(Control::Bind(device.to_owned(), reply))
                .map_err(|_| RouterError::Stopped)?;
        }
        let subscription = Subscription {
            shared: self.shared.clone(),
            device: device.to_owned(),
            id,
            commands,
        };
        match tokio::time::timeout(BIND_TIMEOUT, bound).await {
            Ok(Ok(Ok(()))) => Ok(subscription),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(RouterError::Stopped),
            Err(_) => Err(RouterError::Unavailable(
                "RabbitMQ did not bind in time".into(),
            )),
        }
    }

    /// Stops the task and closes the connection (RabbitMQ deletes the queue with it).
    pub async fn close(&self) {
        self.shared.stop.send_replace(true);
        let task = self.shared.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("device", &self.device)
            .field("id", &self.id)
            .finish()
    }
}

impl Subscription {
    /// The next live command for the device; `None` once the router stopped.
    pub async fn next(&mut self) -> Option<DeviceCommand> {
        loop {
            let command = self.commands.recv().await?;
            if command.is_live(chrono::Utc::now()) {
                return Some(command);
            }
        }
    }

    pub fn device(&self) -> &str {
        &self.device
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let Ok(mut subscribers) = self.shared.subscribers.lock() else {
            return;
        };
        let Some(local) = subscribers.get_mut(&self.device) else {
            return;
        };
        local.remove(&self.id);
        if local.is_empty() {
            subscribers.remove(&self.device);
            let _ = self
                .shared
                .control
                .send(Control::Unbind(self.device.clone()));
        }
    }
}

/// The background task's state across connections.
struct Session {
    url: String,
    topology: Topology,
    connection_name: String,
    shared: std::sync::Weak<Shared>,
    queue: String,
    connected: watch::Sender<bool>,
    /// The devices the queue is bound to on the current connection.
    bound: HashSet<String>,
}

enum Ended {
    Stopped,
    Lost(String),
}

impl Session {
    async fn run(
        mut self,
        mut control: mpsc::UnboundedReceiver<Control>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut backoff = Backoff::new(FIRST_RECONNECT, Duration::from_secs(5));
        loop {
            if *stop.borrow() {
                return;
            }
            match self.open().await {
                Ok((connection, channel, consumer)) => {
                    backoff.reset();
                    self.connected.send_replace(true);
                    tracing::info!(queue = %self.queue, "command router connected to RabbitMQ");
                    let ended = self
                        .serve(&connection, &channel, consumer, &mut control, &mut stop)
                        .await;
                    self.connected.send_replace(false);
                    self.bound.clear();
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        connection.close(200, "bye".into()),
                    )
                    .await;
                    match ended {
                        Ended::Stopped => return,
                        Ended::Lost(why) => {
                            tracing::warn!(error = %why, "command router lost RabbitMQ; reconnecting");
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "command router cannot connect to RabbitMQ");
                }
            }
            let retry_at = tokio::time::Instant::now() + backoff.next_delay();
            // While disconnected, a bind is refused at once.
            loop {
                tokio::select! {
                    request = control.recv() => match request {
                        Some(Control::Bind(_, reply)) => {
                            let _ = reply.send(Err(RouterError::Unavailable("not connected to RabbitMQ".into())));
                        }
                        Some(Control::Unbind(_)) => {}
                        None => return,
                    },
                    _ = tokio::time::sleep_until(retry_at) => break,
                    _ = stop.changed() => return,
                }
            }
        }
    }

    /// Connects, declares the topology and the replica's queue, binds every device subscribed now,
    /// and starts consuming.
    async fn open(&mut self) -> lapin::Result<(Connection, Channel, lapin::Consumer)> {
        let devices = self.subscribed();
        let (connection, channel, consumer) = crate::bounded_setup(async {
            let connection = connect(&self.url, &self.connection_name).await?;
            let channel = connection.create_channel().await?;
            declare_topology(&channel, &self.topology).await?;
            channel
                .queue_declare(
                    self.queue.as_str().into(),
                    QueueDeclareOptions {
                        exclusive: true,
                        auto_delete: true,
                        durable: false,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            for device in &devices {
                bind(&channel, &self.queue, &self.topology, device).await?;
            }
            let consumer = start_consuming(&channel, &self.queue, PREFETCH, "").await?;
            Ok((connection, channel, consumer))
        })
        .await?;
        self.bound = devices;
        Ok((connection, channel, consumer))
    }

    fn subscribed(&self) -> HashSet<String> {
        self.shared
            .upgrade()
            .and_then(|shared| {
                shared
                    .subscribers
                    .lock()
                    .ok()
                    .map(|s| s.keys().cloned().collect())
            })
            .unwrap_or_default()
    }

    async fn serve(
        &mut self,
        connection: &Connection,
        channel: &Channel,
        mut consumer: lapin::Consumer,
        control: &mut mpsc::UnboundedReceiver<Control>,
        stop: &mut watch::Receiver<bool>,
    ) -> Ended {
        loop {
            tokio::select! {
                request = control.recv() => match request {
                    Some(Control::Bind(device, reply)) => {
                        if let Err(e) = self.bind(channel, &device).await {
                            let _ = reply.send(Err(RouterError::Unavailable(e.to_string())));
                            return Ended::Lost(e.to_string());
                        }
                        let _ = reply.send(Ok(()));
                    }
                    Some(Control::Unbind(device)) => {
                        if let Err(e) = self.unbind(channel, &device).await {
                            return Ended::Lost(e.to_string());
                        }
                    }
                    None => return Ended::Stopped,
                },
                next = next_delivery(&mut consumer, connection, channel) => {
                    let delivery = match next {
                        Ok(delivery) => delivery,
                        Err(why) => return Ended::Lost(why),
                    };
                    self.hand_over(delivery.routing_key.as_str(), &delivery.data);
                    if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                        return Ended::Lost(e.to_string());
                    }
                }
                _ = stop.changed() => return Ended::Stopped,
            }
        }
    }

    async fn bind(&mut self, channel: &Channel, device: &str) -> lapin::Result<()> {
        if self.bound.contains(device) {
            return Ok(());
        }
        bind(channel, &self.queue, &self.topology, device).await?;
        self.bound.insert(device.to_owned());
        Ok(())
    }

    /// Unbinds `device`, unless someone subscribed again since the unbind was asked for.
    async fn unbind(&mut self, channel: &Channel, device: &str) -> lapin::Result<()> {
        let resubscribed = self
            .shared
            .upgrade()
            .and_then(|s| s.subscribers.lock().ok().map(|s| s.contains_key(device)))
            .unwrap_or(false);
        if resubscribed || !self.bound.contains(device) {
            return Ok(());
        }
        channel
            .queue_unbind(
                self.queue.as_str().into(),
                self.topology.commands_exchange.as_str().into(),
                device.into(),
                FieldTable::default(),
            )
            .await?;
        self.bound.remove(device);
        Ok(())
    }

    /// Gives a delivered command to every local subscriber of its device; one that cannot be
    /// decoded, or is expired, or that no one here waits for, is dropped.
    fn hand_over(&self, device: &str, body: &[u8]) {
        let command = match DeviceCommand::decode(body) {
            Ok(command) => command,
            Err(e) => {
                tracing::warn!(device, error = %e, "dropping a command that cannot be decoded");
                return;
            }
        };
        if !command.is_live(chrono::Utc::now()) {
            return;
        }
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let Ok(subscribers) = shared.subscribers.lock() else {
            return;
        };
        for subscriber in subscribers.get(device).into_iter().flat_map(|s| s.values()) {
            // full: it has plenty to do already; the command is sent again if still unanswered
            let _ = subscriber.try_send(command.clone());
        }
    }
}

async fn bind(
    channel: &Channel,
    queue: &str,
    topology: &Topology,
    device: &str,
) -> lapin::Result<()> {
    channel
        .queue_bind(
            queue.into(),
            topology.commands_exchange.as_str().into(),
            device.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}
