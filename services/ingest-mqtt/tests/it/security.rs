//! deploy/mosquitto's production configuration in a real Mosquitto, its accounts made as sensorctl
//! makes them: nobody in without credentials, each account bound to its own client id (no device
//! can take over another's session or ingest-mqtt's), each device confined to its own topics,
//! nothing received that a role does not allow, revocation at once, the TLS listener up; and
//! ingest-mqtt behind it storing only what devices may write.

use std::process::Command;
use std::time::Duration;

use ingest_mqtt::Settings;
use models::DeviceId;
use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet};
use serde_json::json;
use testkit::mqtt::{Device, Listening, Mosquitto};

use crate::Stack;
use testkit::spawn::Running;

pub const INGEST_PASSWORD: &str = "ingest-secret";
/// ingest-mqtt replicas with an account, as `sensorctl mqtt init --ingest-replicas 2` makes them.
const INGEST_REPLICAS: u32 = 2;

pub struct Production {
    pub mosquitto: Mosquitto,
    pub tls_port: u16,
    pub broker: mqtt_admin::Broker,
}

impl Production {
    /// A device account as `sensorctl device add` makes it (its password: its token).
    pub async fn add_device(&self, device: &str, password: &str) {
        self.broker
            .add_device(&DeviceId::parse(device).unwrap(), password, None)
            .await
            .unwrap();
    }

    /// A device connecting as it must: its id as user name and client id.
    pub fn device(&self, device: &str, password: &str) -> Device {
        Device::new(device, self.mosquitto.port).with_credentials(device, password)
    }

    /// Points ingest-mqtt at this broker as replica `replica` (its account and client id).
    pub fn ingest_settings(&self, settings: &mut Settings, replica: u32) {
        let account = mqtt_admin::ingest_client_id(replica);
        settings.mqtt_url = format!("mqtt://127.0.0.1:{}", self.mosquitto.port);
        settings.mqtt_username = account.clone();
        settings.mqtt_password = INGEST_PASSWORD.into();
        settings.mqtt_client_id = account;
    }

    /// ingest-mqtt's first replica's account listening to every device's readings, as ingest-mqtt
    /// subscribes (shared), for `listen`: to see what reaches ingest.
    pub fn ingest_listening(&self, listen: Duration) -> Listening {
        let account = mqtt_admin::ingest_client_id(1);
        Device::new(&account, self.mosquitto.port)
            .with_credentials(&account, INGEST_PASSWORD)
            .listen("$share/sensorhub/devices/+/readings", listen)
    }

    /// An account allowed to send any device its commands (what a back-end that commands devices
    /// would get), to see what devices receive.
    async fn add_commander(&self) -> Device {
        self.broker
            .run(
                vec![
                    json!({"command": "createRole", "rolename": "commander", "acls": [
                        {"acltype": "publishClientSend", "topic": "devices/+/commands", "allow": true}]}),
                    json!({"command": "createClient", "username": "commander", "password": "cmd",
                           "clientid": "commander:1", "roles": [{"rolename": "commander"}]}),
                ],
                &[],
            )
            .await
            .unwrap();
        Device::new("commander:1", self.mosquitto.port).with_credentials("commander", "cmd")
    }

    /// `user` connecting with `client_id`, resuming whatever session that id has: the CONNACK
    /// Mosquitto answers (`None`: no answer) and how many messages it then delivered within 1 s.
    async fn connect_as(
        &self,
        client_id: &str,
        user: &str,
        password: &str,
    ) -> (Option<ConnectReturnCode>, usize) {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", self.mosquitto.port);
        options
            .set_credentials(user, password)
            .set_clean_session(false);
        let (client, mut events) = AsyncClient::new(options, 16);
        let code = crate::connack(&mut events, Duration::from_secs(3)).await;
        let mut delivered = 0;
        if code == Some(ConnectReturnCode::Success) {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while let Ok(event) = events.poll().await {
                    if let Event::Incoming(Packet::Publish(_)) = event {
                        delivered += 1;
                    }
                }
            })
            .await;
        }
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_millis(200), events.poll()).await;
        (code, delivered)
    }
}

/// The production broker set up as `sensorctl mqtt init --ingest-replicas 2` sets it up.
pub async fn production() -> Production {
    let mosquitto = Mosquitto::production();
    let broker = mqtt_admin::Broker::from_url(&mosquitto.admin_url()).unwrap();
    let ingest = mqtt_admin::IngestAccounts {
        password: INGEST_PASSWORD,
        replicas: INGEST_REPLICAS,
        legacy_topic: Some("sensor/data"),
    };
    broker.init(&ingest, &[]).await.unwrap();
    Production {
        tls_port: mosquitto.tls_port(),
        mosquitto,
        broker,
    }
}

