//! The persister: RabbitMQ → PostgreSQL.
//!
//! A consuming task takes messages (at most `prefetch` unacknowledged), packs them into batches and
//! hands them to `db_writers` writing tasks. A writer stores its batch in one transaction and only
//! then acknowledges the batch's messages, so a crash at any point leaves them on the queue to be
//! delivered again, and the store's unique keys make that second write a no-op. A reading whose id
//! the device chose is recognised by `(device_id, id)` for `dedupe_window_days`, whatever its time;
//! sent again with other content, the first write stays and the newcomer is kept in
//! `reading_conflicts` (counted as `sensorhub_readings_conflicting_total`).
//!
//! Live views: after each commit, the persister announces the readings it stored (see
//! `announce`), for query-api to relay to browsers.
//!
//! Commands: the persister also publishes the commands that are due (new ones, and re-sends of
//! those not answered) and records what the ingest services report about them (see `commands`).
//!
//! Retention: every `retention_interval_secs` one persister applies the retention policy (see
//! `retention`).
//!
//! A message that cannot be decoded goes to the dead-letter queue with the reason, counted. A
//! database that is down is waited for: writes are retried with backoff while the messages stay
//! unacknowledged, and the queue holds everything else.

mod announce;
mod batch;
mod commands;
mod consumer;
mod housekeeping;
mod lag;
mod metrics;
mod retention;
mod rollups;
pub mod settings;
mod writer;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use actix_web::dev::ServerHandle;
use anyhow::Context;
use service_kit::{Ops, Readiness};
use tokio::sync::watch;

pub use metrics::PersisterMetrics;
pub use settings::Settings;

/// A persister, connected to its database and bound to its ops port, not yet consuming.
pub struct Persister {
    settings: Settings,
    pool: store::PgPool,
    metrics: PersisterMetrics,
    ops_port: u16,
    ops_server: actix_web::dev::Server,
    amqp_connected: Arc<AtomicBool>,
    /// Publishes commands (connecting in the background).
    publisher: bus::Publisher,
    shutdown: watch::Sender<bool>,
}

impl Persister {
    /// Waits for PostgreSQL (up to `startup_wait_ms`), refuses an unmigrated database, and binds the
    /// ops endpoints on `http_addr`.
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        let pool =
            service_kit::postgres::connect_migrated(&settings.database, &settings.pool()).await?;

        let mut registry = service_kit::metrics_registry();
        let metrics = PersisterMetrics::register(&mut registry);
        let publisher = bus::Publisher::start(
            settings.bus.amqp_url.clone(),
            settings.bus.topology(),
            settings.publisher.clone(),
            bus::PublisherMetrics::register(&mut registry),
            "persister-commands".to_owned(),
        );
        let amqp_connected = Arc::new(AtomicBool::new(false));
        let ready_pool = pool.clone();
        let ready_amqp = amqp_connected.clone();
        let readiness = Readiness::default()
            .with_check("postgres", move || {
                service_kit::postgres::ping(ready_pool.clone())
            })
            .with_check("rabbitmq", move || {
                let connected = ready_amqp.load(Ordering::SeqCst);
                async move {
                    if connected {
                        Ok(())
                    } else {
                        Err("not consuming from RabbitMQ".to_owned())
                    }
                }
            });
        let (ops_addr, ops_server) = Ops::new(registry, readiness)
            .serve(&settings.http_addr)
            .with_context(|| format!("cannot listen on {}", settings.http_addr))?;
        let (shutdown, _) = watch::channel(false);
        Ok(Self {
            settings: settings.clone(),
            pool,
            metrics,
            ops_port: ops_addr.port(),
            ops_server,
            amqp_connected,
            publisher,
            shutdown,
        })
    }

    pub fn ops_port(&self) -> u16 {
        self.ops_port
    }

    /// Consumes until `stop` resolves, then finishes and acknowledges the batches in hand, and returns.
    pub async fn run_until(self, stop: impl Future<Output = ()>) {
        let ops_handle: ServerHandle = self.ops_server.handle();
        let ops = tokio::spawn(self.ops_server);
        let shutdown = self.shutdown.clone();
        let (announcer, announcing) =
            announce::Announcer::start(self.publisher.clone(), self.metrics.clone());
        let consuming = tokio::spawn(consumer::consume(
            self.settings.clone(),
            self.pool.clone(),
            self.metrics.clone(),
            announcer,
            self.amqp_connected.clone(),
            self.shutdown.subscribe(),
        ));
        let forgetting = tokio::spawn(housekeeping::forget_expired(
            self.pool.clone(),
            self.settings.dedupe_window_days,
            self.settings.conflicts_kept_days,
            self.shutdown.subscribe(),
        ));
        let folding = tokio::spawn(rollups::fold(
            self.pool.clone(),
            self.metrics.clone(),
            self.shutdown.subscribe(),
        ));
        let expiring = tokio::spawn(housekeeping::record_expired_commands(
            self.pool.clone(),
            self.shutdown.subscribe(),
        ));
        let retaining = tokio::spawn(retention::apply_periodically(
            self.pool.clone(),
            self.settings.retention_interval_secs,
            self.metrics.clone(),
            self.shutdown.subscribe(),
        ));
        let dispatching = tokio::spawn(commands::dispatch(
            self.settings.clone(),
            self.pool.clone(),
            self.publisher.clone(),
            self.metrics.clone(),
            self.shutdown.subscribe(),
        ));
        let recording = tokio::spawn(commands::record_reports(
            self.settings.clone(),
            self.pool.clone(),
            self.metrics.clone(),
            self.shutdown.subscribe(),
        ));
        tokio::pin!(stop);
        tokio::select! {
            _ = &mut stop => {}
            _ = shutdown.closed() => {}
        }
        shutdown.send_replace(true);
        if let Err(e) = consuming.await {
            tracing::error!(error = %e, "the consuming task failed");
        }
        let _ = recording.await;
        let _ = dispatching.await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), announcing).await;
        self.publisher.close().await;
        forgetting.abort();
        folding.abort();
        expiring.abort();
        retaining.abort();
        ops_handle.stop(true).await;
        let _ = ops.await;
    }
}

impl service_kit::service::Service for Persister {
    const NAME: &'static str = "persister";
    type Settings = Settings;

    async fn start(settings: &Settings) -> anyhow::Result<Self> {
        let persister = Self::build(settings).await?;
        tracing::info!(ops_port = persister.ops_port, "persister started");
        Ok(persister)
    }

    async fn run(self, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
        self.run_until(stop).await;
        Ok(())
    }
}
