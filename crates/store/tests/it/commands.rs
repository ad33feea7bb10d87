//! Recording what happened to a command: forward only, once, and only from its own device.

use chrono::{Duration, Utc};
use models::{Channel, CommandReport, DeviceId, Outcome, ReportKind};
use store::commands::{CommandStatus, Issued, NewCommand, Refusal, Reported};

use crate::Store;

fn issue(s: &mut Store, id: &str, ttl: Duration) {
    store::credentials::register_device(&mut s.conn, "pi-a", "token").unwrap();
    let issued = store::commands::issue_command(
        &mut s.conn,
        &NewCommand {
            id,
            device_id: "pi-a",
            name: "led",
            args: &serde_json::Value::Null,
            issued_by: "test",
            ttl,
        },
        10,
    )
    .unwrap();
    assert!(matches!(issued, Issued::Issued(_)));
}

fn answer(id: &str, device: &str, outcome: Outcome) -> CommandReport {
    CommandReport {
        command_id: id.into(),
        device_id: DeviceId::parse(device).unwrap(),
        at: Utc::now(),
        via: Channel::LongPoll,
        kind: ReportKind::Answered {
            outcome,
            result: Some(serde_json::json!({"n": 1})),
        },
    }
}

fn record(s: &mut Store, report: &CommandReport) -> Reported {
    store::commands::record_report(&mut s.conn, report, Duration::seconds(30)).unwrap()
}

fn history(s: &mut Store, id: &str) -> Vec<String> {
    let (_, history) = store::commands::command(&mut s.conn, id).unwrap().unwrap();
    history.into_iter().map(|e| e.status).collect()
}

#[test]
fn an_answer_to_a_pending_command_records_its_sending_too_and_nothing_moves_back() {
    let mut s = Store::new();
    issue(&mut s, "c1", Duration::seconds(300));
    let succeeded = answer("c1", "pi-a", Outcome::Succeeded);
    assert!(matches!(record(&mut s, &succeeded), Reported::Recorded(_)));
    assert_eq!(history(&mut s, "c1"), ["pending", "sent", "succeeded"]);
    // the same answer again, a late `sent`, and a contradicting answer
    assert!(matches!(record(&mut s, &succeeded), Reported::Unchanged));
    let sent = CommandReport::sent("c1", DeviceId::parse("pi-a").unwrap(), Channel::Mqtt);
    assert!(matches!(record(&mut s, &sent), Reported::Unchanged));
    assert!(matches!(
        record(&mut s, &answer("c1", "pi-a", Outcome::Failed)),
        Reported::Refused(Refusal::Finished(CommandStatus::Succeeded))
    ));
    assert_eq!(history(&mut s, "c1"), ["pending", "sent", "succeeded"]);
}

#[test]
fn another_devices_or_a_late_answer_is_refused() {
    let mut s = Store::new();
    issue(&mut s, "c1", Duration::seconds(300));
    issue(&mut s, "c2", Duration::milliseconds(10));
    assert!(matches!(
        record(&mut s, &answer("c1", "pi-b", Outcome::Succeeded)),
        Reported::Refused(Refusal::NotTheDevices)
    ));
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert!(matches!(
        record(&mut s, &answer("c2", "pi-a", Outcome::Succeeded)),
        Reported::Refused(Refusal::Finished(CommandStatus::Expired))
    ));
    assert!(matches!(
        record(&mut s, &answer("nope", "pi-a", Outcome::Succeeded)),
        Reported::Refused(Refusal::NoSuchCommand)
    ));
    assert_eq!(history(&mut s, "c1"), ["pending"]);
    assert_eq!(history(&mut s, "c2"), ["pending"]);
}

#[test]
fn a_claimed_command_is_not_claimed_again_until_its_resend_is_due() {
    let mut s = Store::new();
    issue(&mut s, "c1", Duration::seconds(300));
    let claim =
        |s: &mut Store, resend| store::commands::claim_due(&mut s.conn, resend, 10).unwrap();
    let first = claim(&mut s, Duration::seconds(300));
    assert_eq!(first.len(), 1);
    assert!(
        claim(&mut s, Duration::seconds(300)).is_empty(),
        "claimed already"
    );
    store::commands::release(&mut s.conn, &["c1".to_owned()]).unwrap();
    assert_eq!(
        claim(&mut s, Duration::seconds(300)).len(),
        1,
        "handed back"
    );
}
