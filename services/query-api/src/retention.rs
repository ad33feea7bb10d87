//! The retention policy over HTTP: any app token reads it; an admin token changes it (the access
//! check lets only admins write outside the command routes, as for every other route). Applying
//! it is not an API action: the persisters do it on their schedule, and `sensorctl retention apply`
//! now.

use actix_web::{HttpResponse, delete, get, put, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use store::PgPool;
use store::retention::{self, InvalidPolicy, Keep, Table, Target};
use utoipa::{IntoParams, ToSchema};

use crate::api::with_conn;
use crate::error::QueryError;

/// One rule of the policy.
#[derive(Debug, Serialize, ToSchema)]
pub struct RetentionRule {
    /// `raw` (readings), `1m`, `1h` or `1d` (the rollups).
    #[schema(example = "raw")]
    pub table: &'static str,
    /// The device it applies to; null for every device no more specific rule names.
    pub device: Option<String>,
    /// The metric it applies to; null for every metric.
    pub metric: Option<String>,
    /// How long it keeps what it holds (`30d`, `12h`); null keeps forever.
    #[schema(example = "30d")]
    pub keep: Option<String>,
    /// What is older goes at the persisters' next run (raw readings older than this, rollup
    /// buckets ending by it); null when kept forever.
    pub cutoff: Option<DateTime<Utc>>,
}

/// The whole policy: per table a global rule, then its overrides. The most specific applies:
/// device and metric, then device, then metric, then global.
#[derive(Debug, Serialize, ToSchema)]
pub struct RetentionPolicy {
    pub rules: Vec<RetentionRule>,
}

/// A change of one rule.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RetentionChange {
    /// `raw`, `1m`, `1h` or `1d`.
    #[schema(pattern = "^(raw|1m|1h|1d)$", example = "raw")]
    pub table: String,
    /// Whole days or hours (`30d`, `12h`), or null to keep forever. Required.
    #[serde(deserialize_with = "present")]
    #[schema(required = true, pattern = "^[0-9]{1,9}[dh]$", example = "30d")]
    pub keep: Option<String>,
    /// Only this device's (1–64 characters of `[A-Za-z0-9._-]`).
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$", example = "raspi-01")]
    pub device: Option<String>,
    /// Only this metric's (1–64 characters of `[A-Za-z0-9._-]`); not for `raw`, whose rows hold
    /// every metric of a reading.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$", example = "temperature")]
    pub metric: Option<String>,
}

/// `keep` must be there, null or not: a missing one is a 400, never "forever" by omission.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<String>::deserialize(d)
}

/// Which override `DELETE /v1/retention` removes.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RetentionTarget {
    /// `raw`, `1m`, `1h` or `1d`.
    #[param(value_type = String, required = true, pattern = "^(raw|1m|1h|1d)$", example = "raw")]
    pub table: Option<String>,
    /// The override's device.
    #[param(pattern = "^[A-Za-z0-9._-]{1,64}$", example = "raspi-01")]
    pub device: Option<String>,
    /// The override's metric.
    #[param(pattern = "^[A-Za-z0-9._-]{1,64}$", example = "temperature")]
    pub metric: Option<String>,
}

impl From<InvalidPolicy> for QueryError {
    fn from(e: InvalidPolicy) -> Self {
        QueryError::invalid(e.field, e.reason)
    }
}

async fn policy(pool: &web::Data<PgPool>) -> Result<RetentionPolicy, QueryError> {
    let rules = with_conn(pool, retention::show).await?;
    let now = Utc::now();
    Ok(RetentionPolicy {
        rules: rules
            .into_iter()
            .map(|r| RetentionRule {
                table: r.table.as_str(),
                cutoff: r.cutoff(now),
                keep: r.keep.to_option_string(),
                device: r.device,
                metric: r.metric,
            })
            .collect(),
    })
}

/// The retention policy: how long raw readings and each rollup table keep what they hold.
#[utoipa::path(
    tag = "retention",
    responses(
        (status = 200, description = "Every rule, per table the global one first", body = RetentionPolicy),
    )
)]
#[get("/v1/retention")]
pub(crate) async fn get_retention(
    pool: web::Data<PgPool>,
) -> Result<web::Json<RetentionPolicy>, QueryError> {
    Ok(web::Json(policy(&pool).await?))
}

/// Sets one rule (admin): a table's global default, or an override for a device, a metric, or a
/// device's metric. Answers the whole policy as it now is; the persisters apply it at their next
/// run.
#[utoipa::path(
    tag = "retention",
    request_body = RetentionChange,
    responses(
        (status = 200, description = "Set; the whole policy", body = RetentionPolicy),
        (status = 400, description = "A bad `table`, `keep`, `device` or `metric` (`field` names it), or a per-metric rule for `raw`; nothing changed", body = service_kit::ErrorBody),
        (status = 403, description = "Not an admin token", body = service_kit::ErrorBody),
        (status = 413, description = "A body larger than 16 KiB", body = service_kit::ErrorBody),
        (status = 415, description = "A Content-Type other than JSON (or none)", body = service_kit::ErrorBody),
    )
)]
#[put("/v1/retention")]
pub(crate) async fn set_retention(
    pool: web::Data<PgPool>,
    body: web::Json<RetentionChange>,
) -> Result<web::Json<RetentionPolicy>, QueryError> {
    let change = body.into_inner();
    let target = Target::new(
        Table::parse(&change.table)?,
        change.device.as_deref(),
        change.metric.as_deref(),
    )?;
    let keep = match change.keep.as_deref() {
        None => Keep::Forever,
        // "forever" is null here: one spelling per meaning
        Some("forever") => {
            return Err(QueryError::invalid(
                "keep",
                "use null to keep forever (or e.g. \"30d\", \"12h\")",
            ));
        }
        Some(text) => Keep::parse(text)?,
    };
    with_conn(&pool, move |conn| retention::set(conn, &target, keep)).await?;
    Ok(web::Json(policy(&pool).await?))
}

/// Removes an override (admin); the next more general rule applies again. A table's global rule
/// cannot be removed, only set.
#[utoipa::path(
    tag = "retention",
    params(RetentionTarget),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "A bad or missing `table`, a bad `device` or `metric` (`field` names it), or neither given (the global rule)", body = service_kit::ErrorBody),
        (status = 403, description = "Not an admin token", body = service_kit::ErrorBody),
        (status = 404, description = "No such override", body = service_kit::ErrorBody),
    )
)]
#[delete("/v1/retention")]
pub(crate) async fn unset_retention(
    pool: web::Data<PgPool>,
    query: web::Query<RetentionTarget>,
) -> Result<HttpResponse, QueryError> {
    let query = query.into_inner();
    let table = query
        .table
        .as_deref()
        .ok_or_else(|| QueryError::invalid("table", "required: raw, 1m, 1h or 1d"))?;
    let target = Target::override_of(
        Table::parse(table)?,
        query.device.as_deref(),
        query.metric.as_deref(),
    )?;
    let described = format!(
        "{} override for {}",
        target.table,
        match (&target.device, &target.metric) {
            (Some(d), Some(m)) => format!("device {d}, metric {m}"),
            (Some(d), None) => format!("device {d}"),
            (None, Some(m)) => format!("metric {m}"),
            (None, None) => "everything".to_owned(),
        }
    );
    if with_conn(&pool, move |conn| retention::unset(conn, &target)).await? {
        Ok(HttpResponse::NoContent().finish())
    } else {
        Err(QueryError::UnknownRetentionOverride(described))
    }
}
