//! Commands to devices over HTTP: a device long-polls `GET /v1/commands/next` for its next command
//! and answers it with `POST /v1/commands/{id}/result` (the WebSocket, in `ws`, does both on one
//! connection). ingest-http never writes PostgreSQL: it reads what is due, and hands what happened
//! (a command sent, a command answered) to the persister as a report on RabbitMQ, answering the
//! device only once RabbitMQ confirmed it.

use std::collections::HashMap;
use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, get, post, web};
use bus::{DeviceCommands, Publisher};
use models::{Channel, CommandReport, DeviceCommand, DeviceId, ValidationError};
use serde::{Deserialize, Serialize};
use store::commands::{Command, Refusal};
use utoipa::ToSchema;

use crate::api::IngestState;
use crate::device_auth::Writer;
use crate::error::IngestError;

/// Due commands a long-poll looks at, oldest first, for one it did not hand out just now.
const DUE_LOOKED_AT: i64 = 8;

/// A long-poll waits this long unless it says otherwise (or `command_poll_max_wait_secs` is
/// lower)...
pub const DEFAULT_WAIT_SECS: u64 = 30;
/// ...and at most this long (`command_poll_max_wait_secs` may lower it).
pub const MAX_WAIT_SECS: u64 = 60;

/// A command this replica handed to a device by long-poll is not handed to it again by long-poll
/// for this long. Without it, while the persister cannot record what happened (PostgreSQL or the
/// persister down), a sent command whose re-send is due would be answered to every poll at once,
/// and a device would spin through the same command as fast as it can ask (the chaos run saw 169
/// deliveries of 8 commands in a 3 s database outage). Re-sends still come, after the window.
const HANDED_AGAIN_AFTER: Duration = Duration::from_secs(5);

/// What the command routes need beside the publisher: the router that brings a command to the
/// replica a device waits on, and PostgreSQL (read only) for what is due and whose a command is.
pub struct CommandDesk {
    pub router: DeviceCommands,
    pub pool: store::PgPool,
    pub publisher: Publisher,
    /// The longest `wait` a long-poll may ask for: [`MAX_WAIT_SECS`] or less.
    pub max_wait_secs: u64,
    /// (device, command) → when this replica last handed it out by long-poll; entries older than
    /// [`HANDED_AGAIN_AFTER`] are forgotten as new ones come.
    pub handed: std::sync::Mutex<HashMap<(String, String), std::time::Instant>>,
}

impl CommandDesk {
    /// Whether `command` may be handed to `device` by long-poll now: not within
    /// [`HANDED_AGAIN_AFTER`] of the last time.
    fn may_hand(&self, device: &str, command: &str) -> bool {
        let Ok(handed) = self.handed.lock() else {
            return true;
        };
        handed
            .get(&(device.to_owned(), command.to_owned()))
            .is_none_or(|at| at.elapsed() >= HANDED_AGAIN_AFTER)
    }

    fn handed_out(&self, device: &str, command: &str) {
        if let Ok(mut handed) = self.handed.lock() {
            handed.retain(|_, at| at.elapsed() < HANDED_AGAIN_AFTER);
            handed.insert(
                (device.to_owned(), command.to_owned()),
                std::time::Instant::now(),
            );
        }
    }

    /// The commands due for `device` now, oldest first (at most `limit`).
    pub async fn due(&self, device: &str, limit: i64) -> Result<Vec<DeviceCommand>, IngestError> {
        let pool = self.pool.clone();
        let device = device.to_owned();
        let due = tokio::task::spawn_blocking(move || {
            let mut conn = pool.get()?;
            store::commands::due_for_device(&mut conn, &device, limit)
        })
        .await
        .map_err(|e| IngestError::Database(e.to_string()))?
        .map_err(|e| IngestError::Database(e.to_string()))?;
        Ok(due.iter().map(device_command).collect())
    }

    /// Tells the persister `command` was handed to `device` via `via`; once RabbitMQ confirmed.
    pub async fn report_sent(
        &self,
        device: &str,
        command: &str,
        via: Channel,
    ) -> Result<(), IngestError> {
        let report = CommandReport::sent(command, device_id(device)?, via);
        Ok(self.publisher.publish_report(&report).await?)
    }

