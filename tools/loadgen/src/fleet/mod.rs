//! `loadgen fleet`: a fleet of simulated devices, each posting one reading at a time on its own
//! schedule (open loop), stepped up in offered rate against each target until the latency bound
//! breaks; the highest rate each target held, what the whole path spent in CPU per stored reading,
//! and charts of both (`docs/bench/*.svg`). Over HTTP (`send`) or MQTT (`mqtt`).

pub mod mqtt;
mod plot;
mod report;
pub mod send;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::db;
use crate::progress::Progress;
use crate::report::Machine;
use mqtt::{MqttFleet, MqttTarget};
use report::{Report, ms};
use send::{ConnectionMode, Destination, Fleet};
use system::numbers::readable;
use system::procs::{CpuWindow, Watched};

/// Open-loop fleet benchmark: N simulated devices, each sending one reading (POST /data, with its
/// own device token; or an MQTT publish at QoS 1) at its own jittered phase once per period, never
/// waiting for its previous answer; latency counts from each reading's scheduled send time to its
/// answer (to the broker's PUBACK over MQTT). For each target and connection mode, the offered
/// rate steps up (--rates), each step held --hold-secs, until a step breaks the bound (p99 ≥
/// --p99-bound-ms, or anything refused, failed or not sent; over MQTT also: PostgreSQL behind by
/// more than a tenth of the acknowledged readings at the last PUBACK). Prints a Markdown table,
/// writes it with JSON to --out and the charts to --plots.
#[derive(clap::Args, Debug, Clone)]
pub struct FleetArgs {
    /// JSON file naming the targets, benchmarked in its order (scripts/bench --fleet writes one):
    /// `{"registry": {"database_url", "ingest_url"}, "targets": [{"name", "role", "url",
    /// "ca_file", "database_url", "table", "reset": [tables], "tokens": bool, "processes":
    /// [{"name", "pid", "tree"}]}]}`. `role` is one of sensorhub, sensorhub-traefik, seed,
    /// node-red, traefik-ceiling, other (what the summary compares); `url` http:// or https://
    /// (checked against `ca_file`); readings are counted in `table` of `database_url` (none: acks
    /// only); `processes` are the path's processes whose CPU is charged to the stored readings
    /// (`tree`: with their children); `registry` is where the fleet's devices are registered
    /// (with --keys-dir) and the ingest-http that must let them in. A target with `"mqtt": {"url":
    /// "mqtt://host:port", "format": "device-topic" | "seed", "logins": bool, "processes": [...]}`
    /// is benchmarked in mode mqtt too (`logins`: each device logs in with its id and token;
    /// `processes`: the MQTT path's, charged in that mode).
    #[arg(long)]
    pub targets: PathBuf,
    /// Simulated devices (1,000 to 20,000 is a fleet); each sends once per devices/rate seconds.
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
    /// Offered rates to step through, readings/s over the whole fleet, lowest first.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "250,500,1000,2000,4000,8000,16000"
    )]
    pub rates: Vec<f64>,
    /// Seconds each rate is held.
    #[arg(long, default_value_t = 60.0)]
    pub hold_secs: f64,
    /// Connection modes, each a step search of its own: new-connection (a TCP and TLS connection
    /// per reading, closed after it, as Python's requests.post without a session), keep-alive
    /// (a connection per device, opened in an uncounted warm-up before the first step, each
    /// device sending one reading, and kept between its readings) and mqtt (an MQTT connection per
    /// device, opened before the first step and held through all of them; QoS 1; only the targets
    /// with an `mqtt` broker).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "new-connection,keep-alive"
    )]
    pub modes: Vec<ConnectionMode>,
    /// The latency bound a held rate keeps: p99 of acknowledgements below this.
    #[arg(long, default_value_t = 100.0)]
    pub p99_bound_ms: f64,
    /// The operator's key directory (`signing-key.pem`): the fleet's devices are registered in
    /// the registry's database and each sends with its own token (to every target: the seed and
    /// Node-RED ignore it, so each request is the same size everywhere).
    #[arg(long, env = "LOADGEN_KEYS_DIR")]
    pub keys_dir: Option<PathBuf>,
    /// A request unanswered after this long counts as failed.
    #[arg(long, default_value_t = 5.0)]
    pub timeout_secs: f64,
    /// Requests in flight at most (each holds a socket: keep it under `ulimit -n`); a send due
    /// beyond it is not made and counts as failed.
    #[arg(long, default_value_t = 15_000)]
    pub max_inflight: u64,
    /// Go on stepping up after a step broke the bound (default: stop at the first that did).
    #[arg(long)]
    pub keep_going: bool,
    /// After the steps, this many more between the highest rate held and the lowest above it not
    /// held, each halving the gap (a ladder doubling its rate says only "between 1,000 and 2,000";
    /// 2 more say it within 250).
    #[arg(long, default_value_t = 0)]
    pub refine: u32,
    /// Only the targets of these roles (sensorhub, sensorhub-traefik, seed, node-red,
    /// traefik-ceiling, other); default: every target in the file.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub roles: Vec<Role>,
    /// Empty each target's `reset` tables before each step (dedicated benchmark databases only).
    #[arg(long)]
    pub reset_db: bool,
    /// After a step, how long to wait for its acknowledged readings to be stored.
    #[arg(long, default_value_t = 120.0)]
    pub drain_timeout_secs: f64,
    /// ...giving up earlier when the count has not grown for this long.
    #[arg(long, default_value_t = 10.0)]
    pub stall_secs: f64,
    #[command(flatten)]
    pub written: Written,
    /// A short run to try things out: 10 s holds (overrides --hold-secs).
    #[arg(long)]
    pub quick: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Sensorhub,
    SensorhubTraefik,
    Seed,
    NodeRed,
    TraefikCeiling,
    Other,
}

