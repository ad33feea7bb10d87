//! Simulated Pis that behave as careful ones do: each reading gets its id and time once, and is sent
//! again, unchanged, until the server acknowledges it (HTTP 2xx, MQTT PUBACK). What was sent and
//! what was acknowledged is written in a ledger, to be compared with what PostgreSQL stored.
//!
//! Also the reading formats every simulated Pi sends ([`reading`], [`flat_reading`]), so the chaos
//! run's fleet and the deployment tests build them in one way.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;
use tokio::task::JoinSet;
use tokio::time::Instant;

const FIRST_RETRY_DELAY: Duration = Duration::from_millis(50);
const MAX_RETRY_DELAY: Duration = Duration::from_millis(500);

/// An HTTP device's delays between sends of one request, each drawn from `[d/2, d]` where `d`
/// doubles from [`FIRST_RETRY_DELAY`] to [`MAX_RETRY_DELAY`]: as a fleet of Pis does, the devices
/// refused together do not all come back at once. (backon's jitter adds up to the delay itself,
/// hence the halves.)
fn retry_delays() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::new()
        .with_min_delay(FIRST_RETRY_DELAY / 2)
        .with_max_delay(MAX_RETRY_DELAY / 2)
        .with_jitter()
        .without_max_times()
        .build()
}

/// A reading in the `POST /v1/readings` format (with `device` `None`, MQTT's: the topic names the
/// device), with its own `id` and `ts`, so that sending it again (a retry) stores it once.
pub fn reading(device: Option<&str>, id: &str, ts: &str, temperature: f64) -> serde_json::Value {
    let mut reading = json!({"id": id, "ts": ts,
                             "metrics": {"temperature": temperature, "humidity": 60.0}});
    if let Some(device) = device {
        reading["device_id"] = device.into();
    }
    reading
}

/// A reading in the seed's flat `POST /data` format.
pub fn flat_reading(device: &str, id: &str, ts: &str, temperature: f64) -> serde_json::Value {
    json!({"device_id": device, "id": id, "ts": ts, "temperature": temperature, "humidity": 60.0})
}

/// How a simulated device sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `POST /data`, one reading in the seed's flat format.
    HttpSingle,
    /// `POST /v1/readings`, an array of readings.
    HttpBatch,
    /// QoS 1 to `devices/<id>/readings`, one message in flight.
    Mqtt,
}

impl Kind {
    fn tag(self) -> &'static str {
        match self {
            Kind::HttpSingle => "h",
            Kind::HttpBatch => "b",
            Kind::Mqtt => "m",
        }
    }
}

/// How many devices of each kind, and how fast they send.
#[derive(Debug, Clone)]
pub struct FleetPlan {
    pub http_devices: usize,
    pub batch_devices: usize,
    pub batch_size: usize,
    pub mqtt_devices: usize,
    /// Pause between a device's readings (or batches), once the previous one was acknowledged.
    pub pace: Duration,
}

impl FleetPlan {
    /// The device ids of one step: `<step>-<kind><n>`, e.g. `s03-h7`.
    pub fn devices(&self, step_tag: &str) -> Vec<(String, Kind)> {
        let kinds = [
            (Kind::HttpSingle, self.http_devices),
            (Kind::HttpBatch, self.batch_devices),
            (Kind::Mqtt, self.mqtt_devices),
        ];
        kinds
            .into_iter()
            .flat_map(|(kind, n)| {
                (0..n).map(move |i| (format!("{step_tag}-{}{i}", kind.tag()), kind))
            })
            .collect()
    }
}

/// What the devices of one step sent and were told.
#[derive(Default)]
pub struct Ledger {
    /// Distinct readings created (each sent at least once).
    pub sent: AtomicU64,
    /// Sending attempts after the first, for every reason.
    pub retries: AtomicU64,
    /// Answers by HTTP status other than 2xx, and failures to connect or to get an answer.
    refusals: Mutex<BTreeMap<String, u64>>,
    /// Readings given up on: never acknowledged before the deadline.
    pub unacknowledged: AtomicU64,
    /// (device id, reading id) of every acknowledged reading.
    acknowledged: Mutex<Vec<(String, String)>>,
}