    /// Checks `device`'s answer (`{"status", "result"}`) to `command` and hands it to the persister:
    /// 400 for a bad answer, 404 / 403 / 409 for an unknown, another device's, or a finished or
    /// expired command; done once RabbitMQ confirmed the report.
    pub async fn answer(
        &self,
        device: &str,
        command: &str,
        body: &[u8],
        via: Channel,
    ) -> Result<models::Outcome, IngestError> {
        let answer = models::parse_command_answer(body)?;
        let stored = self.command(command).await?;
        let Some(stored) = stored else {
            return Err(IngestError::Command(Refusal::NoSuchCommand));
        };
        store::commands::answerable(&stored, device, chrono::Utc::now())
            .map_err(IngestError::Command)?;
        let outcome = answer.outcome;
        let report = CommandReport::answered(command, device_id(device)?, via, answer);
        self.publisher.publish_report(&report).await?;
        Ok(outcome)
    }

    async fn command(&self, id: &str) -> Result<Option<Command>, IngestError> {
        let pool = self.pool.clone();
        let id = id.to_owned();
        let found = tokio::task::spawn_blocking(move || {
            let mut conn = pool.get()?;
            store::commands::command(&mut conn, &id)
        })
        .await
        .map_err(|e| IngestError::Database(e.to_string()))?
        .map_err(|e| IngestError::Database(e.to_string()))?;
        Ok(found.map(|(command, _history)| command))
    }
}

pub fn device_command(command: &Command) -> DeviceCommand {
    DeviceCommand {
        id: command.id.clone(),
        name: command.name.clone(),
        args: command.args.clone(),
        expires_at: command.expires_at,
    }
}

fn device_id(device: &str) -> Result<DeviceId, IngestError> {
    DeviceId::parse(device).map_err(IngestError::Forbidden)
}

/// The device a command route serves: a device token's, never an anonymous writer.
pub fn own_device(writer: &Writer) -> Result<&str, IngestError> {
    writer.device_id().ok_or_else(|| {
        IngestError::Forbidden("commands are a device's own: send the device's token".into())
    })
}

/// `wait`: 0 to `max` seconds (60 unless configured lower), 30 (or `max`) when absent.
fn wait_of(req: &HttpRequest, max: u64) -> Result<Duration, IngestError> {
    let max = max.min(MAX_WAIT_SECS);
    let invalid = || {
        IngestError::Invalid(ValidationError::new(
            "wait",
            format!("must be a whole number of seconds from 0 to {max}"),
        ))
    };
    let query = web::Query::<HashMap<String, String>>::from_query(req.query_string())
        .map_err(|_| invalid())?;
    let secs = match query.get("wait") {
        None => DEFAULT_WAIT_SECS.min(max),
        Some(text) => text
            .parse::<u64>()
            .ok()
            .filter(|s| *s <= max)
            .ok_or_else(invalid)?,
    };
    Ok(Duration::from_secs(secs))
}

/// What a device receives (`models::DeviceCommand`).
#[derive(ToSchema, Serialize)]
#[allow(
    dead_code,
    reason = "describes the body for OpenAPI; the answer is a models::DeviceCommand"
)]
struct CommandOut {
    /// The command's id (a UUIDv7): act on it once, answer with it.
    id: String,
    name: String,
    /// The app's arguments, any JSON.
    args: serde_json::Value,
    /// Never act on it past this.
    #[schema(format = DateTime)]
    expires_at: String,
}

/// A device's answer to a command.
#[derive(ToSchema, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(
    dead_code,
    reason = "describes the body for OpenAPI; parsing is models::parse_command_answer"
)]
struct AnswerIn {
    /// `succeeded` or `failed`.
    #[schema(pattern = "^(succeeded|failed)$")]
    status: String,
    /// What the device has to say, any JSON (at most 8 KiB with its envelope).
    result: Option<serde_json::Value>,
}

#[derive(Serialize, ToSchema)]
struct AnswerAccepted {
    #[schema(example = "accepted")]
    status: &'static str,
}

