//! The ingest routes, and the OpenAPI description generated from them.

use std::collections::BTreeMap;

use actix_web::http::header;
use actix_web::web::{self, BytesMut};
use actix_web::{HttpRequest, HttpResponse, post};
use bus::Publisher;
use futures_util::StreamExt;
use models::{Reading, ValidationError};
use serde::{Deserialize, Serialize};
use service_kit::net::{KeyedLimit, TrustedProxies};
use utoipa::{OpenApi, ToSchema};
use utoipa_actix_web::service_config::ServiceConfig;

use crate::device_auth::{Authenticator, Writer};
use crate::error::IngestError;
use crate::metrics::{EndpointLabels, IngestMetrics, RejectionLabels};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Sensorhub ingest API",
        description = "Send readings. A 2xx answer means RabbitMQ has them durably; on 503, retry later with the same reading ids."
    ),
    components(schemas(service_kit::ErrorBody))
)]
pub struct ApiDoc;

pub struct IngestState {
    pub publisher: Publisher,
    pub metrics: IngestMetrics,
    pub max_body_bytes: usize,
    pub body_timeout: std::time::Duration,
    pub authenticator: Authenticator,
    pub rate_limit: KeyedLimit,
    pub trusted_proxies: TrustedProxies,
}

pub fn routes(cfg: &mut ServiceConfig) {
    cfg.service(post_data).service(post_readings);
}

/// The flat seed format: `device_id`, optional `ts` and `id`, and every other field a numeric metric.
#[derive(ToSchema, Deserialize)]
#[schema(example = json!({"device_id": "raspi-01", "temperature": 25.5, "humidity": 60.3}))]
#[allow(dead_code)] // describes the body for OpenAPI; parsing is models::parse_seed_body
struct SeedReading {
    /// 1–64 characters of `[A-Za-z0-9._-]`.
    device_id: String,
    /// RFC 3339, or epoch milliseconds; the server's time when absent.
    ts: Option<String>,
    /// Up to 64 characters; a retry with the same id is stored once. Assigned when absent.
    id: Option<String>,
    /// Every other field is a metric: its name as a device id, its value a finite number.
    #[serde(flatten)]
    metrics: BTreeMap<String, f64>,
}

/// One reading of `POST /v1/readings`.
#[derive(ToSchema)]
#[schema(example = json!({"device_id": "raspi-01", "ts": "2026-11-24T10:00:00Z", "id": "raspi-01-000042", "metrics": {"temperature": 25.5}}))]
#[allow(dead_code)] // describes the body for OpenAPI; parsing is models::parse_readings_body
struct ReadingIn {
    device_id: String,
    ts: Option<String>,
    id: Option<String>,
    /// 1–64 metrics: names as device ids, finite numbers.
    metrics: BTreeMap<String, f64>,
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
    request_body(content = SeedReading, content_type = "application/json"),
    responses(
        (status = 200, description = "RabbitMQ has the reading", body = SeedAccepted),
        (status = 400, body = service_kit::ErrorBody),
        (status = 413, body = service_kit::ErrorBody),
        (status = 415, body = service_kit::ErrorBody),
        (status = 503, description = "Not accepted; retry after Retry-After seconds", body = service_kit::ErrorBody),
    )
)]
#[post("/data")]
async fn post_data(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<IngestState>,
) -> Result<HttpResponse, IngestError> {
    let parse = |body: &[u8], now| models::parse_seed_body(body, now).map(|r| vec![r]);
    ingest(&req, payload, &state, "/data", parse)
        .await
        .map(|_| HttpResponse::Ok().json(SeedAccepted { status: "success" }))
}

/// Takes one reading or an array of up to 1,000.
#[utoipa::path(
    tag = "ingest",
    request_body(content = Vec<ReadingIn>, content_type = "application/json", description = "One reading, or an array of up to 1,000"),
    responses(
        (status = 202, description = "RabbitMQ has the readings", body = Accepted),
        (status = 400, body = service_kit::ErrorBody),
        (status = 413, body = service_kit::ErrorBody),
        (status = 415, body = service_kit::ErrorBody),
        (status = 503, description = "Not accepted; retry after Retry-After seconds", body = service_kit::ErrorBody),
    )
)]
#[post("/v1/readings")]
async fn post_readings(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<IngestState>,
) -> Result<HttpResponse, IngestError> {
    ingest(
        &req,
        payload,
        &state,
        "/v1/readings",
        models::parse_readings_body,
    )
    .await
    .map(|accepted| HttpResponse::Accepted().json(Accepted { accepted }))
}

/// Every write, in order: who (401/403), how often (429), what (415/413/400), as whom (403), and
/// then RabbitMQ (503); each outcome lands in the audit trail and the metrics.
async fn ingest(
    req: &HttpRequest,
    payload: web::Payload,
    state: &IngestState,
    endpoint: &'static str,
    parse: impl FnOnce(&[u8], chrono::DateTime<chrono::Utc>) -> Result<Vec<Reading>, ValidationError>,
) -> Result<usize, IngestError> {
    let client = state.trusted_proxies.client_addr(req);
    let mut writer = None;
    let result = async {
        let who = state.authenticator.authenticate(req).await?;
        let limit_key = match &who {
            Writer::Device { id, .. } => id.clone(),
            Writer::Anonymous => client.map(|a| a.to_string()).unwrap_or_default(),
        };
        writer = Some(who.clone());
        state
            .rate_limit
            .check(&limit_key)
            .map_err(IngestError::RateLimited)?;
        let body = tokio::time::timeout(
            state.body_timeout,
            read_json_body(req, payload, state.max_body_bytes),
        )
        .await
        .map_err(|_| IngestError::Timeout)??;
        let readings = parse(&body, chrono::Utc::now())?;
        if let Some(device) = who.device_id()
            && let Some(other) = readings.iter().find(|r| r.device_id.as_str() != device)
        {
            return Err(IngestError::Forbidden(format!(
                "device_id {:?} is not this token's device {device:?}; nothing was stored",
                other.device_id.as_str()
            )));
        }
        let count = readings.len();
        state.publisher.publish(readings).await?;
        Ok(count)
    }
    .await;

    let device = writer.as_ref().and_then(Writer::device_id).unwrap_or("-");
    let token = writer.as_ref().and_then(Writer::token_id).unwrap_or("-");
    let client = client.map(|a| a.to_string()).unwrap_or_default();
    match &result {
        Ok(count) => {
            state
                .metrics
                .readings_accepted
                .get_or_create(&EndpointLabels { endpoint })
                .inc_by(*count as u64);
            tracing::info!(target: "audit", outcome = "accepted", endpoint, device.id = device,
                token.id = token, client.addr = %client, readings = count);
        }
        Err(error) => {
            state
                .metrics
                .requests_rejected
                .get_or_create(&RejectionLabels {
                    endpoint,
                    reason: error.kind(),
                })
                .inc();
            tracing::info!(target: "audit", outcome = "refused", endpoint, device.id = device,
                token.id = token, client.addr = %client, readings = 0, reason = error.kind(),
                detail = %error);
        }
    }
    result
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
async fn read_json_body(
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
