//! A private Mosquitto per test (so tests sharing topic names cannot see each other), and simulated
//! devices that publish at QoS 1 and count the broker's PUBACKs.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// The dynamic security admin of [`Mosquitto::production`] instances.
pub const DYNSEC_ADMIN: (&str, &str) = ("admin", "admin-secret");

/// Where the distribution keeps the dynamic security plugin (the production file names the
/// official image's path).
fn dynsec_plugin() -> PathBuf {
    [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
    ]
    .iter()
    .map(|d| Path::new(d).join("mosquitto_dynamic_security.so"))
    .find(|p| p.exists())
    .expect("mosquitto's dynamic security plugin (Debian's mosquitto package has it)")
}

/// A Mosquitto process of its own, on a free port, stopped (SIGKILL) when dropped.
pub struct Mosquitto {
    pub port: u16,
    pub dir: PathBuf,
    config: String,
    child: Option<Child>,
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Mosquitto {
    /// Anonymous access, deep queues (Mosquitto's default of 1,000 queued messages per session would
    /// drop what tests send in bursts), persistence in its own directory.
    pub fn anonymous() -> Self {
        Self::start_with(|port, dir| {
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                 persistence_location {}/\nmax_queued_messages 0\nmax_inflight_messages 1000\n\
                 max_packet_size 1048576\nlog_dest stderr\nlog_type error\n",
                dir.display()
            )
        })
    }

    /// deploy/mosquitto/mosquitto.conf with only its ports and paths changed, its dynamic security
    /// file made as deploy/README.md has the operator make it (admin: [`DYNSEC_ADMIN`]). The TLS
    /// listener's port is `tls_port`, its certificate `dir/server.crt`.
    pub fn production() -> Self {
        Self::start_with(|port, dir| {
            let tls_port = free_port();
            let run = |cmd: &mut Command| {
                let out = cmd.output().expect("run a tool");
                assert!(
                    out.status.success(),
                    "{cmd:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            };
            run(Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                ])
                .args(["-subj", "/CN=localhost", "-keyout"])
                .arg(dir.join("server.key"))
                .arg("-out")
                .arg(dir.join("server.crt")));
            std::fs::create_dir_all(dir.join("data")).expect("data dir");
            std::fs::write(dir.join("tls_port"), tls_port.to_string()).expect("tls port");
            run(Command::new("mosquitto_ctrl")
                .args(["dynsec", "init"])
                .arg(dir.join("data/dynamic-security.json"))
                .args([DYNSEC_ADMIN.0, DYNSEC_ADMIN.1]));
            let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/mosquitto");
            std::fs::read_to_string(deploy.join("mosquitto.conf"))
                .expect("deploy/mosquitto/mosquitto.conf")
                .replace("listener 1883", &format!("listener {port} 127.0.0.1"))
                .replace("listener 8883", &format!("listener {tls_port} 127.0.0.1"))
                .replace(
                    "/usr/lib/mosquitto_dynamic_security.so",
                    &dynsec_plugin().display().to_string(),
                )
                .replace("/mosquitto/data/", &format!("{}/data/", dir.display()))
                .replace("/mosquitto/certs/", &format!("{}/", dir.display()))
                .replace("log_dest stdout", "log_dest stderr")
        })
    }

    /// The TLS listener's port of a [`Mosquitto::production`] instance.
    pub fn tls_port(&self) -> u16 {
        std::fs::read_to_string(self.dir.join("tls_port"))
            .ok()
            .and_then(|p| p.parse().ok())
            .expect("a production instance")
    }

    /// `mqtt://admin:password@127.0.0.1:port`, the dynamic security admin of a production instance.
    pub fn admin_url(&self) -> String {
        format!(
            "mqtt://{}:{}@127.0.0.1:{}",
            DYNSEC_ADMIN.0, DYNSEC_ADMIN.1, self.port
        )
    }

