//! ingest-mqtt: Mosquitto → RabbitMQ, losing nothing in between.
//!
//! It holds a persistent MQTT session (fixed client id, no clean start, a long session expiry) with
//! QoS 1 subscriptions and manual acknowledgements. Each message is handled in its own task: parsed
//! and validated with `models`, published with confirms, and only then acknowledged (PUBACK). While
//! RabbitMQ is down, messages stay unacknowledged and are retried; Mosquitto stops sending once its
//! window of unacknowledged messages is full, and keeps the rest in the session. A message that was
//! published but not yet acknowledged when the process dies is delivered again after it restarts.
//!
//! A payload that can never be a reading (not JSON, invalid, wrong device) is kept on RabbitMQ's
//! invalid queue with the reason, counted, and acknowledged, so it is not redelivered forever.

mod classify;
mod metrics;
pub mod settings;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use bus::{PublishError, Publisher, PublisherMetrics, Topology};
use prometheus_client::registry::Registry;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use service_kit::{Ops, Readiness};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;

pub use classify::{Classified, classify};
pub use metrics::MqttMetrics;
pub use settings::Settings;

use crate::metrics::KindLabels;

/// How long a stop waits for messages in flight to reach RabbitMQ before leaving them to Mosquitto.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// The longest wait between two attempts to reconnect to Mosquitto.
const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(1);

pub struct IngestMqtt {
    settings: Settings,
    client_id: String,
    publisher: Publisher,
    metrics: MqttMetrics,
    mqtt_connected: Arc<AtomicBool>,
    ops_port: u16,
    ops_server: actix_web::dev::Server,
}

impl IngestMqtt {
    /// Starts the RabbitMQ publisher (it connects in the background) and binds the ops endpoints.
    pub fn build(settings: &Settings) -> anyhow::Result<Self> {
        settings.endpoint().map_err(anyhow::Error::msg)?;
        let mut registry = Registry::default();
        let metrics = MqttMetrics::register(&mut registry);
        let publisher = Publisher::start(
            settings.bus.amqp_url.clone(),
            Topology::with_prefix(&settings.bus.amqp_prefix),
            settings.publisher.clone(),
            PublisherMetrics::register(&mut registry),
            "ingest-mqtt".to_owned(),
        );
        let mqtt_connected = Arc::new(AtomicBool::new(false));
        let (ready_publisher, ready_mqtt) = (publisher.clone(), mqtt_connected.clone());
        let readiness = Readiness::default()
            .with_check("rabbitmq", move || {
                let available = ready_publisher.check_available().map_err(|e| e.to_string());
                async move { available }
            })
            .with_check("mosquitto", move || {
                let connected = ready_mqtt.load(Ordering::SeqCst);
                async move {
                    connected
                        .then_some(())
                        .ok_or_else(|| "not connected and subscribed to Mosquitto".to_owned())
                }
            });
        let (ops_addr, ops_server) = Ops::new(registry, readiness)
            .serve(&settings.http_addr)
            .with_context(|| format!("cannot listen on {}", settings.http_addr))?;
        Ok(Self {
            client_id: settings.client_id(),
            settings: settings.clone(),
            publisher,
            metrics,
            mqtt_connected,
            ops_port: ops_addr.port(),
            ops_server,
        })
    }

