//! Commands over MQTT, the whole way: an app's command stored in PostgreSQL, published by the
//! persister, forwarded by ingest-mqtt to the device's topic on the production broker, the device's
//! answer on its result topic back through ingest-mqtt to the persister, which records it.

use std::time::Duration;

use models::DeviceCommand;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;
use store::commands::{Command, CommandEvent, Issued, NewCommand};
use testkit::spawn::{self, Running};
use testkit::{TestDb, eventually};
use tokio::sync::mpsc;

use crate::Stack;
use crate::rabbitmq::DurableStack;
use crate::security::{INGEST_PASSWORD, Production, production};

/// How long a step of these tests may take (they take well under a second each when all is well).
const STEP: Duration = Duration::from_secs(10);

/// The production broker, a stack behind it (the persister re-sending unanswered commands every
/// `resend_secs`), and ingest-mqtt as replica 1.
async fn commands_stack(resend_secs: u32) -> (Production, Stack, Running, Running) {
    let p = production().await;
    let stack = Stack::new();
    let mut persister = spawn::persister_settings(&stack.db.url, &stack.prefix);
    persister.command_resend_secs = resend_secs;
    let persister = spawn::persister(&persister).await;
    let mut settings = stack.settings("unused");
    p.ingest_settings(&mut settings, 1);
    let ingest = stack.ingest(&settings).await;
    (p, stack, persister, ingest)
}

/// A device registered in PostgreSQL (so commands may be issued to it) with its broker account;
/// its password.
async fn register(p: &Production, stack: &Stack, device: &str) -> String {
    let token = stack.keys.register_device(&stack.db.url, device);
    p.add_device(device, &token).await;
    token
}

/// An app's command to `device`, stored as query-api stores it (living a minute).
fn issue(db: &TestDb, device: &str, name: &str) -> Command {
    let id = testkit::unique_name("cmd");
    let args = json!({"on": true});
    let new = NewCommand {
        id: &id,
        device_id: device,
        name,
        args: &args,
        issued_by: "test-app-token",
        ttl: chrono::Duration::seconds(60),
    };
    match store::commands::issue_command(&mut db.connect(), &new, 10).unwrap() {
        Issued::Issued(command) => *command,
        other => panic!("not issued: {other:?}"),
    }
}

fn stored(db: &TestDb, id: &str) -> (Command, Vec<CommandEvent>) {
    store::commands::command(&mut db.connect(), id)
        .unwrap()
        .expect("the command is stored")
}

/// Waits until the command's stored status is `status`; answers it and its history's statuses.
async fn status_becomes(db: &TestDb, id: &str, status: &str) -> (Command, Vec<String>) {
    eventually(STEP, &format!("command {id} {status}"), || async {
        let (command, history) = stored(db, id);
        (command.stored_status == status)
            .then(|| (command, history.into_iter().map(|e| e.status).collect()))
    })
    .await
}

/// What a device sees on its MQTT connection.
#[derive(Debug)]
enum Heard {
    SubAck(bool),
    Message(String, Vec<u8>),
    PubAck,
    Gone,
}

/// A device on one MQTT 3.1.1 connection (clean session) of its own: it subscribes, receives
/// and publishes on that same connection, as a device's script does.
struct DeviceClient {
    client: AsyncClient,
    heard: mpsc::UnboundedReceiver<Heard>,
}

impl DeviceClient {
    /// A device of the production broker: its id as user name and client id.
    fn connect(p: &Production, device: &str, password: &str) -> Self {
        Self::connect_to(p.mosquitto.port, device, Some(password))
    }

