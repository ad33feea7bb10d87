//! deploy/mosquitto's production configuration, loaded into a real Mosquitto: nobody in without
//! credentials, each device confined to its own topics, and the TLS listener up.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use testkit::mqtt::{Device, Mosquitto, free_port};

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/mosquitto");

struct Production {
    mosquitto: Mosquitto,
    tls_port: u16,
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run a tool");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The production files with only ports and paths changed.
fn production() -> Production {
    let tls_port = free_port();
    let mosquitto = Mosquitto::start_with(|port, dir: &Path| {
        let passwd = dir.join("passwd");
        run(Command::new("mosquitto_passwd")
            .arg("-c")
            .arg("-b")
            .arg(&passwd)
            .args(["sensorhub-ingest", "ingest-secret"]));
        for (user, password) in [("raspi-01", "pw-01"), ("raspi-02", "pw-02")] {
            run(Command::new("mosquitto_passwd")
                .arg("-b")
                .arg(&passwd)
                .args([user, password]));
        }
        run(Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=localhost",
                "-keyout",
            ])
            .arg(dir.join("server.key"))
            .arg("-out")
            .arg(dir.join("server.crt")));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let production = std::fs::read_to_string(format!("{DEPLOY}/mosquitto.conf")).unwrap();
        let acl = format!("{DEPLOY}/acl");
        production
            .replace("listener 1883", &format!("listener {port} 127.0.0.1"))
            .replace("listener 8883", &format!("listener {tls_port} 127.0.0.1"))
            .replace("/mosquitto/config/passwd", &passwd.display().to_string())
            .replace("/mosquitto/config/acl", &acl)
            .replace("/mosquitto/data/", &format!("{}/data/", dir.display()))
            .replace("/mosquitto/certs/", &format!("{}/", dir.display()))
            .replace("log_dest stdout", "log_dest stderr")
    });
    Production {
        mosquitto,
        tls_port,
    }
}

fn reading(device: &str) -> (String, Vec<u8>) {
    (
        format!("devices/{device}/readings"),
        br#"{"metrics":{"t":1}}"#.to_vec(),
    )
}

#[tokio::test]
async fn nobody_gets_in_without_credentials() {
    let p = production();
    let port = p.mosquitto.port;
    let wait = Duration::from_secs(3);
    assert_eq!(
        Device::new("anon", port)
            .publish_all(vec![reading("raspi-01")], Duration::ZERO, wait)
            .await,
        0
    );
    let wrong = Device::new("wrong", port).with_credentials("raspi-01", "not-the-password");
    assert_eq!(
        wrong
            .publish_all(vec![reading("raspi-01")], Duration::ZERO, wait)
            .await,
        0
    );
    let right = Device::new("right", port).with_credentials("raspi-01", "pw-01");
    assert_eq!(
        right
            .publish_all(vec![reading("raspi-01")], Duration::ZERO, wait)
            .await,
        1
    );
}

#[tokio::test]
async fn a_device_publishes_only_as_itself_and_ingest_sees_only_that() {
    let p = production();
    let port = p.mosquitto.port;
    let ingest = Device::new("ingest", port).with_credentials("sensorhub-ingest", "ingest-secret");
    let listening = tokio::spawn(async move {
        ingest
            .subscribe_and_collect(
                "$share/sensorhub/devices/+/readings",
                Duration::from_secs(3),
            )
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pi = Device::new("pi", port).with_credentials("raspi-01", "pw-01");
    // MQTT 3.1.1 cannot say "refused" to a publish: Mosquitto acknowledges and drops it
    pi.publish_all(
        vec![reading("raspi-01"), reading("raspi-02")],
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
    let p = production();
    let port = p.mosquitto.port;
    // Mosquitto grants any subscription and filters what it delivers by the ACL: subscribe to
    // everything, and see what arrives.
    let pi1 = Device::new("pi1-listen", port).with_credentials("raspi-01", "pw-01");
    let listening =
        tokio::spawn(async move { pi1.subscribe_and_collect("#", Duration::from_secs(3)).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let command = |device: &str| (format!("devices/{device}/commands"), b"{}".to_vec());
    let pi2 = Device::new("pi2", port).with_credentials("raspi-02", "pw-02");
    pi2.publish_all(
        vec![command("raspi-02"), reading("raspi-02")],
        Duration::ZERO,
        Duration::from_secs(3),
    )
    .await;
    let pi1 = Device::new("pi1-send", port).with_credentials("raspi-01", "pw-01");
    pi1.publish_all(
        vec![command("raspi-01"), reading("raspi-01")],
        Duration::ZERO,
        Duration::from_secs(3),
    )
    .await;
    let seen = listening.await.unwrap().expect("subscribed");
    let topics: Vec<&str> = seen.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(topics, ["devices/raspi-01/commands"]);
}

#[tokio::test]
async fn the_tls_listener_serves_its_certificate() {
    let p = production();
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
