//! A device's WebSocket (`GET /v1/ws`): its commands pushed as they come, its answers and its
//! readings taken on the same connection, each acknowledged only once RabbitMQ confirmed it.
//!
//! The device authenticates with its token in the `Authorization: Bearer` header; a client that
//! cannot set headers (a browser) offers the subprotocol `sensorhub.bearer.<token>` (echoed back),
//! or sends `{"type":"auth","token":"..."}` as its first frame within 10 seconds.
//!
//! Frames, all JSON text:
//!
//! ```text
//! server → device  {"type":"command","id","name","args","expires_at"}
//!                  {"type":"ack","id":"<command>"}          an answer, confirmed by RabbitMQ
//!                  {"type":"ack","ref":<ref>}               readings, confirmed by RabbitMQ
//!                  {"type":"error","id"|"ref":...,"error":"<code>","message":"...","field"?}
//! device → server  {"type":"auth","token":"..."}            first frame, without another credential
//!                  {"type":"result","id":"<command>","status":"succeeded"|"failed","result":...}
//!                  {"type":"readings","ref":<ref>,"readings":<the body of POST /v1/readings>}
//! ```
//!
//! Commands due when the socket opens are sent at once; later ones as the persister publishes them.
//! A command is written once per socket (a re-send by the persister is not written again on the
//! same connection); a device that reconnects gets again whatever it has not answered, so it acts on
//! a command id once.
//!
//! The server pings every 20 s and closes a socket it has heard nothing from (no frame, no pong)
//! for 60 s. A frame is at most `max_body_bytes`. Through the replica's command router, a command
//! reaches whichever replica holds the device's socket.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, get, web};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, Session};
use models::{Channel, DeviceCommand, TimeWindow};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::api::IngestState;
use crate::commands::own_device;
use crate::device_auth::Writer;
use crate::error::IngestError;
use crate::metrics::EndpointLabels;

/// The route, as a metric and audit label.
pub const ROUTE: &str = "/v1/ws";
/// The subprotocol that carries a token: `sensorhub.bearer.<token>`.
pub const BEARER_PROTOCOL: &str = "sensorhub.bearer.";
/// A socket without another credential must authenticate within this.
const AUTH_WITHIN: Duration = Duration::from_secs(10);
const PING_EVERY: Duration = Duration::from_secs(20);
/// A socket silent (no frame, no pong) this long is closed.
const SILENT_FOR: Duration = Duration::from_secs(60);
/// Answers and readings of one socket awaiting RabbitMQ at once; past this, its frames wait.
const IN_FLIGHT: usize = 32;
/// The most commands a new socket is handed at once (query-api bounds a device's open ones).
const DUE_ON_CONNECT: i64 = 100;
/// The command ids a socket remembers having sent (past this, it forgets them all).
const REMEMBERED: usize = 1024;

/// How the device's token came.
enum Credential {
    /// A header or the subprotocol (`Some`: the protocol to echo), checked before the upgrade.
    Admitted(Writer, Option<String>),
    /// Nothing yet: the first frame must carry it.
    FirstFrame,
}

/// A device's WebSocket: commands pushed, answers and readings taken.
#[utoipa::path(
    tag = "commands",
    params(
        ("Sec-WebSocket-Protocol" = Option<String>, Header,
            description = "`sensorhub.bearer.<token>` for clients that cannot set `Authorization` (echoed back); or send `{\"type\":\"auth\",\"token\":\"...\"}` first, within 10 s"),
    ),
    responses(
        (status = 101, description = "Switched to the WebSocket protocol: JSON text frames, see the service's documentation"),
        (status = 400, description = "Not a WebSocket handshake", body = service_kit::ErrorBody),
        (status = 403, description = "Not a device token", body = service_kit::ErrorBody),
        (status = 503, description = "Commands cannot be routed now (RabbitMQ); connect again after `Retry-After` seconds", body = service_kit::ErrorBody),
    )
)]
#[get("/v1/ws")]
pub(crate) async fn websocket(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<IngestState>,
) -> Result<HttpResponse, IngestError> {
    let client = state.trusted_proxies.client_addr(&req);
    let credential = match credential(&req, &state).await {
        Ok(credential) => credential,
        Err(error) => {
            if error.is_refusal() {
                state.refusals.record(client);
            }
            state.record_refusal(ROUTE, None, client, &error);
            return Err(error);
        }
    };
    let protocol = match &credential {
        Credential::Admitted(_, Some(protocol)) => vec![protocol.as_str()],
        _ => Vec::new(),
    };
    let (response, session, stream) = actix_ws::handle_with_protocols(&req, body, &protocol)
        .map_err(|e| IngestError::Body(format!("not a WebSocket handshake: {e}")))?;
    let stream = stream
        .max_frame_size(state.max_body_bytes)
        .aggregate_continuations()
        .max_continuation_size(state.max_body_bytes);
    let socket = Socket {
        state: state.into_inner(),
        session,
        client,
        in_flight: Arc::new(Semaphore::new(IN_FLIGHT)),
        sent: HashSet::new(),
    };
    actix_web::rt::spawn(socket.run(credential, stream));
    Ok(response)
}

