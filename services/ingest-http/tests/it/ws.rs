//! A device's WebSocket: commands pushed (those due at connect, and those issued later, to
//! whichever replica holds the socket), answers and readings acknowledged once RabbitMQ has them.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::commands::{issue, wait_status};
use crate::{Ingest, Stack};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How a test's device authenticates.
enum Auth<'a> {
    Header(&'a str),
    Subprotocol(&'a str),
    /// No credential in the handshake.
    None,
}

async fn connect(ingest: &Ingest, auth: Auth<'_>) -> Socket {
    let url = format!("{}/v1/ws", ingest.url.replace("http://", "ws://"));
    let mut request = url.into_client_request().unwrap();
    let headers = request.headers_mut();
    let protocol = match auth {
        Auth::Header(token) => {
            let value = format!("Bearer {token}");
            headers.insert("authorization", HeaderValue::from_str(&value).unwrap());
            None
        }
        Auth::Subprotocol(token) => {
            let value = format!("sensorhub.bearer.{token}");
            headers.insert(
                "sec-websocket-protocol",
                HeaderValue::from_str(&value).unwrap(),
            );
            Some(value)
        }
        Auth::None => None,
    };
    let (socket, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.status(), 101);
    if let Some(protocol) = protocol {
        assert_eq!(
            response.headers()["sec-websocket-protocol"],
            protocol.as_str()
        );
    }
    socket
}

/// The next JSON text frame (pings and pongs skipped); `None` once closed.
async fn next_frame(socket: &mut Socket) -> Option<Value> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(15), socket.next())
            .await
            .expect("a frame within 15 s")?
            .ok()?;
        match message {
            Message::Text(text) => return Some(serde_json::from_str(text.as_str()).unwrap()),
            Message::Close(_) => return None,
            _ => {}
        }
    }
}

/// A reading of `device` in the format of `POST /v1/readings`.
fn reading(device: &str) -> Value {
    json!({"device_id": device, "id": "ws-1", "ts": 1_795_000_000_000u64, "metrics": {"temperature": 21.5}})
}

async fn send(socket: &mut Socket, frame: Value) {
    socket
        .send(Message::Text(frame.to_string().into()))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_websocket_gets_its_commands_and_acknowledges_answers_and_readings() {
    let stack = Stack::new();
    let token = stack.token("pi-1").await;
    stack.token("pi-2").await;
    let ingest = stack.ingest().await;
    let _persister = stack.persister().await;
    let waiting = issue(&stack, "pi-1", chrono::Duration::minutes(5));

    let mut socket = connect(&ingest, Auth::Header(&token)).await;
    let command = next_frame(&mut socket).await.unwrap();
    assert_eq!(
        (&command["type"], &command["id"], &command["name"]),
        (&json!("command"), &json!(waiting), &json!("led"))
    );
    // issued while connected: pushed at once
    let later = issue(&stack, "pi-1", chrono::Duration::minutes(5));
    let command = next_frame(&mut socket).await.unwrap();
    assert_eq!(command["id"], json!(later), "{command}");

    send(
        &mut socket,
        json!({"type": "result", "id": waiting, "status": "succeeded", "result": {"led": "on"}}),
    )
    .await;
    assert_eq!(
        next_frame(&mut socket).await.unwrap(),
        json!({"type": "ack", "id": waiting})
    );
    send(
        &mut socket,
        json!({"type": "readings", "ref": "r1", "readings": [reading("pi-1")]}),
    )
    .await;
    assert_eq!(
        next_frame(&mut socket).await.unwrap(),
        json!({"type": "ack", "ref": "r1"})
    );
    // another device's readings, a bad answer, another device's command: error frames
    send(
        &mut socket,
        json!({"type": "readings", "ref": "r2", "readings": [reading("pi-2")]}),
    )
    .await;
    let error = next_frame(&mut socket).await.unwrap();
    assert_eq!(
        (&error["ref"], &error["error"]),
        (&json!("r2"), &json!("forbidden")),
        "{error}"
    );
    send(
        &mut socket,
        json!({"type": "result", "id": later, "status": "maybe"}),
    )
    .await;
    let error = next_frame(&mut socket).await.unwrap();
    assert_eq!(
        (&error["id"], &error["error"], &error["field"]),
        (&json!(later), &json!("invalid"), &json!("status")),
        "{error}"
    );
    let others = issue(&stack, "pi-2", chrono::Duration::minutes(5));
    send(
        &mut socket,
        json!({"type": "result", "id": others, "status": "failed"}),
    )
    .await;
    let error = next_frame(&mut socket).await.unwrap();
    assert_eq!(error["error"], "not_the_devices", "{error}");

    let history = wait_status(&stack, &waiting, "succeeded").await;
    assert_eq!(history, ["pending", "sent", "succeeded"]);
    wait_status(&stack, &later, "sent").await;
    stack.wait_stored(1).await;
    socket.close(None).await.unwrap();
    ingest.stop().await;
}

#[tokio::test]
async fn a_browser_authenticates_with_the_subprotocol_or_its_first_frame() {
    let stack = Stack::new();
    let token = stack.token("pi-1").await;
    let ingest = stack.ingest().await;
    let id = issue(&stack, "pi-1", chrono::Duration::minutes(5));

    let mut socket = connect(&ingest, Auth::Subprotocol(&token)).await;
    assert_eq!(next_frame(&mut socket).await.unwrap()["id"], json!(id));
    socket.close(None).await.unwrap();

    let mut socket = connect(&ingest, Auth::None).await;
    send(&mut socket, json!({"type": "auth", "token": token})).await;
    assert_eq!(next_frame(&mut socket).await.unwrap()["id"], json!(id));
    socket.close(None).await.unwrap();

    // a wrong first frame is refused, and the socket closed (policy violation)
    let mut socket = connect(&ingest, Auth::None).await;
    send(&mut socket, json!({"type": "auth", "token": "forged"})).await;
    let error = next_frame(&mut socket).await.unwrap();
    assert_eq!(error["error"], "unauthorized", "{error}");
    assert!(next_frame(&mut socket).await.is_none());
    ingest.stop().await;
}

#[tokio::test]
async fn a_command_reaches_the_replica_holding_the_devices_socket() {
    let stack = Stack::new();
    let token = stack.token("pi-1").await;
    let first = stack.ingest().await;
    let second = stack.ingest().await;
    let _persister = stack.persister().await;
    let mut socket = connect(&second, Auth::Header(&token)).await;
    // connected, and nothing was due: wait for a ping's worth of nothing, then issue
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = issue(&stack, "pi-1", chrono::Duration::minutes(5));
    let command = next_frame(&mut socket).await.unwrap();
    assert_eq!(command["id"], json!(id), "{command}");
    wait_status(&stack, &id, "sent").await;
    first.stop().await;
    // a stopping replica closes its sockets (the devices reconnect elsewhere) without waiting
    let started = std::time::Instant::now();
    second.stop().await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(next_frame(&mut socket).await.is_none());
}
