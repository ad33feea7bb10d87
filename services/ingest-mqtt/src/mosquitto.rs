//! Source `mosquitto`: a persistent MQTT session (fixed client id, no clean start, a long session
//! expiry) with QoS 1 subscriptions and manual acknowledgements. Each message is forwarded in its
//! own task; its PUBACK goes out, in arrival order, once RabbitMQ confirmed it. While RabbitMQ is
//! down, messages stay unacknowledged; Mosquitto stops sending once its window of unacknowledged
//! messages is full, and keeps the rest in the session. A message forwarded but not yet
//! acknowledged when the process dies is delivered again after it restarts.
//!
//! The same session carries commands out (see `commands`): each is published at QoS 1 on its
//! device's `devices/<id>/commands`, and its PUBACK answered to whoever handed it over. rumqttc
//! does not say which publish a PUBACK is for, only the packet id it gave each publish as it
//! wrote it (`Outgoing::Publish`); ingest-mqtt publishes nothing but commands, so the publishes
//! queued and the packet ids written line up in order. A lost connection breaks that line: the
//! commands not yet acknowledged are answered as failed then, and taken out of what rumqttc would
//! send again on the next connection, so that every packet id written afterwards is a new
//! command's. (The persister re-sends a command not reported sent.)

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Packet, PubAck, PubAckReason, Publish, SubAck, SubscribeReasonCode,
};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Request};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::commands::{CommandPublish, Handed};
use crate::forward::{Forwarded, Forwarder};
use crate::metrics::MqttMetrics;
use crate::settings::Settings;
use crate::startup::{STOP_GRACE, Source};

/// The longest wait between two attempts to reconnect to Mosquitto: readings wait in Mosquitto for
/// as long as we are away, and trying one broker again is cheap.
const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(1);
const FIRST_RECONNECT_BACKOFF: Duration = Duration::from_millis(100);

/// What the loop does next.
enum Step {
    /// Boxed: an event is large, and most steps are not events.
    Event(Box<Result<Event, ConnectionError>>),
    /// A command to publish.
    Command(CommandPublish),
    /// Nothing to do this time round (a timer, a slot freed, shutdown noticed).
    Again,
    Stop,
}

/// The bridge's state: the MQTT connection, the messages in hand, and how far a stop has got.
pub struct MosquittoBridge {
    client: AsyncClient,
    events: EventLoop,
    filters: Vec<String>,
    forwarder: Arc<Forwarder>,
    metrics: MqttMetrics,
    connected: Arc<AtomicBool>,
    shutdown: watch::Receiver<bool>,
    handlers: JoinSet<()>,
    done: mpsc::UnboundedSender<Handled>,
    acker: JoinHandle<()>,
    /// Never more than receive_maximum messages in hand, whatever the broker does: Mosquitto
    /// before 2.0.13 miscounts its send quota (#2306) and was measured sending 77,000
    /// unacknowledged messages to one subscriber. While every slot is taken the socket is not
    /// read, and TCP holds the broker back; a handler frees its slot when it has handed its
    /// PUBACK to the acker.
    slots: Arc<Semaphore>,
    slot: Option<OwnedSemaphorePermit>,
    next_seq: u64,
    keep_alive: Duration,
    backoff: bus::Backoff,
    /// Set once a stop was asked for: messages in flight get until then to be confirmed.
    stop_deadline: Option<Instant>,
    /// Commands to publish (none in a bridge that forwards no commands).
    commands: Option<mpsc::Receiver<CommandPublish>>,
    /// Commands handed to rumqttc and not yet written, in the order they were handed over.
    commands_queued: VecDeque<oneshot::Sender<Handed>>,
    /// Commands written, by packet id, waiting for their PUBACK.
    commands_in_flight: HashMap<u16, oneshot::Sender<Handed>>,
}

