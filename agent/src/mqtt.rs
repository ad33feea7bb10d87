//! Talking to the server over MQTT (`transport = "mqtt"`): one connection, driven by one task,
//! carries both directions. Client id and user name are the device id, the password its token;
//! MQTT 3.1.1, which Mosquitto and RabbitMQ's MQTT plugin both speak.
//!
//! - Readings: a batch is one message on `devices/<id>/readings` at QoS 1, and it is stored once
//!   its PUBACK came (the server PUBACKs only after RabbitMQ confirmed). One batch is in flight
//!   at a time (the sender waits for each), so the outbox is the only queue: a batch whose PUBACK
//!   never came stays there and goes again, with the same ids, which the server stores once.
//! - Commands: `devices/<id>/commands` is subscribed at QoS 1 in a persistent session
//!   (clean_session = false), so what is published while the Pi is away waits in the broker.
//!   Each is handed to the commands loop; answers go back on
//!   `devices/<id>/commands/<command id>/result` at QoS 1.
//!
//! rumqttc does not say which publish a PUBACK is for, only the packet id it gave each publish as
//! it wrote it (`Outgoing::Publish`). Every publish goes through this module's task, which hands
//! them to rumqttc one by one, so the publishes queued and the packet ids written line up in
//! order. A lost connection breaks that line: what is waiting fails then (the outbox and the
//! commands ledger keep it for the next attempt), and it is taken out of what rumqttc would send
//! again on the next connection, so that every packet id written afterwards is a new publish's.
//! (ingest-mqtt's bridge does the same with its commands.)
//!
//! Incoming commands are acknowledged by rumqttc as they arrive. One lost between that PUBACK
//! and the agent recording it (a crash in that millisecond) is not lost for good: the server sends
//! every unanswered command again (every 30 s) until it is answered or expires.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use models::{BackfillHorizon, DeviceCommand, DeviceId, TimeWindow};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Outgoing,
    Packet, QoS, Request, TlsConfiguration, Transport,
};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::Config;
use crate::error::Error;
use crate::link::{Answered, Sent, answer_body, readings_body};
use crate::outbox::Pending;

/// The largest message sent: deploy/mosquitto/mosquitto.conf's `max_packet_size` is 1 MiB, the
/// topic and header included. A bigger batch is [`Sent::TooLarge`], and the sender halves it.
pub const MAX_PAYLOAD: usize = 1_000_000;
/// The largest packet rumqttc takes or sends (its default, 10 KiB, is less than a batch).
const MAX_PACKET: usize = 1 << 20;
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Commands received and not yet taken by the commands loop. A command that does not fit is
/// dropped here; the server sends it again.
const COMMANDS_WAITING: usize = 32;

/// A message to publish at QoS 1, and where to say whether its PUBACK came.
struct Publish {
    topic: String,
    payload: Vec<u8>,
    done: oneshot::Sender<Result<(), String>>,
}

/// Where the connection is.
#[derive(Debug, Clone)]
enum Connection {
    /// Not yet connected since the start: a publish waits for it (up to its timeout).
    Starting,
    Up,
    /// Lost, and why: a publish fails at once (the sender backs off, the outbox keeps it).
    Down(String),
}

/// The connection's handle: cheap to clone, shared by the sender and the commands loop.
#[derive(Clone)]
pub struct Mqtt {
    publishes: mpsc::Sender<Publish>,
    state: watch::Receiver<Connection>,
    device: DeviceId,
}