#[derive(Debug, Clone, Deserialize)]
struct TargetsFile {
    registry: Option<Registry>,
    targets: Vec<Target>,
}

#[derive(Debug, Clone, Deserialize)]
struct Registry {
    database_url: String,
    ingest_url: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Target {
    pub name: String,
    pub role: Role,
    pub url: String,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub database_url: Option<String>,
    #[serde(default)]
    pub table: Option<String>,
    #[serde(default)]
    pub reset: Vec<String>,
    #[serde(default)]
    pub tokens: bool,
    #[serde(default)]
    pub processes: Vec<Process>,
    /// Where its devices publish over MQTT (mode mqtt); none: HTTP only.
    #[serde(default)]
    pub mqtt: Option<MqttTarget>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Process {
    pub name: String,
    pub pid: u32,
    #[serde(default)]
    pub tree: bool,
}

/// One held rate of one target in one mode.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct StepResult {
    pub target: String,
    pub role: Role,
    pub mode: ConnectionMode,
    pub offered: f64,
    pub scheduled: u64,
    /// 2xx answers per second of the hold.
    pub achieved: f64,
    pub p50_ms: Option<f64>,
    /// p50 from the moment loadgen made each send rather than when it was due: without loadgen's
    /// timer tick (up to 1 ms), what the server made the device wait.
    pub p50_from_send_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub refused: u64,
    pub failed: u64,
    pub connections_opened: u64,
    /// Rows that reached the target's table (None: the target stores nothing).
    pub stored: Option<i64>,
    /// ...of them, those there when the last answer came (over MQTT, where a broker answers for
    /// the target, whether storing kept up).
    pub stored_by_last_answer: Option<i64>,
    pub all_stored: bool,
    /// CPU seconds of each path process over the hold and the drain.
    pub cpu_seconds: Vec<(String, f64)>,
    /// The path's CPU (every process named, loadgen not) per 1,000 stored readings, in ms of one core.
    pub cpu_ms_per_1000: Option<f64>,
    /// loadgen's own CPU over the hold, percent of one core.
    pub loadgen_cpu_percent: Option<f64>,
    /// How late loadgen made its sends, p99.
    pub send_lag_p99_ms: Option<f64>,
    /// The machine's 1-minute load average when the step ended (`uptime`).
    pub load_average: String,
    /// Below the latency bound with nothing refused, failed or unsent, and ≥ 95% of the offered rate;
    /// over MQTT also ≥ 90% of the acknowledged readings stored by the last PUBACK.
    pub held: bool,
    /// loadgen near a core of its own, or late with its sends: the step measured loadgen too.
    pub loadgen_limited: bool,
}

/// A keep-alive warm-up lasts at least this long...
const WARM_UP_SECS: f64 = 10.0;
/// ...and opens at most this many connections a second (a TLS handshake costs Traefik milliseconds).
const WARM_UP_CONNECTIONS_PER_SEC: f64 = 200.0;
/// ...and is run again while anything in it was refused or failed, at most this many times in all
/// (a minute at 1,000 devices: longer than Traefik's health check takes to see a backend back).
const WARM_UP_ROUNDS: u32 = 6;

/// The name of loadgen's own process among the watched.
const LOADGEN: &str = "loadgen";

pub async fn run(mut args: FleetArgs) -> anyhow::Result<()> {
    if args.quick {
        args.hold_secs = 10.0;
    }
    anyhow::ensure!(args.devices >= 1, "--devices must be at least 1");
    anyhow::ensure!(!args.rates.is_empty(), "--rates needs at least one rate");
    let mut file: TargetsFile = serde_json::from_slice(
        &std::fs::read(&args.targets)
            .with_context(|| format!("reading {}", args.targets.display()))?,
    )
    .with_context(|| format!("{}: not a targets file", args.targets.display()))?;
    if !args.roles.is_empty() {
        file.targets.retain(|t| args.roles.contains(&t.role));
        anyhow::ensure!(
            !file.targets.is_empty(),
            "no target in {} has a role named by --roles",
            args.targets.display()
        );
    }
    for t in &file.targets {
        if let Some(table) = &t.table {
            db::check_table_name(table)?;
        }
        for table in &t.reset {
            db::check_table_name(table)?;
        }
    }
    let started_at = chrono::Utc::now();
    let progress = Progress::start();
    let names: Vec<String> = (0..args.devices).map(crate::http::device_name).collect();
    let tokens = register(&args, file.registry.as_ref(), &progress).await?;
    let mut course = Course {
        args: args.clone(),
        progress: progress.clone(),
        results: Vec::new(),
        tag: format!("f{:x}", started_at.timestamp() % 0x100_0000),
        steps_run: 0,
    };
    for mode in args.modes.clone() {
        if mode == ConnectionMode::Mqtt && file.targets.iter().all(|t| t.mqtt.is_none()) {
            progress.say("mode mqtt: no target names an MQTT broker (\"mqtt\"), skipped");
        }
        for target in &file.targets {
            if mode == ConnectionMode::Mqtt && target.mqtt.is_none() {
                continue;
            }
            let tokens = tokens.as_deref().filter(|_| target.tokens);
            course.step_search(target, mode, &names, tokens).await?;
        }
    }
    progress.done();
    let report = Report {
        started_at: started_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        machine: Machine::here(),
        devices: args.devices,
        hold_secs: args.hold_secs,
        p99_bound_ms: args.p99_bound_ms,
        targets: file.targets.clone(),
        steps: course.results,
    };
    write(&report, &args.written)
}

/// Where a run's figures go: `loadgen fleet` writes them there, `loadgen fleet-report` again.
#[derive(clap::Args, Debug, Clone)]
pub struct Written {
    /// Directory for the figures (`fleet-<time>.json`, `latest.json`, `latest.md`).
    #[arg(long, default_value = "target/bench/fleet")]
    pub out: PathBuf,
    /// Directory for the charts (`fleet-throughput.svg`, `fleet-latency.svg`, a panel per mode;
    /// `fleet-mqtt-*.svg` when mqtt is the only mode); empty: none.
    #[arg(long, default_value = "docs/bench")]
    pub plots: PathBuf,
}

/// Writes a run's figures: its markdown (also printed) and JSON to `--out`, its charts to
/// `--plots` (none when empty).
fn write(report: &Report, Written { out, plots }: &Written) -> anyhow::Result<()> {
    let markdown = report.markdown();
    println!("{markdown}");
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = serde_json::to_string_pretty(report)?;
    let stamp = report.started_at.replace(':', "");
    std::fs::write(out.join(format!("fleet-{stamp}.json")), &json)?;
    std::fs::write(out.join("latest.json"), &json)?;
    std::fs::write(out.join("latest.md"), &markdown)?;
    if !plots.as_os_str().is_empty() {
        let written = plot::write(report, plots)?;
        for path in written {
            eprintln!("chart written to {}", path.display());
        }
    }
    eprintln!("figures written to {}", out.join("latest.md").display());
    Ok(())
}

/// Arguments of `loadgen fleet-report`.
#[derive(clap::Args, Debug, Clone)]
pub struct ReportArgs {
    /// A fleet run's JSON (`latest.json` or `fleet-<time>.json` of its --out directory).
    pub json: PathBuf,
    #[command(flatten)]
    pub written: Written,
}

/// Writes a finished run's markdown, JSON and charts again from its JSON, as the run would write
/// them now: after a change to the report, without running the benchmark again.
pub fn report(args: ReportArgs) -> anyhow::Result<()> {
    let report: Report = serde_json::from_slice(
        &std::fs::read(&args.json).with_context(|| format!("reading {}", args.json.display()))?,
    )
    .with_context(|| format!("{}: not a fleet run's JSON", args.json.display()))?;
    write(&report, &args.written)
}

/// Registers the fleet in the registry's database and waits until ingest-http lets the last one
/// in; `None` without --keys-dir.
async fn register(
    args: &FleetArgs,
    registry: Option<&Registry>,
    progress: &Progress,
) -> anyhow::Result<Option<Vec<String>>> {
    let (Some(keys), Some(registry)) = (args.keys_dir.clone(), registry) else {
        return Ok(None);
    };
    progress.phase(format!("registering {} devices", args.devices));
    let (url, devices) = (registry.database_url.clone(), args.devices);
    let tokens = tokio::task::spawn_blocking(move || db::register_fleet(&url, &keys, devices))
        .await?
        .context("registering the fleet's devices")?;
    if let Some(last) = tokens.last() {
        system::service::wait_token_accepted(&registry.ingest_url, last, Duration::from_secs(60))
            .await
            .context("ingest-http to let the fleet in")?;
    }
    Ok(Some(tokens))
}

struct Course {
    args: FleetArgs,
    progress: Progress,
    results: Vec<StepResult>,
    tag: String,
    steps_run: u64,
}

/// What carries one target's readings in one mode: HTTP requests (its destination, and the
/// fleet's kept connections), or the fleet's MQTT connections to its broker.
enum Carrier {
    Http {
        destination: Destination,
        fleet: Arc<Fleet>,
    },
    Mqtt(MqttFleet),
}

impl Carrier {
    /// Closes whatever the fleet holds open (before it turns to another target).
    fn hang_up(self) {
        match self {
            Carrier::Http { fleet, .. } => fleet.hang_up(),
            Carrier::Mqtt(fleet) => fleet.hang_up(),
        }
    }
}

impl Course {
    /// Steps the offered rate up for one target in one mode, until a step breaks the bound.
    async fn step_search(
        &mut self,
        target: &Target,
        mode: ConnectionMode,
        names: &[String],
        tokens: Option<&[String]>,
    ) -> anyhow::Result<()> {
        let carrier = self.carrier(target, mode, names, tokens).await?;
        if mode == ConnectionMode::KeepAlive {
            self.warm_up(target, &carrier).await?;
        }
        let mut bracket = Bracket::default();
        let mut broke = false;
        for rate in self.args.rates.clone() {
            if broke && !self.args.keep_going {
                break;
            }
            broke = !self
                .search_step(target, mode, &carrier, rate, broke)
                .await?;
            bracket.record(rate, !broke);
        }
        for _ in 0..self.args.refine {
            let Some(rate) = bracket.middle() else { break };
            broke = !self
                .search_step(target, mode, &carrier, rate, broke)
                .await?;
            bracket.record(rate, !broke);
        }
        carrier.hang_up();
        Ok(())
    }

