//! A simulated Pi: its own database and queue names, the server's way in (ingest-http, or a
//! private Mosquitto with ingest-mqtt, behind a TCP proxy the test can cut) and the persister
//! running in the test; a folder with the agent's configuration, token, outbox, a counting sensor
//! script and an LED handler script; the agent as a process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use testkit::mqtt::Mosquitto;
use testkit::rabbitmq::{MqttAuth, RabbitMqtt};
use testkit::spawn::{self, Running};
use testkit::{AmqpPrefix, TcpProxy, TestDb, TestKeys};

/// How long anything may take before the test fails.
const WAIT: Duration = Duration::from_secs(60);

/// The sensor: counts its runs in `count` and prints `seq=<n>`; fails while `pause` exists.
const SENSOR: &str = r#"#!/bin/sh
dir=$(dirname "$0")
[ -e "$dir/pause" ] && exit 1
n=$(cat "$dir/count" 2>/dev/null || echo 0)
n=$((n + 1))
echo "$n" > "$dir/count.tmp" && mv "$dir/count.tmp" "$dir/count"
echo "seq=$n"
"#;

/// The LED handler: counts its runs, answers the LED's state and the args it was given.
const LED: &str = r#"#!/bin/sh
dir=$(dirname "$0")
read -r args
echo run >> "$dir/handler-runs"
case "$args" in
  *'"on":true'*) state=on ;;
  *) state=off ;;
esac
printf '{"led": "%s", "args": %s}\n' "$state" "$args"
"#;

/// How the agent reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// ingest-http.
    Http,
    /// A Mosquitto of the test's own (anonymous), with ingest-mqtt bridging it to RabbitMQ.
    Mqtt,
    /// A RabbitMQ node of the test's own with the MQTT plugin, the whole stack on it: broker mode
    /// `rabbitmq`, which new deployments use. Devices log in as in production: RabbitMQ asks
    /// ingest-http, which checks the device's token.
    RabbitMqtt,
}

/// The MQTT broker a test started, if any: stopped when dropped.
#[allow(dead_code, reason = "held only to be dropped last")]
enum Broker {
    None,
    Mosquitto(Mosquitto),
    /// The node, and the ingest-http it asks about devices' logins.
    RabbitMqtt(RabbitMqtt, Running),
}

/// What a test may change in the agent's configuration.
pub struct Settings {
    pub max_readings: u64,
    pub batch: usize,
    pub transport: Transport,
}

pub struct Pi {
    pub db: TestDb,
    pub device: String,
    pub dir: PathBuf,
    pub proxy: TcpProxy,
    _prefix: AmqpPrefix,
    _ingest: Running,
    _persister: Running,
    /// The broker, with transport MQTT (declared after ingest-mqtt, so it is dropped after it).
    _broker: Broker,
}

impl Pi {
    pub async fn new(tag: &str) -> Self {
        Self::with(tag, |_| {}).await
    }

