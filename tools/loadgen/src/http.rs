//! Simulated Pis over HTTP/1.1 keep-alive: one hyper connection per simulated connection, each
//! sending its next request when the previous one is answered (closed loop, as wrk does), or on a
//! schedule (open loop, for a fixed rate).

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::stats::Latencies;

/// Where to send: `http://host:port/path`.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub authority: String,
    pub path: String,
}

impl Endpoint {
    pub fn parse(base: &str, path: &str) -> anyhow::Result<Self> {
        let uri: Uri = base.parse().with_context(|| format!("not a URL: {base}"))?;
        if uri.scheme_str() != Some("http") {
            bail!("{base}: only http:// is supported (point it at the service, not at TLS)");
        }
        let authority = uri
            .authority()
            .with_context(|| format!("{base}: no host"))?
            .to_string();
        let authority = if authority.contains(':') {
            authority
        } else {
            format!("{authority}:80")
        };
        let prefix = uri.path().trim_end_matches('/');
        Ok(Self {
            authority,
            path: format!("{prefix}{path}"),
        })
    }
}

/// What each request carries.
#[derive(Debug, Clone, Copy)]
pub enum Body {
    /// `POST /data`: one reading in the seed's flat format, with `id` and `ts`.
    Seed,
    /// `POST /v1/readings`: an array of this many readings.
    Batch(usize),
}

impl Body {
    pub fn readings(self) -> u64 {
        match self {
            Body::Seed => 1,
            Body::Batch(n) => n as u64,
        }
    }
}

/// A reading whose arrival in the database is timed (end-to-end latency).
#[derive(Debug, Clone)]
pub struct Sample {
    pub device_id: String,
    pub ts_millis: i64,
    pub reading_id: String,
    pub acked_at: Instant,
}

#[derive(Clone)]
pub struct Plan {
    pub endpoint: Endpoint,
    pub body: Body,
    pub connections: usize,
    pub duration: Duration,
    /// Requests per second over all connections; `None`: as fast as answers come (closed loop).
    pub rate: Option<f64>,
    /// Devices the readings are spread over.
    pub fleet: usize,
    /// Makes reading ids unique across runs and processes.
    pub run_tag: String,
    /// Every this many requests of a connection, the (first) reading is sent for end-to-end timing.
    pub sample_every: u64,
    /// Each device's token, by fleet index (a request carries one device's readings only).
    pub tokens: Option<Arc<Vec<String>>>,
}

#[derive(Default)]
pub struct Outcome {
    pub ok_requests: u64,
    pub ok_readings: u64,
    /// Answers other than 2xx, by status.
    pub refused: u64,
    /// Connections refused or broken, requests unanswered.
    pub failures: u64,
    pub latencies: Latencies,
    /// From the first request to the last answer.
    pub elapsed: Duration,
}

/// Runs the plan; `acked` counts acknowledged readings as they come (for the progress line).
pub async fn run(
    plan: Plan,
    acked: Arc<AtomicU64>,
    samples: Option<mpsc::UnboundedSender<Sample>>,
) -> Outcome {
    let started = Instant::now();
    let deadline = started + plan.duration;
    let plan = Arc::new(plan);
    let mut tasks = Vec::with_capacity(plan.connections);
    for index in 0..plan.connections {
        tasks.push(tokio::spawn(connection(
            plan.clone(),
            index,
            started,
            deadline,
            acked.clone(),
            samples.clone(),
        )));
    }
    drop(samples);
    let mut total = Outcome::default();
    for task in tasks {
        // A connection task only ends by returning its outcome (it has no panicking paths).
        if let Ok(outcome) = task.await {
            total.ok_requests += outcome.ok_requests;
            total.ok_readings += outcome.ok_readings;
            total.refused += outcome.refused;
            total.failures += outcome.failures;
            total.latencies.merge(outcome.latencies);
        }
    }
    total.elapsed = started.elapsed();
    total
}

