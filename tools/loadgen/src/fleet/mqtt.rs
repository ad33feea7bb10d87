//! The fleet over MQTT: every device holds a connection of its own to the target's broker (rumqttc,
//! as `loadgen`'s closed-loop MQTT workload uses), opened before the first step, a few hundred at a
//! time, and kept across the steps of one target, as a Pi keeps its session. Each reading is
//! published at QoS 1 on the same open-loop schedule as over HTTP, and its latency runs from its
//! scheduled send to the broker's PUBACK.
//!
//! A PUBACK is the broker's: it says the broker took the message, not that anything stored it (the
//! seed and Node-RED read from a broker that acknowledges on their behalf), so the step also counts
//! what reached PostgreSQL by the last PUBACK (`super::Course::step`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use serde::{Deserialize, Serialize};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::send::{AnswerTimes, Due, Outcome, open_loop};
use crate::mqtt::{Broker, Format, reading};

/// A target's MQTT side, in the targets file: `{"url", "format", "logins", "processes"}`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct MqttTarget {
    /// `mqtt://host:port`, the broker the devices publish to.
    pub url: String,
    /// `device-topic` (`devices/<id>/readings`, Sensorhub's) or `seed` (`sensor/data`, flat).
    pub format: Format,
    /// Each device logs in with its device id and token (client id its device id), as a broker
    /// that checks devices wants; otherwise anonymous, a client id per run.
    #[serde(default)]
    pub logins: bool,
    /// The MQTT path's processes, charged instead of the target's HTTP ones.
    #[serde(default)]
    pub processes: Vec<super::Process>,
}

/// Connections being opened at once while the fleet connects: enough to connect 10,000 devices
/// in seconds, few enough that the broker's accept queue never overflows.
const CONNECTING_AT_ONCE: usize = 200;
/// Unacknowledged publishes one device may have: far more than one reading per period needs, so
/// a slow broker shows as latency, not as a device that stops sending.
const DEVICE_INFLIGHT: u16 = 100;

/// The fleet's MQTT connections to one broker.
pub struct MqttFleet {
    devices: Vec<Option<Device>>,
    format: Format,
    /// Connections opened not yet charged to a step.
    opened: AtomicU64,
}

struct Device {
    name: String,
    client: AsyncClient,
    state: Arc<DeviceState>,
    task: JoinHandle<()>,
}

/// What a device's connection task and the scheduler share.
#[derive(Default)]
struct DeviceState {
    connected: AtomicBool,
    /// Published, not yet handed to the socket: rumqttc numbers them (packet ids) as they go out,
    /// in the order they were published.
    queued: Mutex<VecDeque<Pending>>,
    /// Out, awaiting the PUBACK, by packet id.
    inflight: Mutex<HashMap<u16, Pending>>,
}

struct Pending {
    due: Due,
    tally: Arc<Tally>,
}

/// One step's PUBACKs, as they come.
struct Tally {
    /// PUBACKed within the timeout (a later one fails, as an HTTP answer that late does).
    ok: AtomicU64,
    /// Published and neither acknowledged nor lost with their connection yet.
    waiting: AtomicU64,
    /// Set when the step's figures are taken: later PUBACKs are not counted.
    closed: AtomicBool,
    timeout: Duration,
    answers: AnswerTimes,
    last_ack: Mutex<Option<Instant>>,
    acked: Arc<AtomicU64>,
}

impl Tally {
    fn puback(&self, due: Due) {
        let now = Instant::now();
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        if now - due.scheduled > self.timeout {
            return;
        }
        self.ok.fetch_add(1, Ordering::Relaxed);
        self.acked.fetch_add(1, Ordering::Relaxed);
        self.answers.record(due, now);
        if let Ok(mut last) = self.last_ack.lock() {
            *last = Some(last.map_or(now, |l| l.max(now)));
        }
    }