/// The device's credential from the handshake: the `Authorization` header, else the bearer
/// subprotocol; with neither, a WebSocket handshake authenticates with its first frame, and
/// anything else is refused as every route refuses a request without a token.
async fn credential(req: &HttpRequest, state: &IngestState) -> Result<Credential, IngestError> {
    state
        .refusals
        .check(state.trusted_proxies.client_addr(req))
        .map_err(IngestError::RateLimited)?;
    if req.headers().contains_key(header::AUTHORIZATION) {
        let writer = state.authenticator.authenticate(req).await?;
        own_device(&writer)?;
        return Ok(Credential::Admitted(writer, None));
    }
    let offered = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|p| p.starts_with(BEARER_PROTOCOL));
    if let Some(protocol) = offered {
        let token = &protocol[BEARER_PROTOCOL.len()..];
        let writer = state.authenticator.admit_token(token).await?;
        return Ok(Credential::Admitted(writer, Some(protocol.to_owned())));
    }
    if req.headers().contains_key(header::UPGRADE) {
        return Ok(Credential::FirstFrame);
    }
    // not a WebSocket handshake, and no token: what any route answers (401; in development, an
    // anonymous writer, who has no commands)
    let writer = state.authenticator.authenticate(req).await?;
    own_device(&writer)?;
    Ok(Credential::Admitted(writer, None))
}

struct Socket {
    state: Arc<IngestState>,
    session: Session,
    client: Option<std::net::IpAddr>,
    in_flight: Arc<Semaphore>,
    /// The commands written to this socket: one the persister publishes again (or that was due at
    /// connect and published meanwhile) is not written twice on the same connection. A new socket
    /// starts afresh, so a device that reconnects gets what it has not answered.
    sent: HashSet<String>,
}

/// Why a socket ends.
enum Ended {
    /// The device closed it, or the connection is gone.
    Gone,
    /// We close it, saying why.
    Close(CloseCode, String),
}

impl Socket {
    async fn run(mut self, credential: Credential, mut stream: actix_ws::AggregatedMessageStream) {
        let ended = self.serve(credential, &mut stream).await;
        if let Ended::Close(code, description) = ended {
            let reason = CloseReason {
                code,
                description: Some(description),
            };
            let _ = self.session.close(Some(reason)).await;
        }
    }

    async fn serve(
        &mut self,
        credential: Credential,
        stream: &mut actix_ws::AggregatedMessageStream,
    ) -> Ended {
        let writer = match credential {
            Credential::Admitted(writer, _) => writer,
            Credential::FirstFrame => match self.authenticate(stream).await {
                Ok(writer) => writer,
                Err(ended) => return ended,
            },
        };
        let Some(device) = writer.device_id().map(str::to_owned) else {
            return self
                .refuse(
                    None,
                    IngestError::Forbidden("a device token is required".into()),
                )
                .await;
        };
        let desk = &self.state.commands;
        // subscribed before reading what is due: a command issued meanwhile is not missed
        let mut subscription = match desk.router.subscribe(&device).await {
            Ok(subscription) => subscription,
            Err(e) => return self.refuse(Some(&writer), e.into()).await,
        };
        let due = match desk.due(&device, DUE_ON_CONNECT).await {
            Ok(due) => due,
            Err(e) => return self.refuse(Some(&writer), e).await,
        };
        for command in due {
            if !self.send_command(&writer, &device, &command).await {
                return Ended::Gone;
            }
        }
        let mut stopping = self.state.stopping.clone();
        let mut heard = Instant::now();
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
        loop {
            tokio::select! {
                command = subscription.next() => match command {
                    Some(command) => {
                        if !self.send_command(&writer, &device, &command).await {
                            return Ended::Gone;
                        }
                    }
                    None => return Ended::Close(CloseCode::Restart, "the service is stopping".into()),
                },
                frame = stream.recv() => {
                    heard = Instant::now();
                    match frame {
                        Some(Ok(AggregatedMessage::Text(text))) => {
                            self.frame(&writer, &device, text.as_bytes()).await;
                        }
                        Some(Ok(AggregatedMessage::Binary(_))) => {
                            let error = IngestError::Body("frames are JSON text".into());
                            self.reply_error(&writer, None, &error).await;
                        }
                        Some(Ok(AggregatedMessage::Ping(bytes))) => {
                            if self.session.pong(&bytes).await.is_err() {
                                return Ended::Gone;
                            }
                        }
                        Some(Ok(AggregatedMessage::Pong(_))) => {}
                        Some(Ok(AggregatedMessage::Close(_))) | None => {
                            return Ended::Close(CloseCode::Normal, "bye".into());
                        }
                        Some(Err(e)) => {
                            // too large a frame, or not the WebSocket protocol
                            let error = IngestError::Body(e.to_string());
                            self.count_refusal(Some(&writer), &error);
                            return Ended::Close(CloseCode::Size, error.to_string());
                        }
                    }
                }
                _ = stopping.wait_for(|s| *s) => {
                    return Ended::Close(CloseCode::Restart, "the service is stopping".into());
                }
                _ = ping.tick() => {
                    if heard.elapsed() >= SILENT_FOR {
                        return Ended::Close(CloseCode::Away, "nothing heard for 60 s".into());
                    }
                    if self.session.ping(b"").await.is_err() {
                        return Ended::Gone;
                    }
                }
            }
        }
    }