    /// Opens the fleet's keep-alive connections before the first step, as the MQTT fleet connects
    /// before its first: each device sends one reading, spread over at least
    /// [`WARM_UP_SECS`] and at most [`WARM_UP_CONNECTIONS_PER_SEC`] new connections a second,
    /// and nothing of it is counted. Without it the first step also paid for a thousand TLS
    /// handshakes in its first second, and a p99 measured the handshake storm rather than the
    /// rate (a new connection per reading is its own mode).
    ///
    /// A warm-up in which anything was refused or failed is run again, up to
    /// [`WARM_UP_ROUNDS`] in all: after a step that broke, a target can take a while to come
    /// back (Traefik marks its backend healthy again only at its next health check), and the
    /// next step would measure that recovery rather than its rate.
    async fn warm_up(&mut self, target: &Target, carrier: &Carrier) -> anyhow::Result<()> {
        let Carrier::Http { fleet, .. } = carrier else {
            return Ok(());
        };
        let devices = fleet.devices() as f64;
        let seconds = WARM_UP_SECS.max(devices / WARM_UP_CONNECTIONS_PER_SEC);
        for round in 1..=WARM_UP_ROUNDS {
            // a rate a little above one reading per device, so that every device has sent once
            let warm = self
                .step(
                    target,
                    ConnectionMode::KeepAlive,
                    carrier,
                    devices * 1.1 / seconds,
                    seconds,
                )
                .await?;
            let troubles = warm.refused + warm.failed;
            self.progress.say(&format!(
                "{}: keep-alive warm-up (not counted), {} connections opened over {} s, {} refused or failed{}",
                target.name,
                readable(warm.connections_opened as f64),
                readable(seconds),
                troubles,
                match (troubles, round) {
                    (0, _) => "",
                    (_, WARM_UP_ROUNDS) => "; the next step goes ahead anyway",
                    _ => "; again",
                }
            ));
            if troubles == 0 {
                break;
            }
        }
        Ok(())
    }

