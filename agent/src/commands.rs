//! Commands from the server: long-polled over HTTP or received over MQTT, each run once by the
//! handler configured for its name (a program given the args as JSON on stdin), its exit status
//! and output sent back as the answer (by HTTP POST, or MQTT publish: the [`Link`]).
//!
//! The server sends a command at least once (again every 30 s until it is answered), so the
//! outbox remembers every command id it has seen: a repeat is answered with the first outcome,
//! never run again. A command is recorded *before* its handler starts, so one interrupted by a
//! crash is answered `failed` after the restart rather than run twice: for a device that moves
//! things, at most once is the safe side.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use models::{DeviceCommand, MAX_ANSWER_BYTES};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::config::Handler;
use crate::http::Server;
use crate::link::{Answered, Link};
use crate::{Shared, lock};

/// How long one long-poll waits for a command.
const POLL_WAIT: Duration = Duration::from_secs(30);
/// Over MQTT, with no command arriving, how often answers not yet acknowledged are sent again.
const ANSWER_AGAIN: Duration = Duration::from_secs(5);
/// The most of a handler's stdout kept in its answer (the answer is at most 8 KiB).
const OUTPUT_KEPT: usize = 4096;

pub struct Commands {
    /// Where answers go.
    pub link: Link,
    pub outbox: Shared,
    pub handlers: BTreeMap<String, Handler>,
    pub device_id: String,
    pub timeout: Duration,
    pub backoff_max: Duration,
}

impl Commands {
    /// Over HTTP: long-polls `server` for the next command, for ever.
    pub async fn poll(self, server: Server) {
        let mut backoff = self.backoff();
        let mut failing = false;
        loop {
            self.answer_unanswered().await;
            match server.next_command(POLL_WAIT, self.timeout).await {
                Ok(next) => {
                    if failing {
                        tracing::info!("commands can be fetched again");
                        failing = false;
                    }
                    backoff = self.backoff();
                    if let Some(command) = next {
                        self.act_on(command).await;
                    }
                }
                Err((error, retry_after)) => {
                    if !failing {
                        tracing::warn!(%error, "commands cannot be fetched now; trying again with backoff");
                        failing = true;
                    }
                    let wait = backoff.next().unwrap_or(self.backoff_max);
                    tokio::time::sleep(retry_after.map_or(wait, |r| r.max(wait))).await;
                }
            }
        }
    }

    /// Over MQTT: acts on each command the connection received, for ever; answers that could
    /// not be sent go again every few seconds meanwhile.
    pub async fn receive(self, mut incoming: mpsc::Receiver<DeviceCommand>) {
        loop {
            self.answer_unanswered().await;
            match tokio::time::timeout(ANSWER_AGAIN, incoming.recv()).await {
                // the broker keeps a command in the session for as long as the Pi is away, past
                // its expiry too (ingest-http's long-poll never hands out an expired one)
                Ok(Some(command)) if !command.is_live(chrono::Utc::now()) => {
                    tracing::warn!(id = %command.id, name = %command.name, expired = %command.expires_at, "a command that expired before it arrived: not run");
                }
                Ok(Some(command)) => self.act_on(command).await,
                Ok(None) => {
                    // the connection's task is gone: nothing more can arrive
                    tracing::error!("the MQTT connection's task stopped; no more commands");
                    return;
                }
                Err(_) => {}
            }
        }
    }

    fn backoff(&self) -> backon::ExponentialBackoff {
        crate::backoff(Duration::from_secs(1), self.backoff_max)
    }

    /// Runs `command` unless it was seen before, then answers it.
    async fn act_on(&self, command: DeviceCommand) {
        let known = match lock(&self.outbox).command(&command.id) {
            Ok(known) => known,
            Err(e) => {
                // not knowing whether it ran, it is not run: the server sends it again
                tracing::error!(error = %e, id = %command.id, "the outbox cannot be read");
                return;
            }
        };
        match known {
            None => self.run_once(&command).await,
            Some(record) if record.status == "running" => {
                let result = json!({"error": "the agent stopped while the handler ran; it is not run again"});
                tracing::warn!(id = %command.id, name = %command.name, "a command interrupted by a restart: answered failed");
                self.finish(&command.id, "failed", &result);
            }
            // a repeat: answered below with the first outcome
            Some(_) => tracing::debug!(id = %command.id, "a command seen before"),
        }
        self.answer_unanswered().await;
    }

    async fn run_once(&self, command: &DeviceCommand) {
        if let Err(e) = lock(&self.outbox).command_started(&command.id, &command.name) {
            tracing::error!(error = %e, id = %command.id, "the outbox cannot be written; the command is not run");
            return;
        }
        let (status, result) = match self.handlers.get(&command.name) {
            Some(handler) => run_handler(handler, command, &self.device_id).await,
            None => (
                "failed",
                json!({"error": format!("this device has no handler for {:?}", command.name)}),
            ),
        };
        tracing::info!(id = %command.id, name = %command.name, status, "command done");
        self.finish(&command.id, status, &result);
    }

