//! `transport = "mqtt"`: the agent against a Mosquitto of the test's own, ingest-mqtt bridging it
//! to RabbitMQ, and the persister: readings stored once through an outage (a cut proxy in front
//! of the broker), commands received on the MQTT connection and answered there, a command sent
//! while the agent was away received from its persistent session, and `check`.

use std::time::Duration;

use serde_json::json;

use crate::assert_each_once_in_order;
use crate::fixture::{Pi, Transport};

/// The most resident memory the agent may use (a Pi Zero has 512 MB for everything).
const MAX_RSS_KIB: u64 = 10 * 1024;

async fn pi(tag: &str) -> Pi {
    Pi::with(tag, |c| c.transport = Transport::Mqtt).await
}

/// The agent's memory, asserted below the bound (not under an emulator, which counts its own).
fn assert_small(agent: &crate::fixture::Agent) -> u64 {
    let rss = agent.rss_kib().expect("the agent's VmRSS");
    if std::env::var_os("SENSORHUB_AGENT_RUNNER").is_none() {
        assert!(rss < MAX_RSS_KIB, "the agent uses {rss} KiB");
    }
    rss
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mqtt_an_outage_loses_nothing_and_each_reading_is_stored_once() {
    let pi = pi("mqtt-outage").await;
    let mut agent = pi.start_agent();
    pi.wait_stored_at_least(5).await;
    let before = assert_small(&agent);

    pi.proxy.cut();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = agent.status();
    assert!(
        during["depth"].as_i64().unwrap() >= 10,
        "readings kept while the broker is away: {during}"
    );
    assert!(during["last_error"].is_string(), "{during}");
    pi.proxy.restore();

    pi.wait_all_taken_stored(&mut agent).await;
    let after = assert_small(&agent);
    eprintln!("the agent's VmRSS: {before} KiB running, {after} KiB after the outage");
    agent.stop().await;
    let stored = assert_each_once_in_order(&pi, 0);
    assert!(stored.len() >= 30, "{} stored", stored.len());
    assert_eq!(agent.status()["depth"], json!(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mqtt_a_command_runs_its_handler_once_and_its_result_is_stored() {
    let pi = pi("mqtt-command").await;
    let mut agent = pi.start_agent();
    pi.wait_stored_at_least(1).await;
    let id = pi.issue_command("led", json!({"on": true}));
    let command = pi.wait_command_finished(&id).await;
    assert_eq!(command.stored_status, "succeeded");
    assert_eq!(
        command.result,
        Some(json!({"led": "on", "args": {"on": true}}))
    );
    let id = pi.issue_command("reboot", json!({}));
    let command = pi.wait_command_finished(&id).await;
    assert_eq!(command.stored_status, "failed");
    assert!(
        command.result.unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("no handler")
    );
    // the server resends unanswered commands every 2 s here: a repeat is not run again
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(pi.handler_runs(), 1);
    agent.stop().await;
    assert_eq!(agent.status()["commands_run_total"], json!(2));
}

/// A command sent while the agent is stopped waits in its persistent session (clean_session =
/// false) and reaches it when it connects again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mqtt_a_command_sent_while_the_agent_is_away_reaches_it_when_it_is_back() {
    let pi = pi("mqtt-away").await;
    let mut agent = pi.start_agent();
    pi.wait_stored_at_least(1).await;
    agent.stop().await;
    let id = pi.issue_command("led", json!({"on": false}));
    // the broker took it for the agent's session: the server counts it sent
    pi.wait_command_status(&id, "sent").await;
    let mut agent = pi.start_agent();
    let command = pi.wait_command_finished(&id).await;
    assert_eq!(
        command.result,
        Some(json!({"led": "off", "args": {"on": false}}))
    );
    assert_eq!(pi.handler_runs(), 1);
    pi.wait_all_taken_stored(&mut agent).await;
    agent.stop().await;
    assert_each_once_in_order(&pi, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mqtt_check_sees_the_broker_accept_the_login() {
    let pi = pi("mqtt-check").await;
    let (ok, out) = pi.check();
    assert!(ok, "{out}");
    assert!(out.contains("broker mqtt://"), "{out}");
    assert!(out.contains("the token is accepted"), "{out}");
    pi.proxy.cut();
    let (ok, out) = pi.check();
    assert!(!ok, "{out}");
    assert!(out.contains("FAIL  broker mqtt://"), "{out}");
    assert_eq!(pi.stored_seqs().len(), 0, "check stores nothing");
}
