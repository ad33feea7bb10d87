//! `loadgen crash`: what a consumer's crash costs, counted reading by reading. A burst of readings
//! is published at QoS 1 to a broker that acknowledges (PUBACK) on its own, as Mosquitto does in
//! production; part way through, the process that takes them from the broker (or one further down
//! the path) gets SIGKILL or SIGTERM and is started again at once. Each reading carries an id of its
//! own, so the rows stored afterwards are matched against the PUBACKs the devices saw: what was
//! acknowledged to a device and never stored is lost, a reading stored twice is duplicated.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde::{Deserialize, Serialize};
use system::numbers::{readable, thousands};
use system::process::Process;
use tokio::sync::Barrier;
use tokio::time::Instant;

use crate::db;
use crate::http::device_name;
use crate::mqtt::Broker;
use crate::progress::Progress;
use crate::report::Machine;

/// Crash comparison: for each target in --targets and each signal, starts the target's processes,
/// checks that a reading gets through, publishes a burst of --messages readings at QoS 1 from
/// --devices connections, sends the signal to the target's `kill` process once --kill-at of the
/// burst was PUBACKed, starts that process again, waits until the stored rows settle, and counts
/// PUBACKed, stored, lost (PUBACKed, never stored) and duplicated readings. Prints a Markdown
/// table; writes it with JSON to --out.
#[derive(clap::Args, Debug, Clone)]
pub struct CrashArgs {
    /// JSON file naming the targets, run in its order (scripts/bench --crash writes one):
    /// `{"targets": [{"name", "broker": "mqtt://host:port", "payload": "device-topic" |
    /// "sensor-data", "database_url", "table", "id_column", "reset": [tables], "processes":
    /// [{"name", "command": [argv]}], "kill": process name, "note"}]}`. The processes are started
    /// here, in their order, each time afresh, and stopped after each signal's run; the `reset`
    /// tables are emptied before each burst (dedicated benchmark databases only); `id_column`
    /// is the column of `table` that holds each reading's id (`payload` says where the id goes:
    /// `device-topic` publishes `{"id", "ts", "metrics"}` on `devices/<device>/readings`,
    /// `sensor-data` the seed's flat `{"device_id", ...}` on `sensor/data` with the reading's id as
    /// its device_id, since the seed and Node-RED store no id of their own).
    #[arg(long)]
    pub targets: PathBuf,
    /// Readings in each burst, over all devices.
    #[arg(long, default_value_t = 100_000)]
    pub messages: usize,
    /// Device connections the burst is spread over.
    #[arg(long, default_value_t = 200)]
    pub devices: usize,
    /// Unacknowledged QoS 1 publishes per device at once.
    #[arg(long, default_value_t = 20)]
    pub inflight: u16,
    /// The signal goes out once this share of the burst was PUBACKed (0 to 1).
    #[arg(long, default_value_t = 0.3)]
    pub kill_at: f64,
    /// The signals, each a run of its own per target.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "kill,term")]
    pub signals: Vec<Signal>,
    /// After SIGTERM, how long the process may take to exit before it gets SIGKILL.
    #[arg(long, default_value_t = 30.0)]
    pub term_grace_secs: f64,
    /// How long a target's processes may take to store a first reading (Node-RED installs itself
    /// on its first start).
    #[arg(long, default_value_t = 300.0)]
    pub ready_timeout_secs: f64,
    /// Publishing the burst gives up this long after its start.
    #[arg(long, default_value_t = 300.0)]
    pub publish_timeout_secs: f64,
    /// After the burst, how long to wait for the restarted consumer to store what reaches it.
    #[arg(long, default_value_t = 900.0)]
    pub drain_timeout_secs: f64,
    /// ...and, once a reading published after the burst was stored, how long the count may stand
    /// still before it is taken as settled.
    #[arg(long, default_value_t = 10.0)]
    pub stall_secs: f64,
    /// Directory for the figures (`crash-<time>.json`, `latest.json`, `latest.md`) and, under
    /// `logs/`, the processes' output.
    #[arg(long, default_value = "target/bench/crash")]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum Signal {
    /// SIGKILL: no goodbye, as a crash, the OOM killer or a pulled plug.
    Kill,
    /// SIGTERM: a stop, as `docker stop` or systemd sends, with time to finish.
    Term,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Self::Kill => "SIGKILL",
            Self::Term => "SIGTERM",
        }
    }
}