    /// One step of the search, said on the progress line and kept; whether it held. After one that
    /// broke, keep-alive connections are opened again first: the broken step may have left them
    /// closed or half-dead, and the next would measure a reconnection storm rather than its rate.
    async fn search_step(
        &mut self,
        target: &Target,
        mode: ConnectionMode,
        carrier: &Carrier,
        rate: f64,
        after_a_break: bool,
    ) -> anyhow::Result<bool> {
        if after_a_break && mode == ConnectionMode::KeepAlive {
            self.warm_up(target, carrier).await?;
        }
        let result = self
            .step(target, mode, carrier, rate, self.args.hold_secs)
            .await?;
        let held = result.held;
        self.progress.say(&step_line(&result));
        self.results.push(result);
        Ok(held)
    }

    /// Resolves the target's URL, or connects the whole fleet to its broker (ramped, before the
    /// first step: 10,000 MQTT connections take seconds to open).
    async fn carrier(
        &self,
        target: &Target,
        mode: ConnectionMode,
        names: &[String],
        tokens: Option<&[String]>,
    ) -> anyhow::Result<Carrier> {
        let Some(broker) = target
            .mqtt
            .as_ref()
            .filter(|_| mode == ConnectionMode::Mqtt)
        else {
            let destination = Destination::resolve(&target.url, "/data", target.ca_file.as_deref())
                .await
                .with_context(|| format!("{}: its URL", target.name))?;
            let fleet = Arc::new(Fleet::new(names.to_vec(), tokens.map(<[String]>::to_vec)));
            return Ok(Carrier::Http { destination, fleet });
        };
        let counter = self.progress.phase(format!(
            "{}: connecting {} devices to {}",
            target.name,
            readable(names.len() as f64),
            broker.url
        ));
        let started = Instant::now();
        let (fleet, refusals) = MqttFleet::connect(broker, names, tokens, &self.tag, counter)
            .await
            .with_context(|| format!("{}: connecting the fleet over MQTT", target.name))?;
        self.progress.say(&format!(
            "{}: {} devices connected over MQTT in {:.1} s{}",
            target.name,
            readable(fleet.connected() as f64),
            started.elapsed().as_secs_f64(),
            refusals.first().map_or(String::new(), |first| format!(
                "; {} could not connect (first: {first})",
                refusals.len()
            ))
        ));
        Ok(Carrier::Mqtt(fleet))
    }