    /// `config(port, dir)` returns the configuration to run with (the port is free, the directory
    /// private to this instance).
    pub fn start_with(config: impl FnOnce(u16, &Path) -> String) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(crate::unique_name("mosquitto"));
        std::fs::create_dir_all(&dir).expect("mosquitto dir");
        let mut config = config(port, &dir);
        // As root, Mosquitto switches to the `mosquitto` user, which cannot read our files.
        if std::fs::metadata("/proc/self")
            .map(|m| m.uid())
            .unwrap_or(1)
            == 0
        {
            config.push_str("\nuser root\n");
        }
        let mut m = Self {
            port,
            dir,
            config,
            child: None,
        };
        m.restart();
        m
    }

    /// Starts the process again (after [`Mosquitto::kill`]), same port, same persistence.
    pub fn restart(&mut self) {
        let conf = self.dir.join("mosquitto.conf");
        std::fs::write(&conf, &self.config).expect("write mosquitto.conf");
        // its log, in its directory, out of the tests' output
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("mosquitto.log"))
            .expect("mosquitto log");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mosquitto (is it installed? scripts/test installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not start on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A simulated device: an MQTT 3.1.1 client that publishes at QoS 1.
pub struct Device {
    pub client_id: String,
    pub port: u16,
    pub credentials: Option<(String, String)>,
}

impl Device {
    pub fn new(client_id: &str, port: u16) -> Self {
        Self {
            client_id: client_id.to_owned(),
            port,
            credentials: None,
        }
    }

    pub fn with_credentials(mut self, user: &str, password: &str) -> Self {
        self.credentials = Some((user.to_owned(), password.to_owned()));
        self
    }

    fn options(&self) -> MqttOptions {
        let mut o = MqttOptions::new(&self.client_id, "127.0.0.1", self.port);
        o.set_keep_alive(Duration::from_secs(10))
            .set_inflight(100)
            .set_max_packet_size(1 << 20, 1 << 20);
        if let Some((user, password)) = &self.credentials {
            o.set_credentials(user, password);
        }
        o
    }

    /// Publishes every message at QoS 1 (`pace`: pause between publishes) and returns how many the
    /// broker acknowledged within `timeout`. Errors (a refused connection) end the attempt.
    pub async fn publish_all(
        &self,
        messages: Vec<(String, Vec<u8>)>,
        pace: Duration,
        timeout: Duration,
    ) -> usize {
        self.publish_all_tracked(messages, pace, timeout)
            .await
            .len()
    }

    /// As [`Device::publish_all`], and says exactly which messages (their indices) the broker
    /// acknowledged: each PUBACK is matched to its publish by packet id, so a test need not assume
    /// that the acknowledgements come in publish order.
    pub async fn publish_all_tracked(
        &self,
        messages: Vec<(String, Vec<u8>)>,
        pace: Duration,
        timeout: Duration,
    ) -> Vec<usize> {
        let total = messages.len();
        let (client, mut events) = AsyncClient::new(self.options(), 128);
        let sender = client.clone();
        let feeding = tokio::spawn(async move {
            for (topic, payload) in messages {
                if sender
                    .publish(topic, QoS::AtLeastOnce, false, payload)
                    .await
                    .is_err()
                {
                    return;
                }
                if !pace.is_zero() {
                    tokio::time::sleep(pace).await;
                }
            }
        });
        let deadline = tokio::time::Instant::now() + timeout;
        // packet id -> the index of the message it carries (ids are reused once acknowledged)
        let mut in_flight = HashMap::new();
        let mut written = 0;
        let mut acked = Vec::new();
        while acked.len() < total {
            match tokio::time::timeout_at(deadline, events.poll()).await {
                Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid)))) => {
                    in_flight.insert(pkid, written);
                    written += 1;
                }
                Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                    if let Some(index) = in_flight.remove(&ack.pkid) {
                        acked.push(index);
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => break,
            }
        }
        feeding.abort();
        system::mqtt::disconnect(&client, &mut events, Duration::from_secs(1)).await;
        acked.sort_unstable();
        acked
    }

    /// Subscribes to `filter` at QoS 1 and collects what arrives for `listen`: (topic, payload).
    /// Returns `None` when the subscription is refused.
    pub async fn subscribe_and_collect(
        &self,
        filter: &str,
        listen: Duration,
    ) -> Option<Vec<(String, Vec<u8>)>> {
        self.listen(filter, listen).collect().await
    }

    /// Subscribes to `filter` at QoS 1 and listens for `listen` on a task of its own, so a test
    /// can publish once [`Listening::subscribed`] says the broker has taken the subscription,
    /// rather than after a guessed pause.
    pub fn listen(&self, filter: &str, listen: Duration) -> Listening {
        let (client, mut events) = AsyncClient::new(self.options(), 16);
        let (heard, receiver) = tokio::sync::mpsc::unbounded_channel();
        let filter = filter.to_owned();
        tokio::spawn(async move {
            if client.subscribe(filter, QoS::AtLeastOnce).await.is_err() {
                return;
            }
            let deadline = tokio::time::Instant::now() + listen;
            loop {
                match tokio::time::timeout_at(deadline, events.poll()).await {
                    Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => {
                        let granted = ack
                            .return_codes
                            .iter()
                            .all(|c| !matches!(c, rumqttc::SubscribeReasonCode::Failure));
                        let _ = heard.send(Heard::Granted(granted));
                        if !granted {
                            break;
                        }
                    }
                    Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                        let _ = heard.send(Heard::Message(p.topic.clone(), p.payload.to_vec()));
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) | Err(_) => break,
                }
            }
            let _ = client.disconnect().await;
        });
        Listening {
            heard: receiver,
            granted: None,
            got: Vec::new(),
        }
    }

    /// Publishes `message` `times` times, 100 ms apart, on a task of its own (giving up after
    /// 8 s): a device connected and publishing while the test does something to it, such as
    /// revoke it. The task answers how many the broker acknowledged.
    pub fn publish_slowly(
        self,
        message: (String, Vec<u8>),
        times: usize,
    ) -> tokio::task::JoinHandle<usize> {
        tokio::spawn(async move {
            let messages = vec![message; times];
            self.publish_all(messages, Duration::from_millis(100), Duration::from_secs(8))
                .await
        })
    }
}

