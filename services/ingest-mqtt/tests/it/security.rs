//! deploy/mosquitto's production configuration in a real Mosquitto, its accounts made as sensorctl
//! makes them: nobody in without credentials, each device confined to its own topics, revocation at
//! once, the TLS listener up; and ingest-mqtt behind it storing only what devices may write.

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use service_kit::net::MqttEndpoint;
use testkit::mqtt::{Device, Mosquitto};

use crate::Stack;

const INGEST_PASSWORD: &str = "ingest-secret";

pub struct Production {
    pub mosquitto: Mosquitto,
    pub tls_port: u16,
}

impl Production {
    pub fn admin(&self) -> MqttEndpoint {
        service_kit::net::parse_mqtt_url(&self.mosquitto.admin_url()).unwrap()
    }

    /// A device account as `sensorctl device add` makes it (its password: its token).
    pub async fn add_device(&self, device: &str, password: &str) {
        mqtt_admin::execute(
            &self.admin(),
            mqtt_admin::device_account(device, password, None),
            &[],
        )
        .await
        .unwrap();
    }

    pub fn device(&self, device: &str, password: &str) -> Device {
        Device::new(&testkit::unique_name(device), self.mosquitto.port)
            .with_credentials(device, password)
    }

    pub fn ingest_url(&self) -> String {
        format!(
            "mqtt://{}:{INGEST_PASSWORD}@127.0.0.1:{}",
            mqtt_admin::INGEST_USER,
            self.mosquitto.port
        )
    }
}

/// The production broker with the accounts `sensorctl mqtt init` creates.
pub async fn production() -> Production {
    let mosquitto = Mosquitto::production();
    let p = Production {
        tls_port: mosquitto.tls_port(),
        mosquitto,
    };
    mqtt_admin::execute(
        &p.admin(),
        mqtt_admin::ingest_account(INGEST_PASSWORD, Some("sensor/data")),
        &[],
    )
    .await
    .unwrap();
    p
}

fn reading(device: &str) -> (String, Vec<u8>) {
    (
        format!("devices/{device}/readings"),
        br#"{"metrics":{"t":1}}"#.to_vec(),
    )
}

#[tokio::test]
async fn nobody_gets_in_without_credentials() {
    let p = production().await;
    p.add_device("raspi-01", "token-01").await;
    let port = p.mosquitto.port;
    let wait = Duration::from_secs(3);
    assert_eq!(
        Device::new("anon", port)
            .publish_all(vec![reading("raspi-01")], Duration::ZERO, wait)
            .await,
        0
    );
    let wrong = p.device("raspi-01", "not-the-token");
    assert_eq!(
        wrong
            .publish_all(vec![reading("raspi-01")], Duration::ZERO, wait)
            .await,
        0
    );
    let unknown = p.device("raspi-99", "token-99");
    assert_eq!(
        unknown
            .publish_all(vec![reading("raspi-99")], Duration::ZERO, wait)
            .await,
        0
    );
    let right = p.device("raspi-01", "token-01");
    assert_eq!(
        right
            .publish_all(vec![reading("raspi-01")], Duration::ZERO, wait)
            .await,
        1
    );
}

