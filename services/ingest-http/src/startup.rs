use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::middleware::from_fn;
use actix_web::{App, HttpServer, web};
use anyhow::Context;
use auth::{CredentialChange, DeviceRegistry, Follower, TokenVerifier};
use bus::{DeviceCommands, Publisher, PublisherMetrics};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use service_kit::access::{PublicRoutes, RefusalLimit};
use service_kit::connections::ConnectionCap;
use service_kit::net::{KeyedLimit, TrustedProxies};
use service_kit::ops::HttpMetrics;
use service_kit::{Ops, Readiness};
use utoipa::OpenApi;
use utoipa_actix_web::AppExt;

use crate::api::{self, ApiDoc, IngestState};
use crate::audit::AuditTrail;
use crate::commands::CommandDesk;
use crate::device_auth::{self, Authenticator};
use crate::metrics::{CauseLabels, IngestMetrics};
use crate::rabbitmq_auth::{self, MqttRules};
use crate::settings::Settings;

/// ingest-http, built and bound, ready to run.
pub struct Application {
    port: u16,
    server: Server,
    /// The registry's change listener (none for anonymous devices): stops with the service.
    notifications: Option<store::listen::Listener>,
    publisher: Publisher,
    router: DeviceCommands,
    audit: Arc<AuditTrail>,
    stopping: tokio::sync::watch::Sender<bool>,
}