/// Where a reading's id travels, and so what the consumer must store for it to be matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Payload {
    /// Sensorhub's topic `devices/<id>/readings`, `{"id", "ts", "metrics"}`.
    DeviceTopic,
    /// The seed's `sensor/data`, `{"device_id", "temperature", "humidity"}`, the reading's id as
    /// its device_id.
    SensorData,
}

#[derive(Debug, Clone, Deserialize)]
struct TargetsFile {
    targets: Vec<Target>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Target {
    pub name: String,
    pub broker: String,
    pub payload: Payload,
    pub database_url: String,
    pub table: String,
    pub id_column: String,
    #[serde(default)]
    pub reset: Vec<String>,
    pub processes: Vec<Consumer>,
    /// The process (by name) that gets the signal.
    pub kill: String,
    /// Said under the table: what is particular to this target.
    #[serde(default)]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Consumer {
    pub name: String,
    /// Its argv; it runs in loadgen's environment (use `env NAME=value ...` for more).
    pub command: Vec<String>,
}

/// One signal's run against one target.
#[derive(Debug, Clone, Serialize)]
pub struct CrashResult {
    pub target: String,
    pub signal: Signal,
    /// The process that got the signal.
    pub signalled: String,
    /// PUBACKs the devices had seen when the signal went out.
    pub acked_at_signal: u64,
    pub published: u64,
    /// PUBACKs the devices saw: the readings the broker took responsibility for.
    pub acked: u64,
    /// Rows of the burst in the table, duplicates included.
    pub stored_rows: u64,
    /// Distinct readings of the burst in the table.
    pub stored: u64,
    /// PUBACKed, never stored.
    pub lost: u64,
    /// Rows beyond the first of a reading.
    pub duplicated: u64,
    /// Stored though its PUBACK was never seen (the device gave up first).
    pub stored_unacked: u64,
    /// Devices that could not connect or lost their connection.
    pub failed_devices: u64,
    /// SIGTERM: seconds the process took to exit; None when it had to be killed (or for SIGKILL).
    pub stopped_secs: Option<f64>,
    /// Seconds from the burst's start to its last PUBACK.
    pub burst_secs: f64,
    /// Seconds from the burst's end until the stored count settled.
    pub settle_secs: f64,
    /// Whether every PUBACKed reading was stored, or the count stood still (false: the drain
    /// timed out first).
    pub settled: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub started_at: String,
    pub machine: Machine,
    pub messages: usize,
    pub devices: usize,
    pub inflight: u16,
    pub kill_at: f64,
    pub targets: Vec<Target>,
    pub runs: Vec<CrashResult>,
}

pub async fn run(args: CrashArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.messages >= 1, "--messages must be at least 1");
    anyhow::ensure!(args.devices >= 1, "--devices must be at least 1");
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.kill_at),
        "--kill-at is a share, 0 to 1"
    );
    let file: TargetsFile = serde_json::from_slice(
        &std::fs::read(&args.targets)
            .with_context(|| format!("reading {}", args.targets.display()))?,
    )
    .with_context(|| format!("{}: not a targets file", args.targets.display()))?;
    for t in &file.targets {
        Broker::parse(&t.broker)?;
        db::check_table_name(&t.table)?;
        db::check_table_name(&t.id_column)?;
        for table in &t.reset {
            db::check_table_name(table)?;
        }
        anyhow::ensure!(
            t.processes.iter().any(|p| p.name == t.kill),
            "{}: kill names {}, which is not among its processes",
            t.name,
            t.kill
        );
        anyhow::ensure!(
            t.processes.iter().all(|p| !p.command.is_empty()),
            "{}: a process without a command",
            t.name
        );
    }
    let logs = args.out.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let started_at = chrono::Utc::now();
    let progress = Progress::start();
    // one tag per loadgen run, so that rows of an earlier run are never counted as this one's
    let tag = format!("k{:x}", started_at.timestamp() % 0x100_0000);
    let mut runs = Vec::new();
    for (t, target) in file.targets.iter().enumerate() {
        for signal in &args.signals {
            let run_tag = format!(
                "{tag}-{t}{}",
                if *signal == Signal::Kill { 'k' } else { 't' }
            );
            let result = crash_once(&args, target, *signal, &run_tag, &logs, &progress)
                .await
                .with_context(|| format!("{}, {}", target.name, signal.name()))?;
            eprintln!(
                "{}, {}: {} PUBACKed, {} stored, {} lost, {} duplicated",
                result.target,
                signal.name(),
                result.acked,
                result.stored,
                result.lost,
                result.duplicated
            );
            runs.push(result);
        }
    }
    progress.done();
    let report = Report {
        started_at: started_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        machine: Machine::here(),
        messages: args.messages,
        devices: args.devices,
        inflight: args.inflight,
        kill_at: args.kill_at,
        targets: file.targets.clone(),
        runs,
    };
    let markdown = report.markdown();
    println!("{markdown}");
    let json = serde_json::to_string_pretty(&report)?;
    let stamp = report.started_at.replace(':', "");
    std::fs::write(args.out.join(format!("crash-{stamp}.json")), &json)?;
    std::fs::write(args.out.join("latest.json"), &json)?;
    std::fs::write(args.out.join("latest.md"), &markdown)?;
    eprintln!(
        "figures written to {}",
        args.out.join("latest.md").display()
    );
    Ok(())
}