#[tokio::test]
async fn a_device_publishes_only_as_itself_and_ingest_sees_only_that() {
    let p = production().await;
    p.add_device("raspi-01", "token-01").await;
    let ingest = Device::new("ingest", p.mosquitto.port)
        .with_credentials(mqtt_admin::INGEST_USER, INGEST_PASSWORD);
    let listening = tokio::spawn(async move {
        ingest
            .subscribe_and_collect(
                "$share/sensorhub/devices/+/readings",
                Duration::from_secs(3),
            )
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pi = p.device("raspi-01", "token-01");
    // MQTT 3.1.1 cannot say "refused" to a publish: Mosquitto acknowledges and drops it
    let legacy = (
        "sensor/data".to_owned(),
        br#"{"device_id":"raspi-02","t":1}"#.to_vec(),
    );
    pi.publish_all(
        vec![reading("raspi-01"), reading("raspi-02"), legacy],
        Duration::ZERO,
        Duration::from_secs(3),
    )
    .await;
    let seen = listening
        .await
        .unwrap()
        .expect("ingest may subscribe (shared)");
    let topics: Vec<&str> = seen.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(topics, ["devices/raspi-01/readings"]);
}

#[tokio::test]
async fn a_device_reads_only_its_own_commands() {
    let p = production().await;
    p.add_device("raspi-01", "token-01").await;
    p.add_device("raspi-02", "token-02").await;
    // Subscribe to everything and see what arrives: only what the role allows.
    let pi1 = p.device("raspi-01", "token-01");
    let listening = tokio::spawn(async move {
        let own = pi1.subscribe_and_collect("devices/raspi-01/commands", Duration::from_secs(3));
        own.await
    });
    let pi1_all = p.device("raspi-01", "token-01");
    assert!(
        pi1_all
            .subscribe_and_collect("devices/+/readings", Duration::from_millis(300))
            .await
            .is_none(),
        "a device cannot subscribe to others' readings"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let command = |device: &str| (format!("devices/{device}/commands"), b"{}".to_vec());
    let pi2 = p.device("raspi-02", "token-02");
    pi2.publish_all(
        vec![command("raspi-02")],
        Duration::ZERO,
        Duration::from_secs(3),
    )
    .await;
    let pi1 = p.device("raspi-01", "token-01");
    pi1.publish_all(
        vec![command("raspi-01")],
        Duration::ZERO,
        Duration::from_secs(3),
    )
    .await;
    let seen = listening
        .await
        .unwrap()
        .expect("its own commands are allowed");
    let topics: Vec<&str> = seen.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(topics, ["devices/raspi-01/commands"]);
}

#[tokio::test]
async fn a_revoked_device_is_disconnected_and_refused() {
    let p = production().await;
    p.add_device("raspi-01", "token-01").await;
    let pi = p.device("raspi-01", "token-01");
    assert_eq!(
        pi.publish_all(
            vec![reading("raspi-01")],
            Duration::ZERO,
            Duration::from_secs(3)
        )
        .await,
        1
    );
    // connected, publishing slowly, when the operator revokes it
    let pi = p.device("raspi-01", "token-01");
    let streaming = tokio::spawn(async move {
        pi.publish_all(
            (0..50).map(|_| reading("raspi-01")).collect(),
            Duration::from_millis(100),
            Duration::from_secs(8),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    mqtt_admin::execute(&p.admin(), mqtt_admin::remove_device("raspi-01"), &[])
        .await
        .unwrap();
    let acked = streaming.await.unwrap();
    assert!(
        acked < 50,
        "the connection was cut at the revocation ({acked} acknowledged)"
    );
    let again = p.device("raspi-01", "token-01");
    assert_eq!(
        again
            .publish_all(
                vec![reading("raspi-01")],
                Duration::ZERO,
                Duration::from_secs(3)
            )
            .await,
        0
    );
}

#[tokio::test]
async fn the_tls_listener_serves_its_certificate() {
    let p = production().await;
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{}", p.tls_port),
            "-CAfile",
        ])
        .arg(p.mosquitto.dir.join("server.crt"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
}

#[tokio::test]
async fn behind_the_production_broker_ingest_stores_only_what_devices_may_write() {
    let p = production().await;
    let stack = Stack::new();
    let _persister = stack.persister().await;
    let mut settings = stack.settings("ingest-secured");
    settings.mqtt_url = p.ingest_url();
    let ingest = stack.ingest(&settings).await;
    p.add_device("raspi-a", "token-a").await;
    let a = p.device("raspi-a", "token-a");
    let own = (
        "devices/raspi-a/readings".to_owned(),
        json!({"id": "a-1", "ts": 1_795_000_000_000u64, "metrics": {"t": 1.5}})
            .to_string()
            .into_bytes(),
    );
    let as_b = (
        "devices/raspi-b/readings".to_owned(),
        json!({"id": "b-1", "ts": 1_795_000_000_000u64, "metrics": {"t": 6.6}})
            .to_string()
            .into_bytes(),
    );
    let legacy = (
        "sensor/data".to_owned(),
        br#"{"device_id":"raspi-b","id":"b-2","t":6.6}"#.to_vec(),
    );
    // one connection each: Mosquitto 2.0.11 answers a denied publish with a PUBACK carrying a reason
    // code, which an MQTT 3.1.1 client takes as a protocol error and disconnects
    for message in [as_b, legacy, own] {
        a.publish_all(vec![message], Duration::ZERO, Duration::from_secs(5))
            .await;
    }
    stack.wait_stored(1).await;
    assert_eq!(
        ingest.metric("mqtt_messages_received_total").await,
        1.0,
        "the others never reached ingest"
    );
    assert_eq!(stack.stored_ids("raspi-a"), ["a-1"]);
    assert!(stack.stored_ids("raspi-b").is_empty());
    ingest.stop().await;
    stack.cleanup().await;
}
