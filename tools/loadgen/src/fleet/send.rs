//! One step of open-loop fleet load: every simulated device sends one reading per period at its own
//! (jittered) phase, whether or not its previous request was answered, and each request's latency
//! counts from the moment it was *scheduled*, so a server (or a load generator) that falls behind
//! shows as latency rather than as fewer requests (no coordinated omission).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use rand::Rng;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::stats::Latencies;

/// How a simulated device uses TCP.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    clap::ValueEnum,
    serde::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum ConnectionMode {
    /// A new TCP (and TLS) connection for every reading, closed after the answer: what Python's
    /// `requests.post(...)` without a session does.
    NewConnection,
    /// Each device keeps its own connection open between readings (reopened when the server closed
    /// it); a device whose previous reading is still unanswered opens another for the next.
    KeepAlive,
    /// Each device holds its own MQTT connection for the whole search and publishes each reading
    /// at QoS 1; its latency runs to the broker's PUBACK (targets with an `mqtt` broker only).
    Mqtt,
}

impl ConnectionMode {
    pub fn label(self) -> &'static str {
        match self {
            ConnectionMode::NewConnection => "new connection per reading",
            ConnectionMode::KeepAlive => "keep-alive, a connection per device",
            ConnectionMode::Mqtt => "MQTT QoS 1, a connection per device",
        }
    }
}

/// Where a target listens: TCP address, TLS name (for https), Host header and path.
#[derive(Clone)]
pub struct Destination {
    address: SocketAddr,
    authority: String,
    path: String,
    tls: Option<(tokio_native_tls::TlsConnector, String)>,
}

impl Destination {
    /// `http://host:port` or `https://host:port` (checked against `ca_file` when given), `path`
    /// appended. An IPv4 address is preferred: local servers here listen on 127.0.0.1.
    pub async fn resolve(
        url: &str,
        path: &str,
        ca_file: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        let uri: Uri = url.parse().with_context(|| format!("not a URL: {url}"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => bail!("{url}: http:// or https:// only"),
        };
        let host = uri.host().with_context(|| format!("{url}: no host"))?;
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .with_context(|| format!("resolving {host}"))?
            .collect();
        let address = addresses
            .iter()
            .find(|a| a.is_ipv4())
            .or(addresses.first())
            .copied()
            .with_context(|| format!("{host} has no address"))?;
        let tls = if https {
            let mut builder = native_tls::TlsConnector::builder();
            if let Some(ca) = ca_file {
                let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
                builder.add_root_certificate(native_tls::Certificate::from_pem(&pem)?);
            }
            let connector = builder.build().context("a TLS client")?;
            Some((connector.into(), host.to_owned()))
        } else {
            None
        };
        Ok(Self {
            address,
            authority: uri
                .authority()
                .map_or_else(|| host.to_owned(), |a| a.to_string()),
            path: format!("{}{path}", uri.path().trim_end_matches('/')),
            tls,
        })
    }
}

type Sender = http1::SendRequest<Full<Bytes>>;

/// One step's plan.
pub struct Step {
    pub destination: Destination,
    pub mode: ConnectionMode,
    /// Readings per second over the whole fleet.
    pub rate: f64,
    pub hold: Duration,
    /// A request unanswered this long counts as failed.
    pub timeout: Duration,
    /// Requests in flight at most; a send due beyond it is not made and counts as failed (and
    /// marks the step as limited by the load generator).
    pub max_inflight: u64,
    /// Makes reading ids unique across steps.
    pub run_tag: String,
}

/// The fleet: names, tokens, and each device's idle keep-alive connection (kept across the steps
/// of one target, as a Pi keeps its session).
pub struct Fleet {
    names: Vec<String>,
    tokens: Option<Vec<String>>,
    idle: Vec<Mutex<Option<Sender>>>,
}

impl Fleet {
    pub fn new(names: Vec<String>, tokens: Option<Vec<String>>) -> Self {
        let idle = names.iter().map(|_| Mutex::new(None)).collect();
        Self {
            names,
            tokens,
            idle,
        }
    }