/// The production broker, and a stack behind it with its persister running; ingest-mqtt's settings
/// (not started) are replica 1's on that broker.
pub async fn behind_production() -> (Production, Stack, Running, Settings) {
    let p = production().await;
    let stack = Stack::new();
    let persister = stack.persister().await;
    let mut settings = stack.settings("unused");
    p.ingest_settings(&mut settings, 1);
    (p, stack, persister, settings)
}

fn reading(device: &str) -> (String, Vec<u8>) {
    (
        format!("devices/{device}/readings"),
        br#"{"metrics":{"t":1}}"#.to_vec(),
    )
}

/// Publishes `messages` at once and answers how many the broker acknowledged within 3 s (MQTT
/// 3.1.1 cannot refuse a publish: one a device may not make is acknowledged and dropped).
async fn publish(device: &Device, messages: Vec<(String, Vec<u8>)>) -> usize {
    device
        .publish_all(messages, Duration::ZERO, Duration::from_secs(3))
        .await
}

#[tokio::test]
async fn nobody_gets_in_without_credentials() {
    let p = production().await;
    p.add_device("raspi-01", "token-01").await;
    let port = p.mosquitto.port;
    assert_eq!(
        publish(&Device::new("anon", port), vec![reading("raspi-01")]).await,
        0
    );
    let wrong = p.device("raspi-01", "not-the-token");
    assert_eq!(publish(&wrong, vec![reading("raspi-01")]).await, 0);
    let unknown = p.device("raspi-99", "token-99");
    assert_eq!(publish(&unknown, vec![reading("raspi-99")]).await, 0);
    let right = p.device("raspi-01", "token-01");
    assert_eq!(publish(&right, vec![reading("raspi-01")]).await, 1);
}

#[tokio::test]
async fn a_device_publishes_only_as_itself_and_ingest_sees_only_that() {
    let p = production().await;
    p.add_device("raspi-01", "token-01").await;
    let mut listening = p.ingest_listening(Duration::from_secs(3));
    assert!(
        listening.subscribed().await,
        "ingest may subscribe (shared)"
    );
    let pi = p.device("raspi-01", "token-01");
    // MQTT 3.1.1 cannot say "refused" to a publish: Mosquitto acknowledges and drops it
    let legacy = (
        "sensor/data".to_owned(),
        br#"{"device_id":"raspi-02","t":1}"#.to_vec(),
    );
    publish(&pi, vec![reading("raspi-01"), reading("raspi-02"), legacy]).await;
    let topics = listening
        .topics()
        .await
        .expect("ingest may subscribe (shared)");
    assert_eq!(topics, ["devices/raspi-01/readings"]);
}

#[tokio::test]
async fn a_device_reads_only_its_own_commands() {
    let p = production().await;
    p.add_device("raspi-01", "token-01").await;
    p.add_device("raspi-02", "token-02").await;
    let commander = p.add_commander().await;
    assert!(
        !p.device("raspi-01", "token-01")
            .listen("devices/+/readings", Duration::from_millis(300))
            .subscribed()
            .await,
        "a device cannot subscribe to others' readings"
    );
    let mut listening = p
        .device("raspi-01", "token-01")
        .listen("devices/raspi-01/commands", Duration::from_secs(3));
    assert!(listening.subscribed().await, "its own commands are allowed");
    let command = |device: &str| (format!("devices/{device}/commands"), b"{}".to_vec());
    // raspi-02 may not command raspi-01 (MQTT 3.1.1 cannot say so: the publish is dropped)
    publish(&p.device("raspi-02", "token-02"), vec![command("raspi-01")]).await;
    publish(&commander, vec![command("raspi-02"), command("raspi-01")]).await;
    let topics = listening
        .topics()
        .await
        .expect("its own commands are allowed");
    assert_eq!(topics, ["devices/raspi-01/commands"]);
}