impl Application {
    /// Starts the publisher (it connects to RabbitMQ in the background; until it has, requests are
    /// answered 503) and binds `http_addr` (port 0 picks a free port: see [`Application::port`]).
    pub fn build(settings: &Settings) -> anyhow::Result<Self> {
        let mut registry = service_kit::metrics_registry();
        let http_metrics = HttpMetrics::register(&mut registry);
        let connections = ConnectionCap::new(settings.http_max_connections, &mut registry);
        let ingest_metrics = IngestMetrics::register(&mut registry);
        let publisher = Publisher::start(
            settings.bus.amqp_url.clone(),
            settings.bus.topology(),
            settings.publisher.clone(),
            PublisherMetrics::register(&mut registry),
            "ingest-http".to_owned(),
        );
        let router = DeviceCommands::start(
            settings.bus.amqp_url.clone(),
            settings.bus.topology(),
            "ingest-http commands".to_owned(),
        );
        let ready_publisher = publisher.clone();
        let ready_router = router.clone();
        let readiness = Readiness::default().with_check("rabbitmq", move || {
            let available = ready_publisher
                .check_available()
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    ready_router
                        .is_connected()
                        .then_some(())
                        .ok_or_else(|| "the command router is not connected".to_owned())
                });
            async move { available }
        });
        // read only: what is due for a device, whose a command is (connections are made lazily)
        let commands_pool = store::connect_pool(
            &settings.database_url,
            &store::PoolSettings {
                max_connections: settings.commands_db_max_connections,
                acquire_timeout_ms: 5_000,
                statement_timeout_ms: 10_000,
                application_name: "ingest-http commands".into(),
            },
        )?;
        let (authenticator, readiness, notifications) =
            authenticator(settings, readiness, ingest_metrics.registry_reads.clone())?;
        let audit = AuditTrail::new(settings.audit_accepted);
        audit.flush_every(Duration::from_secs(settings.audit_summary_interval_secs));
        let ops = Ops::new(registry, readiness);
        let (stopping, stopping_rx) = tokio::sync::watch::channel(false);
        let state = web::Data::new(IngestState {
            publisher: publisher.clone(),
            metrics: ingest_metrics,
            max_body_bytes: settings.max_body_bytes,
            backfill_horizon: settings.backfill_horizon_days,
            body_timeout: settings.http.body_timeout(),
            authenticator,
            rate_limit: KeyedLimit::new(settings.rate_limit_per_second, settings.rate_limit_burst),
            refusals: RefusalLimit::new(
                settings.refusal_limit_per_second,
                settings.refusal_limit_burst,
            ),
            trusted_proxies: TrustedProxies::parse(&settings.trusted_proxies)
                .map_err(anyhow::Error::msg)?,
            // RabbitMQ's auth backend carries no bearer token: the device's token is the question
            public: PublicRoutes::ops_and(if settings.rabbitmq_mqtt_auth {
                &rabbitmq_auth::PATHS
            } else {
                &[]
            }),
            audit: audit.clone(),
            commands: CommandDesk {
                router: router.clone(),
                pool: commands_pool,
                publisher: publisher.clone(),
                max_wait_secs: settings.command_poll_max_wait_secs,
                handed: Default::default(),
            },
            stopping: stopping_rx,
        });

        let (listener, port) = settings.http.bind()?;
        let mqtt_rules = settings.rabbitmq_mqtt_auth.then(|| MqttRules {
            exchange: bus::MqttTopology::with_prefix(&settings.bus.amqp_prefix).exchange,
            vhost: settings.rabbitmq_mqtt_vhost.clone(),
        });
        let connections_for_workers = connections.clone();
        let server = HttpServer::new(move || {
            let (app, openapi) = App::new()
                .into_utoipa_app()
                .openapi(ApiDoc::openapi())
                .app_data(state.clone())
                .configure(api::routes)
                .split_for_parts();
            app.app_data(web::Data::new(api::description(openapi)))
                .app_data(web::Data::new(http_metrics.clone()))
                .wrap(from_fn(device_auth::require_device))
                .wrap(from_fn(HttpMetrics::record))
                .wrap(from_fn({
                    let connections = connections_for_workers.clone();
                    move |req, next| connections.clone().admit(req, next)
                }))
                .configure(|cfg| ops.routes(cfg))
                .route("/openapi.json", web::get().to(api::openapi_json))
                .configure(|cfg| {
                    if let Some(rules) = mqtt_rules.clone() {
                        rabbitmq_auth::routes(rules)(cfg);
                    }
                })
                .default_service(web::to(service_kit::error::unknown_route))
        })
        .on_connect(move |io, data| connections.on_connect(io, data))
        // actix's own limit (per worker) stays above the cap, so the cap answers before actix stops
        // accepting
        .max_connections(hard_connection_limit(settings.http_max_connections))
        .disable_signals()
        .workers(settings.http.workers())
        .client_request_timeout(settings.http.header_timeout())
        .keep_alive(settings.http.keep_alive())
        .listen(listener)?
        .run();
        Ok(Self {
            port,
            server,
            notifications,
            publisher,
            router,
            audit,
            stopping,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until `stop` resolves (`service_kit::shutdown::signal()`: SIGTERM or SIGINT); then
    /// answers the requests in flight (each waits for its confirm), publishes anything still
    /// waiting, and closes the RabbitMQ connection.
    pub async fn run_until(self, stop: impl Future<Output = ()>) -> std::io::Result<()> {
        let stopping = self.stopping;
        let stop = async move {
            stop.await;
            // long-polls and WebSockets end now, so the requests in flight drain quickly
            stopping.send_replace(true);
        };
        let served = service_kit::shutdown::serve_until(self.server, stop).await;
        drop(self.notifications);
        self.router.close().await;
        self.publisher.close().await;
        self.audit.flush();
        served
    }

    /// For tests: the server handle (to stop it) alongside the future that runs it.
    pub fn into_parts(
        self,
    ) -> (
        actix_web::dev::ServerHandle,
        impl Future<Output = std::io::Result<()>>,
    ) {
        let handle = self.server.handle();
        (handle, self.run_until(std::future::pending()))
    }
}

/// actix's per-worker accept limit: past the cap (which counts every worker's connections), room for
/// the connections that are answered 503; actix's default without a cap.
fn hard_connection_limit(cap: usize) -> usize {
    const ACTIX_DEFAULT: usize = 25_600;
    if cap == 0 {
        ACTIX_DEFAULT
    } else {
        cap.saturating_add(1_024)
    }
}

impl service_kit::service::Service for Application {
    const NAME: &'static str = "ingest-http";
    type Settings = Settings;

    async fn start(settings: &Settings) -> anyhow::Result<Self> {
        let app = Self::build(settings)?;
        tracing::info!(addr = %settings.http.http_addr, port = app.port, "ingest-http listening");
        Ok(app)
    }

    async fn run(self, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
        Ok(self.run_until(stop).await?)
    }
}

/// The device check: the public key, and the device registry followed from PostgreSQL (re-read at
/// each change it notifies, every `auth_refresh_ms`, and promptly for a device it does not know).
/// Without a key, only an explicit `auth_allow_anonymous` lets the service start, and it says so
/// loudly.
fn authenticator(
    settings: &Settings,
    readiness: Readiness,
    reads: Family<CauseLabels, Counter>,
) -> anyhow::Result<(Authenticator, Readiness, Option<store::listen::Listener>)> {
    let follower = Follower::new(Duration::from_millis(
        settings.auth_prompt_read_interval_ms.max(10),
    ));
    let registry = Arc::new(DeviceRegistry::with_prompt_reads(
        follower.clone(),
        Duration::from_millis(settings.auth_unknown_device_cache_ms),
    ));
    if settings.auth_allow_anonymous {
        tracing::warn!(
            "ANONYMOUS INGEST IS ON: anyone who can reach this service can write readings as any \
             device. For local development only; set auth_allow_anonymous = false in production."
        );
    }
    if settings.auth_public_key_file.is_empty() {
        anyhow::ensure!(
            settings.auth_allow_anonymous,
            "auth_public_key_file is not set: point it at the verifying key from `sensorctl keys \
             init` (or, for local development only, set auth_allow_anonymous = true)"
        );
        let authenticator = Authenticator {
            verifier: None,
            registry,
            allow_anonymous: true,
        };
        return Ok((authenticator, readiness, None));
    }
    let verifier = TokenVerifier::from_file(std::path::Path::new(&settings.auth_public_key_file))
        .context("loading auth_public_key_file")?;
    let pool = store::connect_pool(
        &settings.database_url,
        &store::PoolSettings {
            max_connections: 1,
            acquire_timeout_ms: 5_000,
            statement_timeout_ms: 10_000,
            application_name: "ingest-http registry".into(),
        },
    )?;
    let interval = Duration::from_millis(settings.auth_refresh_ms.max(100));
    let notifications = service_kit::postgres::follow_notifications(
        &settings.database_url,
        store::listen::DEVICE_CREDENTIALS_CHANNEL,
        "ingest-http registry listener",
        &follower,
    )
    .context("starting the registry's change listener")?;
    tokio::spawn(auth::keep_fresh(
        registry.clone(),
        follower,
        interval,
        move |since, cause| {
            let pool = pool.clone();
            reads
                .get_or_create(&CauseLabels {
                    cause: cause.as_str(),
                })
                .inc();
            async move {
                tokio::task::spawn_blocking(move || load_changes(&pool, since))
                    .await
                    .map_err(|e| e.to_string())?
            }
        },
    ));
    let ready_registry = registry.clone();
    // Never less than a few refreshes, so one slow read does not take the service out of rotation.
    let max_age = Duration::from_secs(settings.auth_registry_max_age_secs)
        .max(interval * 5 + Duration::from_secs(5));
    let readiness = readiness.with_check("device_registry", move || {
        let health = ready_registry.health(max_age);
        async move { health }
    });
    let authenticator = Authenticator {
        // a fleet's worth of device tokens (about 300 bytes each)
        verifier: Some(auth::CachedVerifier::new(verifier, 20_000)),
        registry,
        allow_anonymous: settings.auth_allow_anonymous,
    };
    Ok((authenticator, readiness, Some(notifications)))
}

fn load_changes(
    pool: &store::PgPool,
    since: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<Vec<CredentialChange>, String> {
    let mut conn = pool.get().map_err(|e| e.to_string())?;
    let rows = store::credentials::credential_changes_since(&mut conn, since)
        .map_err(|e| e.to_string())?;
    Ok(rows
        .into_iter()
        .map(|c| CredentialChange {
            revoked: c.revoked_at.is_some(),
            device_id: c.device_id,
            token_id: c.token_id,
            updated_at: c.updated_at,
        })
        .collect())
}
