//! Talking to ingest-http: `POST /v1/readings` for readings, `GET /v1/commands/next` (long-poll)
//! and `POST /v1/commands/{id}/result` for commands, all with the device's token, over HTTP or
//! HTTPS (rustls; the system's root certificates, and `server.ca_file` for a private CA).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use models::DeviceCommand;
use serde_json::{Value, json};

use crate::config::Config;
use crate::error::Error;
use crate::link::{Answered, Sent, readings_body};
use crate::outbox::Pending;

type Https = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A response: its status, headers and whole body.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Clone)]
pub struct Server {
    client: Https,
    base: String,
    authorization: HeaderValue,
    device_id: String,
}

impl Server {
    pub fn new(config: &Config) -> Result<Self, Error> {
        let tls = crate::tls::client_config(config)?;
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(50))
            .build(connector);
        let authorization = HeaderValue::from_str(&format!("Bearer {}", config.token()?))
            .map_err(|_| Error::Config("the token holds characters a header cannot".to_owned()))?;
        Ok(Self {
            client,
            base: config.base_url().to_owned(),
            authorization,
            device_id: config.device_id.clone(),
        })
    }

    /// One request with the token, its whole answer within `timeout`.
    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Answer, String> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(header::AUTHORIZATION, self.authorization.clone())
            .header(
                header::USER_AGENT,
                concat!("sensorhub-agent/", env!("CARGO_PKG_VERSION")),
            );
        let body = match body {
            Some(body) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(body.to_string())
            }
            None => Bytes::new(),
        };
        let request = request.body(Full::new(body)).map_err(|e| e.to_string())?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| describe(&e))?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await.map_err(|e| describe(&e))?.to_bytes();
            Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("no answer within {}", humantime::format_duration(timeout)))?
    }

    /// Sends `batch` in one request, within `timeout`.
    pub async fn send(&self, batch: &[Pending], timeout: Duration) -> Sent {
        let body = readings_body(batch, Some(&self.device_id));
        let answer = match self
            .request(Method::POST, "/v1/readings", Some(&body), timeout)
            .await
        {
            Ok(answer) => answer,
            Err(error) => {
                return Sent::Failed {
                    error,
                    retry_after: None,
                };
            }
        };
        let status = answer.status;
        if status.is_success() {
            return Sent::Stored;
        }
        let retry_after = retry_after(&answer.headers);
        let message = message_of(&answer.body);
        match status {
            StatusCode::BAD_REQUEST => Sent::Refused(message),
            StatusCode::PAYLOAD_TOO_LARGE => Sent::TooLarge,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Sent::Failed {
                error: format!(
                    "{status}: the server refused the device's token ({message}); check token_file and device_id"
                ),
                retry_after,
            },
            _ => Sent::Failed {
                error: format!("{status}: {message}"),
                retry_after,
            },
        }
    }

    /// `POST /v1/readings` with an empty batch, which stores nothing: the status says whether
    /// the server is there and takes the token (`check`).
    pub async fn probe(&self, timeout: Duration) -> Result<u16, String> {
        self.request(Method::POST, "/v1/readings", Some(&json!([])), timeout)
            .await
            .map(|a| a.status.as_u16())
    }

    /// Waits up to `wait` for the next command due to this device.
    pub async fn next_command(
        &self,
        wait: Duration,
        timeout: Duration,
    ) -> Result<Option<DeviceCommand>, (String, Option<Duration>)> {
        let answer = self
            .request(
                Method::GET,
                &format!("/v1/commands/next?wait={}", wait.as_secs()),
                None,
                wait + timeout,
            )
            .await
            .map_err(|e| (e, None))?;
        if answer.status == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        if !answer.status.is_success() {
            return Err((
                format!("{}: {}", answer.status, message_of(&answer.body)),
                retry_after(&answer.headers),
            ));
        }
        DeviceCommand::decode(&answer.body)
            .map(Some)
            .map_err(|e| (format!("a command that is not one: {e}"), None))
    }

    /// Answers command `id`.
    pub async fn answer(
        &self,
        id: &str,
        status: &str,
        result: &Value,
        timeout: Duration,
    ) -> Answered {
        let body = crate::link::answer_body(status, result);
        match self
            .request(
                Method::POST,
                &format!("/v1/commands/{id}/result"),
                Some(&body),
                timeout,
            )
            .await
        {
            Ok(a) if a.status.is_success() => Answered::Done,
            // finished, expired or cancelled (409), unknown (404): the server will never want it
            Ok(a) if matches!(a.status, StatusCode::CONFLICT | StatusCode::NOT_FOUND) => {
                Answered::Done
            }
            Ok(a) => Answered::Failed(format!("{}: {}", a.status, message_of(&a.body))),
            Err(e) => Answered::Failed(e),
        }
    }
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s.min(300)))
}

/// The server's `message` (its error shape), or the body's start.
fn message_of(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(200).collect())
}

/// An error with its causes (hyper's own says only "client error (Connect)").
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