    /// The first frame's `{"type":"auth","token"}`, within [`AUTH_WITHIN`].
    async fn authenticate(
        &mut self,
        stream: &mut actix_ws::AggregatedMessageStream,
    ) -> Result<Writer, Ended> {
        let first = tokio::time::timeout(AUTH_WITHIN, async {
            loop {
                match stream.recv().await {
                    Some(Ok(AggregatedMessage::Text(text))) => return Some(text),
                    Some(Ok(AggregatedMessage::Ping(_) | AggregatedMessage::Pong(_))) => {}
                    _ => return None,
                }
            }
        })
        .await;
        let text = match first {
            Ok(Some(text)) => text,
            Ok(None) => return Err(Ended::Gone),
            Err(_) => {
                let error = IngestError::Unauthorized {
                    reason: "authenticate within 10 s: {\"type\":\"auth\",\"token\":\"...\"}"
                        .into(),
                    token_sent: false,
                };
                return Err(self.refuse(None, error).await);
            }
        };
        let frame: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let token = match (frame["type"].as_str(), frame["token"].as_str()) {
            (Some("auth"), Some(token)) => token,
            _ => {
                let error = IngestError::Unauthorized {
                    reason: "the first frame must be {\"type\":\"auth\",\"token\":\"...\"}".into(),
                    token_sent: false,
                };
                return Err(self.refuse(None, error).await);
            }
        };
        match self.state.authenticator.admit_token(token).await {
            Ok(writer) => Ok(writer),
            Err(error) => Err(self.refuse(None, error).await),
        }
    }

    /// Sends a command, then reports it sent (a report that fails is logged: the command stays
    /// due, and is sent again).
    async fn send_command(
        &mut self,
        writer: &Writer,
        device: &str,
        command: &DeviceCommand,
    ) -> bool {
        if self.sent.len() >= REMEMBERED {
            self.sent.clear();
        }
        if !self.sent.insert(command.id.clone()) {
            return true;
        }
        let mut frame = serde_json::to_value(command).unwrap_or(Value::Null);
        if let Value::Object(map) = &mut frame {
            map.insert("type".into(), json!("command"));
        }
        if self.session.text(frame.to_string()).await.is_err() {
            return false;
        }
        match self
            .state
            .commands
            .report_sent(device, &command.id, Channel::Websocket)
            .await
        {
            Ok(()) => {
                self.state
                    .audit
                    .command(ROUTE, writer, self.client, &command.id, "sent");
            }
            Err(e) => {
                tracing::warn!(device, command = %command.id, error = %e, "a command's sent report was not confirmed");
            }
        }
        true
    }