    /// One held rate: empty (or count) the table, offer the load, wait for the readings to be
    /// stored, and charge the path's CPU over all of it to what was stored.
    async fn step(
        &mut self,
        target: &Target,
        mode: ConnectionMode,
        carrier: &Carrier,
        rate: f64,
        hold_secs: f64,
    ) -> anyhow::Result<StepResult> {
        self.steps_run += 1;
        let phase = format!(
            "{}, {}, {} readings/s offered",
            target.name,
            mode.label(),
            readable(rate)
        );
        let before = self.prepare(target).await?;
        let processes = match (carrier, &target.mqtt) {
            (Carrier::Mqtt(_), Some(mqtt)) => &mqtt.processes,
            _ => &target.processes,
        };
        let path: Vec<Watched> = processes
            .iter()
            .map(|p| Watched {
                name: p.name.clone(),
                pid: p.pid,
                tree: p.tree,
            })
            .collect();
        let me = [Watched {
            name: LOADGEN.into(),
            pid: std::process::id(),
            tree: false,
        }];
        let path_cpu = CpuWindow::start(&path);
        let loadgen_cpu = CpuWindow::start(&me);
        let window = Instant::now();
        let counter = self.progress.phase(&phase);
        let mut outcome = self.offer(carrier, mode, rate, hold_secs, counter).await;
        let loadgen_cpu_percent = loadgen_cpu.finish().first().and_then(|u| u.cpu_percent);
        let stored_by_last_answer = self.stored_now(target, before).await?;
        let stored = self
            .drain(target, &phase, before, outcome.ok as i64)
            .await?;
        let seconds = window.elapsed().as_secs_f64();
        let cpu_seconds: Vec<(String, f64)> = path_cpu
            .finish()
            .into_iter()
            .filter_map(|u| Some((u.name, u.cpu_percent? / 100.0 * seconds)))
            .collect();
        let path_total: f64 = cpu_seconds.iter().map(|(_, s)| s).sum();
        // a target that stores nothing (the ceiling's responder) is charged per answered request
        let counted = stored.map_or(outcome.ok as f64, |(n, _)| n as f64);
        let cpu_ms_per_1000 = (counted > 0.0 && !cpu_seconds.is_empty())
            .then(|| path_total * 1000.0 / counted * 1000.0);
        let achieved = outcome.ok as f64 / outcome.elapsed.as_secs_f64().max(hold_secs);
        let p99 = outcome.latencies.percentile_ms(99.0);
        let send_lag_p99_ms = outcome.send_lag.percentile_ms(99.0);
        // a broker's PUBACK does not say the target kept up: what PostgreSQL had by the last one does
        // (a tenth behind allowed: the readings of the step's last second or so still on their way)
        let kept_up = !matches!(carrier, Carrier::Mqtt(_))
            || stored_by_last_answer.is_none_or(|n| n as f64 >= 0.9 * outcome.ok as f64);
        let held = p99.is_some_and(|p| p < self.args.p99_bound_ms)
            && outcome.refused == 0
            && outcome.failed == 0
            && achieved >= 0.95 * rate
            && kept_up;
        let loadgen_limited = loadgen_cpu_percent.is_some_and(|c| c >= 80.0)
            || send_lag_p99_ms.is_some_and(|l| l >= 10.0)
            || outcome.not_sent > 0;
        Ok(StepResult {
            target: target.name.clone(),
            role: target.role,
            mode,
            offered: rate,
            scheduled: outcome.scheduled,
            achieved,
            p50_ms: outcome.latencies.percentile_ms(50.0),
            p50_from_send_ms: outcome.from_send.percentile_ms(50.0),
            p90_ms: outcome.latencies.percentile_ms(90.0),
            p99_ms: p99,
            max_ms: outcome.latencies.percentile_ms(100.0),
            refused: outcome.refused,
            failed: outcome.failed,
            connections_opened: outcome.connections_opened,
            stored: stored.map(|(n, _)| n),
            stored_by_last_answer,
            all_stored: stored.is_none_or(|(_, complete)| complete),
            cpu_seconds,
            cpu_ms_per_1000,
            loadgen_cpu_percent,
            send_lag_p99_ms,
            load_average: load_average(),
            held,
            loadgen_limited,
        })
    }

