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
async fn over_mqtt_sigkill_mid_flush_stores_everything_once() {
    crate::sigkill_mid_flush(Transport::Mqtt).await;
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
/// false) and reaches it when it connects again; one that expired meanwhile is not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mqtt_a_command_sent_while_the_agent_is_away_reaches_it_when_it_is_back() {
    let pi = pi("mqtt-away").await;
    let mut agent = pi.start_agent();
    pi.wait_stored_at_least(1).await;
    agent.stop().await;
    let id = pi.issue_command("led", json!({"on": false}));
    // the broker took it for the agent's session: the server counts it sent
    pi.wait_command_status(&id, "sent").await;
    // one that expires while the agent is away waits in the session too, and is not run
    let late = pi.issue_command_living("led", json!({"on": true}), chrono::Duration::seconds(2));
    pi.wait_command_status(&late, "sent").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut agent = pi.start_agent();
    let command = pi.wait_command_finished(&id).await;
    assert_eq!(
        command.result,
        Some(json!({"led": "off", "args": {"on": false}}))
    );
    pi.wait_all_taken_stored(&mut agent).await;
    agent.stop().await;
    assert_eq!(pi.handler_runs(), 1, "the expired command was not run");
    let log = std::fs::read_to_string(pi.dir.join("agent.log")).unwrap();
    assert!(log.contains("expired before it arrived"), "{log}");
    // stopped once while the sensor ran: a run under way at SIGTERM was counted by the script,
    // never kept by the agent
    assert_each_once_in_order(&pi, 1);
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

/// `mqtts://`: the broker's certificate checked against `server.ca_file` (beside the system's
/// roots, which do not know this test's CA), through the same rustls configuration as HTTPS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mqtts_check_trusts_the_ca_file_and_nothing_else() {
    let pi = pi("mqtts-check").await;
    let tls = testkit::mqtt::Mosquitto::start_with(|port, dir| {
        // a CA, and the broker's certificate signed by it (a self-signed certificate is a CA
        // used as an end entity, which rustls refuses)
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=agent test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ]);
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\ncertfile {dir}/server.crt\n\
             keyfile {dir}/server.key\nlog_dest stderr\nlog_type error\n",
            dir = dir.display()
        )
    });
    let config_path = pi.dir.join("agent.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    let start = config.find("mqtt_url = ").unwrap();
    let end = start + config[start..].find('\n').unwrap();
    let plain = &config[start..end];
    let with_tls = |ca_file: bool| {
        let mut line = format!("mqtt_url = \"mqtts://localhost:{}\"", tls.port);
        if ca_file {
            line.push_str(&format!("\nca_file = \"{}/ca.crt\"", tls.dir.display()));
        }
        config.replace(plain, &line)
    };

    std::fs::write(&config_path, with_tls(true)).unwrap();
    let (ok, out) = pi.check();
    assert!(ok, "{out}");
    assert!(out.contains("broker mqtts://localhost"), "{out}");
    assert!(out.contains("the token is accepted"), "{out}");

    std::fs::write(&config_path, with_tls(false)).unwrap();
    let (ok, out) = pi.check();
    assert!(!ok, "an unknown CA: {out}");
    assert!(out.contains("FAIL  broker mqtts://"), "{out}");
    eprintln!("{out}");
}

/// Broker mode `rabbitmq` (RabbitMQ's MQTT plugin, what new deployments use): the same agent,
/// readings through an outage stored once, a command there and back, and `check` told whether
/// the token is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_rabbitmq_mqtt_readings_survive_an_outage_a_command_comes_and_goes_and_check_sees_the_token()
 {
    let pi = Pi::with("rmqtt", |c| c.transport = Transport::RabbitMqtt).await;
    let mut agent = pi.start_agent();
    pi.wait_stored_at_least(5).await;
    let id = pi.issue_command("led", json!({"on": true}));
    let command = pi.wait_command_finished(&id).await;
    assert_eq!(
        command.result,
        Some(json!({"led": "on", "args": {"on": true}}))
    );
    pi.proxy.cut();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(agent.status()["last_error"].is_string());
    pi.proxy.restore();
    pi.wait_all_taken_stored(&mut agent).await;
    assert_small(&agent);
    agent.stop().await;
    assert_each_once_in_order(&pi, 0);
    assert_eq!(pi.handler_runs(), 1);

    // RabbitMQ asks ingest-http about the login: check hears the token accepted, or refused
    std::fs::remove_file(pi.dir.join("pause")).unwrap();
    let (ok, out) = pi.check();
    assert!(ok && out.contains("the token is accepted"), "{out}");
    std::fs::write(pi.dir.join("token"), "not-a-token").unwrap();
    let (ok, out) = pi.check();
    assert!(!ok, "{out}");
    assert!(out.contains("refuses the token"), "{out}");
}
