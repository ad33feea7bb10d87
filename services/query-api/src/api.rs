//! The read API's routes, their response shapes, and the OpenAPI description generated from them.

use std::collections::BTreeMap;

use actix_web::{HttpRequest, HttpResponse, delete, get, post, web};
use chrono::{DateTime, Duration, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use store::read::{ReadingsQuery, SeriesQuery};
use store::{PgConnection, PgPool, StoreError};
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_actix_web::service_config::ServiceConfig;

use crate::error::QueryError;
use crate::params;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Sensorhub query API",
        description = "Read the readings Sensorhub stored: devices, readings by time range, latest values, time buckets. \
            Every `/v1` route needs `Authorization: Bearer <token>`: a reader, operator or admin token to read, an operator \
            or admin token to send devices commands, an admin token to register or revoke devices and to change the retention policy."
    ),
    components(schemas(service_kit::ErrorBody))
)]
pub struct ApiDoc;

/// The description as served: the routes' own, plus what every `/v1` route can answer because of
/// the token check and rate limit (`access`) and the database (503).
pub fn description(generated: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    service_kit::openapi::complete(generated, &service_kit::openapi::Common::ALL)
}

/// The `{id}` of the device routes.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct DevicePath {
    /// The device's id: 1–64 characters of `[A-Za-z0-9._-]`.
    #[param(pattern = "^[A-Za-z0-9._-]{1,64}$", example = "raspi-01")]
    pub id: String,
}

/// Mints device tokens on `POST /v1/devices` when query-api was given the signing key.
pub struct DeviceTokens(pub Option<auth::TokenSigner>);

/// Mosquitto's accounts, when query-api was given the MQTT admin URL: devices registered and
/// revoked here get and lose their MQTT accounts exactly as with `sensorctl device add/revoke`.
pub struct MqttAccounts(pub Option<mqtt_admin::Broker>);

/// Registers every documented route; `startup` adds the ops endpoints and `/openapi.json`.
pub fn routes(cfg: &mut ServiceConfig) {
    cfg.service(list_devices)
        .service(register_device)
        .service(revoke_device)
        .service(get_device)
        .service(device_readings)
        .service(device_latest)
        .service(device_series)
        .service(crate::commands::issue_command)
        .service(crate::commands::device_commands)
        .service(crate::commands::get_command)
        .service(crate::commands::cancel_command)
        .service(crate::tokens::list_tokens)
        .service(crate::tokens::revoke_token)
        .service(crate::tokens::me)
        .service(crate::retention::get_retention)
        .service(crate::retention::set_retention)
        .service(crate::retention::unset_retention)
        .service(crate::live::live);
}

/// The pool the read-only API reads from: `database_read_url` (a standby, or any server libpq's
/// `target_session_attrs` picks there) when it is set, else the primary's pool itself. Only readings
/// and the device registry's views go here; writes, what must see a write at once (commands,
/// tokens, retention) and the token registry's LISTEN (a standby cannot LISTEN) stay on the primary.
#[derive(Clone)]
pub struct ReadPool(pub PgPool);

impl std::ops::Deref for ReadPool {
    type Target = PgPool;

    fn deref(&self) -> &PgPool {
        &self.0
    }
}

/// Runs a store call on the blocking pool with a pooled connection, in the request's span.
pub(crate) async fn with_conn<T, F>(pool: &PgPool, call: F) -> Result<T, QueryError>
where
    T: Send + 'static,
    F: FnOnce(&mut PgConnection) -> Result<T, StoreError> + Send + 'static,
{
    let pool = pool.clone();
    let span = tracing::Span::current();
    web::block(move || {
        span.in_scope(|| {
            let mut conn = pool.get()?;
            call(&mut conn)
        })
    })
    .await?
    .map_err(QueryError::from)
}

