//! A private Mosquitto per test (so tests sharing topic names cannot see each other), and simulated
//! devices that publish at QoS 1 and count the broker's PUBACKs.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

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
        let mut acked = 0;
        while acked < total {
            match tokio::time::timeout_at(deadline, events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => break,
            }
        }
        feeding.abort();
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while !matches!(
                events.poll().await,
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_)
            ) {}
        })
        .await;
        acked
    }

    /// Subscribes to `filter` at QoS 1 and collects what arrives for `listen`: (topic, payload).
    /// Returns `None` when the subscription is refused.
    pub async fn subscribe_and_collect(
        &self,
        filter: &str,
        listen: Duration,
    ) -> Option<Vec<(String, Vec<u8>)>> {
        let (client, mut events) = AsyncClient::new(self.options(), 16);
        client.subscribe(filter, QoS::AtLeastOnce).await.ok()?;
        let deadline = tokio::time::Instant::now() + listen;
        let mut got = Vec::new();
        let mut granted = None;
        loop {
            match tokio::time::timeout_at(deadline, events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => {
                    granted = Some(
                        ack.return_codes
                            .iter()
                            .all(|c| !matches!(c, rumqttc::SubscribeReasonCode::Failure)),
                    );
                    if granted == Some(false) {
                        break;
                    }
                }
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    got.push((p.topic.clone(), p.payload.to_vec()))
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => break,
            }
        }
        let _ = client.disconnect().await;
        match granted {
            Some(true) => Some(got),
            _ => None,
        }
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
