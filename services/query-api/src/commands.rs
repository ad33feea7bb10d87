//! Commands to devices, the app's side: issue one (`POST /v1/devices/{id}/commands`, operator or
//! admin), follow it (`GET /v1/commands/{id}`), list a device's (`GET /v1/devices/{id}/commands`),
//! cancel one while it is not finished (`DELETE /v1/commands/{id}`). A command is stored here as
//! `pending` with its expiry; delivery to the device and its answer move it on.

use actix_web::{HttpResponse, delete, get, post, web};
use auth::Claims;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use store::PgPool;
use store::commands::{Change, CommandStatus, Issued, NewCommand};
use utoipa::{IntoParams, ToSchema};

use crate::api::{DevicePath, next_page, with_conn};
use crate::error::QueryError;
use crate::params;

/// The limits on what apps may ask of devices (query-api's `command_*` settings).
#[derive(Debug, Clone)]
pub struct CommandLimits {
    /// Unfinished commands a device may have; more are refused (429).
    pub max_open: i64,
    /// The largest `args`, as JSON text (413 beyond).
    pub max_args_bytes: usize,
    /// `ttl_s` when the request has none.
    pub default_ttl_secs: u32,
    /// The largest `ttl_s` allowed.
    pub max_ttl_secs: u32,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCommandBody {
    /// What to do: 1–64 characters of `[A-Za-z0-9._-]`.
    #[schema(example = "led", pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub name: String,
    /// Handed to the device as sent; a JSON object (`{}` when left out).
    #[schema(value_type = Option<Object>, example = json!({"on": true}))]
    pub args: Option<serde_json::Value>,
    /// Seconds the command may wait for the device; not finished by then, it expires and is never
    /// delivered afterwards. Default and largest value: query-api's settings (300 and 7 days).
    #[schema(example = 300, minimum = 1)]
    pub ttl_s: Option<i64>,
}

/// A command and where it is.
#[derive(Debug, Serialize, ToSchema)]
pub struct Command {
    #[schema(example = "01938b4e-8c2a-7d41-9a3e-5b2f0c1d7e6a")]
    pub id: String,
    #[schema(example = "raspi-01")]
    pub device_id: String,
    #[schema(example = "led")]
    pub name: String,
    #[schema(value_type = Object, example = json!({"on": true}))]
    pub args: serde_json::Value,
    /// `pending` (not yet handed to the device), `sent`, then `succeeded`, `failed`, `expired` or
    /// `cancelled`; only ever forward.
    #[schema(example = "pending")]
    pub status: &'static str,
    /// The id of the app token that issued it.
    pub issued_by: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// What the device answered.
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
    /// Every status it had, oldest first (`GET /v1/commands/{id}` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<Vec<StatusChange>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StatusChange {
    #[schema(example = "pending")]
    pub status: String,
    pub at: DateTime<Utc>,
    /// Who or what made it: `issued by token …`, `cancelled by token …`, `not finished by its expiry`.
    pub detail: String,
}

impl Command {
    fn new(c: store::commands::Command, now: DateTime<Utc>) -> Self {
        Self {
            status: c.status(now).as_str(),
            finished_at: c.finished_at(now),
            id: c.id,
            device_id: c.device_id,
            name: c.name,
            args: c.args,
            issued_by: c.issued_by,
            created_at: c.created_at,
            expires_at: c.expires_at,
            sent_at: c.sent_at,
            result: c.result,
            history: None,
        }
    }

    fn with_history(mut self, events: Vec<store::commands::CommandEvent>) -> Self {
        let history = events
            .into_iter()
            .map(|e| StatusChange {
                status: e.status,
                at: e.at,
                detail: e.detail,
            })
            .collect();
        self.history = Some(history);
        self
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CommandList {
    /// Newest first.
    pub commands: Vec<Command>,
    /// Pass as `cursor` for the next page; null when there is none.
    pub next_cursor: Option<String>,
}

/// The `{id}` of `/v1/commands/{id}`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct CommandPath {
    /// The command's id, as `POST /v1/devices/{id}/commands` answered it.
    #[param(example = "01938b4e-8c2a-7d41-9a3e-5b2f0c1d7e6a")]
    pub id: String,
}

/// The query of `GET /v1/devices/{id}/commands`, as sent.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CommandsParams {
    /// Only commands in this status now: pending, sent, succeeded, failed, expired, cancelled.
    #[param(example = "pending")]
    pub status: Option<String>,
    /// How many commands, 1–10,000.
    #[param(value_type = Option<i64>, minimum = 1, maximum = 10000, default = 100)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Sends a device a command (operator or admin): stored as `pending` until the device is handed
/// it. Delivered at least once: a device deduplicates by `id`.
#[utoipa::path(
    tag = "commands",
    params(DevicePath),
    request_body = NewCommandBody,
    responses(
        (status = 201, description = "Stored as pending; `Location` is where to follow it", body = Command),
        (status = 400, description = "A bad `name`, `args` that are not an object, or a `ttl_s` out of range", body = service_kit::ErrorBody),
        (status = 403, description = "Not an operator or admin token", body = service_kit::ErrorBody),
        (status = 404, description = "No such device (neither registered nor seen)", body = service_kit::ErrorBody),
        (status = 409, description = "The device is revoked: it can no longer connect", body = service_kit::ErrorBody),
        (status = 413, description = "`args` larger than allowed (8 KiB by default)", body = service_kit::ErrorBody),
        (status = 415, description = "A Content-Type other than JSON (or none)", body = service_kit::ErrorBody),
        (status = 429, description = "The device already has as many unfinished commands as allowed", body = service_kit::ErrorBody),
    )
)]
#[post("/v1/devices/{id}/commands")]
pub(crate) async fn issue_command(
    pool: web::Data<PgPool>,
    limits: web::Data<CommandLimits>,
    caller: web::ReqData<Claims>,
    path: web::Path<DevicePath>,
    body: web::Json<NewCommandBody>,
) -> Result<HttpResponse, QueryError> {
    let target = path.into_inner().id;
    let outcome = issue(&pool, &limits, &caller, &target, body.into_inner()).await;
    audited("issue", &target, &caller, outcome)
}

