use std::future::Future;
use std::path::Path;

use actix_cors::Cors;
use actix_web::dev::Server;
use actix_web::http::header;
use actix_web::middleware::from_fn;
use actix_web::{App, HttpServer, web};
use anyhow::Context;
use service_kit::access::{PublicRoutes, RefusalLimit};
use service_kit::ops::HttpMetrics;
use service_kit::{Ops, Readiness};
use utoipa::OpenApi;
use utoipa_actix_web::AppExt;

use crate::access::{self, Access};
use crate::api::{self, ApiDoc, DeviceTokens, MqttAccounts};
use crate::body_deadline;
use crate::dashboard;
use crate::settings::Settings;
use crate::tokens;

/// query-api, built and bound, ready to run.
pub struct Application {
    port: u16,
    server: Server,
    /// The app tokens' change listener: stops with the service.
    notifications: store::listen::Listener,
    /// The live relay's feed from RabbitMQ: closed with the service.
    live: std::sync::Arc<crate::live::LiveHub>,
}

impl Application {
    /// Connects to PostgreSQL (waiting for it up to `startup_wait_ms`), refuses an unmigrated
    /// database, and binds `http_addr` (port 0 picks a free port: see [`Application::port`]).
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        let pool =
            service_kit::postgres::connect_migrated(&settings.database, &settings.pool()).await?;

        let (listener, port) = settings.http.bind()?;

        let mut registry = service_kit::metrics_registry();
        let http_metrics = HttpMetrics::register(&mut registry);
        let live = crate::live::LiveHub::start(
            &settings.bus,
            settings.live_max_streams as usize,
            std::time::Duration::from_secs(settings.live_keepalive_secs.max(1)),
            &mut registry,
        );
        let read_pool = match settings.read_database() {
            Some((database, pool_settings)) => {
                service_kit::postgres::connect_migrated(&database, &pool_settings).await?
            }
            None => pool.clone(),
        };
        let readiness = readiness(settings, &pool, &read_pool);
        let (app_tokens, readiness, notifications) =
            tokens::follow_app_tokens(settings, &pool, readiness).await?;
        let ops = Ops::new(registry, readiness);

        let access = web::Data::new(access(settings, app_tokens.clone())?);
        let live_data = web::Data::new(live.clone());
        let offline_after = web::Data::new(api::OfflineAfter(settings.offline_after_secs));
        let app_tokens = web::Data::new(tokens::AppTokens::new(settings)?);
        let device_tokens =
            web::Data::new(DeviceTokens(if settings.auth_signing_key_file.is_empty() {
                None
            } else {
                Some(
                    auth::TokenSigner::from_file(Path::new(&settings.auth_signing_key_file))
                        .context("loading auth_signing_key_file")?,
                )
            }));
        let body_timeout = settings.http.body_timeout();
        let mqtt_accounts = web::Data::new(MqttAccounts(
            (!settings.mqtt_admin_url.is_empty())
                .then(|| mqtt_admin::Broker::from_url(&settings.mqtt_admin_url))
                .transpose()
                .context("sensorhub_mqtt_admin_url")?,
        ));
        let command_limits = web::Data::new(crate::commands::CommandLimits {
            max_open: i64::from(settings.command_max_open),
            max_args_bytes: settings.command_args_max_bytes as usize,
            default_ttl_secs: settings.command_ttl_default_secs,
            max_ttl_secs: settings.command_ttl_max_secs,
        });
        let origins: Vec<String> = settings
            .cors_allowed_origins
            .split(',')
            .map(str::trim)
            .filter(|o| !o.is_empty())
            .map(str::to_owned)
            .collect();
        let server = HttpServer::new(move || {
            let cors = origins.iter().fold(
                Cors::default()
                    .allowed_methods(["GET", "POST", "DELETE"])
                    .allowed_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
                    .max_age(3600),
                |cors, origin| cors.allowed_origin(origin),
            );
            let (app, openapi) = App::new()
                .into_utoipa_app()
                .openapi(ApiDoc::openapi())
                .app_data(web::Data::new(pool.clone()))
                .app_data(web::Data::new(api::ReadPool(read_pool.clone())))
                .app_data(access.clone())
                .app_data(device_tokens.clone())
                .app_data(mqtt_accounts.clone())
                .app_data(app_tokens.clone())
                .app_data(command_limits.clone())
                .app_data(live_data.clone())
                .app_data(offline_after.clone())
                .app_data(
                    web::JsonConfig::default()
                        .limit(16 * 1024)
                        .error_handler(|e, _| crate::error::QueryError::from(e).into()),
                )
                .app_data(
                    web::QueryConfig::default()
                        .error_handler(|e, _| service_kit::error::query_error(e)),
                )
                .app_data(
                    web::PathConfig::default()
                        .error_handler(|e, _| service_kit::error::path_error(e)),
                )
                .configure(api::routes)
                .split_for_parts();
            app.app_data(web::Data::new(api::description(openapi)))
                .app_data(web::Data::new(http_metrics.clone()))
                .wrap(from_fn(move |req, next| {
                    body_deadline::limit(body_timeout, req, next)
                }))
                .wrap(from_fn(access::require_token))
                .wrap(from_fn(HttpMetrics::record))
                .wrap(cors)
                .configure(|cfg| ops.routes(cfg))
                .route("/openapi.json", web::get().to(api::openapi_json))
                .configure(dashboard::routes)
                .default_service(web::to(service_kit::error::unknown_route))
        })
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
            live,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until `stop` resolves (`service_kit::shutdown::signal()`: SIGTERM or SIGINT), then
    /// answers the requests in flight and returns.
    pub async fn run_until(self, stop: impl Future<Output = ()>) -> std::io::Result<()> {
        let served = service_kit::shutdown::serve_until(self.server, stop).await;
        self.live.close().await;
        drop(self.notifications);
        served
    }
}