async fn require_device(pool: &PgPool, device_id: &str) -> Result<(), QueryError> {
    let id = device_id.to_owned();
    match with_conn(pool, move |conn| store::read::device(conn, &id)).await? {
        Some(_) => Ok(()),
        None => Err(QueryError::UnknownDevice(device_id.to_owned())),
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Device {
    #[schema(example = "raspi-01")]
    pub device_id: String,
    /// Time of the device's oldest stored reading.
    pub first_seen: DateTime<Utc>,
    /// Time of the device's newest stored reading.
    pub last_seen: DateTime<Utc>,
    /// Every metric name the device has sent.
    pub metrics: Vec<String>,
    /// Its newest reading is at most `OFFLINE_AFTER_SECS` old.
    pub online: bool,
    /// The newest value of each metric, by name (with `latest=true`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latest: Option<Vec<MetricLatest>>,
}

impl Device {
    fn of(d: store::read::DeviceSummary, offline_after: &OfflineAfter) -> Self {
        Self {
            online: offline_after.is_online(d.last_seen),
            device_id: d.device_id,
            first_seen: d.first_seen,
            last_seen: d.last_seen,
            metrics: d.metrics.into_iter().flatten().collect(),
            latest: None,
        }
    }
}

/// How long a device may stay silent (since its newest reading's time) and still count as online.
#[derive(Debug, Clone, Copy)]
pub struct OfflineAfter(pub u64);

impl OfflineAfter {
    fn is_online(&self, last_seen: DateTime<Utc>) -> bool {
        Utc::now() - last_seen
            <= Duration::seconds(i64::try_from(self.0).unwrap_or(i64::MAX / 1000))
    }
}

/// One metric's newest value, in a fleet listing.
#[derive(Debug, Serialize, ToSchema)]
pub struct MetricLatest {
    pub metric: String,
    pub ts: DateTime<Utc>,
    pub value: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceList {
    pub devices: Vec<Device>,
    /// Pass as `cursor` for the next page; null when there is none.
    pub next_cursor: Option<String>,
    /// A device whose newest reading is older than this is offline.
    pub offline_after_secs: u64,
}

/// The query of `GET /v1/devices`, as sent: `params` parses and checks each value.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeviceListParams {
    /// How many devices, 1–10,000 (1–1,000 with `latest=true`).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 10000, default = 100)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Only devices whose id holds this (ignoring case): 1–64 characters of `[A-Za-z0-9._-]`.
    #[param(pattern = "^[A-Za-z0-9._-]{1,64}$", example = "raspi")]
    pub q: Option<String>,
    /// With the newest value of each metric of each device.
    #[param(value_type = Option<bool>, default = false)]
    pub latest: Option<String>,
}

/// The most devices a page with their latest values may hold: each costs an index lookup per metric.
const MAX_LATEST_PAGE: i64 = 1000;

/// The query of `GET /v1/devices`, as sent: `params` parses and checks each value.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// How many devices, 1–10,000.
    #[param(value_type = Option<i64>, minimum = 1, maximum = 10000, default = 100)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Every device that has sent readings, by id; `q` finds devices by part of their id.
#[utoipa::path(
    tag = "devices",
    params(DeviceListParams),
    responses(
        (status = 200, description = "A page of devices", body = DeviceList),
        (status = 400, description = "A bad `limit` or `cursor` (`field` names it)", body = service_kit::ErrorBody),
    )
)]
#[get("/v1/devices")]
async fn list_devices(
    pool: web::Data<ReadPool>,
    offline_after: web::Data<OfflineAfter>,
    query: web::Query<DeviceListParams>,
) -> Result<web::Json<DeviceList>, QueryError> {
    let query = query.into_inner();
    let search = params::device_search(query.q.as_deref())?;
    let with_latest = params::flag("latest", query.latest.as_deref())?;
    if with_latest && params::limit(query.limit.as_deref())? > MAX_LATEST_PAGE {
        return Err(QueryError::invalid(
            "limit",
            format!("must be at most {MAX_LATEST_PAGE} with latest=true"),
        ));
    }
    let page = PageParams {
        limit: query.limit,
        cursor: query.cursor,
    };
    let (found, next_cursor) = id_page(
        &pool,
        &page,
        move |conn, after, limit| store::read::find_devices(conn, search.as_deref(), after, limit),
        |d| &d.device_id,
    )
    .await?;
    let mut devices: Vec<Device> = found
        .into_iter()
        .map(|d| Device::of(d, &offline_after))
        .collect();
    if with_latest {
        let ids: Vec<String> = devices.iter().map(|d| d.device_id.clone()).collect();
        let values = with_conn(&pool, move |conn| store::read::latest_of(conn, &ids)).await?;
        let mut values = values.into_iter().peekable();
        // both in device id order
        for device in &mut devices {
            let mut latest = Vec::new();
            while let Some(v) = values.next_if(|v| v.device_id == device.device_id) {
                latest.push(MetricLatest {
                    metric: v.metric,
                    ts: v.ts,
                    value: v.value,
                });
            }
            device.latest = Some(latest);
        }
    }
    Ok(web::Json(DeviceList {
        devices,
        next_cursor,
        offline_after_secs: offline_after.0,
    }))
}