async fn connection(
    plan: Arc<Plan>,
    index: usize,
    started: Instant,
    deadline: Instant,
    acked: Arc<AtomicU64>,
    samples: Option<mpsc::UnboundedSender<Sample>>,
) -> Outcome {
    let mut out = Outcome {
        latencies: Latencies::with_capacity(4096),
        ..Default::default()
    };
    // Open loop: this connection's share of the rate, its first request staggered over one interval
    // so that the connections do not fire together.
    let interval = plan
        .rate
        .map(|rate| Duration::from_secs_f64(plan.connections as f64 / rate.max(0.001)));
    let mut next_send = match interval {
        Some(i) => started + i.mul_f64(index as f64 / plan.connections as f64),
        None => started,
    };
    let mut seq: u64 = 0;
    let mut body = String::with_capacity(256);
    'connect: while Instant::now() < deadline {
        let mut sender = match open(&plan.endpoint).await {
            Ok(sender) => sender,
            Err(_) => {
                out.failures += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        loop {
            if let Some(interval) = interval {
                tokio::time::sleep_until(next_send).await;
                next_send += interval;
                // Fallen far behind (a stall): start the schedule afresh rather than burst.
                let now = Instant::now();
                if next_send + interval * 10 < now {
                    next_send = now + interval;
                }
            }
            if Instant::now() >= deadline {
                break 'connect;
            }
            if sender.ready().await.is_err() {
                out.failures += 1;
                continue 'connect;
            }
            let sample = plan.sample_every > 0 && seq.is_multiple_of(plan.sample_every);
            let first = fill_body(&mut body, &plan, index, seq);
            seq += 1;
            let mut request = Request::post(plan.endpoint.path.as_str())
                .header(HOST, plan.endpoint.authority.as_str())
                .header(CONTENT_TYPE, "application/json");
            if let Some(token) = plan.tokens.as_ref().and_then(|t| t.get(first.device_index)) {
                request = request.header(AUTHORIZATION, format!("Bearer {token}"));
            }
            let request = request.body(Full::new(Bytes::copy_from_slice(body.as_bytes())));
            let Ok(request) = request else {
                // Our own path and header values: always a valid request.
                out.failures += 1;
                break 'connect;
            };
            let sent = Instant::now();
            match sender.send_request(request).await {
                Ok(response) => {
                    let status = response.status();
                    // Read the whole answer, so the connection can carry the next request.
                    let read = response.into_body().collect().await;
                    if read.is_err() {
                        out.failures += 1;
                        continue 'connect;
                    }
                    if status.is_success() {
                        let answered = Instant::now();
                        out.latencies.record(answered - sent);
                        out.ok_requests += 1;
                        out.ok_readings += plan.body.readings();
                        acked.fetch_add(plan.body.readings(), Ordering::Relaxed);
                        if sample && let Some(tx) = &samples {
                            let _ = tx.send(Sample {
                                device_id: first.device_id,
                                ts_millis: first.ts_millis,
                                reading_id: first.reading_id,
                                acked_at: answered,
                            });
                        }
                    } else {
                        out.refused += 1;
                    }
                }
                Err(_) => {
                    out.failures += 1;
                    continue 'connect;
                }
            }
        }
    }
    out
}

async fn open(endpoint: &Endpoint) -> anyhow::Result<http1::SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(&endpoint.authority).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    // Drives the connection; ends when the sender is dropped or the peer closes.
    tokio::spawn(conn);
    Ok(sender)
}

/// The identity of the first reading of a body.
struct First {
    device_index: usize,
    device_id: String,
    ts_millis: i64,
    reading_id: String,
}

pub fn device_name(index: usize) -> String {
    format!("pi-{index:05}")
}

/// Writes request `seq` of connection `conn` into `out`.
fn fill_body(out: &mut String, plan: &Plan, conn: usize, seq: u64) -> First {
    out.clear();
    let ts_millis = chrono::Utc::now().timestamp_millis();
    let readings = plan.body.readings();
    let mut first = None;
    if matches!(plan.body, Body::Batch(_)) {
        out.push('[');
    }
    // spread over the fleet, each connection walking its own stride through it; a request is one
    // device's (a device token writes only its own readings), as a Pi sends its backlog
    let device_index =
        (conn + (seq as usize).wrapping_mul(plan.connections.max(1))) % plan.fleet.max(1);
    let device = device_name(device_index);
    for k in 0..readings {
        let n = seq * readings + k;
        let device = device.clone();
        let id = format!("{}-c{conn}-{n}", plan.run_tag);
        let temperature = 15.0 + (n % 200) as f64 / 10.0;
        let humidity = 40.0 + (n % 300) as f64 / 10.0;
        // Writing to a String cannot fail.
        let _ = match plan.body {
            Body::Seed => write!(
                out,
                r#"{{"device_id":"{device}","id":"{id}","ts":{ts_millis},"temperature":{temperature:.1},"humidity":{humidity:.1}}}"#
            ),
            Body::Batch(_) => {
                if k > 0 {
                    out.push(',');
                }
                write!(
                    out,
                    r#"{{"device_id":"{device}","id":"{id}","ts":{ts_millis},"metrics":{{"temperature":{temperature:.1},"humidity":{humidity:.1}}}}}"#
                )
            }
        };
        if first.is_none() {
            first = Some(First {
                device_index,
                device_id: device,
                ts_millis,
                reading_id: id,
            });
        }
    }
    if matches!(plan.body, Body::Batch(_)) {
        out.push(']');
    }
    // `readings` is at least 1, so the loop ran.
    first.unwrap_or(First {
        device_index: 0,
        device_id: String::new(),
        ts_millis,
        reading_id: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(body: Body) -> Plan {
        Plan {
            endpoint: Endpoint::parse("http://127.0.0.1:1", "/data").unwrap(),
            body,
            connections: 4,
            duration: Duration::from_secs(1),
            rate: None,
            fleet: 10,
            run_tag: "t".into(),
            sample_every: 0,
            tokens: None,
        }
    }

    #[test]
    fn endpoints_keep_a_path_prefix() {
        let e = Endpoint::parse("http://example.test/ingest/", "/data").unwrap();
        assert_eq!(e.authority, "example.test:80");
        assert_eq!(e.path, "/ingest/data");
        assert!(Endpoint::parse("https://x", "/data").is_err());
    }

    #[test]
    fn bodies_are_json_with_unique_ids() {
        let mut s = String::new();
        let first = fill_body(&mut s, &plan(Body::Seed), 1, 7);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["id"], first.reading_id.as_str());
        assert_eq!(v["device_id"], first.device_id.as_str());
        assert!(v["temperature"].is_f64());

        fill_body(&mut s, &plan(Body::Batch(100)), 2, 3);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        let distinct = |field: &str| {
            let values: std::collections::HashSet<&str> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r[field].as_str().unwrap())
                .collect();
            values.len()
        };
        assert_eq!(distinct("id"), 100);
        assert_eq!(
            distinct("device_id"),
            1,
            "a request is one device's, as its token allows"
        );
    }
}
