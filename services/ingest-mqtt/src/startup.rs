//! ingest-mqtt's skeleton: [`IngestMqtt::build`] (publisher, ops endpoints bound), then
//! [`IngestMqtt::run_until`] a shutdown, running the source the settings name.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use bus::{Publisher, PublisherMetrics, Topology};
use service_kit::{Ops, Readiness};
use tokio::sync::{mpsc, watch};

use crate::commands::{COMMANDS_PREFETCH, CommandPublish, CommandsOut, Outlet};
use crate::forward::Forwarder;
use crate::metrics::MqttMetrics;
use crate::mosquitto::MosquittoBridge;
use crate::queue::QueueBridge;
use crate::settings::{MqttBroker, Settings};

/// How long a stop waits for messages in flight to reach RabbitMQ before leaving them to the broker.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(10);

/// What either source (Mosquitto, RabbitMQ's MQTT queue) is built from.
pub(crate) struct Source<'a> {
    pub settings: &'a Settings,
    /// The MQTT client id (Mosquitto) or AMQP consumer tag (RabbitMQ).
    pub client_id: &'a str,
    pub forwarder: Arc<Forwarder>,
    pub metrics: MqttMetrics,
    /// Set while the source is connected and taking messages (readiness).
    pub ready: Arc<AtomicBool>,
    pub shutdown: watch::Receiver<bool>,
    /// Commands for the MQTT bridge to publish (broker mode `mosquitto`).
    pub commands: Option<mpsc::Receiver<CommandPublish>>,
}

pub struct IngestMqtt {
    settings: Settings,
    client_id: String,
    publisher: Publisher,
    metrics: MqttMetrics,
    source_ready: Arc<AtomicBool>,
    ops_port: u16,
    ops_server: actix_web::dev::Server,
}

impl IngestMqtt {
    /// Starts the RabbitMQ publisher (it connects in the background) and binds the ops endpoints.
    pub fn build(settings: &Settings) -> anyhow::Result<Self> {
        if settings.mqtt_broker == MqttBroker::Mosquitto {
            settings.endpoint().map_err(anyhow::Error::msg)?;
        }
        let mut registry = service_kit::metrics_registry();
        let metrics = MqttMetrics::register(&mut registry);
        let publisher = Publisher::start(
            settings.bus.amqp_url.clone(),
            Topology::with_prefix(&settings.bus.amqp_prefix),
            settings.publisher.clone(),
            PublisherMetrics::register(&mut registry),
            "ingest-mqtt".to_owned(),
        );
        let source_ready = Arc::new(AtomicBool::new(false));
        let (ready_publisher, ready_source) = (publisher.clone(), source_ready.clone());
        let (source_check, not_ready) = match settings.mqtt_broker {
            MqttBroker::Mosquitto => ("mosquitto", "not connected and subscribed to Mosquitto"),
            MqttBroker::Rabbitmq => ("mqtt_queue", "not consuming the MQTT queue"),
        };
        let readiness = Readiness::default()
            .with_check("rabbitmq", move || {
                let available = ready_publisher.check_available().map_err(|e| e.to_string());
                async move { available }
            })
            .with_check(source_check, move || {
                let ready = ready_source.load(Ordering::SeqCst);
                async move { ready.then_some(()).ok_or_else(|| not_ready.to_owned()) }
            });
        let (ops_addr, ops_server) = Ops::new(registry, readiness)
            .serve(&settings.http_addr)
            .with_context(|| format!("cannot listen on {}", settings.http_addr))?;
        Ok(Self {
            client_id: settings.client_id(),
            settings: settings.clone(),
            publisher,
            metrics,
            source_ready,
            ops_port: ops_addr.port(),
            ops_server,
        })
    }

    pub fn ops_port(&self) -> u16 {
        self.ops_port
    }

    /// The MQTT client id (Mosquitto) or AMQP consumer tag (RabbitMQ) this instance uses.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Bridges until `stop` resolves; then stops taking messages, lets those in flight reach
    /// RabbitMQ and be acknowledged (up to a grace period), and leaves the rest to the broker.
    pub async fn run_until(self, stop: impl Future<Output = ()>) {
        let ops_handle = self.ops_server.handle();
        let ops = tokio::spawn(self.ops_server);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let forwarder = Arc::new(Forwarder::new(
            &self.settings,
            self.publisher.clone(),
            self.metrics.clone(),
            shutdown_rx.clone(),
        ));
        // Commands go out through Mosquitto's session, or the MQTT plugin's exchange.
        let (commands, outlet) = match self.settings.mqtt_broker {
            MqttBroker::Mosquitto => {
                let (to_broker, commands) = mpsc::channel(usize::from(COMMANDS_PREFETCH));
                (Some(commands), Outlet::Mosquitto(to_broker))
            }
            MqttBroker::Rabbitmq => {
                let mqtt = bus::MqttTopology::with_prefix(&self.settings.bus.amqp_prefix);
                (None, Outlet::Rabbitmq(mqtt.exchange))
            }
        };
        let commands_out = tokio::spawn(
            CommandsOut::new(
                &self.settings,
                &self.client_id,
                self.publisher.clone(),
                outlet,
                self.metrics.clone(),
                shutdown_rx.clone(),
            )
            .run(),
        );
        let source = Source {
            settings: &self.settings,
            client_id: &self.client_id,
            forwarder,
            metrics: self.metrics.clone(),
            ready: self.source_ready.clone(),
            shutdown: shutdown_rx,
            commands,
        };
        let source = match self.settings.mqtt_broker {
            MqttBroker::Mosquitto => tokio::spawn(MosquittoBridge::new(source).run()),
            MqttBroker::Rabbitmq => tokio::spawn(QueueBridge::new(source).run()),
        };
        stop.await;
        shutdown.send_replace(true);
        if let Err(e) = source.await {
            tracing::error!(error = %e, "the MQTT bridge failed");
        }
        if let Err(e) = commands_out.await {
            tracing::error!(error = %e, "forwarding commands failed");
        }
        self.publisher.close().await;
        ops_handle.stop(true).await;
        let _ = ops.await;
    }
}

impl service_kit::service::Service for IngestMqtt {
    const NAME: &'static str = "ingest-mqtt";
    type Settings = Settings;

    async fn start(settings: &Settings) -> anyhow::Result<Self> {
        let ingest = Self::build(settings)?;
        tracing::info!(ops_port = ingest.ops_port, client_id = %ingest.client_id, "ingest-mqtt started");
        Ok(ingest)
    }

    async fn run(self, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
        self.run_until(stop).await;
        Ok(())
    }
}