impl Mqtt {
    /// Starts the connection's task (it connects, and reconnects with backoff, for as long as the
    /// agent runs); the handle and the commands received.
    pub fn start(config: &Config) -> Result<(Self, mpsc::Receiver<DeviceCommand>), Error> {
        let device = DeviceId::parse(config.device_id.as_str()).map_err(Error::Config)?;
        let (client, events) = AsyncClient::new(options(config, false)?, 16);
        let (publishes, to_publish) = mpsc::channel(16);
        let (commands, received) = mpsc::channel(COMMANDS_WAITING);
        let (tell, state) = watch::channel(Connection::Starting);
        let driver = Driver {
            client,
            events,
            to_publish,
            commands,
            commands_topic: commands_topic(&device),
            state: tell,
            queued: VecDeque::new(),
            in_flight: HashMap::new(),
            backoff_max: config.server.backoff_max,
        };
        tokio::spawn(driver.run());
        Ok((
            Self {
                publishes,
                state,
                device,
            },
            received,
        ))
    }

    /// Publishes `batch` as one message and waits for its PUBACK, all within `timeout`.
    ///
    /// The server PUBACKs a payload it refuses as well (it keeps it on its invalid queue), so
    /// there is no refusal to hear over MQTT: the batch is checked here, by the server's own
    /// rules (`models`), first. The outbox only holds readings the sources made valid, so this
    /// finds nothing in practice; if it ever does, [`Sent::Refused`] lets the sender find the
    /// reading by halving and set it aside, as over HTTP. (The server's backfill horizon may be
    /// set shorter than the default one checked here.)
    pub async fn send(&self, batch: &[Pending], timeout: Duration) -> Sent {
        let payload = readings_body(batch, None).to_string().into_bytes();
        if payload.len() > MAX_PAYLOAD {
            return Sent::TooLarge;
        }
        let window = TimeWindow::new(chrono::Utc::now(), BackfillHorizon::DEFAULT);
        if let Err(e) = models::parse_device_topic_payload(&self.device, &payload, window) {
            return Sent::Refused(e.to_string());
        }
        let topic = format!("devices/{}/readings", self.device.as_str());
        match self.publish(topic, payload, timeout).await {
            Ok(()) => Sent::Stored,
            Err(error) => Sent::Failed {
                error,
                retry_after: None,
            },
        }
    }

    /// Resolves at the next time the connection is (re)established.
    pub async fn reconnected(&self) {
        let mut state = self.state.clone();
        state.mark_unchanged();
        loop {
            if state.changed().await.is_err() {
                // the connection's task is gone: it never comes back
                return std::future::pending().await;
            }
            if matches!(*state.borrow(), Connection::Up) {
                return;
            }
        }
    }

    /// Publishes the answer to command `id`, done at its PUBACK.
    pub async fn answer(
        &self,
        id: &str,
        status: &str,
        result: &Value,
        timeout: Duration,
    ) -> Answered {
        let topic = format!("devices/{}/commands/{id}/result", self.device.as_str());
        let payload = answer_body(status, result).to_string().into_bytes();
        match self.publish(topic, payload, timeout).await {
            Ok(()) => Answered::Done,
            Err(error) => Answered::Failed(error),
        }
    }

    /// One QoS 1 publish: waits (within `timeout`) for the first connection, then for the
    /// PUBACK; fails at once while the connection is down.
    async fn publish(
        &self,
        topic: String,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<(), String> {
        if let Connection::Down(why) = &*self.state.borrow() {
            return Err(format!("the MQTT connection is down: {why}"));
        }
        let mut state = self.state.clone();
        let exchange = async {
            state
                .wait_for(|s| !matches!(s, Connection::Starting))
                .await
                .map_err(|_| "the MQTT connection's task stopped".to_owned())?;
            if let Connection::Down(why) = &*state.borrow() {
                return Err(format!("the MQTT connection is down: {why}"));
            }
            let (done, acked) = oneshot::channel();
            self.publishes
                .send(Publish {
                    topic,
                    payload,
                    done,
                })
                .await
                .map_err(|_| "the MQTT connection's task stopped".to_owned())?;
            acked
                .await
                .map_err(|_| "the MQTT connection's task stopped".to_owned())?
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(outcome) => outcome,
            Err(_) => {
                let why = match &*self.state.borrow() {
                    Connection::Starting => "not connected yet".to_owned(),
                    Connection::Up => "connected".to_owned(),
                    Connection::Down(e) => e.clone(),
                };
                Err(format!(
                    "no PUBACK within {} ({why})",
                    humantime::format_duration(timeout)
                ))
            }
        }
    }
}

fn commands_topic(device: &DeviceId) -> String {
    format!("devices/{}/commands", device.as_str())
}

/// The connection's options: the device's login, a persistent session, TLS for `mqtts://`.
/// `manual_acks` leaves received messages unacknowledged, so they stay in the session (`check`).
fn options(config: &Config, manual_acks: bool) -> Result<MqttOptions, Error> {
    let url = config.mqtt_url().map_err(Error::Config)?;
    let mut options = MqttOptions::new(config.device_id.as_str(), url.host.as_str(), url.port);
    options
        .set_credentials(config.device_id.as_str(), config.token()?)
        .set_clean_session(false)
        .set_keep_alive(KEEP_ALIVE)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET)
        .set_manual_acks(manual_acks);
    if url.tls {
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            crate::tls::client_config(config)?,
        )));
    }
    Ok(options)
}

