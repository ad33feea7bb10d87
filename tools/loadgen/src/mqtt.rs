//! Simulated Pis over MQTT: many device clients, each publishing its share of a burst at QoS 1 and
//! counting the broker's PUBACKs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::Barrier;
use tokio::time::Instant;

use crate::http::device_name;

/// `mqtt://host[:port]`.
#[derive(Debug, Clone)]
pub struct Broker {
    pub host: String,
    pub port: u16,
}

impl Broker {
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
            .with_context(|| format!("{url}: expected mqtt://host[:port]"))?;
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) => (
                host.to_owned(),
                port.parse()
                    .with_context(|| format!("{url}: bad port {port}"))?,
            ),
            None => (rest.to_owned(), 1883),
        };
        if host.is_empty() {
            bail!("{url}: no host");
        }
        Ok(Self { host, port })
    }
}

/// Which topic and payload format the devices use.
#[derive(Debug, Clone, Copy, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// `devices/<id>/readings`, `{"id", "ts", "metrics": {...}}`: Sensorhub's recommended topic.
    DeviceTopic,
    /// `sensor/data`, the seed's flat format (what the seed design subscribes to).
    Seed,
}

#[derive(Clone)]
pub struct Plan {
    pub broker: Broker,
    pub format: Format,
    pub devices: usize,
    /// Messages over all devices.
    pub messages: usize,
    /// Unacknowledged publishes per device at once.
    pub inflight: u16,
    pub run_tag: String,
    /// Publishing gives up this long after the start.
    pub timeout: Duration,
    /// Device tokens by fleet index: each device then logs in as in broker mode `rabbitmq` (user
    /// name and client id its device id, password its token). None: anonymous, a client id per run.
    pub logins: Option<Arc<Vec<String>>>,
}

#[derive(Default)]
pub struct Outcome {
    pub published: u64,
    pub acked: u64,
    /// Devices that could not connect, or lost their connection.
    pub failed_devices: u64,
    /// From the start to the last PUBACK.
    pub elapsed: Duration,
}

pub async fn run(plan: Plan, acked: Arc<AtomicU64>) -> Outcome {
    let devices = plan.devices.max(1);
    let plan = Arc::new(plan);
    // every device connects first; the clock starts when all are connected
    let barrier = Arc::new(Barrier::new(devices + 1));
    let mut tasks = Vec::with_capacity(devices);
    for index in 0..devices {
        let share = plan.messages / devices + usize::from(index < plan.messages % devices);
        tasks.push(tokio::spawn(device(
            plan.clone(),
            index,
            share,
            barrier.clone(),
            acked.clone(),
        )));
    }
    barrier.wait().await;
    let started = Instant::now();
    let mut total = Outcome::default();
    let mut last_ack = started;
    for task in tasks {
        if let Ok(d) = task.await {
            total.published += d.published;
            total.acked += d.acked;
            total.failed_devices += u64::from(d.failed);
            if let Some(at) = d.last_ack {
                last_ack = last_ack.max(at);
            }
        }
    }
    total.elapsed = last_ack - started;
    total
}

struct DeviceOutcome {
    published: u64,
    acked: u64,
    failed: bool,
    last_ack: Option<Instant>,
}

async fn device(
    plan: Arc<Plan>,
    index: usize,
    share: usize,
    barrier: Arc<Barrier>,
    acked_total: Arc<AtomicU64>,
) -> DeviceOutcome {
    let mut out = DeviceOutcome {
        published: 0,
        acked: 0,
        failed: false,
        last_ack: None,
    };
    let device_id = device_name(index);
    let token = plan.logins.as_ref().and_then(|tokens| tokens.get(index));
    let client_id = match token {
        Some(_) => device_id.clone(),
        None => format!("{}-{index}", plan.run_tag),
    };
    let mut options = MqttOptions::new(client_id, plan.broker.host.clone(), plan.broker.port);
    if let Some(token) = token {
        options.set_credentials(device_id.clone(), token.clone());
    }
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_inflight(plan.inflight.max(1))
        .set_max_packet_size(1 << 16, 1 << 16);
    let (client, mut events) = AsyncClient::new(options, 64);

    // Connect; whatever happens, take part in the barrier so the others are not held up.
    let connected = system::mqtt::connected(&mut events, Duration::from_secs(30))
        .await
        .is_ok();
    barrier.wait().await;
    if !connected {
        out.failed = true;
        return out;
    }

    let deadline = Instant::now() + plan.timeout;
    let sent = Arc::new(AtomicU64::new(0));
    let feeder = {
        let client = client.clone();
        let plan = plan.clone();
        let device_id = device_id.clone();
        let sent = sent.clone();
        tokio::spawn(async move {
            for n in 0..share {
                let (topic, payload) = message(&plan, &device_id, index, n);
                if client
                    .publish(topic, QoS::AtLeastOnce, false, payload)
                    .await
                    .is_err()
                {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    while out.acked < share as u64 {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                out.acked += 1;
                out.last_ack = Some(Instant::now());
                acked_total.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) => {
                out.failed = true;
                break;
            }
            Err(_) => break,
        }
    }
    feeder.abort();
    let _ = feeder.await;
    out.published = sent.load(Ordering::Relaxed);
    system::mqtt::disconnect(&client, &mut events, Duration::from_secs(2)).await;
    out
}

fn message(plan: &Plan, device_id: &str, index: usize, n: usize) -> (String, Vec<u8>) {
    reading(
        plan.format,
        device_id,
        &format!("{}-d{index}-{n}", plan.run_tag),
        n as u64,
    )
}

/// One reading as `format` wants it: its topic and payload, with its own `id` and the time now.
pub fn reading(format: Format, device_id: &str, id: &str, n: u64) -> (String, Vec<u8>) {
    let ts = chrono::Utc::now().timestamp_millis();
    let temperature = 15.0 + (n % 200) as f64 / 10.0;
    let humidity = 40.0 + (n % 300) as f64 / 10.0;
    match format {
        Format::DeviceTopic => (
            format!("devices/{device_id}/readings"),
            format!(
                r#"{{"id":"{id}","ts":{ts},"metrics":{{"temperature":{temperature:.1},"humidity":{humidity:.1}}}}}"#
            )
            .into_bytes(),
        ),
        Format::Seed => (
            "sensor/data".to_owned(),
            format!(
                r#"{{"device_id":"{device_id}","id":"{id}","ts":{ts},"temperature":{temperature:.1},"humidity":{humidity:.1}}}"#
            )
            .into_bytes(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let b = Broker::parse("mqtt://127.0.0.1:18830").unwrap();
        assert_eq!((b.host.as_str(), b.port), ("127.0.0.1", 18830));
        assert_eq!(Broker::parse("tcp://h").unwrap().port, 1883);
        assert!(Broker::parse("http://h").is_err());
    }
}