/// The device's next command, waiting up to `wait` seconds for one.
///
/// Delivery is at least once: act on a command id once. The same command comes again until it is
/// answered (or expires).
#[utoipa::path(
    tag = "commands",
    params(("wait" = Option<u64>, Query, minimum = 0, maximum = 60,
        description = "Seconds to wait for a command when none is due (0-60, default 30; a service may be configured with a lower maximum)")),
    responses(
        (status = 200, description = "The device's next command", body = CommandOut),
        (status = 204, description = "No command within `wait`: ask again"),
        (status = 400, description = "`wait` is not 0-60 (or above the service's configured maximum)", body = service_kit::ErrorBody),
        (status = 403, description = "Not a device token", body = service_kit::ErrorBody),
        (status = 503, description = "RabbitMQ or PostgreSQL unavailable; no command was handed out. Retry after `Retry-After` seconds", body = service_kit::ErrorBody),
    )
)]
#[get("/v1/commands/next")]
async fn next_command(
    req: HttpRequest,
    writer: web::ReqData<Writer>,
    state: web::Data<IngestState>,
) -> Result<HttpResponse, IngestError> {
    let endpoint = NEXT;
    let client = state.trusted_proxies.client_addr(&req);
    let result = async {
        let device = own_device(&writer)?;
        state
            .rate_limit
            .check(device)
            .map_err(IngestError::RateLimited)?;
        let desk = &state.commands;
        let wait = wait_of(&req, desk.max_wait_secs)?;
        // subscribed before reading: a command issued meanwhile is not missed
        let mut subscription = desk.router.subscribe(device).await?;
        let due = desk
            .due(device, DUE_LOOKED_AT)
            .await?
            .into_iter()
            .find(|c| desk.may_hand(device, &c.id));
        let mut stopping = state.stopping.clone();
        let command = match due {
            Some(command) => Some(command),
            None => tokio::select! {
                command = tokio::time::timeout(wait, async {
                    while let Some(command) = subscription.next().await {
                        if desk.may_hand(device, &command.id) {
                            return Some(command);
                        }
                    }
                    None
                }) => command.ok().flatten(),
                // stopping: no command, and the device asks again (another replica)
                _ = stopping.wait_for(|s| *s) => None,
            },
        };
        drop(subscription);
        let Some(command) = command else {
            return Ok(None);
        };
        desk.report_sent(device, &command.id, Channel::LongPoll)
            .await?;
        desk.handed_out(device, &command.id);
        Ok(Some(command))
    }
    .await;
    match result {
        Ok(Some(command)) => {
            state
                .audit
                .command(endpoint, &writer, client, &command.id, "sent");
            Ok(HttpResponse::Ok().json(command))
        }
        Ok(None) => Ok(HttpResponse::NoContent().finish()),
        Err(error) => {
            state.record_refusal(endpoint, Some(&writer), client, &error);
            Err(error)
        }
    }
}

/// The device's answer to one of its commands.
#[utoipa::path(
    tag = "commands",
    params(("id" = String, Path, description = "The command's id")),
    request_body(content = AnswerIn, content_type = "application/json"),
    responses(
        (status = 202, description = "RabbitMQ has the answer; the command's status follows", body = AnswerAccepted),
        (status = 400, description = "Not a valid answer (`field` names what is wrong)", body = service_kit::ErrorBody),
        (status = 403, description = "Not a device token, or another device's command", body = service_kit::ErrorBody),
        (status = 404, description = "No such command", body = service_kit::ErrorBody),
        (status = 408, description = "The body took longer than `HTTP_BODY_TIMEOUT_MS` to arrive", body = service_kit::ErrorBody),
        (status = 409, description = "The command is finished already (answered, cancelled) or expired: the message says which", body = service_kit::ErrorBody),
        (status = 413, description = "The body is larger than `MAX_BODY_BYTES`", body = service_kit::ErrorBody),
        (status = 415, description = "A Content-Type other than JSON", body = service_kit::ErrorBody),
        (status = 503, description = "RabbitMQ or PostgreSQL unavailable; not accepted, retry after `Retry-After` seconds", body = service_kit::ErrorBody),
    )
)]
#[post("/v1/commands/{id}/result")]
async fn post_result(
    req: HttpRequest,
    id: web::Path<String>,
    writer: web::ReqData<Writer>,
    payload: web::Payload,
    state: web::Data<IngestState>,
) -> Result<HttpResponse, IngestError> {
    let endpoint = RESULT;
    let client = state.trusted_proxies.client_addr(&req);
    let result = async {
        let device = own_device(&writer)?;
        state
            .rate_limit
            .check(device)
            .map_err(IngestError::RateLimited)?;
        let body = state.json_body(&req, payload).await?;
        state
            .commands
            .answer(device, &id, &body, Channel::LongPoll)
            .await
    }
    .await;
    match result {
        Ok(outcome) => {
            state
                .audit
                .command(endpoint, &writer, client, &id, outcome.as_str());
            Ok(HttpResponse::Accepted().json(AnswerAccepted { status: "accepted" }))
        }
        Err(error) => {
            state.record_refusal(endpoint, Some(&writer), client, &error);
            Err(error)
        }
    }
}

/// The routes' labels (see `api::ENDPOINTS`).
pub const NEXT: &str = "/v1/commands/next";
pub const RESULT: &str = "/v1/commands/{id}/result";

pub fn routes(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(next_command)
        .service(post_result)
        .service(crate::ws::websocket);
}