/// The task that owns the connection.
struct Driver {
    client: AsyncClient,
    events: EventLoop,
    to_publish: mpsc::Receiver<Publish>,
    commands: mpsc::Sender<DeviceCommand>,
    commands_topic: String,
    state: watch::Sender<Connection>,
    /// Publishes handed to rumqttc and not yet written, in the order they were handed over.
    queued: VecDeque<oneshot::Sender<Result<(), String>>>,
    /// Publishes written, by packet id, waiting for their PUBACK.
    in_flight: HashMap<u16, oneshot::Sender<Result<(), String>>>,
    backoff_max: Duration,
}

impl Driver {
    async fn run(mut self) {
        let mut backoff = self.backoff();
        let mut failing = false;
        loop {
            let connected = matches!(*self.state.borrow(), Connection::Up);
            tokio::select! {
                event = self.events.poll() => match event {
                    Ok(event) => {
                        if matches!(event, Event::Incoming(Packet::ConnAck(_))) {
                            if failing {
                                tracing::info!("connected to the MQTT broker again");
                            } else {
                                tracing::info!("connected to the MQTT broker");
                            }
                            failing = false;
                            backoff = self.backoff();
                        }
                        self.on_event(event);
                    }
                    Err(error) => {
                        let error = describe(&error);
                        self.on_connection_lost(&error);
                        if !failing {
                            tracing::warn!(%error, "the MQTT connection is down; reconnecting with backoff");
                            failing = true;
                        } else {
                            tracing::debug!(%error, "the MQTT connection is still down");
                        }
                        tokio::time::sleep(backoff.next().unwrap_or(self.backoff_max)).await;
                    }
                },
                Some(publish) = self.to_publish.recv(), if connected => self.publish(publish),
            }
        }
    }