/// A page of a list in id order (devices, app tokens), as `query` asks: `fetch` reads up to a given
/// number of rows after an id; the next cursor is the id of the page's last row when more follow.
pub(crate) async fn id_page<T, F>(
    pool: &PgPool,
    query: &PageParams,
    fetch: F,
    id: impl Fn(&T) -> &str,
) -> Result<(Vec<T>, Option<String>), QueryError>
where
    T: Send + 'static,
    F: FnOnce(&mut PgConnection, Option<&str>, i64) -> Result<Vec<T>, StoreError> + Send + 'static,
{
    let limit = params::limit(query.limit.as_deref())?;
    let after = params::decode_device_cursor(query.cursor.as_deref())?;
    let mut items = with_conn(pool, move |conn| fetch(conn, after.as_deref(), limit + 1)).await?;
    let next_cursor =
        next_page(&mut items, limit).map(|last| params::encode_device_cursor(id(last)));
    Ok((items, next_cursor))
}

/// Keeps the first `limit` of `items` (fetched as `limit + 1`); returns the last kept one when more
/// follow, so that a next cursor exists exactly when there is a next page.
pub(crate) fn next_page<T>(items: &mut Vec<T>, limit: i64) -> Option<&T> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if items.len() > limit {
        items.truncate(limit);
        items.last()
    } else {
        None
    }
}

/// One device.
#[utoipa::path(
    tag = "devices",
    params(DevicePath),
    responses(
        (status = 200, description = "The device", body = Device),
        (status = 400, description = "The path is not valid UTF-8", body = service_kit::ErrorBody),
        (status = 404, description = "No readings of this device are stored", body = service_kit::ErrorBody),
    )
)]
#[get("/v1/devices/{id}")]
async fn get_device(
    pool: web::Data<ReadPool>,
    offline_after: web::Data<OfflineAfter>,
    path: web::Path<DevicePath>,
) -> Result<web::Json<Device>, QueryError> {
    let device_id = params::device_id(path.into_inner().id)?.into_string();
    let lookup = device_id.clone();
    with_conn(&pool, move |conn| store::read::device(conn, &lookup))
        .await?
        .map(|d| web::Json(Device::of(d, &offline_after)))
        .ok_or(QueryError::UnknownDevice(device_id))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Reading {
    /// The reading's id: the device's own, or the UUIDv7 assigned at ingest.
    pub id: String,
    pub ts: DateTime<Utc>,
    /// By metric name.
    #[schema(value_type = BTreeMap<String, f64>, example = json!({"temperature": 25.5, "humidity": 60.3}))]
    pub metrics: serde_json::Value,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReadingPage {
    pub device_id: String,
    /// Newest first.
    pub readings: Vec<Reading>,
    /// Pass as `cursor` for the next (older) page; null when there is none.
    pub next_cursor: Option<String>,
}

/// The query of `GET /v1/devices/{id}/readings`, as sent: `params` parses and checks each value.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReadingsParams {
    /// Oldest time, inclusive: RFC 3339 or epoch milliseconds.
    #[param(schema_with = time_param, example = "2026-11-24T00:00:00Z")]
    pub from: Option<String>,
    /// Newest time, exclusive: RFC 3339 or epoch milliseconds.
    #[param(schema_with = time_param, example = "2026-11-25T00:00:00Z")]
    pub to: Option<String>,
    /// Only readings with this metric (or any of several, comma-separated), showing only those.
    #[param(
        pattern = "^[A-Za-z0-9._-]{1,64}(,[A-Za-z0-9._-]{1,64})*$",
        example = "temperature,humidity"
    )]
    pub metric: Option<String>,
    /// How many readings, 1–10,000.
    #[param(value_type = Option<i64>, minimum = 1, maximum = 10000, default = 100)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A device's readings, newest first, a page at a time; or, asked with `Accept: text/csv`, the