    fn connect_to(port: u16, device: &str, password: Option<&str>) -> Self {
        let mut options = MqttOptions::new(device, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(10));
        if let Some(password) = password {
            options.set_credentials(device, password);
        }
        let (client, mut events) = AsyncClient::new(options, 16);
        let (tell, heard) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let heard = match events.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(ack))) => Heard::SubAck(
                        ack.return_codes
                            .iter()
                            .all(|c| !matches!(c, rumqttc::SubscribeReasonCode::Failure)),
                    ),
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        Heard::Message(p.topic.clone(), p.payload.to_vec())
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => Heard::PubAck,
                    Ok(_) => continue,
                    Err(_) => {
                        let _ = tell.send(Heard::Gone);
                        return;
                    }
                };
                if tell.send(heard).is_err() {
                    return;
                }
            }
        });
        Self { client, heard }
    }

    /// The next thing heard that `want` takes, within [`STEP`] (`None`: nothing, or gone).
    async fn next<T>(&mut self, within: Duration, want: impl Fn(Heard) -> Option<T>) -> Option<T> {
        tokio::time::timeout(within, async {
            loop {
                match self.heard.recv().await {
                    None | Some(Heard::Gone) => return None,
                    Some(heard) => {
                        if let Some(found) = want(heard) {
                            return Some(found);
                        }
                    }
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    /// Subscribes at QoS 1: whether the broker granted it.
    async fn subscribe(&mut self, filter: &str) -> bool {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        self.next(STEP, |h| match h {
            Heard::SubAck(granted) => Some(granted),
            _ => None,
        })
        .await
        .unwrap_or(false)
    }

    /// The next message received within `within`: (topic, payload).
    async fn message(&mut self, within: Duration) -> Option<(String, Vec<u8>)> {
        self.next(within, |h| match h {
            Heard::Message(topic, payload) => Some((topic, payload)),
            _ => None,
        })
        .await
    }

    /// Publishes at QoS 1 and waits for the broker's PUBACK.
    async fn publish(&mut self, topic: &str, payload: &[u8]) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .unwrap();
        let acked = self
            .next(STEP, |h| matches!(h, Heard::PubAck).then_some(()))
            .await;
        assert!(acked.is_some(), "the broker acknowledged {topic}");
    }
}

/// The command as the device must receive it: exactly the stored command's `DeviceCommand`.
fn as_sent(command: &Command) -> DeviceCommand {
    DeviceCommand {
        id: command.id.clone(),
        name: command.name.clone(),
        args: command.args.clone(),
        expires_at: command.expires_at,
    }
}

fn result_topic(device: &str, command: &str) -> String {
    format!("devices/{device}/commands/{command}/result")
}

/// `device` answers its `led` command as succeeded (`{"led": "on"}`), and the command ends so,
/// with its full history.
async fn turns_the_led_on(device: &mut DeviceClient, db: &TestDb, device_id: &str, command: &str) {
    device
        .publish(
            &result_topic(device_id, command),
            br#"{"status":"succeeded","result":{"led":"on"}}"#,
        )
        .await;
    let (done, history) = status_becomes(db, command, "succeeded").await;
    assert_eq!(history, ["pending", "sent", "succeeded"]);
    assert_eq!(done.result, Some(json!({"led": "on"})));
}

#[tokio::test]
async fn a_command_reaches_its_device_over_mqtt_and_its_answer_is_recorded() {
    let (p, stack, _persister, ingest) = commands_stack(30).await;
    let token = register(&p, &stack, "raspi-a").await;
    let mut device = DeviceClient::connect(&p, "raspi-a", &token);
    assert!(device.subscribe("devices/raspi-a/commands").await);

    let command = issue(&stack.db, "raspi-a", "led");
    let (topic, payload) = device.message(STEP).await.expect("the command arrives");
    assert_eq!(topic, "devices/raspi-a/commands");
    assert_eq!(DeviceCommand::decode(&payload).unwrap(), as_sent(&command));
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&payload).unwrap(),
        json!({"id": command.id, "name": "led", "args": {"on": true},
               "expires_at": command.expires_at}),
        "the wire shape devices are told of"
    );
    // reported sent once Mosquitto acknowledged it
    status_becomes(&stack.db, &command.id, "sent").await;

    turns_the_led_on(&mut device, &stack.db, "raspi-a", &command.id).await;
    assert_eq!(
        ingest
            .metric("sensorhub_mqtt_commands_total{outcome=\"sent\"}")
            .await,
        1.0
    );
    assert_eq!(
        ingest.metric("sensorhub_mqtt_command_answers_total").await,
        1.0
    );
    ingest.stop().await;
}

#[tokio::test]
async fn a_device_offline_when_its_command_was_issued_gets_it_when_it_connects() {
    let (p, stack, _persister, ingest) = commands_stack(1).await;
    let token = register(&p, &stack, "raspi-off").await;
    let command = issue(&stack.db, "raspi-off", "reboot");
    // published while nobody listens: acknowledged by Mosquitto, received by no one, not sent
    ingest
        .metrics_reaching(
            "sensorhub_mqtt_commands_total{outcome=\"no_subscriber\"}",
            1.0,
            STEP,
        )
        .await;
    assert_eq!(stored(&stack.db, &command.id).0.stored_status, "pending");

    // the device comes online (a clean session: nothing was kept for it) and gets the re-send
    let mut device = DeviceClient::connect(&p, "raspi-off", &token);
    assert!(device.subscribe("devices/raspi-off/commands").await);
    let (_, payload) = device.message(STEP).await.expect("the re-sent command");
    assert_eq!(DeviceCommand::decode(&payload).unwrap(), as_sent(&command));
    device
        .publish(
            &result_topic("raspi-off", &command.id),
            br#"{"status":"failed","result":"busy"}"#,
        )
        .await;
    let (done, history) = status_becomes(&stack.db, &command.id, "failed").await;
    assert_eq!(history, ["pending", "sent", "failed"]);
    assert_eq!(done.result, Some(json!("busy")));
    ingest.stop().await;
}

#[tokio::test]
async fn a_device_neither_reads_nor_answers_another_devices_commands() {
    let (p, stack, persister, ingest) = commands_stack(30).await;
    let token_a = register(&p, &stack, "raspi-a").await;
    let token_b = register(&p, &stack, "raspi-b").await;
    let mut b = DeviceClient::connect(&p, "raspi-b", &token_b);
    assert!(
        !b.subscribe("devices/raspi-a/commands").await,
        "B may not subscribe to A's commands"
    );
    assert!(
        !b.subscribe("devices/+/commands/+/result").await,
        "nor to anyone's answers"
    );
    let mut a = DeviceClient::connect(&p, "raspi-a", &token_a);
    assert!(a.subscribe("devices/raspi-a/commands").await);
    let command = issue(&stack.db, "raspi-a", "unlock");
    assert!(a.message(STEP).await.is_some(), "A gets its command");
    status_becomes(&stack.db, &command.id, "sent").await;
    assert!(
        b.message(Duration::from_millis(300)).await.is_none(),
        "B got nothing"
    );

    // B answering on A's result topic: the broker drops it (and, MQTT 3.1.1 having no way to say
    // so, ends B's connection); it never reaches ingest
    let as_a = (
        result_topic("raspi-a", &command.id),
        br#"{"status":"succeeded"}"#.to_vec(),
    );
    p.device("raspi-b", &token_b)
        .publish_all(vec![as_a], Duration::ZERO, Duration::from_secs(3))
        .await;
    // B answering A's command on its own result topic: ingest reports it, the persister refuses it
    let mut b = DeviceClient::connect(&p, "raspi-b", &token_b);
    b.publish(
        &result_topic("raspi-b", &command.id),
        br#"{"status":"succeeded"}"#,
    )
    .await;
    persister
        .metrics_reaching(
            "sensorhub_command_reports_total{outcome=\"not_the_devices\"}",
            1.0,
            STEP,
        )
        .await;
    assert_eq!(
        ingest
            .metric("sensorhub_mqtt_messages_received_total")
            .await,
        1.0,
        "only B's answer on its own topic reached ingest"
    );
    let (still, history) = stored(&stack.db, &command.id);
    assert_eq!(still.stored_status, "sent");
    assert_eq!(still.result, None);
    assert_eq!(history.len(), 2, "{history:?}");

    // A's own answer still counts
    a.publish(
        &result_topic("raspi-a", &command.id),
        br#"{"status":"succeeded"}"#,
    )
    .await;
    status_becomes(&stack.db, &command.id, "succeeded").await;
    ingest.stop().await;
}

#[tokio::test]
async fn an_invalid_answer_is_refused_counted_and_kept() {
    let stack = Stack::new();
    let _persister = stack.persister().await;
    let ingest = stack.ingest(&stack.settings("ingest-answers")).await;
    let topic = result_topic("raspi-a", "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b");
    let answers = vec![
        (topic.clone(), b"done!".to_vec()),
        (topic.clone(), br#"{"status":"maybe"}"#.to_vec()),
    ];
    assert_eq!(
        stack
            .device("raspi")
            .publish_all(answers.clone(), Duration::ZERO, STEP)
            .await,
        2
    );
    eventually(STEP, "both acknowledged", || async {
        (ingest.metric("sensorhub_mqtt_messages_acked_total").await == 2.0).then_some(())
    })
    .await;
    assert_eq!(crate::invalid(&ingest, "invalid_answer").await, 2.0);
    assert_eq!(
        ingest.metric("sensorhub_mqtt_command_answers_total").await,
        0.0
    );
    let kept = stack.take_invalid().await;
    assert_eq!(kept.len(), 2);
    for (topic, payload) in answers {
        let found = kept
            .iter()
            .find(|k| k.topic.as_deref() == Some(topic.as_str()) && k.payload == payload);
        assert!(found.is_some(), "{payload:?} kept");
    }
    assert!(kept.iter().all(|k| k.reason.starts_with("answer:")));
    ingest.stop().await;
}

/// Messages ready in `queue` of RabbitMQ at `amqp_url`.
async fn ready_in(amqp_url: &str, queue: &str) -> u32 {
    let conn = bus::connect(amqp_url, "mqtt-test").await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    let declared = channel
        .queue_declare(
            queue.into(),
            bus::lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let _ = conn.close(200, "counted".into()).await;
    declared.message_count()
}

#[tokio::test]
async fn in_rabbitmq_mode_commands_go_out_through_the_mqtt_exchange_and_answers_come_back() {
    // devices log in as in production: RabbitMQ asks ingest-http, which must let a device
    // publish its answers
    let stack = DurableStack::with_device_accounts().await;
    let _persister = stack.persister().await;
    let ingest = stack
        .ingest(&stack.settings("ingest-durable-commands"))
        .await;
    let token = stack.register("raspi-r");
    stack.register("raspi-away");
    let mut device = DeviceClient::connect_to(stack.node.mqtt_port, "raspi-r", Some(&token));
    assert!(device.subscribe("devices/raspi-r/commands").await);

    let away = issue(&stack.db, "raspi-away", "led");
    let command = issue(&stack.db, "raspi-r", "led");
    let (topic, payload) = device.message(STEP).await.expect("the command arrives");
    assert_eq!(topic, "devices/raspi-r/commands");
    assert_eq!(DeviceCommand::decode(&payload).unwrap(), as_sent(&command));
    turns_the_led_on(&mut device, &stack.db, "raspi-r", &command.id).await;

    // the command of the device that is not subscribed went nowhere, and is not kept unrouted
    status_becomes(&stack.db, &away.id, "sent").await;
    let unrouted = bus::MqttTopology::with_prefix(&stack.prefix).unrouted_queue;
    assert_eq!(ready_in(&stack.node.amqp_url(), &unrouted).await, 0);
    assert_eq!(
        ingest.metric("sensorhub_mqtt_command_answers_total").await,
        1.0
    );
    ingest.stop().await;
}

#[tokio::test]
async fn mqtt_init_gives_the_ingest_role_of_an_earlier_version_what_commands_need() {
    let p = production().await;
    // the role as earlier versions left it: readings only
    let removed = [
        ("subscribePattern", "devices/+/commands/+/result"),
        ("subscribePattern", "$share/+/devices/+/commands/+/result"),
        ("publishClientReceive", "devices/+/commands/+/result"),
        ("publishClientSend", "devices/+/commands"),
    ]
    .map(|(acltype, topic)| {
        json!({"command": "removeRoleACL", "rolename": mqtt_admin::INGEST_ROLE,
               "acltype": acltype, "topic": topic})
    });
    p.broker.run(removed.to_vec(), &[]).await.unwrap();
    let answers = "$share/sensorhub/devices/+/commands/+/result";
    let mut ingest = DeviceClient::connect(&p, "ingest-mqtt:1", INGEST_PASSWORD);
    assert!(!ingest.subscribe(answers).await, "not allowed before");

    let accounts = mqtt_admin::IngestAccounts {
        password: INGEST_PASSWORD,
        replicas: 2,
        legacy_topic: Some("sensor/data"),
    };
    p.broker.init(&accounts, &[]).await.unwrap();
    p.add_device("raspi-u", "token-u").await;
    let mut device = DeviceClient::connect(&p, "raspi-u", "token-u");
    assert!(device.subscribe("devices/raspi-u/commands").await);
    let mut ingest = DeviceClient::connect(&p, "ingest-mqtt:1", INGEST_PASSWORD);
    assert!(ingest.subscribe(answers).await, "allowed after init");
    ingest.publish("devices/raspi-u/commands", b"{}").await;
    assert_eq!(
        device.message(STEP).await,
        Some(("devices/raspi-u/commands".to_owned(), b"{}".to_vec()))
    );
    device
        .publish(
            "devices/raspi-u/commands/c-1/result",
            br#"{"status":"failed"}"#,
        )
        .await;
    assert_eq!(
        ingest.message(STEP).await.map(|(topic, _)| topic),
        Some("devices/raspi-u/commands/c-1/result".to_owned())
    );
}

#[tokio::test]
async fn commands_issued_while_mosquitto_is_down_go_out_once_it_is_back() {
    let (mut p, stack, _persister, ingest) = commands_stack(1).await;
    let token = register(&p, &stack, "raspi-m").await;
    p.mosquitto.kill();
    let command = issue(&stack.db, "raspi-m", "led");
    // taken off RabbitMQ, held while ingest-mqtt has no connection: nothing reported
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(stored(&stack.db, &command.id).0.stored_status, "pending");
    p.mosquitto.restart();
    eventually(STEP, "ingest-mqtt back", || async {
        (ingest.readyz().await == 200).then_some(())
    })
    .await;
    let mut device = DeviceClient::connect(&p, "raspi-m", &token);
    assert!(device.subscribe("devices/raspi-m/commands").await);
    let (_, payload) = device.message(STEP).await.expect("the command");
    assert_eq!(DeviceCommand::decode(&payload).unwrap(), as_sent(&command));
    // the PUBACKs after the reconnection still answer the right commands (re-sends of the first
    // may come in between: devices act on a command id once)
    let second = issue(&stack.db, "raspi-m", "buzz");
    loop {
        let (_, payload) = device.message(STEP).await.expect("the second command");
        let received = DeviceCommand::decode(&payload).unwrap();
        if received.id != command.id {
            assert_eq!(received, as_sent(&second));
            break;
        }
    }
    status_becomes(&stack.db, &command.id, "sent").await;
    status_becomes(&stack.db, &second.id, "sent").await;
    ingest.stop().await;
}