    fn lost(&self) {
        if !self.closed.load(Ordering::Relaxed) {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl MqttFleet {
    /// Connects every device to the target's broker, `CONNECTING_AT_ONCE` at a time; `connected`
    /// counts them (the progress line). A device that cannot connect stays out: its sends count as
    /// failed. Fails when none connected.
    pub async fn connect(
        target: &MqttTarget,
        names: &[String],
        tokens: Option<&[String]>,
        run_tag: &str,
        connected: Arc<AtomicU64>,
    ) -> anyhow::Result<(Self, Vec<String>)> {
        let broker = Broker::parse(&target.url)?;
        let mut slots: Vec<Option<Device>> = (0..names.len()).map(|_| None).collect();
        let mut refusals = Vec::new();
        let mut connecting = JoinSet::new();
        let mut next = 0;
        while next < names.len() || !connecting.is_empty() {
            while next < names.len() && connecting.len() < CONNECTING_AT_ONCE {
                let login = match tokens.and_then(|t| t.get(next)) {
                    Some(token) if target.logins => Some(token.clone()),
                    _ => None,
                };
                let options = options(&broker, &names[next], login, run_tag, next);
                let index = next;
                connecting.spawn(async move { (index, open(options).await) });
                next += 1;
            }
            let Some(Ok((index, result))) = connecting.join_next().await else {
                continue;
            };
            match result {
                Ok((client, events)) => {
                    connected.fetch_add(1, Ordering::Relaxed);
                    slots[index] = Some(Device::start(names[index].clone(), client, events));
                }
                Err(e) => refusals.push(format!("{}: {e:#}", names[index])),
            }
        }
        anyhow::ensure!(
            slots.iter().any(Option::is_some),
            "no device could connect to {}: {}",
            target.url,
            refusals.first().map_or("", String::as_str)
        );
        let opened = slots.iter().flatten().count() as u64;
        Ok((
            Self {
                devices: slots,
                format: target.format,
                opened: AtomicU64::new(opened),
            },
            refusals,
        ))
    }

    /// Devices connected now.
    pub fn connected(&self) -> usize {
        self.devices
            .iter()
            .flatten()
            .filter(|d| d.state.connected.load(Ordering::Relaxed))
            .count()
    }

    /// One step: publishes `rate × hold` readings on the open-loop schedule, waits for their
    /// PUBACKs (each at most `timeout` after the schedule ended) and returns the figures.
    pub async fn run(
        &self,
        rate: f64,
        hold: Duration,
        timeout: Duration,
        run_tag: &str,
        acked: Arc<AtomicU64>,
    ) -> Outcome {
        let tally = Arc::new(Tally {
            ok: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            timeout,
            answers: AnswerTimes::default(),
            last_ack: Mutex::new(None),
            acked,
        });
        let (mut not_sent, mut disconnected) = (0, 0);
        let schedule = open_loop(self.devices.len(), rate, hold, |index, seq, due| match self
            .publish(index, seq, due, run_tag, &tally)
        {
            Ok(()) => {}
            Err(Unsent::QueueFull) => not_sent += 1,
            Err(Unsent::Disconnected) => disconnected += 1,
        })
        .await;
        // every PUBACK, or the timeout after the last scheduled send
        let deadline = Instant::now() + timeout;
        while tally.waiting.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tally.closed.store(true, Ordering::Relaxed);
        let ok = tally.ok.load(Ordering::Relaxed);
        let sent = schedule.scheduled - not_sent - disconnected;
        let last = tally.last_ack.lock().ok().and_then(|l| *l);
        let (latencies, from_send) = tally.answers.take();
        Outcome {
            scheduled: schedule.scheduled,
            ok,
            // MQTT 3.1.1 has no negative PUBACK: a publish is acknowledged or not
            refused: 0,
            failed: sent - ok + not_sent + disconnected,
            not_sent,
            connections_opened: self.opened.swap(0, Ordering::Relaxed),
            latencies,
            from_send,
            send_lag: schedule.send_lag,
            elapsed: last.unwrap_or_else(Instant::now) - schedule.started,
        }
    }

    /// Hands one reading to the device's connection without waiting.
    fn publish(
        &self,
        index: usize,
        seq: u64,
        due: Due,
        tag: &str,
        tally: &Arc<Tally>,
    ) -> Result<(), Unsent> {
        let Some(device) = self.devices[index]
            .as_ref()
            .filter(|d| d.state.connected.load(Ordering::Relaxed))
        else {
            return Err(Unsent::Disconnected);
        };
        let (topic, payload) = reading(self.format, &device.name, &format!("{tag}-{seq}"), seq);
        let Ok(mut queued) = device.state.queued.lock() else {
            return Err(Unsent::Disconnected);
        };
        // queued before it is handed over, so the connection task finds it when it goes out
        queued.push_back(Pending {
            due,
            tally: tally.clone(),
        });
        tally.waiting.fetch_add(1, Ordering::Relaxed);
        if device
            .client
            .try_publish(topic, QoS::AtLeastOnce, false, payload)
            .is_err()
        {
            queued.pop_back();
            tally.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(Unsent::QueueFull);
        }
        Ok(())
    }

    /// Closes every connection (before the fleet turns to another target).
    pub fn hang_up(self) {
        for device in self.devices.into_iter().flatten() {
            device.task.abort();
        }
    }
}

/// Why a reading was not published: its device has no connection (it could not connect, or lost
/// it), or its connection's queue in loadgen was full (the broker is not taking them: as over
/// HTTP, a send not made counts as failed and marks the step).
enum Unsent {
    Disconnected,
    QueueFull,
}

fn options(
    broker: &Broker,
    name: &str,
    login: Option<String>,
    run_tag: &str,
    index: usize,
) -> MqttOptions {
    // with a login the client id must be the device id (a broker that checks devices insists)
    let client_id = match login {
        Some(_) => name.to_owned(),
        None => format!("{run_tag}-{index}"),
    };
    let mut options = MqttOptions::new(client_id, broker.host.clone(), broker.port);
    if let Some(token) = login {
        options.set_credentials(name, token);
    }
    options
        .set_keep_alive(Duration::from_secs(60))
        .set_clean_session(true)
        .set_inflight(DEVICE_INFLIGHT)
        .set_max_packet_size(1 << 16, 1 << 16);
    options
}

/// Opens one connection: until the broker's CONNACK.
async fn open(options: MqttOptions) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let (client, mut events) = AsyncClient::new(options, 64);
    system::mqtt::connected(&mut events, Duration::from_secs(30)).await?;
    Ok((client, events))
}

impl Device {
    fn start(name: String, client: AsyncClient, events: EventLoop) -> Self {
        let state = Arc::new(DeviceState::default());
        state.connected.store(true, Ordering::Relaxed);
        let task = tokio::spawn(drive(events, state.clone()));
        Self {
            name,
            client,
            state,
            task,
        }
    }
}

/// A device's connection: matches each publish going out to its packet id, and each PUBACK to its
/// publish. A lost connection is not reopened (rumqttc would resend its unacknowledged publishes
/// under their old packet ids, which this matching cannot tell from new ones): what it had in
/// flight is lost, and its later sends count as failed.
async fn drive(mut events: EventLoop, state: Arc<DeviceState>) {
    loop {
        match events.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                let next = state.queued.lock().ok().and_then(|mut q| q.pop_front());
                if let (Some(pending), Ok(mut inflight)) = (next, state.inflight.lock()) {
                    inflight.insert(pkid, pending);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                let pending = state
                    .inflight
                    .lock()
                    .ok()
                    .and_then(|mut i| i.remove(&ack.pkid));
                if let Some(pending) = pending {
                    pending.tally.puback(pending.due);
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    state.connected.store(false, Ordering::Relaxed);
    let queued = state.queued.lock().map(|mut q| std::mem::take(&mut *q));
    let inflight = state.inflight.lock().map(|mut i| std::mem::take(&mut *i));
    for pending in queued
        .into_iter()
        .flatten()
        .chain(inflight.into_iter().flat_map(HashMap::into_values))
    {
        pending.tally.lost();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_targets_file_names_a_broker_its_format_and_its_path() {
        let t: MqttTarget = serde_json::from_str(
            r#"{"url": "mqtt://127.0.0.1:27883", "format": "device-topic",
                "processes": [{"name": "mosquitto", "pid": 7, "tree": true}]}"#,
        )
        .unwrap();
        assert!(matches!(t.format, Format::DeviceTopic));
        assert!(!t.logins);
        assert_eq!(t.processes[0].name, "mosquitto");
        let seed: MqttTarget =
            serde_json::from_str(r#"{"url": "mqtt://h", "format": "seed", "logins": true}"#)
                .unwrap();
        assert!(matches!(seed.format, Format::Seed) && seed.logins);
    }

    #[test]
    fn a_device_logs_in_as_itself_or_anonymously_with_a_client_id_per_run() {
        let broker = Broker::parse("mqtt://127.0.0.1:1").unwrap();
        let login = options(&broker, "pi-00003", Some("token".into()), "f1", 3);
        assert_eq!(login.client_id(), "pi-00003");
        let credentials = login.credentials().unwrap();
        assert_eq!(
            (credentials.username.as_str(), credentials.password.as_str()),
            ("pi-00003", "token")
        );
        let anonymous = options(&broker, "pi-00003", None, "f1", 3);
        assert_eq!(anonymous.client_id(), "f1-3");
        assert!(anonymous.credentials().is_none());
    }
}