    pub fn ops_port(&self) -> u16 {
        self.ops_port
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Bridges until `stop` resolves; then stops taking messages, lets those in flight reach
    /// RabbitMQ and be acknowledged (up to a grace period), and disconnects, keeping the session.
    pub async fn run_until(self, stop: impl Future<Output = ()>) {
        let ops_handle = self.ops_server.handle();
        let ops = tokio::spawn(self.ops_server);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let bridge = tokio::spawn(bridge(
            self.settings.clone(),
            self.client_id.clone(),
            self.publisher.clone(),
            self.metrics.clone(),
            self.mqtt_connected.clone(),
            shutdown_rx,
        ));
        stop.await;
        shutdown.send_replace(true);
        if let Err(e) = bridge.await {
            tracing::error!(error = %e, "the MQTT bridge failed");
        }
        self.publisher.close().await;
        ops_handle.stop(true).await;
        let _ = ops.await;
    }
}

fn mqtt_options(settings: &Settings, client_id: &str) -> MqttOptions {
    // Checked in `build`; the defaults are valid.
    let endpoint = settings
        .endpoint()
        .unwrap_or_else(|_| service_kit::net::MqttEndpoint {
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

fn subscriptions(settings: &Settings) -> Vec<String> {
    let mut filters = vec!["devices/+/readings".to_owned()];
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

async fn bridge(
    settings: Settings,
    client_id: String,
    publisher: Publisher,
    metrics: MqttMetrics,
    connected: Arc<AtomicBool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (client, mut events): (AsyncClient, EventLoop) =
        AsyncClient::new(mqtt_options(&settings, &client_id), 4096);
    let filters = subscriptions(&settings);
    let legacy =
        (!settings.mqtt_legacy_topic.is_empty()).then(|| settings.mqtt_legacy_topic.clone());
    let max_backoff = Duration::from_millis(settings.retry_max_backoff_ms.max(100));
    let mut backoff = Duration::from_millis(100);
    let mut handlers = JoinSet::new();
    let (done, finished) = mpsc::unbounded_channel();
    let mut acker = tokio::spawn(acknowledge_in_order(
        client.clone(),
        finished,
        metrics.clone(),
    ));
    let mut next_seq = 0u64;
    // Never more than receive_maximum messages in hand, whatever the broker does: Mosquitto before
    // 2.0.13 miscounts its send quota (#2306) and was measured sending 77,000 unacknowledged
    // messages to one subscriber. While every slot is taken the socket is not read, and TCP holds
    // the broker back; a handler frees its slot when it has handed its PUBACK to the acker.
    let slots = Arc::new(Semaphore::new(usize::from(
        settings.mqtt_receive_maximum.max(1),
    )));
    let mut slot: Option<OwnedSemaphorePermit> = None;
    let keep_alive = Duration::from_secs(settings.mqtt_keep_alive_secs.max(5));
    let mut stopping = false;
    let mut stop_deadline = None;
    loop {
        while handlers.try_join_next().is_some() {}
        if stopping
            && (handlers.is_empty()
                || stop_deadline.is_some_and(|d| tokio::time::Instant::now() > d))
        {
            break;
        }
        if slot.is_none() && !stopping {
            tokio::select! {
                permit = slots.clone().acquire_owned() => slot = permit.ok(),
                _ = shutdown.changed() => {
                    stopping = true;
                    stop_deadline = Some(tokio::time::Instant::now() + STOP_GRACE);
                    continue;
                }
                // every slot taken for long (RabbitMQ away): poll now and then anyway, so that
                // keep-alive pings go out and Mosquitto keeps the connection
                _ = tokio::time::sleep(keep_alive / 2) => {}
            }
        }
        let event = tokio::select! {
            event = events.poll() => event,
            _ = shutdown.changed(), if !stopping => {
                stopping = true;
                stop_deadline = Some(tokio::time::Instant::now() + STOP_GRACE);
                continue;
            }
            // while stopping, wake up to see whether the handlers are done
            _ = tokio::time::sleep(Duration::from_millis(50)), if stopping => continue,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff = Duration::from_millis(100);
                tracing::info!(
                    session_present = ack.session_present,
                    "connected to Mosquitto"
                );
                // Subscribe on every connection, even when Mosquitto says it kept the session: a
                // Mosquitto that died between two saves of its state keeps an older session, whose
                // subscriptions may predate ours. Subscribing again is harmless. Ready at the SUBACK.
                for filter in &filters {
                    if let Err(e) = client.try_subscribe(filter.as_str(), QoS::AtLeastOnce) {
                        tracing::error!(error = %e, %filter, "cannot subscribe");
                    }
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused: Vec<_> = ack
                    .return_codes
                    .iter()
                    .filter(|code| {
                        !matches!(
                            code,
                            rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
                        )
                    })
                    .collect();
                if refused.is_empty() {
                    tracing::info!(filters = ?filters, "subscribed");
                    connected.store(true, Ordering::SeqCst);
                    metrics.connected.set(1);
                } else {
                    tracing::error!(codes = ?refused, filters = ?filters, "Mosquitto refused a subscription (check the ACL)");
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                if stopping {
                    // Not acknowledged: Mosquitto keeps it in the session for next time.
                    continue;
                }
                metrics.messages_received.inc();
                metrics.messages_in_flight.inc();
                handlers.spawn(handle(
                    publish,
                    slot.take(),
                    next_seq,
                    done.clone(),
                    publisher.clone(),
                    metrics.clone(),
                    legacy.clone(),
                    settings.backfill_horizon_days,
                    max_backoff,
                    shutdown.clone(),
                ));
                next_seq += 1;
            }
            Ok(_) => {}
            Err(e) => {
                connected.store(false, Ordering::SeqCst);
                metrics.connected.set(0);
                if stopping {
                    break;
                }
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "MQTT connection failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => {}
                }
                // Readings wait in Mosquitto for as long as we are away, and trying one broker
                // again is cheap: reconnect at least every second.
                backoff = (backoff * 2).min(max_backoff).min(MAX_RECONNECT_BACKOFF);
            }
        }
    }
    handlers.abort_all();
    while handlers.join_next().await.is_some() {}
    // Every handler is gone: once the acknowledgements they left are queued, the acker ends.
    drop(done);
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
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match events.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    connected.store(false, Ordering::SeqCst);
    metrics.connected.set(0);
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

/// One message: to RabbitMQ (readings, or the invalid queue), retried while RabbitMQ is away, then
/// handed to the acker. On shutdown a message not yet confirmed is left unacknowledged for the next
/// session.
#[allow(clippy::too_many_arguments)]
async fn handle(
    mut publish: Publish,
    // freed when this handler ends; None when taken without a free slot (see `bridge`)
    _slot: Option<OwnedSemaphorePermit>,
    seq: u64,
    done: mpsc::UnboundedSender<Handled>,
    publisher: Publisher,
    metrics: MqttMetrics,
    legacy_topic: Option<String>,
    backfill_horizon: models::BackfillHorizon,
    max_backoff: Duration,
    shutdown: watch::Receiver<bool>,
) {
    let classified = classify(
        &publish.topic,
        &publish.payload,
        legacy_topic.as_deref(),
        models::TimeWindow::new(chrono::Utc::now(), backfill_horizon),
    );
    let mut backoff = Duration::from_millis(50);
    loop {
        let result = match &classified {
            Classified::Readings(readings) => publisher.publish(readings.clone()).await,
            Classified::Invalid { kind, reason } => {
                tracing::debug!(%reason, kind, "refusing an MQTT message");
                publisher
                    .keep_invalid(
                        publish.payload.to_vec(),
                        reason,
                        vec![(
                            "x-mqtt-topic",
                            String::from_utf8_lossy(&publish.topic).into_owned(),
                        )],
                    )
                    .await
            }
        };
        match result {
            Ok(()) => break,
            Err(PublishError::ShuttingDown) => {
                let _ = done.send(Handled { seq, ack: None });
                metrics.messages_in_flight.dec();
                return;
            }
            Err(e) => {
                if *shutdown.borrow() {
                    let _ = done.send(Handled { seq, ack: None });
                    metrics.messages_in_flight.dec();
                    return;
                }
                metrics.publish_retries.inc();
                tracing::debug!(error = %e, "RabbitMQ unavailable; holding the MQTT message");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(max_backoff);
            }
        }
    }
    match &classified {
        Classified::Readings(readings) => {
            metrics.readings_accepted.inc_by(readings.len() as u64);
        }
        Classified::Invalid { kind, .. } => {
            metrics
                .messages_invalid
                .get_or_create(&KindLabels { kind })
                .inc();
        }
    }
    // the acknowledgement needs the packet id alone: let go of the payload and the read buffer it
    // is a slice of
    publish.payload = bytes::Bytes::new();
    publish.topic = bytes::Bytes::new();
    let _ = done.send(Handled {
        seq,
        ack: Some(publish),
    });
    metrics.messages_in_flight.dec();
}