impl MosquittoBridge {
    pub fn new(source: Source<'_>) -> Self {
        let Source {
            settings,
            client_id,
            forwarder,
            metrics,
            ready: connected,
            shutdown,
            commands,
        } = source;
        let (client, events) = AsyncClient::new(mqtt_options(settings, client_id), 4096);
        let (done, finished) = mpsc::unbounded_channel();
        let acker = tokio::spawn(acknowledge_in_order(
            client.clone(),
            finished,
            metrics.clone(),
        ));
        Self {
            client,
            events,
            filters: subscriptions(settings),
            forwarder,
            metrics,
            connected,
            shutdown,
            handlers: JoinSet::new(),
            done,
            acker,
            slots: Arc::new(Semaphore::new(usize::from(
                settings.mqtt_receive_maximum.max(1),
            ))),
            slot: None,
            next_seq: 0,
            keep_alive: Duration::from_secs(settings.mqtt_keep_alive_secs.max(5)),
            backoff: bus::Backoff::new(
                FIRST_RECONNECT_BACKOFF,
                Duration::from_millis(settings.retry_max_backoff_ms).min(MAX_RECONNECT_BACKOFF),
            ),
            stop_deadline: None,
            commands,
            commands_queued: VecDeque::new(),
            commands_in_flight: HashMap::new(),
        }
    }

    /// Bridges until shutdown; then lets the messages in flight be confirmed and acknowledged (up
    /// to [`STOP_GRACE`]) and disconnects, keeping the session.
    pub async fn run(mut self) {
        loop {
            let event = match self.next_step().await {
                Step::Event(event) => *event,
                Step::Command(command) => {
                    self.publish_command(command);
                    continue;
                }
                Step::Again => continue,
                Step::Stop => break,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => self.on_connected(&ack),
                Ok(Event::Incoming(Packet::SubAck(ack))) => self.on_subscribed(&ack),
                Ok(Event::Incoming(Packet::Publish(publish))) => self.dispatch(publish),
                Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                    self.on_command_written(pkid)
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => self.on_command_acknowledged(&ack),
                Ok(_) => {}
                Err(e) => {
                    if self.on_connection_lost(&e).await.is_break() {
                        break;
                    }
                }
            }
        }
        self.drain().await;
    }

    fn stopping(&self) -> bool {
        self.stop_deadline.is_some()
    }

    fn begin_stop(&mut self) {
        self.stop_deadline = Some(Instant::now() + STOP_GRACE);
    }

    /// Waits for a free slot (polling now and then anyway, so keep-alive pings go out while
    /// RabbitMQ is away and every slot is taken), then for the next MQTT event. A command to
    /// publish is taken meanwhile, but only while connected and subscribed: until then commands
    /// wait in the channel (and on RabbitMQ).
    async fn next_step(&mut self) -> Step {
        while self.handlers.try_join_next().is_some() {}
        if let Some(deadline) = self.stop_deadline
            && (self.handlers.is_empty() || Instant::now() > deadline)
        {
            return Step::Stop;
        }
        let take_commands = self.commands.is_some() && self.is_connected() && !self.stopping();
        if self.slot.is_none() && !self.stopping() {
            tokio::select! {
                permit = self.slots.clone().acquire_owned() => self.slot = permit.ok(),
                Some(command) = next_command(&mut self.commands), if take_commands => {
                    return Step::Command(command);
                }
                _ = self.shutdown.changed() => {
                    self.begin_stop();
                    return Step::Again;
                }
                _ = tokio::time::sleep(self.keep_alive / 2) => {}
            }
        }
        let stopping = self.stopping();
        tokio::select! {
            event = self.events.poll() => Step::Event(Box::new(event)),
            Some(command) = next_command(&mut self.commands), if take_commands => {
                Step::Command(command)
            }
            _ = self.shutdown.changed(), if !stopping => {
                self.begin_stop();
                Step::Again
            }
            // while stopping, wake up to see whether the handlers are done
            _ = tokio::time::sleep(Duration::from_millis(50)), if stopping => Step::Again,
        }
    }

    /// Subscribes on every connection, even when Mosquitto says it kept the session: a Mosquitto
    /// that died between two saves of its state keeps an older session, whose subscriptions may
    /// predate ours. Subscribing again is harmless. Ready at the SUBACK.
    fn on_connected(&mut self, ack: &ConnAck) {
        self.backoff.reset();
        tracing::info!(
            session_present = ack.session_present,
            "connected to Mosquitto"
        );
        for filter in &self.filters {
            if let Err(e) = self.client.try_subscribe(filter.as_str(), QoS::AtLeastOnce) {
                tracing::error!(error = %e, %filter, "cannot subscribe");
            }
        }
    }