async fn issue(
    pool: &web::Data<PgPool>,
    limits: &CommandLimits,
    caller: &Claims,
    target: &str,
    body: NewCommandBody,
) -> Result<HttpResponse, QueryError> {
    let device = params::device_id(target.to_owned())?;
    let name = models::MetricName::parse(body.name.as_str())
        .map_err(|reason| QueryError::invalid("name", reason))?;
    let args = body.args.unwrap_or_else(|| serde_json::json!({}));
    if !args.is_object() {
        return Err(QueryError::invalid("args", "must be a JSON object"));
    }
    if models::contains_nul(&args) {
        // PostgreSQL's jsonb cannot hold one
        return Err(QueryError::invalid(
            "args",
            "must not contain the character U+0000",
        ));
    }
    let args_bytes = args.to_string().len();
    if args_bytes > limits.max_args_bytes {
        return Err(QueryError::BodyTooLarge(format!(
            "args: {args_bytes} bytes of JSON, more than the {} allowed",
            limits.max_args_bytes
        )));
    }
    let ttl_secs = body.ttl_s.unwrap_or(i64::from(limits.default_ttl_secs));
    if !(1..=i64::from(limits.max_ttl_secs)).contains(&ttl_secs) {
        return Err(QueryError::invalid(
            "ttl_s",
            format!(
                "must be a whole number of seconds from 1 to {}",
                limits.max_ttl_secs
            ),
        ));
    }
    let id = uuid::Uuid::now_v7().to_string();
    let issued_by = caller.jti.clone();
    let (device_id, command_name, max_open) = (
        device.as_str().to_owned(),
        name.into_string(),
        limits.max_open,
    );
    let issued = with_conn(pool, move |conn| {
        store::commands::issue_command(
            conn,
            &NewCommand {
                id: &id,
                device_id: &device_id,
                name: &command_name,
                args: &args,
                issued_by: &issued_by,
                ttl: chrono::Duration::seconds(ttl_secs),
            },
            max_open,
        )
    })
    .await?;
    match issued {
        Issued::Issued(command) => {
            tracing::info!(target: "audit", outcome = "command_issued", command.id = %command.id,
                device.id = %command.device_id, command.name = %command.name,
                token.id = %command.issued_by);
            Ok(HttpResponse::Created()
                .insert_header((
                    actix_web::http::header::LOCATION,
                    format!("/v1/commands/{}", command.id),
                ))
                .json(Command::new(*command, Utc::now())))
        }
        Issued::UnknownDevice => Err(QueryError::UnknownDevice(device.into_string())),
        Issued::RevokedDevice => Err(QueryError::Conflict(format!(
            "{device} is revoked: it can no longer connect to receive commands"
        ))),
        Issued::TooManyOpen(open) => Err(QueryError::TooManyOpenCommands(format!(
            "{device} already has {open} unfinished commands, the most allowed; \
             wait for them to finish or expire, or cancel some"
        ))),
    }
}

/// A command, with every status it had.
#[utoipa::path(
    tag = "commands",
    params(CommandPath),
    responses(
        (status = 200, description = "The command and its history", body = Command),
        (status = 404, description = "No such command", body = service_kit::ErrorBody),
    )
)]
#[get("/v1/commands/{id}")]
pub(crate) async fn get_command(
    pool: web::Data<PgPool>,
    path: web::Path<CommandPath>,
) -> Result<web::Json<Command>, QueryError> {
    let id = command_id(path.into_inner().id)?;
    let lookup = id.clone();
    match with_conn(&pool, move |conn| store::commands::command(conn, &lookup)).await? {
        Some((command, recorded)) => {
            let now = Utc::now();
            let history = command.history(recorded, now);
            Ok(web::Json(Command::new(command, now).with_history(history)))
        }
        None => Err(QueryError::UnknownCommand(id)),
    }
}