/// whole range as one CSV download, streamed.
#[utoipa::path(
    tag = "readings",
    params(DevicePath, ReadingsParams),
    responses(
        (status = 200, description = "A page of readings (empty past the last one). With `Accept: text/csv`: every reading of the range (`from`, `to`, `metric`; `limit` and `cursor` do not apply), newest first, as CSV: a header `ts,id,<metric>...` (the metrics asked for, or every metric the device has sent), one row a reading, an empty cell where it lacks a metric; streamed, so a download cut short has no last line",
            content((ReadingPage = "application/json"), (String = "text/csv"))),
        (status = 400, description = "A bad parameter (`field` names it)", body = service_kit::ErrorBody),
        (status = 404, description = "No readings of this device are stored", body = service_kit::ErrorBody),
    )
)]
#[get("/v1/devices/{id}/readings")]
async fn device_readings(
    req: HttpRequest,
    pool: web::Data<ReadPool>,
    path: web::Path<DevicePath>,
    query: web::Query<ReadingsParams>,
) -> Result<HttpResponse, QueryError> {
    let device_id = params::device_id(path.into_inner().id)?.into_string();
    let limit = params::limit(query.limit.as_deref())?;
    let metrics = params::metrics(query.metric.as_deref())?;
    let q = ReadingsQuery {
        device_id: device_id.clone(),
        from: params::optional_time("from", query.from.as_deref())?,
        to: params::optional_time("to", query.to.as_deref())?,
        metrics: metrics.clone(),
        before: params::decode_reading_cursor(query.cursor.as_deref())?,
        limit: limit + 1,
    };
    if crate::csv::wanted(&req) {
        return crate::csv::readings(&pool, q).await;
    }
    let mut rows = with_conn(&pool, move |conn| store::read::readings_page(conn, &q)).await?;
    if rows.is_empty() {
        require_device(&pool, &device_id).await?;
    }
    let next_cursor = next_page(&mut rows, limit)
        .map(|last| params::encode_reading_cursor(last.ts, &last.reading_id));
    let readings = rows
        .into_iter()
        .map(|row| {
            let mut values = row.metrics;
            if !metrics.is_empty()
                && let Some(object) = values.as_object_mut()
            {
                object.retain(|name, _| metrics.iter().any(|m| m == name));
            }
            Reading {
                id: row.reading_id,
                ts: row.ts,
                metrics: values,
            }
        })
        .collect();
    Ok(HttpResponse::Ok().json(ReadingPage {
        device_id,
        readings,
        next_cursor,
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LatestValue {
    pub value: f64,
    /// Time of the reading that carried it.
    pub ts: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Latest {
    pub device_id: String,
    /// By metric name.
    pub metrics: BTreeMap<String, LatestValue>,
}

/// The newest value of each of a device's metrics.
#[utoipa::path(
    tag = "readings",
    params(DevicePath),
    responses(
        (status = 200, description = "The newest value of each metric", body = Latest),
        (status = 400, description = "The path is not valid UTF-8", body = service_kit::ErrorBody),
        (status = 404, description = "No readings of this device are stored", body = service_kit::ErrorBody),
    )
)]
#[get("/v1/devices/{id}/latest")]
async fn device_latest(
    pool: web::Data<ReadPool>,
    path: web::Path<DevicePath>,
) -> Result<web::Json<Latest>, QueryError> {
    let device_id = params::device_id(path.into_inner().id)?.into_string();
    let lookup = device_id.clone();
    let values = with_conn(&pool, move |conn| store::read::latest(conn, &lookup)).await?;
    if values.is_empty() {
        require_device(&pool, &device_id).await?;
    }
    Ok(web::Json(Latest {
        device_id,
        metrics: values
            .into_iter()
            .map(|v| {
                (
                    v.metric,
                    LatestValue {
                        value: v.value,
                        ts: v.ts,
                    },
                )
            })
            .collect(),
    }))
}

/// The query of `GET /v1/devices/{id}/series`, as sent: the handler parses and checks each value
/// (absent `metric` included, so that its 400 names the field).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SeriesParams {
    /// The metric to aggregate.
    #[param(required = true, value_type = String, pattern = "^[A-Za-z0-9._-]{1,64}$", example = "temperature")]
    pub metric: Option<String>,
    /// Start, inclusive: RFC 3339 or epoch milliseconds (default: 24 hours before `to`).
    #[param(schema_with = time_param, example = "2026-11-24T00:00:00Z")]
    pub from: Option<String>,
    /// End, exclusive: RFC 3339 or epoch milliseconds (default: now).
    #[param(schema_with = time_param, example = "2026-11-25T00:00:00Z")]
    pub to: Option<String>,
    /// Bucket width: a whole number and s, m, h, d or w, from 1 second to 366 days, and at most
    /// 10,000 buckets between `from` and `to`.
    #[param(pattern = "^[0-9]{1,9}[smhdw]$", default = "1h", example = "1h")]
    pub bucket: Option<String>,
    /// How the values in a bucket are aggregated (default avg): `avg`, `min`, `max`, `sum` or
    /// `count`, or several of them, comma-separated (`min,max,avg`: a chart's band and line from
    /// one pass over the readings), each point then also carrying `values`.
    #[param(value_type = Option<String>, pattern = "^(avg|min|max|sum|count)(,(avg|min|max|sum|count)){0,4}$", example = "avg")]
    pub agg: Option<String>,
}

/// `from` and `to`: what `params::time` takes.
fn time_param() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, OneOfBuilder, SchemaFormat, Type};
    OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime))),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(params::EARLIEST_MILLIS))
                .maximum(Some(params::LATEST_MILLIS)),
        )
        .into()
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Point {
    /// The bucket's start; buckets align to Monday 2000-01-03T00:00:00Z, so `1d` starts at midnight
    /// UTC and `1w` on Monday (ISO weeks).
    pub ts: DateTime<Utc>,
    /// The aggregate. `sum` and `avg` are computed exactly (in decimal) and then rounded to a
    /// double; an average always fits one, but a sum beyond ±1.8e308 (the largest double) does not:
    /// then `value` is null and `reason` says so.
    pub value: Option<f64>,
    /// Only when `value` (or one of `values`) is null: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = json!(null))]
    pub reason: Option<&'static str>,
    /// Only when `agg` names several aggregates: each one's value by name (`value` is the first's).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = json!({"min": 20.5, "max": 23.0, "avg": 21.7}))]
    pub values: Option<BTreeMap<String, Option<f64>>>,
}

