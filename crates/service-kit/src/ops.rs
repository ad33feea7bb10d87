//! `/healthz` (the process is alive), `/readyz` (its connections are up), `/metrics` (Prometheus text),
//! served inside a service's own API or, for services without one, on a small port of their own.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{Server, ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{App, HttpResponse, HttpServer, web};
use futures_util::future::{BoxFuture, join_all};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;

/// Every metric a service exports starts with this (`sensorhub_`), so Sensorhub's series stand apart
/// from everything else a Prometheus scrapes.
pub const METRIC_PREFIX: &str = "sensorhub";

/// The registry a service registers its metrics in: names get [`METRIC_PREFIX`], sub-registries
/// add theirs after it (`sensorhub_mqtt_...`).
pub fn metrics_registry() -> Registry {
    Registry::with_prefix(METRIC_PREFIX)
}

/// How long one readiness check may take before it counts as down.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

type CheckFn = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;
type DetailFn = Arc<dyn Fn() -> BoxFuture<'static, String> + Send + Sync>;

/// Named checks of what a service needs to do its work (its broker connection, its database pool),
/// and named details that say how it is connected (where its reads go) without deciding readiness.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Vec<(&'static str, CheckFn)>,
    details: Vec<(&'static str, DetailFn)>,
}

impl Readiness {
    pub fn with_check<F, Fut>(mut self, name: &'static str, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.checks.push((
            name,
            Arc::new(move || Box::pin(check()) as BoxFuture<'_, _>),
        ));
        self
    }

    /// A fact `/readyz` shows under `details` (e.g. which server reads go to), looked up at each
    /// request; it does not decide readiness.
    pub fn with_detail<F, Fut>(mut self, name: &'static str, detail: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = String> + Send + 'static,
    {
        self.details.push((
            name,
            Arc::new(move || Box::pin(detail()) as BoxFuture<'_, _>),
        ));
        self
    }

    /// Runs every check (and looks up every detail) at once; ready when all checks pass.
    pub async fn evaluate(&self) -> ReadinessReport {
        let details = join_all(self.details.iter().map(|(name, detail)| async move {
            let value = tokio::time::timeout(CHECK_TIMEOUT, detail())
                .await
                .unwrap_or_else(|_| format!("unknown: no answer within {CHECK_TIMEOUT:?}"));
            (*name, value)
        }));
        let results = join_all(self.checks.iter().map(|(name, check)| async move {
            let outcome = match tokio::time::timeout(CHECK_TIMEOUT, check()).await {
                Ok(Ok(())) => "up".to_owned(),
                Ok(Err(why)) => format!("down: {why}"),
                Err(_) => format!("down: no answer within {CHECK_TIMEOUT:?}"),
            };
            (*name, outcome)
        }));
        let (results, details) = futures_util::future::join(results, details).await;
        let ready = results.iter().all(|(_, outcome)| outcome == "up");
        ReadinessReport {
            status: if ready { "ready" } else { "not_ready" },
            checks: results.into_iter().collect(),
            details: details.into_iter().collect(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ReadinessReport {
    pub status: &'static str,
    pub checks: BTreeMap<&'static str, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<&'static str, String>,
}

impl ReadinessReport {
    pub fn is_ready(&self) -> bool {
        self.status == "ready"
    }
}

/// Everything the ops endpoints serve.
#[derive(Clone)]
pub struct Ops {
    registry: Arc<Registry>,
    readiness: Readiness,
    /// `/readyz` as a metric, so an alert can see a service that is up but cannot work.
    ready: Gauge,
}

impl Ops {
    /// Registers `ready` in `registry` (1 when every readiness check passes, evaluated at each
    /// scrape of `/metrics`).
    pub fn new(mut registry: Registry, readiness: Readiness) -> Self {
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 when every readiness check passes (as /readyz answers 200), evaluated at each scrape",
            ready.clone(),
        );
        Self {
            registry: Arc::new(registry),
            readiness,
            ready,
        }
    }

    /// Mounts `/healthz`, `/readyz` and `/metrics` on an app.
    pub fn routes(&self, cfg: &mut web::ServiceConfig) {
        cfg.app_data(web::Data::new(self.clone()))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/metrics", web::get().to(metrics));
    }

    /// The ops endpoints on a port of their own, for services without an HTTP API. Bound here, so that
    /// `addr` may ask for port 0; the caller runs the server and stops it through its handle.
    pub fn serve(&self, addr: &str) -> std::io::Result<(SocketAddr, Server)> {
        let listener = TcpListener::bind(addr)?;
        let bound = listener.local_addr()?;
        let ops = self.clone();
        let server = HttpServer::new(move || {
            App::new()
                .configure(|cfg| ops.routes(cfg))
                .default_service(web::to(crate::error::unknown_route))
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        .listen(listener)?
        .run();
        Ok((bound, server))
    }

    /// Evaluates readiness (for `ready`), then encodes every metric.
    pub async fn render_metrics(&self) -> String {
        let report = self.readiness.evaluate().await;
        self.ready.set(i64::from(report.is_ready()));
        let mut text = String::new();
        // Encoding into a String only fails if a metric's own encoder does; ours are the stock ones.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        text
    }
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "alive"}))
}

async fn readyz(ops: web::Data<Ops>) -> HttpResponse {
    let report = ops.readiness.evaluate().await;
    if report.is_ready() {
        HttpResponse::Ok().json(report)
    } else {
        HttpResponse::ServiceUnavailable()
            .insert_header((
                "Retry-After",
                crate::error::retry_after::NOT_READY_SECS.to_string(),
            ))
            .json(report)
    }
}

async fn metrics(ops: web::Data<Ops>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(ops.render_metrics().await)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

/// Requests by route and status, and their latency, for an actix-web API.
#[derive(Clone)]
pub struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Family<RouteLabels, Histogram>,
}

impl HttpMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<RouteLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.0005, 2.0, 16))) as fn() -> Histogram,
        );
        registry.register(
            "http_requests",
            "HTTP requests answered, by route and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to answer HTTP requests, by route",
            duration.clone(),
        );
        Self { requests, duration }
    }

    /// Middleware (`actix_web::middleware::from_fn`); expects `web::Data<HttpMetrics>` in the app.
    pub async fn record(
        req: ServiceRequest,
        next: Next<impl MessageBody>,
    ) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
        let started = Instant::now();
        let metrics = req.app_data::<web::Data<HttpMetrics>>().cloned();
        // The route pattern the router will match, not the path: `/v1/devices/{id}/readings` and a
        // few known methods keep the label set bounded whatever a client sends.
        let route =
            crate::access::matched_route(req.request()).unwrap_or_else(|| "unmatched".to_owned());
        let method = crate::access::method_label(req.method());
        let response = next.call(req).await?;
        if let Some(metrics) = metrics {
            metrics
                .requests
                .get_or_create(&RequestLabels {
                    method,
                    route: route.clone(),
                    status: response.status().as_u16(),
                })
                .inc();
            metrics
                .duration
                .get_or_create(&RouteLabels { route })
                .observe(started.elapsed().as_secs_f64());
        }
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use actix_web::test;

    use super::*;

    #[actix_web::test]
    async fn readyz_reports_each_check_and_503_when_one_is_down() {
        let readiness = Readiness::default()
            .with_check("database", || async { Ok(()) })
            .with_check("broker", || async { Err("connection refused".to_owned()) });
        let mut registry = Registry::default();
        let counter = Counter::<u64>::default();
        registry.register("things", "Things counted", counter.clone());
        counter.inc_by(3);
        let ops = Ops::new(registry, readiness);
        let app = test::init_service(App::new().configure(|c| ops.routes(c))).await;

        let response =
            test::call_service(&app, test::TestRequest::get().uri("/readyz").to_request()).await;
        assert_eq!(response.status(), 503);
        let body: serde_json::Value = test::read_body_json(response).await;
        assert_eq!(body["status"], "not_ready");
        assert_eq!(body["checks"]["database"], "up");
        assert_eq!(body["checks"]["broker"], "down: connection refused");

        let response =
            test::call_service(&app, test::TestRequest::get().uri("/healthz").to_request()).await;
        assert_eq!(response.status(), 200);

        let response =
            test::call_service(&app, test::TestRequest::get().uri("/metrics").to_request()).await;
        let text = String::from_utf8(test::read_body(response).await.to_vec()).unwrap();
        assert!(text.contains("things_total 3"), "{text}");
        assert!(text.contains("\nready 0\n"), "{text}");
    }

    #[actix_web::test]
    async fn metric_names_carry_the_sensorhub_prefix() {
        let mut registry = metrics_registry();
        let counter = Counter::<u64>::default();
        registry.register("things", "Things counted", counter.clone());
        registry.sub_registry_with_prefix("part").register(
            "parts",
            "Parts counted",
            counter.clone(),
        );
        let ops = Ops::new(registry, Readiness::default());
        let text = ops.render_metrics().await;
        assert!(text.contains("\nsensorhub_things_total 0\n"), "{text}");
        assert!(text.contains("\nsensorhub_part_parts_total 0\n"), "{text}");
        assert!(text.contains("\nsensorhub_ready 1\n"), "{text}");
    }
}