/// A device's commands, newest first, a page at a time.
#[utoipa::path(
    tag = "commands",
    params(DevicePath, CommandsParams),
    responses(
        (status = 200, description = "A page of commands (empty past the last one, and for a device that has none)", body = CommandList),
        (status = 400, description = "A bad parameter (`field` names it)", body = service_kit::ErrorBody),
        (status = 404, description = "Not a device id", body = service_kit::ErrorBody),
    )
)]
#[get("/v1/devices/{id}/commands")]
pub(crate) async fn device_commands(
    pool: web::Data<PgPool>,
    path: web::Path<DevicePath>,
    query: web::Query<CommandsParams>,
) -> Result<web::Json<CommandList>, QueryError> {
    let device_id = params::device_id(path.into_inner().id)?.into_string();
    let limit = params::limit(query.limit.as_deref())?;
    let status = query
        .status
        .as_deref()
        .map(|s| {
            CommandStatus::parse(s).ok_or_else(|| {
                QueryError::invalid(
                    "status",
                    "must be pending, sent, succeeded, failed, expired or cancelled",
                )
            })
        })
        .transpose()?;
    let before = query
        .cursor
        .clone()
        .map(|cursor| {
            command_id(cursor)
                .map_err(|_| QueryError::invalid("cursor", "is not a cursor this API gave out"))
        })
        .transpose()?;
    let mut commands = with_conn(&pool, move |conn| {
        store::commands::device_commands(conn, &device_id, status, before.as_deref(), limit + 1)
    })
    .await?;
    let next_cursor = next_page(&mut commands, limit).map(|last| last.id.clone());
    let now = Utc::now();
    Ok(web::Json(CommandList {
        commands: commands.into_iter().map(|c| Command::new(c, now)).collect(),
        next_cursor,
    }))
}

/// Cancels a command that is not finished (operator or admin): it is never delivered afterwards,
/// and a device that already has it gets its answer refused.
#[utoipa::path(
    tag = "commands",
    params(CommandPath),
    responses(
        (status = 200, description = "Cancelled", body = Command),
        (status = 403, description = "Not an operator or admin token", body = service_kit::ErrorBody),
        (status = 404, description = "No such command", body = service_kit::ErrorBody),
        (status = 409, description = "Already finished (succeeded, failed, expired or cancelled)", body = service_kit::ErrorBody),
    )
)]
#[delete("/v1/commands/{id}")]
pub(crate) async fn cancel_command(
    pool: web::Data<PgPool>,
    caller: web::ReqData<Claims>,
    path: web::Path<CommandPath>,
) -> Result<web::Json<Command>, QueryError> {
    let target = path.into_inner().id;
    let outcome = cancel(&pool, &caller, &target).await;
    audited("cancel", &target, &caller, outcome)
}

async fn cancel(
    pool: &web::Data<PgPool>,
    caller: &Claims,
    target: &str,
) -> Result<web::Json<Command>, QueryError> {
    let id = command_id(target.to_owned())?;
    let (lookup, by) = (id.clone(), caller.jti.clone());
    let change = with_conn(pool, move |conn| {
        store::commands::cancel_command(conn, &lookup, &by)
    })
    .await?;
    let now = Utc::now();
    match change {
        Change::Made(command) => {
            tracing::info!(target: "audit", outcome = "command_cancelled", command.id = %command.id,
                device.id = %command.device_id, token.id = %caller.jti);
            Ok(web::Json(Command::new(*command, now)))
        }
        Change::TooLate(command) => Err(QueryError::Conflict(format!(
            "command {id} is {} already: only a pending or sent command can be cancelled",
            command.status(now)
        ))),
        Change::NoSuchCommand => Err(QueryError::UnknownCommand(id)),
    }
}

/// A refused command request is a line of the audit trail, as the refusals of the access check
/// are: what was asked (`issue` a command to a device, `cancel` a command), of what, by which token,
/// and why not. What the client sent is written escaped (`?`), so no request can forge a line.
fn audited<T>(
    action: &'static str,
    target: &str,
    caller: &Claims,
    outcome: Result<T, QueryError>,
) -> Result<T, QueryError> {
    if let Err(error) = &outcome {
        tracing::info!(target: "audit", outcome = "command_refused", action, subject = ?target,
            token.id = %caller.jti, reason = error.kind(), detail = ?error.to_string());
    }
    outcome
}

/// A command id is a UUID: any other text names no command (404), and never reaches the database.
fn command_id(value: String) -> Result<String, QueryError> {
    match uuid::Uuid::parse_str(&value) {
        Ok(id) => Ok(id.hyphenated().to_string()),
        Err(_) => Err(QueryError::UnknownCommand(value)),
    }
}
