//! The ingest routes, and the OpenAPI description generated from them.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix_web::http::header;
use actix_web::web::{self, BytesMut};
use actix_web::{HttpRequest, HttpResponse, post};
use bus::Publisher;
use futures_util::StreamExt;
use models::{BackfillHorizon, Reading, TimeWindow, ValidationError};
use serde::{Deserialize, Serialize};
use service_kit::access::{PublicRoutes, RefusalLimit};
use service_kit::net::{KeyedLimit, TrustedProxies};
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::{KnownFormat, RefOr, SchemaFormat};
use utoipa::{OpenApi, PartialSchema, ToSchema};
use utoipa_actix_web::service_config::ServiceConfig;

use crate::audit::{AcceptedBatch, AuditTrail};
use crate::device_auth::{Authenticator, Writer};
use crate::error::IngestError;
use crate::metrics::{EndpointLabels, IngestMetrics};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Sensorhub ingest API",
        description = "Send readings, with the device's own token (`Authorization: Bearer <token>`). A 2xx answer \
            means RabbitMQ has them durably; on 503, retry later with the same reading ids and times."
    ),
    components(schemas(service_kit::ErrorBody))
)]
pub struct ApiDoc;

/// The description as served: the routes' own, plus what every route can answer because of the
/// device check and rate limit (401, 403, 429) and RabbitMQ (503).
pub fn description(generated: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    service_kit::openapi::complete(generated, &service_kit::openapi::Common::ALL)
}

pub struct IngestState {
    pub publisher: Publisher,
    pub metrics: IngestMetrics,
    pub max_body_bytes: usize,
    /// Readings older than this are refused (see [`BackfillHorizon`]).
    pub backfill_horizon: BackfillHorizon,
    pub body_timeout: std::time::Duration,
    pub authenticator: Authenticator,
    /// Per device (anonymous: per client address).
    pub rate_limit: KeyedLimit,
    /// Per client address, counting refused requests only.
    pub refusals: RefusalLimit,
    pub trusted_proxies: TrustedProxies,
    pub public: PublicRoutes,
    pub audit: Arc<AuditTrail>,
    pub commands: crate::commands::CommandDesk,
    /// Becomes true when the service starts stopping: long-polls answer and WebSockets close at
    /// once, rather than holding the graceful shutdown for their whole wait.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

impl IngestState {
    /// A refused request in the metrics and the audit trail, as every route records it.
    pub(crate) fn record_refusal(
        &self,
        endpoint: &'static str,
        writer: Option<&Writer>,
        client: Option<std::net::IpAddr>,
        error: &IngestError,
    ) {
        self.metrics.rejected(endpoint, error);
        self.audit.refused(endpoint, writer, client, error);
    }

    /// A request's JSON body, within `body_timeout` and `max_body_bytes`.
    pub(crate) async fn json_body(
        &self,
        req: &HttpRequest,
        payload: web::Payload,
    ) -> Result<BytesMut, IngestError> {
        tokio::time::timeout(
            self.body_timeout,
            read_json_body(req, payload, self.max_body_bytes),
        )
        .await
        .map_err(|_| IngestError::Timeout)?
    }
}

pub fn routes(cfg: &mut ServiceConfig) {
    cfg.service(post_data).service(post_readings);
    crate::commands::routes(cfg);
}

/// The flat seed format: `device_id`, optional `ts` and `id`, and every other field (1–64 of
/// them) a metric: its name 1–64 characters of `[A-Za-z0-9._-]`, its value a finite number.
#[derive(ToSchema, Deserialize)]
#[schema(example = json!({"device_id": "raspi-01", "temperature": 25.5, "humidity": 60.3}))]
#[allow(
    dead_code,
    reason = "describes the body for OpenAPI; parsing is models::parse_seed_body"
)]
struct SeedReading {
    /// The token's own device: 1–64 characters of `[A-Za-z0-9._-]`.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    device_id: String,
    #[schema(schema_with = reading_time)]
    ts: Option<String>,
    #[schema(schema_with = reading_id)]
    id: Option<String>,
    #[serde(flatten)]
    metrics: BTreeMap<String, f64>,
}

/// One reading of `POST /v1/readings`.
#[derive(ToSchema, Deserialize)]
#[serde(deny_unknown_fields)] // as models::parse_readings_body: additionalProperties false
#[schema(example = json!({"device_id": "raspi-01", "ts": "2026-11-24T10:00:00Z", "id": "raspi-01-000044", "metrics": {"temperature": 25.5}}))]
#[allow(
    dead_code,
    reason = "describes the body for OpenAPI; parsing is models::parse_readings_body"
)]
struct ReadingIn {
    /// The token's own device: 1–64 characters of `[A-Za-z0-9._-]`.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    device_id: String,
    #[schema(schema_with = reading_time)]
    ts: Option<String>,
    #[schema(schema_with = reading_id)]
    id: Option<String>,
    #[schema(schema_with = metrics)]
    metrics: BTreeMap<String, f64>,
}

