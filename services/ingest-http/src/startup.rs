use std::net::TcpListener;

use actix_web::dev::Server;
use actix_web::middleware::from_fn;
use actix_web::{App, HttpServer, web};
use anyhow::Context;
use bus::{Publisher, PublisherMetrics, Topology};
use prometheus_client::registry::Registry;
use service_kit::ops::HttpMetrics;
use service_kit::{Ops, Readiness};
use utoipa::OpenApi;
use utoipa_actix_web::AppExt;

use crate::api::{self, ApiDoc, IngestState};
use crate::metrics::IngestMetrics;
use crate::settings::Settings;

/// ingest-http, built and bound, ready to run.
pub struct Application {
    port: u16,
    server: Server,
    publisher: Publisher,
}

impl Application {
    /// Starts the publisher (it connects to RabbitMQ in the background; until it has, requests are
    /// answered 503) and binds `http_addr` (port 0 picks a free port: see [`Application::port`]).
    pub fn build(settings: &Settings) -> anyhow::Result<Self> {
        let mut registry = Registry::default();
        let http_metrics = HttpMetrics::register(&mut registry);
        let ingest_metrics = IngestMetrics::register(&mut registry);
        let publisher = Publisher::start(
            settings.amqp_url.clone(),
            Topology::with_prefix(&settings.amqp_prefix),
            settings.publisher.clone(),
            PublisherMetrics::register(&mut registry),
            "ingest-http".to_owned(),
        );
        let ready_publisher = publisher.clone();
        let readiness = Readiness::default().with_check("rabbitmq", move || {
            let available = ready_publisher.check_available().map_err(|e| e.to_string());
            async move { available }
        });
        let ops = Ops::new(registry, readiness);
        let state = web::Data::new(IngestState {
            publisher: publisher.clone(),
            metrics: ingest_metrics,
            max_body_bytes: settings.max_body_bytes,
        });

        let listener = TcpListener::bind(&settings.http_addr)
            .with_context(|| format!("cannot listen on {}", settings.http_addr))?;
        let port = listener.local_addr()?.port();
        let workers = match settings.http_workers {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        let server = HttpServer::new(move || {
            let (app, openapi) = App::new()
                .into_utoipa_app()
                .openapi(ApiDoc::openapi())
                .app_data(state.clone())
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
        Ok(Self {
            port,
            server,
            publisher,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until SIGTERM/SIGINT; then answers the requests in flight (each waits for its
    /// confirm), publishes anything still waiting, and closes the RabbitMQ connection.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let served = self.server.await;
        self.publisher.close().await;
        served
    }

    /// For tests: the server handle (to stop it) alongside the future that runs it.
    pub fn into_parts(
        self,
    ) -> (
        actix_web::dev::ServerHandle,
        impl std::future::Future<Output = std::io::Result<()>>,
    ) {
        let handle = self.server.handle();
        (handle, self.run_until_stopped())
    }
}
