use std::net::TcpListener;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::middleware::from_fn;
use actix_web::{App, HttpServer, web};
use anyhow::Context;
use prometheus_client::registry::Registry;
use service_kit::ops::HttpMetrics;
use service_kit::{Ops, Readiness};
use store::PgPool;
use utoipa::OpenApi;
use utoipa_actix_web::AppExt;

use crate::api::{self, ApiDoc};
use crate::settings::Settings;

/// query-api, built and bound, ready to run.
pub struct Application {
    port: u16,
    server: Server,
}

impl Application {
    /// Connects to PostgreSQL (waiting for it up to `startup_wait_ms`), refuses an unmigrated
    /// database, and binds `http_addr` (port 0 picks a free port: see [`Application::port`]).
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        let pool = store::connect_pool(&settings.database_url, &settings.pool())?;
        let wait = Duration::from_millis(settings.startup_wait_ms);
        let check_pool = pool.clone();
        tokio::task::spawn_blocking(move || store::wait_for_migrated_database(&check_pool, wait))
            .await
            .context("start-up check")??;

        let listener = TcpListener::bind(&settings.http_addr)
            .with_context(|| format!("cannot listen on {}", settings.http_addr))?;
        let port = listener.local_addr()?.port();

        let mut registry = Registry::default();
        let http_metrics = HttpMetrics::register(&mut registry);
        let ready_pool = pool.clone();
        let readiness = Readiness::default().with_check("postgres", move || {
            let pool = ready_pool.clone();
            async move { database_check(pool).await }
        });
        let ops = Ops::new(registry, readiness);

        let workers = match settings.http_workers {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        let server = HttpServer::new(move || {
            let (app, openapi) = App::new()
                .into_utoipa_app()
                .openapi(ApiDoc::openapi())
                .app_data(web::Data::new(pool.clone()))
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
            app.app_data(web::Data::new(openapi))
                .app_data(web::Data::new(http_metrics.clone()))
                .wrap(from_fn(HttpMetrics::record))
                .configure(|cfg| ops.routes(cfg))
                .route("/openapi.json", web::get().to(api::openapi_json))
                .default_service(web::to(service_kit::error::unknown_route))
        })
        .workers(workers)
        .listen(listener)?
        .run();
        Ok(Self { port, server })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until SIGTERM/SIGINT, then answers the requests in flight and stops.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}

async fn database_check(pool: PgPool) -> Result<(), String> {
    tokio::task::spawn_blocking(move || store::ping(&pool).map_err(|e| e.to_string()))
        .await
        .map_err(|e| e.to_string())?
}