    fn backoff(&self) -> backon::ExponentialBackoff {
        crate::backoff(Duration::from_millis(500), self.backoff_max)
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Incoming(Packet::ConnAck(_)) => {
                // subscribed again on every connection: the session may be new (the broker
                // restarted without its state, say); a repeat is harmless
                if let Err(e) = self
                    .client
                    .try_subscribe(self.commands_topic.as_str(), QoS::AtLeastOnce)
                {
                    tracing::error!(error = %e, "cannot subscribe to the commands");
                }
                let _previous = self.state.send_replace(Connection::Up);
            }
            Event::Incoming(Packet::SubAck(ack))
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) =>
            {
                tracing::error!(topic = %self.commands_topic, "the broker refused the commands subscription (its ACL?): no commands will arrive");
            }
            Event::Incoming(Packet::Publish(publish)) => {
                if publish.topic != self.commands_topic {
                    return;
                }
                match DeviceCommand::decode(&publish.payload) {
                    Ok(command) => {
                        if self.commands.try_send(command).is_err() {
                            tracing::warn!(
                                "too many commands waiting; this one is left for the server to send again"
                            );
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "a message on the commands topic that is not a command")
                    }
                }
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if let Some(done) = self.queued.pop_front() {
                    self.in_flight.insert(pkid, done);
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(done) = self.in_flight.remove(&ack.pkid) {
                    let _ = done.send(Ok(()));
                }
            }
            _ => {}
        }
    }

    fn publish(&mut self, publish: Publish) {
        // its sender gave up waiting (a timeout): not sent at all
        if publish.done.is_closed() {
            return;
        }
        match self
            .client
            .try_publish(publish.topic, QoS::AtLeastOnce, false, publish.payload)
        {
            Ok(()) => self.queued.push_back(publish.done),
            Err(e) => {
                let _ = publish.done.send(Err(format!("cannot publish: {e}")));
            }
        }
    }

    /// No PUBACK will come for what is in hand: it fails now, and rumqttc is not to send it again
    /// on the next connection (under packet ids this task would not know).
    fn on_connection_lost(&mut self, error: &str) {
        let _previous = self.state.send_replace(Connection::Down(error.to_owned()));
        let reason = format!("the MQTT connection was lost: {error}");
        // what was asked for but not yet handed to rumqttc fails too, rather than waiting
        while let Ok(publish) = self.to_publish.try_recv() {
            let _ = publish.done.send(Err(reason.clone()));
        }
        for done in self
            .queued
            .drain(..)
            .chain(self.in_flight.drain().map(|(_, d)| d))
        {
            let _ = done.send(Err(reason.clone()));
        }
        self.events
            .pending
            .retain(|request| !matches!(request, Request::Publish(_)));
    }
}

/// A connection error as a person can act on it.
fn describe(error: &ConnectionError) -> String {
    match error {
        ConnectionError::ConnectionRefused(
            code @ (ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized),
        ) => format!(
            "the broker refused the device's login ({code:?}); check token_file and device_id"
        ),
        other => {
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(cause) = source {
                // rumqttc's errors often say their cause already
                let cause_text = cause.to_string();
                if !text.contains(&cause_text) {
                    text.push_str(": ");
                    text.push_str(&cause_text);
                }
                source = cause.source();
            }
            text
        }
    }
}

/// What `check` learnt from the broker.
pub enum Probe {
    /// CONNACK accepted.
    Accepted,
    /// The broker refused the login (user name, password, not authorised).
    Refused(String),
    /// Not reached, or something else went wrong.
    Failed(String),
}

/// Connects as the device, waits for the CONNACK, and disconnects (`check`). The session is the
/// agent's own (same client id, clean_session = false, so nothing in it is discarded), and any
/// command the broker hands over meanwhile is left unacknowledged, so it stays in the session for
/// the agent. A running agent is thrown off for a moment (one client id, one connection) and
/// reconnects.
pub async fn probe(config: &Config, timeout: Duration) -> Probe {
    let options = match options(config, true) {
        Ok(options) => options,
        Err(e) => return Probe::Failed(e.to_string()),
    };
    let (client, mut events) = AsyncClient::new(options, 4);
    let connected = tokio::time::timeout(timeout, events.poll()).await;
    let outcome = match connected {
        Err(_) => Probe::Failed(format!(
            "no CONNACK within {}",
            humantime::format_duration(timeout)
        )),
        Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => Probe::Accepted,
        Ok(Ok(other)) => Probe::Failed(format!("{other:?} before the CONNACK")),
        Ok(Err(
            error @ ConnectionError::ConnectionRefused(
                ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized,
            ),
        )) => Probe::Refused(format!("{error}")),
        Ok(Err(error)) => Probe::Failed(describe(&error)),
    };
    if matches!(outcome, Probe::Accepted) {
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while !matches!(
                events.poll().await,
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_)
            ) {}
        })
        .await;
    }
    outcome
}