/// Why a point has no value (see [`Point::value`]).
const SUM_OVERFLOW: &str = "the sum is beyond ±1.8e308, the largest number a double can hold";

#[derive(Debug, Serialize, ToSchema)]
pub struct Series {
    pub device_id: String,
    pub metric: String,
    pub agg: String,
    pub bucket: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// The coarsest table that answered: `1d`, `1h` or `1m` summaries, or `raw` readings. Whole
    /// buckets come from the coarsest summary that fits the bucket (a `1h` series from hours or
    /// minutes), the rest from finer ones; the numbers are those the raw readings give. A range
    /// that starts before the raw readings' retention is answered from whole summary buckets only.
    #[schema(example = "1h")]
    pub source: &'static str,
    /// Oldest first; buckets without readings are left out.
    pub points: Vec<Point>,
}

/// One metric of a device in time buckets, aggregated in PostgreSQL. `sum` and `avg` are computed
/// exactly in decimal, so they never fail on large values; a sum too large for a double (beyond
/// ±1.8e308) is answered as `"value": null` with a `reason`, never as an error.
#[utoipa::path(
    tag = "readings",
    params(DevicePath, SeriesParams),
    responses(
        (status = 200, description = "The buckets that have readings, oldest first", body = Series),
        (status = 400, description = "A bad or missing parameter (`field` names it)", body = service_kit::ErrorBody),
        (status = 404, description = "No readings of this device are stored", body = service_kit::ErrorBody),
    )
)]
#[get("/v1/devices/{id}/series")]
async fn device_series(
    pool: web::Data<ReadPool>,
    path: web::Path<DevicePath>,
    query: web::Query<SeriesParams>,
) -> Result<web::Json<Series>, QueryError> {
    let device_id = params::device_id(path.into_inner().id)?.into_string();
    let metric = match query.metric.as_deref() {
        None => return Err(QueryError::invalid("metric", "is required")),
        Some(name) => models::MetricName::parse(name)
            .map_err(|reason| QueryError::invalid("metric", reason))?
            .into_string(),
    };
    let to = params::optional_time("to", query.to.as_deref())?
        .unwrap_or_else(|| Utc::now().trunc_subsecs(6));
    let from =
        params::optional_time("from", query.from.as_deref())?.unwrap_or(to - Duration::hours(24));
    if from >= to {
        return Err(QueryError::invalid("from", "must be before `to`"));
    }
    let bucket = query.bucket.clone().unwrap_or_else(|| "1h".to_owned());
    let bucket_micros = params::bucket(&bucket)?;
    let span_micros = (to - from).num_microseconds().unwrap_or(i64::MAX);
    if span_micros / bucket_micros >= params::MAX_BUCKETS {
        return Err(QueryError::invalid(
            "bucket",
            format!(
                "gives more than {} buckets between from and to; choose a wider bucket",
                params::MAX_BUCKETS
            ),
        ));
    }
    let agg = query.agg.clone().unwrap_or_else(|| "avg".to_owned());
    let aggregates = params::aggregates(&agg)?;
    let names: Vec<String> = agg.split(',').map(str::to_owned).collect();
    let q = SeriesQuery {
        device_id: device_id.clone(),
        metric: metric.clone(),
        from,
        to,
        bucket_micros,
        aggregate: aggregates[0],
    };
    let several = aggregates.len() > 1;
    let store::read::SeriesAnswer { source, buckets } = with_conn(&pool, move |conn| {
        store::read::series_of(conn, &q, &aggregates)
    })
    .await?;
    if buckets.is_empty() {
        require_device(&pool, &device_id).await?;
    }
    Ok(web::Json(Series {
        device_id,
        metric,
        agg,
        bucket,
        from,
        to,
        source: source.as_str(),
        points: buckets
            .into_iter()
            .map(|b| Point {
                ts: b.start,
                value: b.values.first().copied().flatten(),
                reason: b.values.iter().any(Option::is_none).then_some(SUM_OVERFLOW),
                values: several.then(|| names.iter().cloned().zip(b.values).collect()),
            })
            .collect(),
    }))
}