impl service_kit::service::Service for Application {
    const NAME: &'static str = "query-api";
    type Settings = Settings;

    async fn start(settings: &Settings) -> anyhow::Result<Self> {
        let app = Self::build(settings).await?;
        tracing::info!(addr = %settings.http.http_addr, port = app.port, "query-api listening");
        Ok(app)
    }

    async fn run(self, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
        Ok(self.run_until(stop).await?)
    }
}

/// `/readyz`: the primary's pool and, when reads go elsewhere, the read pool; and, as a detail,
/// which server the reads reach (a standby or the primary, and where).
fn readiness(settings: &Settings, pool: &store::PgPool, read_pool: &store::PgPool) -> Readiness {
    let primary = pool.clone();
    let mut readiness = Readiness::default().with_check("postgres", move || {
        service_kit::postgres::ping(primary.clone())
    });
    let source = if settings.read_database().is_some() {
        let reads = read_pool.clone();
        readiness = readiness.with_check("postgres_reads", move || {
            service_kit::postgres::ping(reads.clone())
        });
        "database_read_url"
    } else {
        "database_url; database_read_url is not set"
    };
    let reads = read_pool.clone();
    readiness.with_detail("postgres_reads", move || {
        let reads = reads.clone();
        async move {
            let role = tokio::task::spawn_blocking(move || store::server_role(&reads)).await;
            match role {
                Ok(Ok(role)) => format!(
                    "{} at {} ({source})",
                    if role.standby { "standby" } else { "primary" },
                    role.address
                ),
                Ok(Err(e)) => format!("unknown: {e} ({source})"),
                Err(e) => format!("unknown: {e} ({source})"),
            }
        }
    })
}

fn access(
    settings: &Settings,
    app_tokens: std::sync::Arc<auth::AppTokenRegistry>,
) -> anyhow::Result<Access> {
    anyhow::ensure!(
        !settings.auth_public_key_file.is_empty(),
        "auth_public_key_file is not set: point it at the verifying key from `sensorctl keys init`"
    );
    Ok(Access {
        verifier: auth::CachedVerifier::new(
            auth::TokenVerifier::from_file(Path::new(&settings.auth_public_key_file))
                .context("loading auth_public_key_file")?,
            10_000,
        ),
        app_tokens,
        rate_limit: service_kit::net::KeyedLimit::new(
            settings.rate_limit_per_second,
            settings.rate_limit_burst,
        ),
        refusals: RefusalLimit::new(
            settings.refusal_limit_per_second,
            settings.refusal_limit_burst,
        ),
        public: PublicRoutes::ops_and(dashboard::PUBLIC_ROUTES),
        trusted_proxies: service_kit::net::TrustedProxies::parse(&settings.trusted_proxies)
            .map_err(anyhow::Error::msg)?,
    })
}