    pub fn devices(&self) -> usize {
        self.names.len()
    }

    /// Closes every kept connection (before the fleet turns to another target).
    pub fn hang_up(&self) {
        for slot in &self.idle {
            if let Ok(mut slot) = slot.lock() {
                slot.take();
            }
        }
    }

    fn take_idle(&self, device: usize) -> Option<Sender> {
        self.idle[device].lock().ok()?.take()
    }

    fn keep_idle(&self, device: usize, sender: Sender) {
        if let Ok(mut slot) = self.idle[device].lock()
            && slot.is_none()
        {
            *slot = Some(sender);
        }
    }
}

/// What one step measured (over HTTP or MQTT).
#[derive(Default)]
pub struct Outcome {
    pub scheduled: u64,
    pub ok: u64,
    /// Answered, but not 2xx.
    pub refused: u64,
    /// Not answered: connection refused or reset, timed out, or not sent (`max_inflight`).
    pub failed: u64,
    /// Sends not made because `max_inflight` requests were waiting.
    pub not_sent: u64,
    pub connections_opened: u64,
    /// From the scheduled send to the whole answer, 2xx only.
    pub latencies: Latencies,
    /// From the moment loadgen made the send (its timer fired, up to a 1 ms tick late) to the whole
    /// answer, 2xx only: what the device waited, without loadgen's own lateness.
    pub from_send: Latencies,
    /// How late the load generator made each send (its own lag).
    pub send_lag: Latencies,
    /// From the first scheduled send to the last answer.
    pub elapsed: Duration,
}

#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    opened: AtomicU64,
    inflight: AtomicU64,
}

struct Shared {
    step: Step,
    fleet: Arc<Fleet>,
    counters: Counters,
    answers: AnswerTimes,
    last_answer: Mutex<Option<Instant>>,
}

/// Runs one step: schedules `rate × hold` sends over the fleet, waits for every answer (or its
/// timeout), and returns the figures. `acked` counts 2xx answers as they come (the progress line).
pub async fn run(step: Step, fleet: Arc<Fleet>, acked: Arc<AtomicU64>) -> Outcome {
    let (rate, hold) = (step.rate, step.hold);
    let shared = Arc::new(Shared {
        step,
        fleet,
        counters: Counters::default(),
        answers: AnswerTimes::default(),
        last_answer: Mutex::new(None),
    });
    let mut not_sent = 0;
    let mut tasks = tokio::task::JoinSet::new();
    let schedule = open_loop(shared.fleet.devices(), rate, hold, |device, seq, due| {
        if shared.counters.inflight.load(Ordering::Relaxed) >= shared.step.max_inflight {
            not_sent += 1;
            return;
        }
        shared.counters.inflight.fetch_add(1, Ordering::Relaxed);
        let (shared, acked) = (shared.clone(), acked.clone());
        tasks.spawn(async move {
            send_one(&shared, device, seq, due, &acked).await;
            shared.counters.inflight.fetch_sub(1, Ordering::Relaxed);
        });
        // reap finished tasks as we go, so the set stays small
        while tasks.try_join_next().is_some() {}
    })
    .await;
    while tasks.join_next().await.is_some() {}
    let c = &shared.counters;
    let last = shared.last_answer.lock().ok().and_then(|l| *l);
    let (latencies, from_send) = shared.answers.take();
    Outcome {
        scheduled: schedule.scheduled,
        ok: c.ok.load(Ordering::Relaxed),
        refused: c.refused.load(Ordering::Relaxed),
        failed: c.failed.load(Ordering::Relaxed) + not_sent,
        not_sent,
        connections_opened: c.opened.load(Ordering::Relaxed),
        latencies,
        from_send,
        send_lag: schedule.send_lag,
        elapsed: last.unwrap_or_else(Instant::now) - schedule.started,
    }
}