    fn on_subscribed(&mut self, ack: &SubAck) {
        let refused: Vec<_> = ack
            .return_codes
            .iter()
            .filter(|code| !matches!(code, SubscribeReasonCode::Success(_)))
            .collect();
        if refused.is_empty() {
            tracing::info!(filters = ?self.filters, "subscribed");
            self.set_connected(true);
        } else {
            tracing::error!(codes = ?refused, filters = ?self.filters, "Mosquitto refused a subscription (check the ACL)");
        }
    }

    /// Hands a message to its own task. While stopping, it is not acknowledged: Mosquitto keeps
    /// it in the session for next time.
    fn dispatch(&mut self, publish: Publish) {
        if self.stopping() {
            return;
        }
        self.metrics.messages_received.inc();
        self.handlers.spawn(handle(
            publish,
            self.slot.take(),
            self.next_seq,
            self.done.clone(),
            self.forwarder.clone(),
        ));
        self.next_seq += 1;
    }

    /// Hands a command to rumqttc, to be written at QoS 1 (its answer comes with the PUBACK).
    fn publish_command(&mut self, command: CommandPublish) {
        if command.expires_at <= chrono::Utc::now() {
            let _ = command.done.send(Handed::Expired);
            return;
        }
        match self
            .client
            .try_publish(command.topic, QoS::AtLeastOnce, false, command.payload)
        {
            Ok(()) => self.commands_queued.push_back(command.done),
            Err(e) => {
                let _ = command.done.send(Handed::Failed(e.to_string()));
            }
        }
    }

    /// rumqttc wrote a publish with this packet id: the oldest command queued (nothing else is
    /// published on this session, and what a lost connection left is never written again).
    fn on_command_written(&mut self, pkid: u16) {
        if let Some(done) = self.commands_queued.pop_front() {
            self.commands_in_flight.insert(pkid, done);
        }
    }

    /// Mosquitto's answer to a command: delivered (or queued for a session away), no subscriber,
    /// or refused (its reason code says why: not authorised, most likely).
    fn on_command_acknowledged(&mut self, ack: &PubAck) {
        let Some(done) = self.commands_in_flight.remove(&ack.pkid) else {
            return;
        };
        let handed = match ack.reason {
            PubAckReason::Success => Handed::Sent,
            PubAckReason::NoMatchingSubscribers => Handed::NoSubscriber,
            other => Handed::Refused(format!("{other:?}")),
        };
        let _ = done.send(handed);
    }

    /// The connection is gone: no PUBACK will come for the commands in hand. They fail now, and
    /// whatever of them rumqttc kept to send again is dropped (see the module's documentation).
    fn fail_commands(&mut self, reason: &str) {
        self.events
            .pending
            .retain(|request| !matches!(request, Request::Publish(_)));
        let queued = self.commands_queued.drain(..);
        for done in queued.chain(self.commands_in_flight.drain().map(|(_, done)| done)) {
            let _ = done.send(Handed::Failed(reason.to_owned()));
        }
    }

    fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    async fn on_connection_lost(&mut self, error: &ConnectionError) -> std::ops::ControlFlow<()> {
        self.set_connected(false);
        self.fail_commands(&format!("MQTT connection lost: {error}"));
        if self.stopping() {
            return std::ops::ControlFlow::Break(());
        }
        let delay = self.backoff.next_delay();
        tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "MQTT connection failed");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = self.shutdown.changed() => {}
        }
        std::ops::ControlFlow::Continue(())
    }

    fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::SeqCst);
        self.metrics.connected.set(i64::from(connected));
    }

    /// Ends the handlers still waiting, sends the PUBACKs already earned, then DISCONNECTs.
    async fn drain(mut self) {
        self.handlers.abort_all();
        while self.handlers.join_next().await.is_some() {}
        // Every handler is gone: once the acknowledgements they left are queued, the acker ends.
        drop(self.done);
        let (mut acker, events) = (self.acker, &mut self.events);
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                tokio::select! {
                    _ = &mut acker => break,
                    _ = events.poll() => {}
                }
            }
        })
        .await;
        // Acknowledgements queued go out before the DISCONNECT (requests are in order).
        let _ = self.client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match events.poll().await {
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        self.connected.store(false, Ordering::SeqCst);
        self.metrics.connected.set(0);
    }
}

