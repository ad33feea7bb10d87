//! Simulated Pis that take commands, as the README's LED example does: one subscribed over MQTT,
//! one asking by long-poll. Each acts on a command id once, answers every delivery of it (a
//! command may arrive more than once: delivery is at least once), and keeps going through refused
//! connections and restarts. A ledger counts the deliveries of each command, so a run can say how
//! many were repeats.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;
use tokio::task::JoinSet;

use crate::devices::MqttLogin;

/// How long a device waits before trying again after a failure.
const RETRY: Duration = Duration::from_millis(200);
/// The long-poll's `wait`: short, so a device notices a stop soon.
const POLL_WAIT_SECS: u32 = 2;

/// The answer every simulated Pi gives: its LED is on.
pub fn led_answer() -> serde_json::Value {
    json!({"status": "succeeded", "result": {"led": "on"}})
}

/// Command id → how many times it was delivered.
#[derive(Default)]
pub struct CommandLedger {
    deliveries: Mutex<HashMap<String, u32>>,
}

impl CommandLedger {
    fn delivered(&self, command_id: &str) {
        if let Ok(mut deliveries) = self.deliveries.lock() {
            *deliveries.entry(command_id.to_owned()).or_default() += 1;
        }
    }

    /// Deliveries in all, and how many commands were delivered at all.
    pub fn counts(&self) -> (u32, usize) {
        self.deliveries
            .lock()
            .map(|d| (d.values().sum(), d.len()))
            .unwrap_or_default()
    }
}

/// A device that takes commands: its id and token, and how it listens.
pub struct CommandedDevice {
    pub id: String,
    pub token: String,
    pub channel: Listening,
}

pub enum Listening {
    /// Subscribed to `devices/<id>/commands` on the broker at this port, keeping its session.
    Mqtt { port: u16, login: MqttLogin },
    /// `GET /v1/commands/next` on ingest-http at this URL.
    LongPoll { ingest_url: String },
}

/// Commanded devices at work until [`CommandedDevices::stop`].
pub struct CommandedDevices {
    ledger: Arc<CommandLedger>,
    stop: Arc<AtomicBool>,
    tasks: JoinSet<()>,
}

impl CommandedDevices {
    pub fn start(devices: Vec<CommandedDevice>) -> anyhow::Result<Self> {
        let ledger = Arc::new(CommandLedger::default());
        let stop = Arc::new(AtomicBool::new(false));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(u64::from(POLL_WAIT_SECS) + 5))
            .build()?;
        let mut tasks = JoinSet::new();
        for device in devices {
            let (ledger, stop) = (ledger.clone(), stop.clone());
            match device.channel {
                Listening::Mqtt { port, login } => {
                    tasks.spawn(over_mqtt(
                        device.id,
                        device.token,
                        port,
                        login,
                        ledger,
                        stop,
                    ));
                }
                Listening::LongPoll { ingest_url } => {
                    let poller = Poller {
                        http: http.clone(),
                        ingest_url,
                        token: device.token,
                        ledger,
                    };
                    tasks.spawn(poller.run(stop));
                }
            }
        }
        Ok(Self {
            ledger,
            stop,
            tasks,
        })
    }

    /// Stops the devices (each within a few seconds) and returns the ledger.
    pub async fn stop(mut self) -> Arc<CommandLedger> {
        self.stop.store(true, Ordering::SeqCst);
        let stopped = tokio::time::timeout(Duration::from_secs(10), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if stopped.is_err() {
            self.tasks.abort_all();
        }
        self.ledger
    }
}

/// The MQTT device: connects (again and again, as needed) with a session the broker keeps, so
/// commands sent while it was away arrive when it is back; answers each command on its result
/// topic.
async fn over_mqtt(
    device: String,
    token: String,
    port: u16,
    login: MqttLogin,
    ledger: Arc<CommandLedger>,
    stop: Arc<AtomicBool>,
) {
    let commands = format!("devices/{device}/commands");
    while !stop.load(Ordering::SeqCst) {
        let mut options = MqttOptions::new(device.clone(), "127.0.0.1", port);
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_clean_session(false);
        if login == MqttLogin::DeviceToken {
            options.set_credentials(device.clone(), token.clone());
        }
        let (client, mut events) = AsyncClient::new(options, 16);
        while !stop.load(Ordering::SeqCst) {
            let event = match tokio::time::timeout(Duration::from_secs(1), events.poll()).await {
                Err(_) => continue, // quiet: look at `stop` again
                Ok(Err(_)) => break,
                Ok(Ok(event)) => event,
            };
            match event {
                Event::Incoming(Packet::ConnAck(_))
                    if client.subscribe(&commands, QoS::AtLeastOnce).await.is_err() =>
                {
                    break;
                }
                Event::Incoming(Packet::Publish(publish)) => {
                    let Ok(command) = serde_json::from_slice::<serde_json::Value>(&publish.payload)
                    else {
                        continue;
                    };
                    let Some(id) = command["id"].as_str() else {
                        continue;
                    };
                    ledger.delivered(id);
                    let topic = format!("devices/{device}/commands/{id}/result");
                    let answer = led_answer().to_string();
                    if client
                        .publish(topic, QoS::AtLeastOnce, false, answer)
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                _ => {}
            }
        }
        crate::mqtt::disconnect(&client, &mut events, Duration::from_millis(300)).await;
        if !stop.load(Ordering::SeqCst) {
            tokio::time::sleep(RETRY).await;
        }
    }
}

/// The long-poll device.
struct Poller {
    http: reqwest::Client,
    ingest_url: String,
    token: String,
    ledger: Arc<CommandLedger>,
}

impl Poller {
    async fn run(self, stop: Arc<AtomicBool>) {
        while !stop.load(Ordering::SeqCst) {
            match self.next().await {
                Ok(Some(id)) => self.answer(&id, &stop).await,
                Ok(None) => {}
                Err(_) => tokio::time::sleep(RETRY).await,
            }
        }
    }

    /// The next command's id, `None` when none came within the wait.
    async fn next(&self) -> reqwest::Result<Option<String>> {
        let response = self
            .http
            .get(format!(
                "{}/v1/commands/next?wait={POLL_WAIT_SECS}",
                self.ingest_url
            ))
            .bearer_auth(&self.token)
            .send()
            .await?
            .error_for_status()?;
        if response.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(None);
        }
        let command: serde_json::Value = response.json().await?;
        let id = command["id"].as_str().map(str::to_owned);
        if let Some(id) = &id {
            self.ledger.delivered(id);
        }
        Ok(id)
    }

    /// Answers until the server took it (`202`) or says the command is finished (`409`: answered
    /// already, by an earlier attempt whose answer was lost on the way back).
    async fn answer(&self, id: &str, stop: &AtomicBool) {
        let url = format!("{}/v1/commands/{id}/result", self.ingest_url);
        while !stop.load(Ordering::SeqCst) {
            let sent = self
                .http
                .post(&url)
                .bearer_auth(&self.token)
                .json(&led_answer())
                .send()
                .await;
            match sent.map(|r| r.status()) {
                Ok(status) if status.is_success() || status == reqwest::StatusCode::CONFLICT => {
                    return;
                }
                _ => tokio::time::sleep(RETRY).await,
            }
        }
    }
}