/// When a send was due, and when loadgen made it (tokio's timer fires on 1 ms ticks, so up to one
/// late): latency counts from the first (no coordinated omission) and, for the server's own share,
/// from the second.
#[derive(Debug, Clone, Copy)]
pub struct Due {
    pub scheduled: Instant,
    pub made: Instant,
}

/// A step's answers timed both ways (see [`Due`]), under one lock.
pub struct AnswerTimes(Mutex<Timed>);

#[derive(Default)]
struct Timed {
    from_due: Latencies,
    from_made: Latencies,
}

impl Default for AnswerTimes {
    fn default() -> Self {
        Self(Mutex::new(Timed {
            from_due: Latencies::with_capacity(1 << 16),
            from_made: Latencies::with_capacity(1 << 16),
        }))
    }
}

impl AnswerTimes {
    pub fn record(&self, due: Due, answered: Instant) {
        if let Ok(mut timed) = self.0.lock() {
            timed.from_due.record(answered - due.scheduled);
            timed.from_made.record(answered - due.made);
        }
    }

    /// (from when each was due, from when it was made), leaving both empty.
    pub fn take(&self) -> (Latencies, Latencies) {
        let timed = self
            .0
            .lock()
            .map(|mut timed| std::mem::take(&mut *timed))
            .unwrap_or_default();
        (timed.from_due, timed.from_made)
    }
}

/// What the schedule itself did: sends made due, how late each was made, and when it began.
pub struct Schedule {
    pub scheduled: u64,
    pub send_lag: Latencies,
    pub started: Instant,
}