impl Ledger {
    fn refused(&self, why: String) {
        *self
            .refusals
            .lock()
            .expect("ledger lock")
            .entry(why)
            .or_default() += 1;
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    fn acknowledge(&self, device: &str, ids: impl IntoIterator<Item = String>) {
        let mut acked = self.acknowledged.lock().expect("ledger lock");
        acked.extend(ids.into_iter().map(|id| (device.to_owned(), id)));
    }

    /// Calls `each` with every acknowledgement from the `from`-th on; returns how many there are
    /// now (the next call's `from`), so a watcher goes through each once.
    pub fn acknowledged_from(&self, from: usize, mut each: impl FnMut(&str)) -> usize {
        let acked = self.acknowledged.lock().expect("ledger lock");
        for (device, _) in acked.iter().skip(from) {
            each(device);
        }
        acked.len()
    }

    /// Readings acknowledged so far.
    pub fn acknowledged_count(&self) -> usize {
        self.acknowledged.lock().expect("ledger lock").len()
    }

    pub fn acknowledged(&self) -> Vec<(String, String)> {
        self.acknowledged.lock().expect("ledger lock").clone()
    }

    pub fn refusals(&self) -> BTreeMap<String, u64> {
        self.refusals.lock().expect("ledger lock").clone()
    }
}

/// Where the devices send.
#[derive(Clone)]
pub struct Targets {
    pub ingest_url: String,
    pub mqtt_port: u16,
    /// How MQTT devices connect: anonymous with a client id of their own choosing (Mosquitto as the
    /// chaos run sets it up), or as RabbitMQ's MQTT plugin with the HTTP auth backend demands.
    pub mqtt_login: MqttLogin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttLogin {
    /// No user name; client id `<device>-<attempt>`, so a new connection never waits for the
    /// broker to notice that the old one is gone.
    Anonymous,
    /// User name and client id = the device id, password = its token (MQTT 3.1.1); a new
    /// connection takes the client id over from the old one.
    DeviceToken,
}

/// The devices of one step, sending until told to stop.
pub struct RunningFleet {
    ledger: Arc<Ledger>,
    stop_new: Arc<AtomicBool>,
    give_up: Arc<Mutex<Option<Instant>>>,
    tasks: JoinSet<()>,
}

impl RunningFleet {
    pub fn start(
        plan: &FleetPlan,
        devices: Vec<(String, Kind, String)>,
        targets: Targets,
    ) -> anyhow::Result<Self> {
        let ledger = Arc::new(Ledger::default());
        let stop_new = Arc::new(AtomicBool::new(false));
        let give_up = Arc::new(Mutex::new(None));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(64)
            .build()?;
        let mut tasks = JoinSet::new();
        for (device, kind, token) in devices {
            let device = Device {
                id: device,
                token,
                ledger: ledger.clone(),
                stop_new: stop_new.clone(),
                give_up: give_up.clone(),
                pace: plan.pace,
            };
            match kind {
                Kind::HttpSingle => {
                    tasks.spawn(device.http(http.clone(), targets.ingest_url.clone(), None));
                }
                Kind::HttpBatch => {
                    tasks.spawn(device.http(
                        http.clone(),
                        targets.ingest_url.clone(),
                        Some(plan.batch_size.max(1)),
                    ));
                }
                Kind::Mqtt => {
                    tasks.spawn(device.mqtt(targets.mqtt_port, targets.mqtt_login));
                }
            }
        }
        Ok(Self {
            ledger,
            stop_new,
            give_up,
            tasks,
        })
    }

    pub fn acknowledged_so_far(&self) -> usize {
        self.ledger.acknowledged_count()
    }

    /// The ledger, to watch while the devices run.
    pub fn ledger(&self) -> Arc<Ledger> {
        self.ledger.clone()
    }

    /// No new readings; those not acknowledged yet are sent again until `deadline`.
    pub async fn finish(mut self, deadline: Instant) -> Arc<Ledger> {
        self.stop_new.store(true, Ordering::SeqCst);
        *self.give_up.lock().expect("deadline lock") = Some(deadline);
        while self.tasks.join_next().await.is_some() {}
        self.ledger
    }
}

struct Device {
    id: String,
    token: String,
    ledger: Arc<Ledger>,
    stop_new: Arc<AtomicBool>,
    give_up: Arc<Mutex<Option<Instant>>>,
    pace: Duration,
}

impl Device {
    fn stopping(&self) -> bool {
        self.stop_new.load(Ordering::SeqCst)
    }

    fn past_deadline(&self) -> bool {
        self.give_up
            .lock()
            .expect("deadline lock")
            .is_some_and(|d| Instant::now() > d)
    }

    /// A reading's fields, fixed when it is made: retries send exactly these.
    fn next_reading(&self, seq: u64) -> (String, String, f64) {
        let id = format!("{}-{seq}", self.id);
        let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        (id, ts, 15.0 + (seq % 200) as f64 / 10.0)
    }