/// A target's processes, started in order, and how to start each again.
struct Running {
    processes: Vec<(Consumer, Process)>,
}

impl Running {
    fn start(target: &Target, logs: &Path) -> anyhow::Result<Self> {
        let mut processes = Vec::new();
        for consumer in &target.processes {
            let process = start_consumer(target, consumer, logs)?;
            processes.push((consumer.clone(), process));
        }
        Ok(Self { processes })
    }

    fn get(&mut self, name: &str) -> &mut (Consumer, Process) {
        self.processes
            .iter_mut()
            .find(|(c, _)| c.name == name)
            .expect("checked when the targets were read")
    }

    /// A process that exited by itself: the run means nothing then.
    fn check(&mut self) -> anyhow::Result<()> {
        for (consumer, process) in &mut self.processes {
            if !process.is_running() {
                anyhow::bail!(
                    "{} exited; its log ({}) ends:\n{}",
                    consumer.name,
                    process.log().display(),
                    process.tail(20)
                );
            }
        }
        Ok(())
    }

    /// SIGTERM to each, the last started first, as a deployment is taken down.
    async fn stop(mut self) {
        while let Some((_, mut process)) = self.processes.pop() {
            process.terminate(Duration::from_secs(10)).await;
        }
    }
}

fn start_consumer(target: &Target, consumer: &Consumer, logs: &Path) -> anyhow::Result<Process> {
    let slug: String = format!("{}-{}", target.name, consumer.name)
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let mut command = std::process::Command::new(&consumer.command[0]);
    command.args(&consumer.command[1..]);
    Process::start(&consumer.name, command, &logs.join(format!("{slug}.log")))
}