    fn finish(&self, id: &str, status: &str, result: &Value) {
        if let Err(e) = lock(&self.outbox).command_finished(id, status, result) {
            tracing::error!(error = %e, %id, "the outbox cannot be written");
        }
    }

    /// Sends every outcome the server has not acknowledged yet.
    async fn answer_unanswered(&self) {
        let unanswered = match lock(&self.outbox).unanswered() {
            Ok(unanswered) => unanswered,
            Err(e) => {
                tracing::error!(error = %e, "the outbox cannot be read");
                return;
            }
        };
        for (id, status, result) in unanswered {
            match self.link.answer(&id, &status, &result, self.timeout).await {
                Answered::Done => {
                    if let Err(e) = lock(&self.outbox).command_answered(&id) {
                        tracing::error!(error = %e, %id, "the outbox cannot be written");
                    }
                }
                Answered::Failed(error) => {
                    tracing::warn!(%id, %error, "a command's answer cannot be sent now; it will be again");
                    return;
                }
            }
        }
    }
}

/// Runs `handler` for `command`: args as JSON on stdin; exit 0 is `succeeded`, with stdout as
/// the result (its JSON if it is JSON, else `{"output": text}`); anything else is `failed`.
async fn run_handler(
    handler: &Handler,
    command: &DeviceCommand,
    device_id: &str,
) -> (&'static str, Value) {
    let Some((program, args)) = handler.run.split_first() else {
        return ("failed", json!({"error": "the handler names no program"}));
    };
    let child = tokio::process::Command::new(program)
        .args(args)
        .env("SENSORHUB_COMMAND_ID", &command.id)
        .env("SENSORHUB_COMMAND_NAME", &command.name)
        .env("SENSORHUB_DEVICE_ID", device_id)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => return ("failed", json!({"error": format!("{program}: {e}")})),
    };
    if let Some(mut stdin) = child.stdin.take() {
        // a handler that does not read its stdin closes it: that is not a failure
        let _ = stdin.write_all(command.args.to_string().as_bytes()).await;
    }
    let output = match tokio::time::timeout(handler.timeout, child.wait_with_output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => return ("failed", json!({"error": format!("{program}: {e}")})),
        Err(_) => {
            return (
                "failed",
                json!({"error": format!("no answer within {}; stopped", humantime::format_duration(handler.timeout))}),
            );
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    if output.status.success() {
        let result = serde_json::from_str::<Value>(stdout.trim())
            .unwrap_or_else(|_| json!({"output": clip(stdout.trim())}));
        ("succeeded", fit(result))
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        (
            "failed",
            json!({
                "exit": output.status.code(),
                "error": clip(stderr.trim()),
                "output": clip(stdout.trim()),
            }),
        )
    }
}

/// A result small enough for the server's 8 KiB answer.
fn fit(result: Value) -> Value {
    if result.to_string().len() + 64 <= MAX_ANSWER_BYTES {
        result
    } else {
        json!({"output": clip(&result.to_string()), "truncated": true})
    }
}

fn clip(text: &str) -> String {
    if text.len() <= OUTPUT_KEPT {
        return text.to_owned();
    }
    let mut end = OUTPUT_KEPT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test stops at the first surprise")]
    use super::*;

    fn command(args: Value) -> DeviceCommand {
        DeviceCommand {
            id: "c1".into(),
            name: "led".into(),
            args,
            expires_at: chrono::Utc::now(),
        }
    }

    fn handler(script: &str) -> Handler {
        Handler {
            run: vec!["sh".into(), "-c".into(), script.into()],
            timeout: Duration::from_millis(500),
        }
    }

    #[tokio::test]
    async fn a_handler_gets_the_args_and_its_output_is_the_result() {
        let (status, result) = run_handler(
            &handler(r#"read args; echo "{\"got\": $args, \"id\": \"$SENSORHUB_COMMAND_ID\"}""#),
            &command(json!({"on": true})),
            "pi",
        )
        .await;
        assert_eq!(
            (status, result),
            ("succeeded", json!({"got": {"on": true}, "id": "c1"}))
        );
        let (status, result) = run_handler(&handler("echo done"), &command(json!({})), "pi").await;
        assert_eq!((status, result), ("succeeded", json!({"output": "done"})));
    }

    #[tokio::test]
    async fn a_failing_or_slow_handler_fails_the_command() {
        let (status, result) = run_handler(
            &handler("echo no gpio >&2; exit 2"),
            &command(json!({})),
            "pi",
        )
        .await;
        assert_eq!(status, "failed");
        assert_eq!(result["exit"], json!(2));
        assert_eq!(result["error"], json!("no gpio"));
        let (status, result) = run_handler(&handler("sleep 5"), &command(json!({})), "pi").await;
        assert_eq!(status, "failed");
        assert!(result["error"].as_str().unwrap().contains("no answer"));
        let big = fit(json!({"x": "y".repeat(10_000)}));
        assert!(big.to_string().len() < MAX_ANSWER_BYTES);
    }
}
