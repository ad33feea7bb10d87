//! The way to the server, whichever the transport: readings sent in batches and commands'
//! answers, over HTTP (ingest-http) or MQTT (the broker, then ingest-mqtt). The sender and the
//! commands loop hold a [`Link`] and do not care which.

use std::time::Duration;

use serde_json::{Value, json};

use crate::http::Server;
use crate::mqtt::Mqtt;
use crate::outbox::Pending;

/// What became of a batch of readings.
#[derive(Debug)]
pub enum Sent {
    /// The server has them (HTTP 2xx, MQTT PUBACK: RabbitMQ confirmed); they may leave the outbox.
    Stored,
    /// Something in the batch can never be stored: the server's message (HTTP 400), or what the
    /// agent's own check found (MQTT, see [`Mqtt::send`]).
    Refused(String),
    /// The batch is too big for the server's body limit (413) or the broker's packet limit.
    TooLarge,
    /// Anything else (the network, 5xx, 503, 429, a refused token, no PUBACK in time): try again
    /// later, not before `retry_after` if the server said.
    Failed {
        error: String,
        retry_after: Option<Duration>,
    },
}

/// What became of a command's answer.
#[derive(Debug)]
pub enum Answered {
    /// 2xx, or a 4xx that says the server will never take it (finished, expired, unknown), or
    /// the broker's PUBACK: either way there is nothing more to send.
    Done,
    Failed(String),
}

/// The server, by the configured transport.
#[derive(Clone)]
pub enum Link {
    Http(Server),
    Mqtt(Mqtt),
}

impl Link {
    /// Sends `batch` as one request or message, its outcome within `timeout`.
    pub async fn send(&self, batch: &[Pending], timeout: Duration) -> Sent {
        match self {
            Link::Http(server) => server.send(batch, timeout).await,
            Link::Mqtt(mqtt) => mqtt.send(batch, timeout).await,
        }
    }

    /// Resolves when a connection that was lost is back (MQTT); never over HTTP, which has no
    /// connection to wait for.
    pub async fn reconnected(&self) {
        match self {
            Link::Http(_) => std::future::pending().await,
            Link::Mqtt(mqtt) => mqtt.reconnected().await,
        }
    }

    /// Answers command `id`.
    pub async fn answer(
        &self,
        id: &str,
        status: &str,
        result: &Value,
        timeout: Duration,
    ) -> Answered {
        match self {
            Link::Http(server) => server.answer(id, status, result, timeout).await,
            Link::Mqtt(mqtt) => mqtt.answer(id, status, result, timeout).await,
        }
    }
}

/// A batch as `POST /v1/readings` and `devices/<id>/readings` take it: `[{"id", "ts",
/// "metrics"}]`, with `device_id` where given (MQTT leaves it out: the topic says it).
pub fn readings_body(batch: &[Pending], device_id: Option<&str>) -> Value {
    Value::Array(
        batch
            .iter()
            .map(|r| {
                let mut reading = json!({
                    "id": r.id,
                    "ts": r.ts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    "metrics": r.metrics,
                });
                if let (Some(device), Some(fields)) = (device_id, reading.as_object_mut()) {
                    fields.insert("device_id".to_owned(), json!(device));
                }
                reading
            })
            .collect(),
    )
}

/// A command's answer: `{"status", "result"}`.
pub fn answer_body(status: &str, result: &Value) -> Value {
    json!({"status": status, "result": result})
}