    /// Offers one step's load: over HTTP (a task per request) or over the held MQTT connections.
    async fn offer(
        &self,
        carrier: &Carrier,
        mode: ConnectionMode,
        rate: f64,
        hold_secs: f64,
        acked: Arc<std::sync::atomic::AtomicU64>,
    ) -> send::Outcome {
        let hold = Duration::from_secs_f64(hold_secs);
        let timeout = Duration::from_secs_f64(self.args.timeout_secs);
        let run_tag = format!("{}s{}", self.tag, self.steps_run);
        match carrier {
            Carrier::Http { destination, fleet } => {
                let step = send::Step {
                    destination: destination.clone(),
                    mode,
                    rate,
                    hold,
                    timeout,
                    max_inflight: self.args.max_inflight,
                    run_tag,
                };
                send::run(step, fleet.clone(), acked).await
            }
            Carrier::Mqtt(fleet) => fleet.run(rate, hold, timeout, &run_tag, acked).await,
        }
    }

    /// The step's readings in the target's table now (None: it stores nothing).
    async fn stored_now(
        &self,
        target: &Target,
        before: Option<i64>,
    ) -> anyhow::Result<Option<i64>> {
        let (Some(before), Some(url), Some(table)) =
            (before, target.database_url.clone(), target.table.clone())
        else {
            return Ok(None);
        };
        tokio::task::spawn_blocking(move || {
            db::count_rows(&mut db::connect(&url)?, &table).map(|n| Some(n - before))
        })
        .await?
    }

