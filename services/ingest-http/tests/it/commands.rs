//! Commands to devices over HTTP: a device long-polls for its next command and answers it; the
//! persister records what ingest-http reports. Commands are issued as query-api does, with
//! `store::commands::issue_command`.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{Ingest, Stack, WAIT};

/// Issues a command for `device` (registered already), living `ttl`; its id.
pub fn issue(stack: &Stack, device: &str, ttl: chrono::Duration) -> String {
    let id = uuid::Uuid::now_v7().to_string();
    let args = json!({"on": true});
    let new = store::commands::NewCommand {
        id: &id,
        device_id: device,
        name: "led",
        args: &args,
        issued_by: "test",
        ttl,
    };
    let issued = store::commands::issue_command(&mut stack.db.connect(), &new, 10).unwrap();
    assert!(
        matches!(issued, store::commands::Issued::Issued(_)),
        "{issued:?}"
    );
    id
}

/// A command's status and the statuses of its history, oldest first.
pub fn status_of(stack: &Stack, id: &str) -> (String, Vec<String>) {
    let (command, history) = store::commands::command(&mut stack.db.connect(), id)
        .unwrap()
        .unwrap();
    (
        command.status(chrono::Utc::now()).as_str().to_owned(),
        history.into_iter().map(|e| e.status).collect(),
    )
}

/// Waits until the command is `status`; its history then.
pub async fn wait_status(stack: &Stack, id: &str, status: &str) -> Vec<String> {
    testkit::eventually(WAIT, &format!("command {id} {status}"), || async {
        let (now, history) = status_of(stack, id);
        (now == status).then_some(history)
    })
    .await
}

