//! The persister's half of commands: publishing what is due, re-sending what is unanswered, never
//! what expired, and recording the ingest services' reports exactly, refusing what it must.

use bus::lapin::options::BasicGetOptions;
use bus::lapin::{Channel, message::BasicGetMessage};
use models::{Channel as Via, CommandReport, DeviceCommand, DeviceId};
use store::commands::{Issued, NewCommand};
use testkit::eventually;

use crate::{Fixture, WAIT};

const DEVICE: &str = "raspi-01";

fn issue(f: &Fixture, id: &str, ttl_secs: i64) {
    let mut conn = f.db.connect();
    let args = serde_json::json!({"on": true});
    let issued = store::commands::issue_command(
        &mut conn,
        &NewCommand {
            id,
            device_id: DEVICE,
            name: "led",
            args: &args,
            issued_by: "test",
            ttl: chrono::Duration::seconds(ttl_secs),
        },
        100,
    )
    .unwrap();
    assert!(matches!(issued, Issued::Issued(_)), "{issued:?}");
}

fn register(f: &Fixture) {
    let mut conn = f.db.connect();
    store::credentials::register_device(&mut conn, DEVICE, "token-1").unwrap();
}

fn device(id: &str) -> DeviceId {
    DeviceId::parse(id).unwrap()
}

async fn next_message(channel: &Channel, queue: &str, what: &str) -> BasicGetMessage {
    eventually(WAIT, what, || async {
        channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
    })
    .await
}

/// The command as stored, and the statuses of its history in order.
fn stored(f: &Fixture, id: &str) -> (store::commands::Command, Vec<String>) {
    let mut conn = f.db.connect();
    let (command, history) = store::commands::command(&mut conn, id).unwrap().unwrap();
    (command, history.into_iter().map(|e| e.status).collect())
}

async fn wait_status(
    f: &Fixture,
    id: &str,
    status: &str,
) -> (store::commands::Command, Vec<String>) {
    let what = format!("command {id} {status}");
    eventually(WAIT, &what, || async {
        let (command, history) = stored(f, id);
        (command.stored_status == status).then_some((command, history))
    })
    .await
}

/// A new command is published at once, routed by its device id; the reports of its sending and
/// its answer make it `succeeded` with its result and an exact history; a redelivered answer
/// changes nothing, and another device's answer, or one for an unknown command, is refused onto
/// the dead-letter queue with the reason.
#[tokio::test]
async fn a_command_is_published_and_its_reports_recorded_exactly() {
    let f = Fixture::new();
    register(&f);
    let running = crate::spawn::persister(&f.settings()).await;
    let publisher = f.publisher().await;
    let (_conn, channel) = f.channel().await;

    issue(&f, "cmd-1", 300);
    let message = next_message(&channel, &f.topology.mqtt_commands_queue, "the command").await;
    assert_eq!(message.delivery.routing_key.as_str(), DEVICE);
    let command = DeviceCommand::decode(&message.delivery.data).unwrap();
    assert_eq!(
        (command.id.as_str(), command.name.as_str(), &command.args),
        ("cmd-1", "led", &serde_json::json!({"on": true}))
    );

    publisher
        .publish_report(&CommandReport::sent("cmd-1", device(DEVICE), Via::Mqtt))
        .await
        .unwrap();
    wait_status(&f, "cmd-1", "sent").await;
    let answer =
        models::parse_command_answer(br#"{"status":"succeeded","result":{"led":"on"}}"#).unwrap();
    let answered = CommandReport::answered("cmd-1", device(DEVICE), Via::Mqtt, answer);
    publisher.publish_report(&answered).await.unwrap();
    let (command, history) = wait_status(&f, "cmd-1", "succeeded").await;
    assert_eq!(history, ["pending", "sent", "succeeded"]);
    assert_eq!(command.result, Some(serde_json::json!({"led": "on"})));
    assert_eq!(command.finished_at, Some(answered.at));

    // the same answer again (a redelivery), then another device's, then one for no command
    publisher.publish_report(&answered).await.unwrap();
    let mut stolen = answered.clone();
    stolen.device_id = device("raspi-02");
    publisher.publish_report(&stolen).await.unwrap();
    let mut unknown = answered.clone();
    unknown.command_id = "cmd-unknown".into();
    publisher.publish_report(&unknown).await.unwrap();
    let mut reasons = Vec::new();
    for what in ["the first refused report", "the second refused report"] {
        let dead = next_message(&channel, &f.topology.dead_reports_queue, what).await;
        let headers = dead.delivery.properties.headers().clone().unwrap();
        let reason = headers.inner()[bus::REASON_HEADER]
            .as_long_string()
            .unwrap();
        reasons.push(reason.to_string());
    }
    assert_eq!(
        reasons,
        ["the command is not this device's", "no such command"]
    );
    let metrics = running.metrics().await;
    for (outcome, count) in [
        ("recorded", 2.0),
        ("unchanged", 1.0),
        ("not_the_devices", 1.0),
        ("no_such_command", 1.0),
    ] {
        let series = format!("sensorhub_command_reports_total{{outcome=\"{outcome}\"}}");
        assert_eq!(testkit::metric(&metrics, &series), count, "{series}");
    }
    let (command, history) = stored(&f, "cmd-1");
    assert_eq!(command.stored_status, "succeeded");
    assert_eq!(history, ["pending", "sent", "succeeded"]);
    running.stop().await;
}

/// An unanswered command is published again after the re-send interval (what reaches a device
/// that was offline); one past its expiry is never published.
#[tokio::test]
async fn an_unanswered_command_is_sent_again_and_an_expired_one_never() {
    let f = Fixture::new();
    register(&f);
    issue(&f, "cmd-expired", 1);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let mut settings = f.settings();
    settings.command_resend_secs = 1;
    let running = crate::spawn::persister(&settings).await;
    let (_conn, channel) = f.channel().await;

    issue(&f, "cmd-2", 300);
    let queue = &f.topology.mqtt_commands_queue;
    for what in ["the command", "the command sent again"] {
        let message = next_message(&channel, queue, what).await;
        let command = DeviceCommand::decode(&message.delivery.data).unwrap();
        assert_eq!(
            command.id, "cmd-2",
            "{what}: the expired command is never published"
        );
    }
    assert_eq!(stored(&f, "cmd-expired").0.stored_status, "expired");
    running.stop().await;
}