    /// Empties the target's tables when allowed; the rows there now (None: it stores nothing).
    async fn prepare(&self, target: &Target) -> anyhow::Result<Option<i64>> {
        let (Some(url), Some(table)) = (target.database_url.clone(), target.table.clone()) else {
            return Ok(None);
        };
        let reset = self.args.reset_db.then(|| target.reset.clone());
        tokio::task::spawn_blocking(move || {
            let mut conn = db::connect(&url)?;
            if let Some(tables) = reset.filter(|t| !t.is_empty()) {
                let tables: Vec<&str> = tables.iter().map(String::as_str).collect();
                db::truncate(&mut conn, &tables)?;
            }
            db::count_rows(&mut conn, &table).map(Some)
        })
        .await?
    }

    /// Waits for the step's acknowledged readings to be stored: (stored, all of them).
    async fn drain(
        &self,
        target: &Target,
        phase: &str,
        before: Option<i64>,
        acked: i64,
    ) -> anyhow::Result<Option<(i64, bool)>> {
        let (Some(before), Some(url), Some(table)) =
            (before, target.database_url.clone(), target.table.clone())
        else {
            return Ok(None);
        };
        let counter = self
            .progress
            .phase(format!("{phase}: waiting for PostgreSQL"));
        let (stall, timeout) = (
            Duration::from_secs_f64(self.args.stall_secs),
            Duration::from_secs_f64(self.args.drain_timeout_secs),
        );
        let drained = tokio::task::spawn_blocking(move || {
            db::wait_stored(
                &mut db::connect(&url)?,
                &table,
                before,
                acked,
                stall,
                timeout,
                |n| counter.store(n.max(0) as u64, std::sync::atomic::Ordering::Relaxed),
            )
        })
        .await??;
        Ok(Some((drained.stored, drained.complete)))
    }
}

/// Where a target's limit lies so far: the highest rate held, and the lowest above it not held.
#[derive(Debug, Default)]
struct Bracket {
    held: Option<f64>,
    broke: Option<f64>,
}

impl Bracket {
    fn record(&mut self, rate: f64, held: bool) {
        if held {
            self.held = Some(self.held.map_or(rate, |h| h.max(rate)));
            // a rate held above one that broke (noise): the bracket starts again above it
            self.broke = self.broke.filter(|&b| b > rate);
        } else if self.held.is_none_or(|h| rate > h) {
            self.broke = Some(self.broke.map_or(rate, |b| b.min(rate)));
        }
    }