/// `ts`: what `models::parse_timestamp_rfc3339` and `parse_timestamp_millis` take.
fn reading_time() -> Schema {
    OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime))),
        )
        .item(ObjectBuilder::new().schema_type(Type::Number))
        .description(Some(
            "RFC 3339, or epoch milliseconds; at most 5 minutes ahead of the server's clock, and \
             not older than the backfill horizon (365 days unless configured) nor than 2000. The \
             server's time when absent.",
        ))
        .examples([serde_json::json!("2026-11-24T10:00:00Z")])
        .build()
        .into()
}

/// `id`: what `models::ReadingId::parse` takes.
fn reading_id() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(64))
        .pattern(Some("^[!-~]{1,64}$"))
        .description(Some(
            "1–64 printable ASCII characters, no spaces. Chosen by the device, the same on every \
             retry, so that a reading sent twice is stored once; assigned (a UUIDv7) when absent",
        ))
        .into()
}

/// `metrics`: what `models::Metrics::new` and `MetricName::parse` take.
fn metrics() -> Schema {
    ObjectBuilder::new()
        .property_names(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(service_kit::openapi::NAME_PATTERN)),
        ))
        .additional_properties(Some(ObjectBuilder::new().schema_type(Type::Number)))
        .min_properties(Some(1))
        .max_properties(Some(models::MAX_METRICS))
        .description(Some(
            "1–64 metrics: names of 1–64 characters of `[A-Za-z0-9._-]`, values finite numbers",
        ))
        .examples([serde_json::json!({"temperature": 25.5, "humidity": 60.3})])
        .into()
}

/// The body of `POST /v1/readings`: one reading, or an array of them.
struct ReadingsBody;

impl PartialSchema for ReadingsBody {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                ReadingIn::name(),
            )))
            .item(
                ArrayBuilder::new()
                    .items(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                        ReadingIn::name(),
                    )))
                    .min_items(Some(1))
                    .max_items(Some(models::MAX_READINGS_PER_REQUEST)),
            )
            .description(Some("One reading, or an array of 1 to 1,000"))
            .into()
    }
}

impl ToSchema for ReadingsBody {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((ReadingIn::name().into_owned(), ReadingIn::schema()));
        ReadingIn::schemas(schemas);
    }
}

#[derive(Serialize, ToSchema)]
struct SeedAccepted {
    #[schema(example = "success")]
    status: &'static str,
}

#[derive(Serialize, ToSchema)]
struct Accepted {
    /// How many readings RabbitMQ confirmed.
    accepted: usize,
}

/// Takes one reading in the flat format the original Pi scripts send.
#[utoipa::path(
    tag = "ingest",
    request_body(content = SeedReading, content_type = "application/json",
        description = "A JSON body; a request without a Content-Type is read as JSON too"),
    responses(
        (status = 200, description = "RabbitMQ has the reading", body = SeedAccepted),
        (status = 400, description = "Not a valid reading (`field` names what is wrong); nothing was stored", body = service_kit::ErrorBody),
        (status = 403, description = "Not a device token, or a `device_id` that is not the token's device; nothing was stored", body = service_kit::ErrorBody),
        (status = 408, description = "The body took longer than `HTTP_BODY_TIMEOUT_MS` to arrive", body = service_kit::ErrorBody),
        (status = 413, description = "The body is larger than `MAX_BODY_BYTES`", body = service_kit::ErrorBody),
        (status = 415, description = "A Content-Type other than JSON", body = service_kit::ErrorBody),
        (status = 503, description = "Not accepted (RabbitMQ unavailable, or the device registry not loaded yet); retry after `Retry-After` seconds", body = service_kit::ErrorBody),
    )
)]
#[post("/data")]
async fn post_data(
    req: HttpRequest,
    writer: web::ReqData<Writer>,
    payload: web::Payload,
    state: web::Data<IngestState>,
) -> Result<HttpResponse, IngestError> {
    let horizon = state.backfill_horizon;
    let parse = move |body: &[u8], now| {
        models::parse_seed_body(body, TimeWindow::new(now, horizon)).map(|r| vec![r])
    };
    ingest(&req, &writer, payload, &state, "/data", parse)
        .await
        .map(|_| HttpResponse::Ok().json(SeedAccepted { status: "success" }))
}

/// Takes one reading or an array of up to 1,000.
#[utoipa::path(
    tag = "ingest",
    request_body(content = ReadingsBody, content_type = "application/json",
        description = "One reading, or an array of up to 1,000, all of the token's device; a request without a Content-Type is read as JSON too"),
    responses(
        (status = 202, description = "RabbitMQ has the readings", body = Accepted),
        (status = 400, description = "A reading is not valid (`field` names which and what, e.g. `[3].metrics.temperature`); nothing was stored", body = service_kit::ErrorBody),
        (status = 403, description = "Not a device token, or a `device_id` that is not the token's device; nothing was stored", body = service_kit::ErrorBody),
        (status = 408, description = "The body took longer than `HTTP_BODY_TIMEOUT_MS` to arrive", body = service_kit::ErrorBody),
        (status = 413, description = "The body is larger than `MAX_BODY_BYTES`", body = service_kit::ErrorBody),
        (status = 415, description = "A Content-Type other than JSON", body = service_kit::ErrorBody),
        (status = 503, description = "Not accepted (RabbitMQ unavailable, or the device registry not loaded yet); retry after `Retry-After` seconds", body = service_kit::ErrorBody),
    )
)]
#[post("/v1/readings")]
async fn post_readings(
    req: HttpRequest,
    writer: web::ReqData<Writer>,
    payload: web::Payload,
    state: web::Data<IngestState>,
) -> Result<HttpResponse, IngestError> {
    let horizon = state.backfill_horizon;
    let parse =
        move |body: &[u8], now| models::parse_readings_body(body, TimeWindow::new(now, horizon));
    ingest(&req, &writer, payload, &state, "/v1/readings", parse)
        .await
        .map(|accepted| HttpResponse::Accepted().json(Accepted { accepted }))
}

