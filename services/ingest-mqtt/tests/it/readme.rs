//! The README's Python snippets, run as a Pi runs them (requests, paho-mqtt), against the secured
//! services: what the README promises is what works.

use std::process::Command;
use std::time::Duration;

use crate::security::behind_production;

const README: &str = include_str!("../../../../README.md");

/// The README's ```python blocks, in order.
fn python_blocks() -> Vec<String> {
    README
        .split("```python\n")
        .skip(1)
        .filter_map(|rest| rest.split("\n```").next())
        .map(str::to_owned)
        .collect()
}

fn run_python(code: &str) {
    let out = Command::new("python3")
        .args(["-W", "ignore::DeprecationWarning", "-c", code])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "the README's snippet failed:\n{code}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Python with `modules` (as an import list) importable, as the snippets need (`scripts/test`
/// installs requests, paho-mqtt and websocket-client with pip).
fn require_python(modules: &str) {
    let importable = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .status();
    assert!(
        importable.map(|s| s.success()).unwrap_or(false),
        "python3 with {modules} is needed (scripts/test installs them with pip)"
    );
}

#[tokio::test]
async fn the_readmes_python_snippets_work_with_a_token() {
    require_python("requests, paho.mqtt.client");
    let blocks = python_blocks();
    let http = blocks
        .iter()
        .find(|b| b.contains("requests.post"))
        .expect("an HTTP snippet");
    let mqtt = blocks
        .iter()
        .find(|b| b.contains("paho"))
        .expect("an MQTT snippet");

    let (broker, stack, _persister, settings) = behind_production().await;
    let ingest = stack.ingest(&settings).await;
    let http_ingest = stack.ingest_http(&broker).await;

    // `sensorctl device add raspi-01`: the registry and the MQTT account, one token for both
    let token = stack.keys.register_device(&stack.db.url, "raspi-01");
    broker.add_device("raspi-01", &token).await;
    let token_file = std::env::temp_dir().join(testkit::unique_name("raspi-01.token"));
    std::fs::write(&token_file, &token).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await; // ingest-http's registry refresh

    let http = http
        .replace("http://HOST:8080", &http_ingest.url)
        .replace("raspi-01.token", &token_file.display().to_string());
    run_python(&http);
    let mqtt = format!("TOKEN = {token:?}\nHOST = \"127.0.0.1\"\n{mqtt}")
        .replace("HOST, 1883", &format!("HOST, {}", broker.mosquitto.port));
    run_python(&mqtt);

    stack.wait_stored(2).await;
    let ids = stack.stored_ids("raspi-01");
    assert!(
        ids.contains(&"raspi-01-000043".to_owned()),
        "the MQTT reading: {ids:?}"
    );
    let _ = std::fs::remove_file(token_file);
    ingest.stop().await;
}

/// A README snippet started as a Pi runs it, killed when dropped.
struct Snippet(std::process::Child);

impl Drop for Snippet {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The README's LED example on each channel: the snippet runs as a Pi runs it, an app's `led`
/// command reaches it, and the command ends `succeeded` with the snippet's result and an exact
/// history.
#[tokio::test]
async fn the_readmes_command_snippets_turn_the_led_on() {
    require_python("requests, paho.mqtt.client, websocket");
    let blocks = python_blocks();
    let snippet = |needle: &str| {
        blocks
            .iter()
            .find(|b| b.contains(needle) && b.contains("set_led"))
            .unwrap_or_else(|| panic!("a command snippet with {needle}"))
            .clone()
    };
    let (broker, stack, _persister, settings) = behind_production().await;
    let ingest = stack.ingest(&settings).await;
    let http_ingest = stack.ingest_http(&broker).await;
    let token = stack.keys.register_device(&stack.db.url, "raspi-01");
    broker.add_device("raspi-01", &token).await;
    tokio::time::sleep(Duration::from_millis(600)).await; // ingest-http's registry refresh

    for (channel, needle) in [
        ("MQTT", "paho"),
        ("WebSocket", "websocket"),
        ("long-poll", "/v1/commands/next"),
    ] {
        let code = format!(
            "TOKEN = {token:?}\nHOST = \"127.0.0.1\"\n{}",
            snippet(needle)
        )
        .replace("HOST, 1883", &format!("HOST, {}", broker.mosquitto.port))
        .replace("http://HOST:8080", &http_ingest.url)
        .replace(
            "ws://HOST:8080",
            &http_ingest.url.replace("http://", "ws://"),
        );
        let mut pi = Snippet(
            Command::new("python3")
                .args(["-u", "-W", "ignore::DeprecationWarning", "-c", &code])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("python3"),
        );
        // connected and listening; a command sent before would come with the next re-send
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let id = uuid::Uuid::now_v7().to_string();
        let mut conn = stack.db.connect();
        let args = serde_json::json!({"on": true});
        let issued = store::commands::issue_command(
            &mut conn,
            &store::commands::NewCommand {
                id: &id,
                device_id: "raspi-01",
                name: "led",
                args: &args,
                issued_by: "readme-test",
                ttl: chrono::Duration::seconds(120),
            },
            100,
        )
        .unwrap();
        assert!(matches!(issued, store::commands::Issued::Issued(_)));
        let what = format!("the {channel} snippet's answer");
        let (command, history) = testkit::eventually(Duration::from_secs(60), &what, || {
            let url = stack.db.url.clone();
            let id = id.clone();
            async move {
                let mut conn = store::connect(&url).unwrap();
                let (command, history) = store::commands::command(&mut conn, &id).unwrap()?;
                (command.stored_status == "succeeded").then_some((command, history))
            }
        })
        .await;
        if let Ok(Some(status)) = pi.0.try_wait() {
            let mut stderr = String::new();
            let _ = std::io::Read::read_to_string(pi.0.stderr.as_mut().unwrap(), &mut stderr);
            panic!("the {channel} snippet exited ({status}): {stderr}");
        }
        assert_eq!(
            command.result,
            Some(serde_json::json!({"led": "on"})),
            "{channel}"
        );
        let statuses: Vec<&str> = history.iter().map(|e| e.status.as_str()).collect();
        assert_eq!(statuses, ["pending", "sent", "succeeded"], "{channel}");
    }
    ingest.stop().await;
}