#[tokio::test]
async fn no_device_can_take_over_another_clients_id_or_session() {
    let p = production().await;
    p.add_device("raspi-a", "token-a").await;
    p.add_device("raspi-b", "token-b").await;
    let commander = p.add_commander().await;
    // B connected, with a persistent session subscribed to its commands
    let mut b_listening = p
        .device("raspi-b", "token-b")
        .listen("devices/raspi-b/commands", Duration::from_secs(4));
    assert!(b_listening.subscribed().await, "B's subscription stands");

    // A, with its own valid credentials, under B's client id, ingest-mqtt's, or anything not its own
    for foreign in ["raspi-b", "ingest-mqtt:1", "ingest-mqtt:2", "raspi-a-2"] {
        assert_eq!(
            p.connect_as(foreign, "raspi-a", "token-a").await,
            (Some(ConnectReturnCode::NotAuthorized), 0),
            "raspi-a connecting as client {foreign}"
        );
    }
    // A under its own id is fine, and what is sent to B meanwhile reaches B alone
    let mut a_listening = p
        .device("raspi-a", "token-a")
        .listen("devices/raspi-b/commands", Duration::from_secs(2));
    // the broker's answer (a refusal) before B's command is sent
    a_listening.subscribed().await;
    publish(
        &commander,
        vec![("devices/raspi-b/commands".to_owned(), b"reboot".to_vec())],
    )
    .await;
    assert!(
        a_listening.collect().await.is_none(),
        "A may not even subscribe to B's commands"
    );
    let seen = b_listening
        .collect()
        .await
        .expect("B's subscription stands");
    assert_eq!(
        seen,
        [("devices/raspi-b/commands".to_owned(), b"reboot".to_vec())],
        "B stayed connected through A's attempts and got its command"
    );
}

#[tokio::test]
async fn a_revoked_device_is_disconnected_and_refused() {
    let p = production().await;
    p.add_device("raspi-01", "token-01").await;
    let pi = p.device("raspi-01", "token-01");
    assert_eq!(publish(&pi, vec![reading("raspi-01")]).await, 1);
    // connected, publishing slowly, when the operator revokes it
    let mut ingest = p.ingest_listening(Duration::from_secs(8));
    assert!(ingest.subscribed().await, "ingest may subscribe (shared)");
    let pi = p.device("raspi-01", "token-01");
    let streaming = pi.publish_slowly(reading("raspi-01"), 50);
    assert!(ingest.received(1).await, "raspi-01 publishing");
    let removed = p
        .broker
        .remove_device(&DeviceId::parse("raspi-01").unwrap())
        .await
        .unwrap();
    assert!(removed);
    let acked = streaming.await.unwrap();
    assert!(
        acked < 50,
        "the connection was cut at the revocation ({acked} acknowledged)"
    );
    let again = p.device("raspi-01", "token-01");
    assert_eq!(publish(&again, vec![reading("raspi-01")]).await, 0);
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
    let (p, stack, _persister, settings) = behind_production().await;
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
        ingest
            .metric("sensorhub_mqtt_messages_received_total")
            .await,
        1.0,
        "the others never reached ingest"
    );
    assert_eq!(stack.stored_ids("raspi-a"), ["a-1"]);
    assert!(stack.stored_ids("raspi-b").is_empty());
    ingest.stop().await;
}

#[tokio::test]
async fn ingest_mqtts_session_is_its_own_neither_a_device_nor_another_replica_can_take_it() {
    let (p, stack, _persister, mut settings) = behind_production().await;
    // plain subscriptions: every reading waits in replica 1's own session while it is away
    settings.mqtt_shared_group = String::new();
    let ingest = stack.ingest(&settings).await;
    ingest.stop().await;
    p.add_device("raspi-a", "token-a").await;
    let readings = crate::device_messages("raspi-a", 20);
    assert_eq!(
        p.device("raspi-a", "token-a")
            .publish_all(readings, Duration::ZERO, Duration::from_secs(5))
            .await,
        20
    );

    // the readings now wait in ingest-mqtt:1's session; whoever resumed it would get them
    assert_eq!(
        p.connect_as("ingest-mqtt:1", "raspi-a", "token-a").await,
        (Some(ConnectReturnCode::NotAuthorized), 0),
        "a device under ingest-mqtt's client id"
    );
    assert_eq!(
        p.connect_as("ingest-mqtt:1", "ingest-mqtt:2", INGEST_PASSWORD)
            .await,
        (Some(ConnectReturnCode::NotAuthorized), 0),
        "replica 2 under replica 1's client id"
    );
    assert_eq!(
        p.connect_as("ingest-mqtt:2", "ingest-mqtt:2", INGEST_PASSWORD)
            .await
            .0,
        Some(ConnectReturnCode::Success),
        "replica 2 under its own"
    );

    // replica 1 comes back to its session whole: every reading stored
    let ingest = stack.ingest(&settings).await;
    stack.wait_stored(20).await;
    let mut ids = stack.stored_ids("raspi-a");
    ids.sort();
    let mut expected: Vec<String> = (0..20).map(|i| format!("raspi-a-{i}")).collect();
    expected.sort();
    assert_eq!(ids, expected);
    ingest.stop().await;
}