    pub async fn with(tag: &str, adjust: impl FnOnce(&mut Settings)) -> Self {
        service_kit::telemetry::init_for_tests();
        let db = TestDb::migrated();
        let keys = TestKeys::new();
        keys.record_app_tokens_in(&db.url);
        let prefix = AmqpPrefix::new("agent-test");
        let device = format!("pi-{tag}");
        let token = keys.register_device(&db.url, &device);
        let mut settings = Settings {
            max_readings: 100_000,
            batch: 5,
            transport: Transport::Http,
        };
        adjust(&mut settings);
        let mut persister = spawn::persister_settings(&db.url, &prefix);
        let (ingest, broker, proxy, server) = match settings.transport {
            Transport::Http => {
                let mut ingest =
                    spawn::ingest_http_settings(&db.url, &prefix, &keys.verifying_key_file());
                ingest.max_body_bytes = 256 * 1024;
                let ingest = spawn::ingest_http(&ingest).await;
                let proxy = TcpProxy::start(&format!("127.0.0.1:{}", ingest.port())).await;
                let server = format!(
                    "transport = \"http\"\nurl = \"http://127.0.0.1:{}\"",
                    proxy.port
                );
                (ingest, Broker::None, proxy, server)
            }
            Transport::Mqtt => {
                // a command published before the agent subscribed goes again this soon
                persister.command_resend_secs = 2;
                let broker = Mosquitto::anonymous();
                let ingest = spawn::ingest_mqtt(&spawn::ingest_mqtt_settings(
                    broker.port,
                    "ingest-mqtt:agent-test",
                    &prefix,
                ))
                .await;
                let proxy = TcpProxy::start(&format!("127.0.0.1:{}", broker.port)).await;
                let server = format!(
                    "transport = \"mqtt\"\nmqtt_url = \"mqtt://127.0.0.1:{}\"",
                    proxy.port
                );
                (ingest, Broker::Mosquitto(broker), proxy, server)
            }
            Transport::RabbitMqtt => {
                persister.command_resend_secs = 2;
                let mut auth =
                    spawn::ingest_http_settings(&db.url, &prefix, &keys.verifying_key_file());
                auth.rabbitmq_mqtt_auth = true;
                let auth = spawn::ingest_http(&auth).await;
                let node = RabbitMqtt::start(
                    &prefix,
                    MqttAuth::Http {
                        base_url: format!("{}/internal/rabbitmq", auth.url),
                    },
                );
                persister.bus.amqp_url = node.amqp_url();
                let mut ingest =
                    spawn::ingest_mqtt_settings(node.mqtt_port, "ingest-mqtt:agent-test", &prefix);
                ingest.mqtt_broker = ingest_mqtt::MqttBroker::Rabbitmq;
                ingest.bus.amqp_url = node.amqp_url();
                let ingest = spawn::ingest_mqtt(&ingest).await;
                let proxy = TcpProxy::start(&format!("127.0.0.1:{}", node.mqtt_port)).await;
                let server = format!(
                    "transport = \"mqtt\"\nmqtt_url = \"mqtt://127.0.0.1:{}\"",
                    proxy.port
                );
                (ingest, Broker::RabbitMqtt(node, auth), proxy, server)
            }
        };
        let persister = spawn::persister(&persister).await;

        let dir = std::env::temp_dir().join(format!("agent-it-{tag}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("token"), token).unwrap();
        std::fs::write(dir.join("sensor.sh"), SENSOR).unwrap();
        std::fs::write(dir.join("led.sh"), LED).unwrap();
        let config = format!(
            r#"
device_id = "{device}"
token_file = "{dir}/token"

[server]
{server}
timeout = "5s"
backoff_max = "1s"

[outbox]
path = "{dir}/outbox.db"
max_readings = {max}
batch = {batch}

[clock]
sync = "system"

[[source]]
kind = "command"
run = ["sh", "{dir}/sensor.sh"]
every = "100ms"

[commands.led]
run = ["sh", "{dir}/led.sh"]
timeout = "5s"
"#,
            dir = dir.display(),
            max = settings.max_readings,
            batch = settings.batch,
        );
        std::fs::write(dir.join("agent.toml"), config).unwrap();
        let pi = Self {
            db,
            device,
            dir,
            proxy,
            _prefix: prefix,
            _ingest: ingest,
            _persister: persister,
            _broker: broker,
        };
        pi.set_clock(0, true);
        pi
    }

    /// The agent's command line: this build, or the one under test through its runner.
    fn command(&self, args: &[&str]) -> Command {
        let binary = std::env::var("SENSORHUB_AGENT_UNDER_TEST")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_sensorhub-agent").to_owned());
        let runner = std::env::var("SENSORHUB_AGENT_RUNNER").unwrap_or_default();
        let mut words = runner.split_whitespace();
        let mut command = match words.next() {
            Some(program) => {
                let mut c = Command::new(program);
                c.args(words).arg(&binary);
                c
            }
            None => Command::new(&binary),
        };
        command
            .args([
                "--config",
                &self.dir.join("agent.toml").display().to_string(),
            ])
            .args(args)
            .env(
                sensorhub_agent::clock::TEST_CLOCK_ENV,
                self.dir.join("clock"),
            )
            .env("RUST_LOG", "info");
        command
    }

    pub fn start_agent(&self) -> Agent {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .unwrap();
        let child = self
            .command(&["run"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Agent {
            child: Some(child),
            pi_dir: self.dir.clone(),
            status: self.command(&["status", "--json"]),
        }
    }

    /// `sensorhub-agent check`: whether it passed, and what it printed.
    pub fn check(&self) -> (bool, String) {
        let output = self.command(&["check"]).output().unwrap();
        (
            output.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        )
    }

    /// The agent's clock: the system's moved by `offset_secs`, synchronised or not.
    pub fn set_clock(&self, offset_secs: i64, synced: bool) {
        let word = if synced { "synced" } else { "unsynced" };
        std::fs::write(self.dir.join("clock"), format!("{offset_secs} {word}")).unwrap();
    }

    /// How many readings the sensor script has given.
    pub fn taken(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("count"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn handler_runs(&self) -> usize {
        std::fs::read_to_string(self.dir.join("handler-runs"))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }

    /// Every stored reading's `seq` and time, by seq (a repeat would show twice).
    pub fn stored_seqs(&self) -> Vec<(u64, chrono::DateTime<chrono::Utc>)> {
        let mut seqs: Vec<_> = testkit::stored_readings(&self.db.url, &self.device, 1_000_000)
            .into_iter()
            .filter_map(|r| Some((r.metrics.get("seq")?.as_f64()? as u64, r.ts)))
            .collect();
        seqs.sort();
        seqs
    }

    /// The stored values of `metric`.
    pub fn metric_values(&self, metric: &str) -> Vec<f64> {
        testkit::stored_readings(&self.db.url, &self.device, 1_000_000)
            .into_iter()
            .filter_map(|r| r.metrics.get(metric)?.as_f64())
            .collect()
    }

    pub async fn wait_stored_at_least(&self, n: usize) {
        self.wait(&format!("{n} readings stored"), || {
            (self.stored_seqs().len() >= n).then_some(())
        })
        .await
    }

    /// Stops the sensor, then waits until the outbox is empty and the persister has stored
    /// what the agent sent.
    pub async fn wait_all_taken_stored(&self, agent: &mut Agent) {
        std::fs::write(self.dir.join("pause"), "").unwrap();
        // a run of the script already under way finishes
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.wait("the outbox empty", || {
            let status = agent.status();
            (status["depth"] == 0).then_some(())
        })
        .await;
        // acknowledged means in RabbitMQ; the persister stores it a moment later
        let mut last = usize::MAX;
        self.wait("the stored count settled", || {
            let now = self.stored_seqs().len();
            let settled = now == last;
            last = now;
            if !settled {
                std::thread::sleep(Duration::from_millis(300));
            }
            settled.then_some(())
        })
        .await;
    }

    /// Issues command `name` to this Pi as query-api does; its id.
    pub fn issue_command(&self, name: &str, args: Value) -> String {
        self.issue_command_living(name, args, chrono::Duration::minutes(5))
    }

    /// The same, the command expiring after `ttl`.
    pub fn issue_command_living(&self, name: &str, args: Value, ttl: chrono::Duration) -> String {
        let id = uuid::Uuid::now_v7().to_string();
        let new = store::commands::NewCommand {
            id: &id,
            device_id: &self.device,
            name,
            args: &args,
            issued_by: "test",
            ttl,
        };
        let issued = store::commands::issue_command(&mut self.db.connect(), &new, 10).unwrap();
        assert!(
            matches!(issued, store::commands::Issued::Issued(_)),
            "{issued:?}"
        );
        id
    }

    pub async fn wait_command_finished(&self, id: &str) -> store::commands::Command {
        self.wait(&format!("command {id} finished"), || {
            store::commands::command(&mut self.db.connect(), id)
                .unwrap()
                .map(|(command, _)| command)
                .filter(|c| c.finished_at.is_some())
        })
        .await
    }

    /// Waits until command `id`'s stored status is `status`.
    pub async fn wait_command_status(&self, id: &str, status: &str) {
        self.wait(&format!("command {id} {status}"), || {
            store::commands::command(&mut self.db.connect(), id)
                .unwrap()
                .filter(|(command, _)| command.stored_status == status)
                .map(|_| ())
        })
        .await
    }

    /// Polls `check` until it answers, or fails the test with the agent's log.
    async fn wait<T>(&self, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(value) = check() {
                return value;
            }
            if std::time::Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; the agent's log:\n{}",
                    log_tail(&self.dir)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Pi {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("the agent's log:\n{}", log_tail(&self.dir));
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn log_tail(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The agent, running.
pub struct Agent {
    child: Option<Child>,
    pi_dir: PathBuf,
    status: Command,
}

impl Agent {
    /// `sensorhub-agent status --json`, as JSON.
    pub fn status(&mut self) -> Value {
        let output = self.status.output().unwrap();
        assert!(
            output.status.success(),
            "status: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }

    /// Its resident memory (`VmRSS`), in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    }

    /// SIGKILL, as a power cut would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, as systemd stops it; it must exit 0 within 10 s.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "the agent exited {status}:\n{}",
                    log_tail(&self.pi_dir)
                );
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the agent did not stop on SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}