/// Serves the description generated from the routes above.
pub async fn openapi_json(doc: web::Data<utoipa::openapi::OpenApi>) -> HttpResponse {
    HttpResponse::Ok().json(doc.get_ref())
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct NewDevice {
    /// 1–64 characters of `[A-Za-z0-9._-]`.
    #[schema(example = "raspi-01", pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub device_id: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RegisteredDevice {
    pub device_id: String,
    /// Logged in place of the token; what revocation names.
    pub token_id: String,
    /// The device's bearer token for ingest (shown once; Sensorhub keeps only its id).
    pub token: String,
}

/// Registers a device and returns its token (admin).
///
/// Needs query-api to hold the signing key; otherwise register devices with `sensorctl device add`.
/// With the MQTT admin URL set, the device also gets its MQTT account (user name and client id its
/// id, password its token); when that fails, the registration is undone.
#[utoipa::path(
    tag = "devices",
    request_body = NewDevice,
    responses(
        (status = 201, description = "Registered; the token is shown this once", body = RegisteredDevice),
        (status = 400, description = "Not a JSON object with a valid `device_id`", body = service_kit::ErrorBody),
        (status = 403, description = "Not an admin token", body = service_kit::ErrorBody),
        (status = 409, description = "Already registered, or an MQTT account of that name is not a device's", body = service_kit::ErrorBody),
        (status = 413, description = "A body larger than 16 KiB", body = service_kit::ErrorBody),
        (status = 415, description = "A Content-Type other than JSON (or none)", body = service_kit::ErrorBody),
        (status = 501, description = "No signing key here", body = service_kit::ErrorBody),
        (status = 502, description = "The MQTT broker refused the account; not registered", body = service_kit::ErrorBody),
        (status = 503, description = "The MQTT broker cannot be reached; not registered", body = service_kit::ErrorBody),
    )
)]
#[post("/v1/devices")]
async fn register_device(
    pool: web::Data<PgPool>,
    tokens: web::Data<DeviceTokens>,
    mqtt: web::Data<MqttAccounts>,
    body: web::Json<NewDevice>,
) -> Result<HttpResponse, QueryError> {
    let device = models::DeviceId::parse(body.device_id.as_str())
        .map_err(|reason| QueryError::invalid("device_id", reason))?;
    let Some(signer) = &tokens.0 else {
        return Err(QueryError::NotConfigured(
            "this query-api holds no signing key: register devices with `sensorctl device add`",
        ));
    };
    let claims = auth::Claims::device(device.as_str(), Utc::now().timestamp());
    let token = signer
        .sign(&claims)
        .map_err(|e| QueryError::NotConfigured(signing_failed(e)))?;
    let (id, token_id) = (device.as_str().to_owned(), claims.jti.clone());
    let registration = with_conn(&pool, move |conn| {
        store::credentials::register_device(conn, &id, &token_id)
    })
    .await?;
    if let store::credentials::Registration::AlreadyActive = registration {
        return Err(QueryError::Conflict(format!(
            "{device} is already registered; revoke it first to issue a new token"
        )));
    }
    if let Some(broker) = &mqtt.0
        && let Err(source) = broker.add_device(&device, &token, None).await
    {
        // all or nothing, as sensorctl: a device half set up is worse than none
        let id = device.as_str().to_owned();
        with_conn(&pool, move |conn| {
            store::credentials::revoke_device(conn, &id)
        })
        .await?;
        return Err(QueryError::MqttAccount {
            done: format!("{device} not registered: its MQTT account could not be made"),
            source,
        });
    }
    Ok(HttpResponse::Created().json(RegisteredDevice {
        device_id: device.into_string(),
        token_id: claims.jti,
        token,
    }))
}