/// What a [`Device::listen`] task hears.
enum Heard {
    /// The broker's answer to the subscription: granted or refused.
    Granted(bool),
    Message(String, Vec<u8>),
}

/// A subscription listening on its own task (see [`Device::listen`]).
pub struct Listening {
    heard: tokio::sync::mpsc::UnboundedReceiver<Heard>,
    granted: Option<bool>,
    got: Vec<(String, Vec<u8>)>,
}

impl Listening {
    /// Waits for the broker's answer to the subscription: true when it was granted, false when it
    /// was refused or the listening ended without an answer.
    pub async fn subscribed(&mut self) -> bool {
        while self.granted.is_none() && self.hear().await {}
        self.granted == Some(true)
    }

    /// Waits until `n` messages have arrived in all; false when the listening ended first.
    pub async fn received(&mut self, n: usize) -> bool {
        while self.got.len() < n && self.hear().await {}
        self.got.len() >= n
    }

    /// Everything that arrived until the listening ended, (topic, payload); `None` when the
    /// subscription was refused (or never answered).
    pub async fn collect(mut self) -> Option<Vec<(String, Vec<u8>)>> {
        while self.hear().await {}
        match self.granted {
            Some(true) => Some(self.got),
            _ => None,
        }
    }

    /// The topics of everything that arrived until the listening ended, in order; `None` when the
    /// subscription was refused (or never answered).
    pub async fn topics(self) -> Option<Vec<String>> {
        let got = self.collect().await?;
        Some(got.into_iter().map(|(topic, _)| topic).collect())
    }

    /// Takes in what the task heard next; false once it has ended.
    async fn hear(&mut self) -> bool {
        match self.heard.recv().await {
            Some(Heard::Granted(granted)) => self.granted = Some(granted),
            Some(Heard::Message(topic, payload)) => self.got.push((topic, payload)),
            None => return false,
        }
        true
    }
}

/// Counts by key, for asserting that every message arrived exactly once.
pub fn tally<K: std::hash::Hash + Eq>(items: impl IntoIterator<Item = K>) -> HashMap<K, usize> {
    let mut counts = HashMap::new();
    for item in items {
        *counts.entry(item).or_insert(0) += 1;
    }
    counts
}