fn mqtt_options(settings: &Settings, client_id: &str) -> MqttOptions {
    // Checked in `build`; the defaults are valid.
    let endpoint = settings
        .endpoint()
        .unwrap_or_else(|_| mqtt_admin::MqttEndpoint {
            host: "127.0.0.1".into(),
            port: 1883,
            credentials: None,
        });
    let mut options = MqttOptions::new(client_id, endpoint.host, endpoint.port);
    options
        .set_keep_alive(Duration::from_secs(settings.mqtt_keep_alive_secs.max(5)))
        .set_clean_start(false)
        .set_session_expiry_interval(Some(settings.mqtt_session_expiry_secs))
        .set_receive_maximum(Some(settings.mqtt_receive_maximum.max(1)))
        .set_max_packet_size(Some(settings.mqtt_max_packet_bytes))
        .set_manual_acks(true);
    if let Some((user, password)) = endpoint.credentials {
        options.set_credentials(user, password);
    }
    options
}

/// The next command to publish; never, when this bridge forwards none.
async fn next_command(
    commands: &mut Option<mpsc::Receiver<CommandPublish>>,
) -> Option<CommandPublish> {
    match commands {
        Some(commands) => commands.recv().await,
        None => std::future::pending().await,
    }
}

/// Devices' readings, their answers to commands, and the seed's topic (when on).
fn subscriptions(settings: &Settings) -> Vec<String> {
    let mut filters = vec![
        "devices/+/readings".to_owned(),
        "devices/+/commands/+/result".to_owned(),
    ];
    if !settings.mqtt_legacy_topic.is_empty() {
        filters.push(settings.mqtt_legacy_topic.clone());
    }
    if settings.mqtt_shared_group.is_empty() {
        filters
    } else {
        filters
            .into_iter()
            .map(|f| format!("$share/{}/{f}", settings.mqtt_shared_group))
            .collect()
    }
}

/// A handled message, numbered in the order it arrived: to acknowledge, or (None) to leave to
/// Mosquitto for the next session.
struct Handled {
    seq: u64,
    ack: Option<Publish>,
}

/// PUBACKs go out in the order the messages arrived, as MQTT requires (4.6), whatever order
/// RabbitMQ confirms them in. A separate task, so that a handler never waits for the event loop to
/// take its acknowledgement.
async fn acknowledge_in_order(
    client: AsyncClient,
    mut handled: mpsc::UnboundedReceiver<Handled>,
    metrics: MqttMetrics,
) {
    let mut next = 0u64;
    let mut waiting: BTreeMap<u64, Option<Publish>> = BTreeMap::new();
    while let Some(Handled { seq, ack }) = handled.recv().await {
        waiting.insert(seq, ack);
        while let Some(ack) = waiting.remove(&next) {
            next += 1;
            if let Some(publish) = ack
                && client.ack(&publish).await.is_ok()
            {
                metrics.messages_acked.inc();
            }
        }
    }
}

/// One message: forwarded, then handed to the acker (to acknowledge, or to leave for the next
/// session when abandoned on shutdown).
async fn handle(
    mut publish: Publish,
    // freed when this handler ends; None when taken without a free slot (see `next_step`)
    _slot: Option<OwnedSemaphorePermit>,
    seq: u64,
    done: mpsc::UnboundedSender<Handled>,
    forwarder: Arc<Forwarder>,
) {
    let forwarded = forwarder.forward(&publish.topic, &publish.payload).await;
    let ack = (forwarded == Forwarded::Confirmed).then(|| {
        // the acknowledgement needs the packet id alone: let go of the payload and the read
        // buffer it is a slice of
        publish.payload = bytes::Bytes::new();
        publish.topic = bytes::Bytes::new();
        publish
    });
    let _ = done.send(Handled { seq, ack });
}
