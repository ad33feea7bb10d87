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

#[tokio::test]
async fn the_readmes_python_snippets_work_with_a_token() {
    let clients = Command::new("python3")
        .args(["-c", "import requests, paho.mqtt.client"])
        .status();
    assert!(
        clients.map(|s| s.success()).unwrap_or(false),
        "python3 with requests and paho-mqtt is needed (scripts/test installs them with pip)"
    );
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