    async fn http(self, client: reqwest::Client, base: String, batch: Option<usize>) {
        let (url, per_request) = match batch {
            None => (format!("{base}/data"), 1),
            Some(n) => (format!("{base}/v1/readings"), n),
        };
        let mut seq = 0u64;
        while !self.stopping() {
            let mut ids = Vec::with_capacity(per_request);
            let mut readings = Vec::with_capacity(per_request);
            for _ in 0..per_request {
                let (id, ts, value) = self.next_reading(seq);
                seq += 1;
                readings.push(match batch {
                    None => flat_reading(&self.id, &id, &ts, value),
                    Some(_) => reading(Some(&self.id), &id, &ts, value),
                });
                ids.push(id);
            }
            let body = match batch {
                None => readings.pop().unwrap_or_default(),
                Some(_) => serde_json::Value::Array(readings),
            };
            self.ledger
                .sent
                .fetch_add(ids.len() as u64, Ordering::Relaxed);
            let mut backoff = retry_delays();
            loop {
                let answer = client
                    .post(&url)
                    .bearer_auth(&self.token)
                    .json(&body)
                    .send()
                    .await;
                match answer {
                    Ok(r) if r.status().is_success() => {
                        self.ledger.acknowledge(&self.id, ids);
                        break;
                    }
                    Ok(r) => self.ledger.refused(format!("HTTP {}", r.status().as_u16())),
                    Err(e) if e.is_timeout() => self.ledger.refused("no answer in 5 s".into()),
                    Err(e) if e.is_connect() => self.ledger.refused("connection refused".into()),
                    Err(_) => self.ledger.refused("connection broken".into()),
                }
                if self.past_deadline() {
                    self.ledger
                        .unacknowledged
                        .fetch_add(ids.len() as u64, Ordering::Relaxed);
                    break;
                }
                tokio::time::sleep(backoff.next().unwrap_or(MAX_RETRY_DELAY)).await;
            }
            tokio::time::sleep(self.pace).await;
        }
    }

    /// One connection at a time and one message in flight on it, as a Pi that waits for each
    /// publish (paho's `wait_for_publish`). Any trouble (no PUBACK within 3 s, a broken connection)
    /// drops the connection, and the same message goes again on a new one: the PUBACK that arrives
    /// on a connection is then always for the message in flight on it.
    async fn mqtt(self, port: u16, login: MqttLogin) {
        let topic = format!("devices/{}/readings", self.id);
        let mut seq = 0u64;
        let mut connection: Option<(AsyncClient, rumqttc::EventLoop)> = None;
        while !self.stopping() {
            let (id, ts, value) = self.next_reading(seq);
            seq += 1;
            let payload = reading(None, &id, &ts, value).to_string();
            self.ledger.sent.fetch_add(1, Ordering::Relaxed);
            let mut attempt = 0u32;
            loop {
                let (client, events) = connection.get_or_insert_with(|| {
                    attempt += 1;
                    let client_id = match login {
                        MqttLogin::Anonymous => format!("{}-{attempt}", self.id),
                        MqttLogin::DeviceToken => self.id.clone(),
                    };
                    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
                    options
                        .set_keep_alive(Duration::from_secs(5))
                        .set_clean_session(true);
                    if login == MqttLogin::DeviceToken {
                        options.set_credentials(self.id.clone(), self.token.clone());
                    }
                    AsyncClient::new(options, 10)
                });
                let acked = async {
                    client
                        .publish(&topic, QoS::AtLeastOnce, false, payload.as_bytes())
                        .await
                        .map_err(|_| "client closed")?;
                    loop {
                        match events.poll().await {
                            Ok(Event::Incoming(Packet::PubAck(_))) => return Ok(()),
                            Ok(_) => {}
                            Err(rumqttc::ConnectionError::ConnectionRefused(_))
                            | Err(rumqttc::ConnectionError::Io(_)) => {
                                return Err("connection refused or broken");
                            }
                            Err(_) => return Err("connection broken"),
                        }
                    }
                };
                match tokio::time::timeout(Duration::from_secs(3), acked).await {
                    Ok(Ok(())) => {
                        self.ledger.acknowledge(&self.id, [id]);
                        break;
                    }
                    Ok(Err(why)) => self.ledger.refused(format!("MQTT: {why}")),
                    Err(_) => self.ledger.refused("MQTT: no PUBACK in 3 s".into()),
                }
                connection = None;
                if self.past_deadline() {
                    self.ledger.unacknowledged.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            tokio::time::sleep(self.pace).await;
        }
        if let Some((client, mut events)) = connection {
            let _ = client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                while events.poll().await.is_ok() {}
            })
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_name_the_step_and_kind() {
        let plan = FleetPlan {
            http_devices: 2,
            batch_devices: 1,
            batch_size: 10,
            mqtt_devices: 1,
            pace: Duration::ZERO,
        };
        let ids: Vec<String> = plan.devices("s01").into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, ["s01-h0", "s01-h1", "s01-b0", "s01-m0"]);
        // every id is a valid device id
        for id in ids {
            assert!(id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        }
    }

    #[test]
    fn the_ledger_counts_refusals_as_retries() {
        let ledger = Ledger::default();
        ledger.refused("HTTP 503".into());
        ledger.refused("HTTP 503".into());
        ledger.acknowledge("d", ["1".to_owned(), "2".to_owned()]);
        assert_eq!(ledger.retries.load(Ordering::Relaxed), 2);
        assert_eq!(ledger.refusals()["HTTP 503"], 2);
        assert_eq!(ledger.acknowledged().len(), 2);
    }
}