    /// One frame of the device's: an answer or readings, handled in a task of its own (at most
    /// [`IN_FLIGHT`] at once) that acknowledges it once RabbitMQ confirmed it.
    async fn frame(&mut self, writer: &Writer, device: &str, text: &[u8]) {
        let frame: Value = match serde_json::from_slice(text) {
            Ok(frame) => frame,
            Err(e) => {
                let error = IngestError::Invalid(models::ValidationError::new(
                    "frame",
                    format!("not JSON: {e}"),
                ));
                return self.reply_error(writer, None, &error).await;
            }
        };
        let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
            return;
        };
        let task = FrameTask {
            state: self.state.clone(),
            session: self.session.clone(),
            writer: writer.clone(),
            device: device.to_owned(),
            client: self.client,
        };
        actix_web::rt::spawn(async move {
            task.handle(frame).await;
            drop(permit);
        });
    }

    async fn refuse(&mut self, writer: Option<&Writer>, error: IngestError) -> Ended {
        if error.is_refusal() {
            self.state.refusals.record(self.client);
        }
        self.count_refusal(writer, &error);
        let _ = self
            .session
            .text(error_frame(None, &error).to_string())
            .await;
        let code = match error {
            IngestError::Unauthorized { .. } | IngestError::Forbidden(_) => CloseCode::Policy,
            _ => CloseCode::Again,
        };
        Ended::Close(code, error.kind().to_owned())
    }

    async fn reply_error(
        &mut self,
        writer: &Writer,
        key: Option<(&str, Value)>,
        error: &IngestError,
    ) {
        self.count_refusal(Some(writer), error);
        let _ = self.session.text(error_frame(key, error).to_string()).await;
    }

    fn count_refusal(&self, writer: Option<&Writer>, error: &IngestError) {
        self.state.record_refusal(ROUTE, writer, self.client, error);
    }
}

/// What one frame needs, moved into its task.
struct FrameTask {
    state: Arc<IngestState>,
    session: Session,
    writer: Writer,
    device: String,
    client: Option<std::net::IpAddr>,
}

impl FrameTask {
    async fn handle(mut self, frame: Value) {
        let (key, outcome) = match frame["type"].as_str() {
            Some("result") => {
                let id = frame["id"].clone();
                (Some(("id", id)), self.answer(&frame).await)
            }
            Some("readings") => {
                let reference = frame["ref"].clone();
                (Some(("ref", reference)), self.readings(&frame).await)
            }
            Some("auth") => (None, Err(IngestError::Body("already authenticated".into()))),
            _ => (
                None,
                Err(IngestError::Body(
                    "unknown frame: \"type\" must be \"result\" or \"readings\"".into(),
                )),
            ),
        };
        let reply = match (outcome, key) {
            (Ok(()), Some((name, value))) => json!({"type": "ack", name: value}),
            (Ok(()), None) => return,
            (Err(error), key) => {
                self.state
                    .record_refusal(ROUTE, Some(&self.writer), self.client, &error);
                error_frame(key, &error)
            }
        };
        let _ = self.session.text(reply.to_string()).await;
    }

    /// `{"type":"result","id","status","result"}`: checked and reported as `POST
    /// /v1/commands/{id}/result` does.
    async fn answer(&self, frame: &Value) -> Result<(), IngestError> {
        let id = frame["id"].as_str().ok_or_else(|| {
            IngestError::Invalid(models::ValidationError::new(
                "id",
                "the command's id is required (a string)",
            ))
        })?;
        self.state
            .rate_limit
            .check(&self.device)
            .map_err(IngestError::RateLimited)?;
        let mut answer = serde_json::Map::new();
        for field in ["status", "result"] {
            if let Some(value) = frame.get(field) {
                answer.insert(field.into(), value.clone());
            }
        }
        let body = serde_json::to_vec(&answer).unwrap_or_default();
        let outcome = self
            .state
            .commands
            .answer(&self.device, id, &body, Channel::Websocket)
            .await?;
        self.state
            .audit
            .command(ROUTE, &self.writer, self.client, id, outcome.as_str());
        Ok(())
    }

    /// `{"type":"readings","ref","readings"}`: checked and published as `POST /v1/readings` does.
    async fn readings(&self, frame: &Value) -> Result<(), IngestError> {
        self.state
            .rate_limit
            .check(&self.device)
            .map_err(IngestError::RateLimited)?;
        let body = serde_json::to_vec(&frame["readings"]).unwrap_or_default();
        let window = TimeWindow::new(chrono::Utc::now(), self.state.backfill_horizon);
        let readings = models::parse_readings_body(&body, window)?;
        let batch = crate::api::publish_own(&self.state, Some(&self.device), readings).await?;
        self.state
            .metrics
            .readings_accepted
            .get_or_create(&EndpointLabels { endpoint: ROUTE })
            .inc_by(batch.readings as u64);
        self.state
            .audit
            .accepted(ROUTE, &self.writer, self.client, batch);
        Ok(())
    }
}

/// `{"type":"error", "id"|"ref": ..., "error": <code>, "message": ..., "field"?}`.
fn error_frame(key: Option<(&str, Value)>, error: &IngestError) -> Value {
    let mut frame = json!({"type": "error", "error": error.kind(), "message": error.to_string()});
    if let Some((name, value)) = key {
        frame[name] = value;
    }
    if let IngestError::Invalid(invalid) = error {
        frame["field"] = json!(invalid.field);
        frame["message"] = json!(invalid.reason);
    }
    frame
}