/// `GET /v1/commands/next?wait=<wait>` as `device`: the status and the body (null when none).
pub async fn poll(stack: &Stack, ingest: &Ingest, device: &str, wait: &str) -> (u16, Value) {
    let response = stack
        .client
        .get(format!("{}/v1/commands/next?wait={wait}", ingest.url))
        .bearer_auth(stack.token(device).await)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// `POST /v1/commands/{id}/result` as `device`.
pub async fn answer(
    stack: &Stack,
    ingest: &Ingest,
    device: &str,
    id: &str,
    body: Value,
) -> (u16, Value) {
    let token = stack.token(device).await;
    stack
        .post_with(
            format!("{}/v1/commands/{id}/result", ingest.url),
            Some(&token),
            body,
        )
        .await
}

fn succeeded() -> Value {
    json!({"status": "succeeded", "result": {"led": "on"}})
}

#[tokio::test]
async fn a_long_poll_gets_the_command_and_its_answer_is_recorded() {
    let stack = Stack::new();
    stack.token("pi-1").await;
    let ingest = stack.ingest().await;
    let _persister = stack.persister().await;
    let id = issue(&stack, "pi-1", chrono::Duration::minutes(5));

    let (status, command) = poll(&stack, &ingest, "pi-1", "5").await;
    assert_eq!(status, 200, "{command}");
    assert_eq!(
        (&command["id"], &command["name"], &command["args"]),
        (&json!(id), &json!("led"), &json!({"on": true}))
    );
    assert!(command["expires_at"].is_string());
    wait_status(&stack, &id, "sent").await;

    assert_eq!(
        answer(&stack, &ingest, "pi-1", &id, succeeded()).await,
        (202, json!({"status": "accepted"}))
    );
    let history = wait_status(&stack, &id, "succeeded").await;
    assert_eq!(history, ["pending", "sent", "succeeded"]);
    ingest.stop().await;
}

#[tokio::test]
async fn with_nothing_due_a_long_poll_answers_204_after_its_wait() {
    let stack = Stack::new();
    let ingest = stack.ingest().await;
    let started = Instant::now();
    assert_eq!(poll(&stack, &ingest, "pi-1", "1").await.0, 204);
    assert!(started.elapsed() >= Duration::from_secs(1));
    for wait in ["61", "-1", "soon"] {
        let (status, body) = poll(&stack, &ingest, "pi-1", wait).await;
        assert_eq!((status, &body["field"]), (400, &json!("wait")), "{wait}");
    }
    ingest.stop().await;
    // a lower configured maximum: longer waits refused, and the default no longer than it
    let ingest = stack
        .ingest_with(|s| s.command_poll_max_wait_secs = 1)
        .await;
    assert_eq!(poll(&stack, &ingest, "pi-1", "2").await.0, 400);
    let started = Instant::now();
    let response = stack
        .client
        .get(format!("{}/v1/commands/next", ingest.url))
        .bearer_auth(stack.token("pi-1").await)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    assert!(started.elapsed() < Duration::from_secs(5));
    ingest.stop().await;
}

#[tokio::test]
async fn a_command_issued_while_a_long_poll_waits_is_returned_at_once() {
    let stack = Stack::new();
    stack.token("pi-1").await;
    let ingest = stack.ingest().await;
    let _persister = stack.persister().await;
    let polling = {
        let url = format!("{}/v1/commands/next?wait=30", ingest.url);
        let request = stack.client.get(url).bearer_auth(stack.token("pi-1").await);
        tokio::spawn(async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let issued_at = Instant::now();
    let id = issue(&stack, "pi-1", chrono::Duration::minutes(5));
    let (status, command) = polling.await.unwrap();
    assert_eq!((status, &command["id"]), (200, &json!(id)), "{command}");
    assert!(
        issued_at.elapsed() < Duration::from_secs(10),
        "returned after {:?}",
        issued_at.elapsed()
    );
    ingest.stop().await;
}

#[tokio::test]
async fn a_device_cannot_receive_or_answer_another_devices_command() {
    let stack = Stack::new();
    stack.token("dev-a").await;
    stack.token("dev-b").await;
    let ingest = stack.ingest().await;
    let _persister = stack.persister().await;
    let id = issue(&stack, "dev-a", chrono::Duration::minutes(5));

    assert_eq!(poll(&stack, &ingest, "dev-b", "1").await.0, 204);
    let (status, body) = answer(&stack, &ingest, "dev-b", &id, succeeded()).await;
    assert_eq!(status, 403, "{body}");
    let unknown = uuid::Uuid::now_v7().to_string();
    assert_eq!(
        answer(&stack, &ingest, "dev-b", &unknown, succeeded())
            .await
            .0,
        404
    );
    let (status, body) = answer(&stack, &ingest, "dev-a", &id, json!({"status": "done"})).await;
    assert_eq!((status, &body["field"]), (400, &json!("status")), "{body}");
    assert_eq!(status_of(&stack, &id).0, "pending");

    let metrics = ingest.metrics().await;
    for reason in ["not_the_devices", "no_such_command", "invalid"] {
        let sample = format!(
            "sensorhub_requests_rejected_total{{endpoint=\"/v1/commands/{{id}}/result\",reason=\"{reason}\"}} 1"
        );
        assert!(metrics.contains(&sample), "{sample} in\n{metrics}");
    }
    ingest.stop().await;
}

#[tokio::test]
async fn an_expired_or_finished_command_cannot_be_answered() {
    let stack = Stack::new();
    stack.token("pi-1").await;
    let ingest = stack.ingest().await;
    let _persister = stack.persister().await;
    let short = issue(&stack, "pi-1", chrono::Duration::seconds(1));
    let id = issue(&stack, "pi-1", chrono::Duration::minutes(5));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, body) = answer(&stack, &ingest, "pi-1", &short, succeeded()).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("expired"),
        "{body}"
    );

    assert_eq!(
        answer(&stack, &ingest, "pi-1", &id, succeeded()).await.0,
        202
    );
    wait_status(&stack, &id, "succeeded").await;
    let (status, body) = answer(&stack, &ingest, "pi-1", &id, json!({"status": "failed"})).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("already succeeded"),
        "{body}"
    );
    ingest.stop().await;
}

#[tokio::test]
async fn a_stopping_service_answers_its_long_polls_at_once() {
    let stack = Stack::new();
    let ingest = stack.ingest().await;
    let request = stack
        .client
        .get(format!("{}/v1/commands/next?wait=60", ingest.url))
        .bearer_auth(stack.token("pi-1").await);
    let polling = tokio::spawn(async move { request.send().await.unwrap().status().as_u16() });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    ingest.stop().await;
    assert_eq!(polling.await.unwrap(), 204);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "stopped after {:?}",
        started.elapsed()
    );
}

/// While nothing records that a command was sent (no persister running here, as during a
/// database outage), the command stays due; a device polling again at once must not get it again
/// at once, or it spins through it as fast as it can ask. It comes again after the window.
#[tokio::test]
async fn a_command_just_handed_out_is_not_handed_out_again_at_once() {
    let stack = Stack::new();
    stack.token("pi-1").await;
    let ingest = stack.ingest().await;
    let id = issue(&stack, "pi-1", chrono::Duration::minutes(5));
    let (status, command) = poll(&stack, &ingest, "pi-1", "0").await;
    assert_eq!((status, &command["id"]), (200, &json!(id)));
    assert_eq!(poll(&stack, &ingest, "pi-1", "1").await.0, 204);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (status, again) = poll(&stack, &ingest, "pi-1", "0").await;
    assert_eq!(
        (status, &again["id"]),
        (200, &json!(id)),
        "handed out again once the window passed"
    );
    ingest.stop().await;
}