/// The open-loop schedule, shared by HTTP and MQTT: each of `devices` sends once per period
/// (devices/rate) for `hold`, at a phase spread at random over one period so the fleet's sends
/// neither line up nor follow the device order; `send(device, seq, due)` is called at each due
/// time, in time order, and must not wait for the answer.
pub async fn open_loop(
    devices: usize,
    rate: f64,
    hold: Duration,
    mut send: impl FnMut(usize, u64, Due),
) -> Schedule {
    let devices = devices.max(1);
    let period = Duration::from_secs_f64(devices as f64 / rate.max(0.001));
    let mut phases: Vec<(Duration, usize)> = {
        let mut rng = rand::thread_rng();
        (0..devices)
            .map(|d| (period.mul_f64(rng.r#gen::<f64>()), d))
            .collect()
    };
    phases.sort_unstable();
    let mut schedule = Schedule {
        scheduled: 0,
        send_lag: Latencies::with_capacity(1 << 16),
        started: Instant::now(),
    };
    // round after round, each round the devices in phase order
    'rounds: for round in 0u64.. {
        for &(phase, device) in &phases {
            let due = period.mul_f64(round as f64) + phase;
            // in time order: the first send past the hold ends the schedule
            if due >= hold {
                break 'rounds;
            }
            let scheduled = schedule.started + due;
            if scheduled > Instant::now() {
                tokio::time::sleep_until(scheduled).await;
            }
            schedule.scheduled += 1;
            let made = Instant::now();
            schedule.send_lag.record(made - scheduled);
            send(device, schedule.scheduled, Due { scheduled, made });
        }
    }
    schedule
}

async fn send_one(shared: &Shared, device: usize, seq: u64, due: Due, acked: &AtomicU64) {
    let step = &shared.step;
    let answer = tokio::time::timeout(step.timeout, exchange(shared, device, seq)).await;
    let now = Instant::now();
    let c = &shared.counters;
    match answer {
        Ok(Ok(status)) if status.is_success() => {
            c.ok.fetch_add(1, Ordering::Relaxed);
            acked.fetch_add(1, Ordering::Relaxed);
            shared.answers.record(due, now);
            if let Ok(mut last) = shared.last_answer.lock() {
                *last = Some(last.map_or(now, |l| l.max(now)));
            }
        }
        Ok(Ok(_)) => {
            c.refused.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Err(_)) | Err(_) => {
            c.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Sends the reading and reads the whole answer: on the device's kept connection when it has one
/// (once more on a fresh one should the server have closed it meanwhile, as an HTTP client's pool
/// does), else on a new connection.
async fn exchange(shared: &Shared, device: usize, seq: u64) -> anyhow::Result<hyper::StatusCode> {
    let step = &shared.step;
    let fleet = &shared.fleet;
    let body = reading(&fleet.names[device], &step.run_tag, seq);
    let token = fleet.tokens.as_ref().and_then(|t| t.get(device));
    let request = || {
        let mut r = Request::post(step.destination.path.as_str())
            .header(HOST, step.destination.authority.as_str())
            .header(CONTENT_TYPE, "application/json");
        if let Some(token) = token {
            r = r.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        r.body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
            .context("building the request")
    };
    let keep = step.mode == ConnectionMode::KeepAlive;
    if keep
        && let Some(mut sender) = fleet.take_idle(device)
        && sender.ready().await.is_ok()
        && let Ok(response) = sender.send_request(request()?).await
    {
        let status = response.status();
        response.into_body().collect().await?;
        fleet.keep_idle(device, sender);
        return Ok(status);
    }
    let mut sender = open(&step.destination).await?;
    shared.counters.opened.fetch_add(1, Ordering::Relaxed);
    let response = sender.send_request(request()?).await?;
    let status = response.status();
    response.into_body().collect().await?;
    if keep {
        fleet.keep_idle(device, sender);
    }
    // new-connection mode: dropping the sender closes the connection
    Ok(status)
}

/// A new connection, HTTP/1.1, over TLS when the destination says so. SO_LINGER 0: closing sends a
/// reset instead of leaving the socket in TIME_WAIT, so tens of thousands of new connections a
/// minute do not run out of local ports (28,000 here) within TIME_WAIT's 60 s.
async fn open(destination: &Destination) -> anyhow::Result<Sender> {
    let stream = TcpStream::connect(destination.address).await?;
    stream.set_nodelay(true)?;
    stream.set_zero_linger()?;
    let sender = match &destination.tls {
        Some((connector, name)) => {
            let tls = connector.connect(name, stream).await?;
            let (sender, conn) = http1::handshake(TokioIo::new(tls)).await?;
            tokio::spawn(conn);
            sender
        }
        None => {
            let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            sender
        }
    };
    Ok(sender)
}

/// One reading in the seed's flat format (`POST /data`), with its own id and time, so a retry
/// would be stored once by Sensorhub; the seed and Node-RED read `device_id`, `temperature` and
/// `humidity` and ignore the rest.
fn reading(device: &str, run_tag: &str, seq: u64) -> String {
    let ts_millis = chrono::Utc::now().timestamp_millis();
    let temperature = 15.0 + (seq % 200) as f64 / 10.0;
    let humidity = 40.0 + (seq % 300) as f64 / 10.0;
    let mut body = String::with_capacity(160);
    // Writing to a String cannot fail.
    let _ = write!(
        body,
        r#"{{"device_id":"{device}","id":"{run_tag}-{seq}","ts":{ts_millis},"temperature":{temperature:.1},"humidity":{humidity:.1}}}"#
    );
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_the_seed_format_with_an_id() {
        let v: serde_json::Value = serde_json::from_str(&reading("pi-00001", "f1", 7)).unwrap();
        assert_eq!(v["device_id"], "pi-00001");
        assert_eq!(v["id"], "f1-7");
        assert!(v["temperature"].is_f64() && v["humidity"].is_f64() && v["ts"].is_i64());
    }

    #[tokio::test]
    async fn destinations_keep_the_host_for_tls_and_the_path() {
        let d = Destination::resolve("https://localhost:8443/", "/data", None)
            .await
            .unwrap();
        assert_eq!(d.path, "/data");
        assert_eq!(d.authority, "localhost:8443");
        assert!(d.address.is_ipv4());
        assert_eq!(d.tls.map(|(_, name)| name).as_deref(), Some("localhost"));
        assert!(
            Destination::resolve("ftp://x", "/data", None)
                .await
                .is_err()
        );
    }
}