async fn crash_once(
    args: &CrashArgs,
    target: &Target,
    signal: Signal,
    run_tag: &str,
    logs: &Path,
    progress: &Progress,
) -> anyhow::Result<CrashResult> {
    let broker = Broker::parse(&target.broker)?;
    let mut running = Running::start(target, logs)?;

    // Ready once a reading went all the way through: the consumer is connected and subscribed
    // (for a persistent session, Mosquitto keeps what arrives for it from then on).
    progress.phase(format!(
        "{}: waiting for a first stored reading",
        target.name
    ));
    let ready_deadline = Instant::now() + Duration::from_secs_f64(args.ready_timeout_secs);
    let mut probe = Prober::connect(&broker, target.payload, &format!("{run_tag}-p")).await?;
    let mut last_error = String::new();
    loop {
        probe.publish().await;
        // the seed and Node-RED make their database and table as they start: until then, an
        // error only means "not yet"
        match stored_count(target, &format!("{run_tag}-p%")).await {
            Ok(n) if n > 0 => break,
            Ok(_) => {}
            Err(e) => last_error = format!("; last: {e:#}"),
        }
        running.check()?;
        anyhow::ensure!(
            Instant::now() < ready_deadline,
            "no reading stored {} s after the start (logs in {}){last_error}",
            args.ready_timeout_secs,
            logs.display()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // emptied now rather than before the start: the seed and Node-RED make their tables as they
    // start (the counts are by this run's ids anyway; this keeps them quick)
    if !target.reset.is_empty() {
        let (url, tables) = (target.database_url.clone(), target.reset.clone());
        blocking(move || {
            let tables: Vec<&str> = tables.iter().map(String::as_str).collect();
            db::truncate(&mut db::connect(&url)?, &tables)
        })
        .await?;
    }

    let acked = progress.phase(format!(
        "{}, {}: burst of {} (PUBACKs)",
        target.name,
        signal.name(),
        readable(args.messages as f64)
    ));
    let burst_over = Arc::new(AtomicBool::new(false));
    let plan = Burst {
        broker: broker.clone(),
        payload: target.payload,
        devices: args.devices,
        messages: args.messages,
        inflight: args.inflight,
        tag: format!("{run_tag}-b"),
        timeout: Duration::from_secs_f64(args.publish_timeout_secs),
    };
    let threshold = ((args.messages as f64 * args.kill_at).ceil() as u64).max(1);
    let signaller = async {
        // the signal waits for the share of PUBACKs, or for a burst that ended short of it
        while acked.load(Ordering::Relaxed) < threshold && !burst_over.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let at_signal = acked.load(Ordering::Relaxed);
        let (consumer, process) = running.get(&target.kill);
        let stopped = match signal {
            Signal::Kill => {
                process.kill();
                None
            }
            Signal::Term => process
                .terminate(Duration::from_secs_f64(args.term_grace_secs))
                .await
                .map(|d| d.as_secs_f64()),
        };
        // started again at once, as a supervisor (Docker's restart policy, systemd) would
        let consumer = consumer.clone();
        let restarted = start_consumer(target, &consumer, logs);
        anyhow::Ok((at_signal, stopped, restarted))
    };
    let publishing = async {
        let outcome = burst(plan, acked.clone()).await;
        burst_over.store(true, Ordering::Relaxed);
        outcome
    };
    let (signalled, outcome) = tokio::join!(signaller, publishing);
    let (acked_at_signal, stopped, restarted) = signalled?;
    running.get(&target.kill).1 = restarted?;
    let burst_ended = Instant::now();

    // Settled once a reading published after the burst was stored (the restarted consumer works
    // and has gone past what waited for it, in the broker's order) and the count then stands still,
    // or every PUBACKed reading is there.
    progress.phase(format!(
        "{}, {}: waiting for the stored count to settle",
        target.name,
        signal.name()
    ));
    let drain_deadline = burst_ended + Duration::from_secs_f64(args.drain_timeout_secs);
    let mut after = Prober::connect(&broker, target.payload, &format!("{run_tag}-a")).await?;
    let burst_pattern = format!("{run_tag}-b%");
    let mut settled = false;
    while Instant::now() < drain_deadline {
        after.publish().await;
        if stored_count(target, &format!("{run_tag}-a%")).await? > 0 {
            break;
        }
        running.check()?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut last = stored_count(target, &burst_pattern).await?;
    let mut last_growth = Instant::now();
    while Instant::now() < drain_deadline {
        if last >= outcome.acked || last_growth.elapsed().as_secs_f64() >= args.stall_secs {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = stored_count(target, &burst_pattern).await?;
        if now > last {
            last_growth = Instant::now();
        }
        last = now;
    }
    let settle_secs = burst_ended.elapsed().as_secs_f64();
    after.close().await;
    probe.close().await;
    running.stop().await;

    let ids = stored_ids(target, &burst_pattern).await?;
    let stored_rows = ids.len() as u64;
    let stored: HashSet<String> = ids.into_iter().collect();
    let lost = outcome
        .acked_ids
        .iter()
        .filter(|id| !stored.contains(*id))
        .count() as u64;
    let stored_unacked = stored
        .iter()
        .filter(|id| !outcome.acked_ids.contains(*id))
        .count() as u64;
    Ok(CrashResult {
        target: target.name.clone(),
        signal,
        signalled: target.kill.clone(),
        acked_at_signal,
        published: outcome.published,
        acked: outcome.acked,
        stored_rows,
        stored: stored.len() as u64,
        lost,
        duplicated: stored_rows - stored.len() as u64,
        stored_unacked,
        failed_devices: outcome.failed_devices,
        stopped_secs: stopped,
        burst_secs: outcome.elapsed.as_secs_f64(),
        settle_secs,
        settled,
    })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await?
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = Text)]
    id: String,
}

/// Distinct readings whose id matches `pattern` (SQL LIKE).
async fn stored_count(target: &Target, pattern: &str) -> anyhow::Result<u64> {
    let query = format!(
        "SELECT count(DISTINCT {col}) AS n FROM {table} WHERE {col} LIKE $1",
        col = target.id_column,
        table = target.table
    );
    let (url, pattern) = (target.database_url.clone(), pattern.to_owned());
    blocking(move || {
        let rows: Vec<Count> = diesel::sql_query(query)
            .bind::<Text, _>(pattern)
            .load(&mut db::connect(&url)?)?;
        Ok(rows.first().map_or(0, |c| c.n.max(0) as u64))
    })
    .await
}

/// Every row's id matching `pattern`, duplicates included.
async fn stored_ids(target: &Target, pattern: &str) -> anyhow::Result<Vec<String>> {
    let query = format!(
        "SELECT {col} AS id FROM {table} WHERE {col} LIKE $1",
        col = target.id_column,
        table = target.table
    );
    let (url, pattern) = (target.database_url.clone(), pattern.to_owned());
    blocking(move || {
        let rows: Vec<Id> = diesel::sql_query(query)
            .bind::<Text, _>(pattern)
            .load(&mut db::connect(&url)?)?;
        Ok(rows.into_iter().map(|r| r.id).collect())
    })
    .await
}

/// One connection that publishes a reading a call, ids `<prefix>0`, `<prefix>1`, ...: proof that
/// readings get through (before the burst, and after it).
struct Prober {
    client: AsyncClient,
    poller: tokio::task::JoinHandle<()>,
    payload: Payload,
    prefix: String,
    sent: usize,
}

impl Prober {
    async fn connect(broker: &Broker, payload: Payload, prefix: &str) -> anyhow::Result<Self> {
        let mut options =
            MqttOptions::new(format!("{prefix}-probe"), broker.host.clone(), broker.port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true);
        let (client, mut events) = AsyncClient::new(options, 16);
        // the event loop reconnects by itself when polled again after an error
        let poller = tokio::spawn(async move {
            loop {
                if events.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        });
        Ok(Self {
            client,
            poller,
            payload,
            prefix: prefix.to_owned(),
            sent: 0,
        })
    }

    async fn publish(&mut self) {
        let (topic, body) = reading(self.payload, 0, &format!("{}{}", self.prefix, self.sent));
        self.sent += 1;
        let _ = self
            .client
            .publish(topic, QoS::AtLeastOnce, false, body)
            .await;
    }

    async fn close(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.poller.abort();
    }
}

/// A reading with id `id` from device `index`, as `payload` says.
fn reading(payload: Payload, index: usize, id: &str) -> (String, Vec<u8>) {
    let ts = chrono::Utc::now().timestamp_millis();
    let temperature = 15.0 + (index % 200) as f64 / 10.0;
    match payload {
        Payload::DeviceTopic => (
            format!("devices/{}/readings", device_name(index)),
            format!(
                r#"{{"id":"{id}","ts":{ts},"metrics":{{"temperature":{temperature:.1},"humidity":50.0}}}}"#
            )
            .into_bytes(),
        ),
        Payload::SensorData => (
            "sensor/data".to_owned(),
            format!(
                r#"{{"device_id":"{id}","id":"{id}","ts":{ts},"temperature":{temperature:.1},"humidity":50.0}}"#
            )
            .into_bytes(),
        ),
    }
}

struct Burst {
    broker: Broker,
    payload: Payload,
    devices: usize,
    messages: usize,
    inflight: u16,
    /// Each reading's id is `<tag><device>-<n>`.
    tag: String,
    timeout: Duration,
}

#[derive(Default)]
struct BurstOutcome {
    published: u64,
    acked: u64,
    acked_ids: HashSet<String>,
    failed_devices: u64,
    /// From the start to the last PUBACK.
    elapsed: Duration,
}

/// Publishes the burst over `devices` connections, counting each PUBACK into `acked` as it comes.
async fn burst(plan: Burst, acked: Arc<AtomicU64>) -> BurstOutcome {
    let devices = plan.devices.max(1);
    let plan = Arc::new(plan);
    // every device connects first; the clock starts when all are connected
    let barrier = Arc::new(Barrier::new(devices + 1));
    let tasks: Vec<_> = (0..devices)
        .map(|index| {
            let share = plan.messages / devices + usize::from(index < plan.messages % devices);
            tokio::spawn(device(
                plan.clone(),
                index,
                share,
                barrier.clone(),
                acked.clone(),
            ))
        })
        .collect();
    barrier.wait().await;
    let started = Instant::now();
    let mut total = BurstOutcome::default();
    let mut last_ack = started;
    for (index, task) in tasks.into_iter().enumerate() {
        let Ok(d) = task.await else {
            total.failed_devices += 1;
            continue;
        };
        total.published += d.published;
        total.acked += d.acked.len() as u64;
        total.failed_devices += u64::from(d.failed);
        total.acked_ids.extend(
            d.acked
                .into_iter()
                .map(|n| format!("{}{index}-{n}", plan.tag)),
        );
        if let Some(at) = d.last_ack {
            last_ack = last_ack.max(at);
        }
    }
    total.elapsed = last_ack - started;
    total
}

struct DeviceOutcome {
    published: u64,
    /// The sequence numbers (within the device) of the readings PUBACKed.
    acked: Vec<usize>,
    failed: bool,
    last_ack: Option<Instant>,
}

async fn device(
    plan: Arc<Burst>,
    index: usize,
    share: usize,
    barrier: Arc<Barrier>,
    acked_total: Arc<AtomicU64>,
) -> DeviceOutcome {
    let mut out = DeviceOutcome {
        published: 0,
        acked: Vec::with_capacity(share),
        failed: false,
        last_ack: None,
    };
    let mut options = MqttOptions::new(
        format!("{}{index}", plan.tag),
        plan.broker.host.clone(),
        plan.broker.port,
    );
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_inflight(plan.inflight.max(1))
        .set_max_packet_size(1 << 16, 1 << 16);
    let (client, mut events) = AsyncClient::new(options, 64);
    let connected = system::mqtt::connected(&mut events, Duration::from_secs(30))
        .await
        .is_ok();
    // whatever happened, take part in the barrier so the others are not held up
    barrier.wait().await;
    if !connected {
        out.failed = true;
        return out;
    }

    let feeder = {
        let (client, plan) = (client.clone(), plan.clone());
        tokio::spawn(async move {
            for n in 0..share {
                let (topic, body) =
                    reading(plan.payload, index, &format!("{}{index}-{n}", plan.tag));
                if client
                    .publish(topic, QoS::AtLeastOnce, false, body)
                    .await
                    .is_err()
                {
                    break;
                }
            }
        })
    };
    // rumqttc says which packet id a PUBACK is for, and gives each publish its packet id as it
    // writes it (Outgoing::Publish), in the order they were queued: that order is the sequence
    // number's, so the packet ids map back to readings
    let mut in_flight: HashMap<u16, usize> = HashMap::new();
    let mut next = 0usize;
    let deadline = Instant::now() + plan.timeout;
    while out.acked.len() < share {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                in_flight.insert(pkid, next);
                next += 1;
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                if let Some(n) = in_flight.remove(&ack.pkid) {
                    out.acked.push(n);
                    out.last_ack = Some(Instant::now());
                    acked_total.fetch_add(1, Ordering::Relaxed);
                }
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
    out.published = next as u64;
    system::mqtt::disconnect(&client, &mut events, Duration::from_secs(2)).await;
    out
}

impl Report {
    /// The table: per target and signal, PUBACKed against stored.
    pub fn markdown(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Crash comparison, {}: bursts of {} readings at QoS 1 from {} device connections \
             ({} unacknowledged each), the signal sent once {:.0}% were PUBACKed, the process \
             started again at once. {}.\n",
            self.started_at,
            readable(self.messages as f64),
            self.devices,
            self.inflight,
            self.kill_at * 100.0,
            self.machine.describe()
        );
        let _ = writeln!(
            out,
            "| Target | Signal | To | Sent after | PUBACKed | Stored | Lost (PUBACKed, not stored) | Duplicated | Exit after SIGTERM | Settled after |"
        );
        let _ = writeln!(
            out,
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for r in &self.runs {
            let exit = match (r.signal, r.stopped_secs) {
                (Signal::Kill, _) => "–".to_owned(),
                (Signal::Term, Some(s)) => format!("{s:.1} s"),
                (Signal::Term, None) => "killed at the grace's end".to_owned(),
            };
            let lost_pct = 100.0 * r.lost as f64 / r.acked.max(1) as f64;
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} ({lost_pct:.1}%) | {} | {exit} | {:.0} s{} |",
                r.target,
                r.signal.name(),
                r.signalled,
                thousands(r.acked_at_signal),
                thousands(r.acked),
                thousands(r.stored),
                thousands(r.lost),
                thousands(r.duplicated),
                r.settle_secs,
                if r.settled { "" } else { " (timed out)" }
            );
        }
        let mut notes = Vec::new();
        for r in &self.runs {
            if r.failed_devices > 0 {
                notes.push(format!(
                    "{}, {}: {} device connections failed; {} readings published, {} PUBACKed.",
                    r.target,
                    r.signal.name(),
                    r.failed_devices,
                    thousands(r.published),
                    thousands(r.acked)
                ));
            }
            if r.stored_unacked > 0 {
                notes.push(format!(
                    "{}, {}: {} readings stored whose PUBACK the device never saw.",
                    r.target,
                    r.signal.name(),
                    thousands(r.stored_unacked)
                ));
            }
        }
        for t in &self.targets {
            if let Some(note) = &t.note {
                notes.push(format!("{}: {note}", t.name));
            }
        }
        if !notes.is_empty() {
            let _ = writeln!(out);
            for note in notes {
                let _ = writeln!(out, "- {note}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_carry_their_id_where_the_consumer_stores_it() {
        let (topic, body) = reading(Payload::DeviceTopic, 7, "k1-0k-b7-3");
        assert_eq!(topic, "devices/pi-00007/readings");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["id"], "k1-0k-b7-3");
        let (topic, body) = reading(Payload::SensorData, 7, "k1-0k-b7-3");
        assert_eq!(topic, "sensor/data");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["device_id"], "k1-0k-b7-3");
    }
}