/// The device routes (readings, commands, the WebSocket), as metric and audit labels.
pub const ENDPOINTS: [&str; 5] = [
    "/data",
    "/v1/readings",
    crate::commands::NEXT,
    crate::commands::RESULT,
    crate::ws::ROUTE,
];

/// The endpoint label of a request that matched none of [`ENDPOINTS`].
pub const UNMATCHED: &str = "unmatched";

/// `route` as one of [`ENDPOINTS`], or [`UNMATCHED`]: a bounded label whatever the path was.
pub fn endpoint_label(route: Option<&str>) -> &'static str {
    ENDPOINTS
        .into_iter()
        .find(|endpoint| Some(*endpoint) == route)
        .unwrap_or(UNMATCHED)
}

/// Publishes `readings` once they are all `device`'s (any device's for an anonymous writer), and
/// returns what the audit trail says of them once RabbitMQ confirmed; the check every way of
/// sending readings over HTTP (a request, a WebSocket frame) shares.
pub(crate) async fn publish_own(
    state: &IngestState,
    device: Option<&str>,
    readings: Vec<Reading>,
) -> Result<AcceptedBatch, IngestError> {
    if let Some(device) = device {
        models::check_own_readings(device, &readings).map_err(|e| {
            IngestError::Forbidden(format!(
                "device_id {:?} is not this token's device {:?}; nothing was stored",
                e.found, e.writer
            ))
        })?;
    }
    let batch = AcceptedBatch {
        readings: readings.len(),
        earliest: readings.iter().map(|r| r.ts).min().unwrap_or_default(),
        latest: readings.iter().map(|r| r.ts).max().unwrap_or_default(),
    };
    state.publisher.publish(readings).await?;
    Ok(batch)
}

/// Every write of an authenticated writer (the middleware in `device_auth` checked who), in
/// order: how often (429), what (415/413/400), as whom (403), and then RabbitMQ (503); each
/// outcome lands in the audit trail and the metrics.
async fn ingest(
    req: &HttpRequest,
    writer: &Writer,
    payload: web::Payload,
    state: &IngestState,
    endpoint: &'static str,
    parse: impl FnOnce(&[u8], chrono::DateTime<chrono::Utc>) -> Result<Vec<Reading>, ValidationError>,
) -> Result<usize, IngestError> {
    let client = state.trusted_proxies.client_addr(req);
    let result = async {
        let limit_key = match writer {
            Writer::Device { id, .. } => id.clone(),
            Writer::Anonymous => client.map(|a| a.to_string()).unwrap_or_default(),
        };
        state
            .rate_limit
            .check(&limit_key)
            .map_err(IngestError::RateLimited)?;
        let body = state.json_body(req, payload).await?;
        let readings = parse(&body, chrono::Utc::now())?;
        publish_own(state, writer.device_id(), readings).await
    }
    .await;

    match result {
        Ok(batch) => {
            state
                .metrics
                .readings_accepted
                .get_or_create(&EndpointLabels { endpoint })
                .inc_by(batch.readings as u64);
            state.audit.accepted(endpoint, writer, client, batch);
            Ok(batch.readings)
        }
        Err(error) => {
            state.record_refusal(endpoint, Some(writer), client, &error);
            Err(error)
        }
    }
}

/// JSON or nothing said (as with `curl --data`-less scripts); anything else is refused before
/// the body is read.
fn check_content_type(req: &HttpRequest) -> Result<(), IngestError> {
    let Some(value) = req.headers().get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let text = value.to_str().unwrap_or("");
    let essence = text
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let is_json = essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"));
    if is_json {
        Ok(())
    } else {
        Err(IngestError::UnsupportedMediaType(text.to_owned()))
    }
}

/// Reads the body, refusing it as soon as it is known to exceed `limit` (from Content-Length, or
/// while streaming), so an oversized request costs at most `limit` bytes of memory.
pub(crate) async fn read_json_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<BytesMut, IngestError> {
    check_content_type(req)?;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(IngestError::TooLarge { limit });
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(1024).min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| IngestError::Body(e.to_string()))?;
        if body.len() + chunk.len() > limit {
            return Err(IngestError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

pub async fn openapi_json(doc: web::Data<utoipa::openapi::OpenApi>) -> HttpResponse {
    HttpResponse::Ok().json(doc.get_ref())
}