fn signing_failed(e: auth::AuthError) -> &'static str {
    tracing::error!(error = %e, "cannot sign a device token");
    "cannot sign tokens with the configured signing key"
}

/// Revokes a device's token (admin): ingest-http refuses it within seconds. With the MQTT admin
/// URL set, its MQTT account is removed too and its connection closed at once. The registry is
/// changed first, so HTTP is closed even while the broker is away; the answer is then 503 (or 502)
/// and saying so, and repeating the request removes the MQTT account.
#[utoipa::path(
    tag = "devices",
    params(DevicePath),
    responses(
        (status = 204, description = "Revoked"),
        (status = 400, description = "The path is not valid UTF-8", body = service_kit::ErrorBody),
        (status = 403, description = "Not an admin token", body = service_kit::ErrorBody),
        (status = 404, description = "Not an active registered device, and no MQTT account", body = service_kit::ErrorBody),
        (status = 502, description = "Revoked for HTTP; the MQTT broker refused to remove the account", body = service_kit::ErrorBody),
    )
)]
#[delete("/v1/devices/{id}")]
async fn revoke_device(
    pool: web::Data<PgPool>,
    mqtt: web::Data<MqttAccounts>,
    path: web::Path<DevicePath>,
) -> Result<HttpResponse, QueryError> {
    let device = params::device_id(path.into_inner().id)?;
    let device_id = device.as_str().to_owned();
    let lookup = device_id.clone();
    let revoked = with_conn(&pool, move |conn| {
        store::credentials::revoke_device(conn, &lookup)
    })
    .await?;
    let removed =
        match &mqtt.0 {
            Some(broker) => broker.remove_device(&device).await.map_err(|source| {
                QueryError::MqttAccount {
                    done: format!(
                        "{device} is revoked for HTTP, but its MQTT account could not be removed"
                    ),
                    source,
                }
            })?,
            None => false,
        };
    if revoked || removed {
        Ok(HttpResponse::NoContent().finish())
    } else {
        Err(QueryError::UnknownDevice(device_id))
    }
}