    /// The next rate to try: halfway between (from 0 when nothing held), rounded to a round figure;
    /// none when nothing broke yet or the gap is down to 2%.
    fn middle(&self) -> Option<f64> {
        let broke = self.broke?;
        let held = self.held.unwrap_or(0.0);
        let middle = round_rate((held + broke) / 2.0);
        (broke - held > 0.02 * broke && middle > held && middle < broke).then_some(middle)
    }
}

/// A rate rounded to two significant figures (1,500, 750, 3,500), so steps read as round numbers.
fn round_rate(rate: f64) -> f64 {
    if rate <= 0.0 {
        return rate;
    }
    let unit = 10f64.powf(rate.log10().floor() - 1.0);
    (rate / unit).round() * unit
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn step_line(r: &StepResult) -> String {
    format!(
        "{}, {}, {}/s offered: {}/s acked, p50 {} (from send {}) p99 {} max {} ms, {} refused, {} failed, {} stored, path CPU {} ms/1,000, loadgen {}% CPU{}{}",
        r.target,
        r.mode.label(),
        readable(r.offered),
        readable(r.achieved),
        ms(r.p50_ms),
        ms(r.p50_from_send_ms),
        ms(r.p99_ms),
        ms(r.max_ms),
        r.refused,
        r.failed,
        r.stored.map_or("–".into(), |n| readable(n as f64)),
        ms(r.cpu_ms_per_1000),
        ms(r.loadgen_cpu_percent),
        if r.held { ", held" } else { ", NOT held" },
        if r.loadgen_limited {
            " (loadgen limited)"
        } else {
            ""
        }
    )
}

/// Where the charts go, relative to the working directory: a run of mode mqtt alone writes its own
/// (`fleet-mqtt-*.svg`), so it does not replace the charts of the HTTP modes.
pub fn chart_paths(dir: &Path, modes: &[ConnectionMode]) -> [PathBuf; 2] {
    let prefix = if modes == [ConnectionMode::Mqtt] {
        "fleet-mqtt"
    } else {
        "fleet"
    };
    [
        dir.join(format!("{prefix}-throughput.svg")),
        dir.join(format!("{prefix}-latency.svg")),
    ]
}

#[cfg(test)]
mod tests {
    use super::{Bracket, round_rate};

    #[test]
    fn rates_round_to_two_figures() {
        assert_eq!(round_rate(1500.0), 1500.0);
        assert_eq!(round_rate(1234.0), 1200.0);
        assert_eq!(round_rate(750.0), 750.0);
        assert_eq!(round_rate(3333.0), 3300.0);
        assert_eq!(round_rate(62.5), 63.0);
    }

    #[test]
    fn the_bracket_halves_between_held_and_broken() {
        let mut b = Bracket::default();
        assert_eq!(b.middle(), None, "nothing broke yet");
        b.record(500.0, true);
        b.record(1000.0, true);
        assert_eq!(b.middle(), None, "nothing broke yet");
        b.record(2000.0, false);
        assert_eq!(b.middle(), Some(1500.0));
        b.record(1500.0, false);
        assert_eq!(b.middle(), Some(1300.0), "1,250 rounded to two figures");
        b.record(1300.0, true);
        assert_eq!(b.middle(), Some(1400.0));
    }

    #[test]
    fn a_bracket_with_nothing_held_starts_from_zero() {
        let mut b = Bracket::default();
        b.record(500.0, false);
        assert_eq!(b.middle(), Some(250.0));
    }

    #[test]
    fn a_held_rate_above_a_broken_one_moves_the_bracket_up() {
        let mut b = Bracket::default();
        b.record(1000.0, false);
        b.record(2000.0, true);
        assert_eq!(b.middle(), None, "nothing above 2,000 broke");
        b.record(4000.0, false);
        assert_eq!(b.middle(), Some(3000.0));
    }

    #[test]
    fn the_search_stops_when_the_gap_is_small() {
        let mut b = Bracket::default();
        b.record(1000.0, true);
        b.record(1010.0, false);
        assert_eq!(b.middle(), None);
    }
}
