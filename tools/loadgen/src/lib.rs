//! loadgen: Sensorhub's benchmark. Simulates a fleet of Pis over HTTP and MQTT against a
//! running Sensorhub (and, side by side, the seed design), counts what reaches PostgreSQL, and prints
//! the figures as a Markdown table, each the median of several runs with min–max, and as JSON.
//!
//! `scripts/bench` starts everything on this machine and runs it; pointed at a remote deployment it
//! needs the ingest URL, the MQTT broker and a database URL from which it may count `readings`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a measuring tool stops, with the message, where the system it drives is not as it must be; it serves no one"
)]

mod bench;
pub mod crash;
mod db;
pub mod fleet;
mod http;
pub mod idle;
pub mod mqtt;
mod progress;
pub mod report;
pub mod responder;
mod stats;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use system::procs::Watched;

/// Sensorhub's load generator and benchmark. Without a subcommand: the benchmark of workloads
/// (the flags below); `loadgen fleet`: the open-loop fleet step search; `loadgen responder`: the
/// do-nothing backend that measures Traefik's own ceiling; `loadgen idle`: memory per idle
/// connection; `loadgen crash`: readings lost or doubled when a consumer is killed or stopped.
#[derive(Parser, Debug)]
#[command(version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub bench: Args,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Open-loop fleet benchmark: N devices each posting one reading on its own schedule, offered
    /// rates stepped up per target and connection mode until p99 or refusals break the bound.
    Fleet(fleet::FleetArgs),
    /// A fleet run's markdown and charts written again from its JSON (after a change to the
    /// report, without running the benchmark again).
    FleetReport(fleet::ReportArgs),
    /// An HTTP server that answers every request 200 and does nothing else (Traefik's ceiling).
    Responder(responder::ResponderArgs),
    /// What an idle keep-alive connection costs a server: N held connections, its resident
    /// memory's growth per connection.
    Idle(idle::IdleArgs),
    /// Crash comparison: an MQTT burst at QoS 1, the consumer sent SIGKILL or SIGTERM part way and
    /// started again; PUBACKed readings against stored ones, per target and signal.
    Crash(crash::CrashArgs),
}

/// Runs what the command line asks for.
pub async fn main_with(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Fleet(args)) => fleet::run(args).await,
        Some(Command::FleetReport(args)) => fleet::report(args),
        Some(Command::Responder(args)) => responder::run(args).await,
        Some(Command::Idle(args)) => idle::run(args).await,
        Some(Command::Crash(args)) => crash::run(args).await,
        None => run(cli.bench).await,
    }
}

/// Sensorhub's load generator and benchmark: simulates a fleet of Raspberry Pis posting readings over
/// HTTP and MQTT, and measures accepted, persisted (rows visible in PostgreSQL) and end-to-end
/// figures, against Sensorhub and, in the same run, the seed design. Prints a Markdown table (median of
/// --runs runs, min–max) and writes the figures as JSON.
///
/// Only --reset-db empties tables (`readings`, `devices`, the seed's table): use it on a dedicated
/// benchmark database only. Without it, rows are counted before and after each run.
#[derive(Parser, Debug, Clone)]
#[command(version)]
pub struct Args {
    /// Sensorhub's ingest-http (POST /data, POST /v1/readings).
    #[arg(
        long,
        env = "LOADGEN_INGEST_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub ingest_url: String,
    /// Sensorhub's database: stored readings are counted in its `readings` table.
    #[arg(
        long,
        env = "LOADGEN_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/sensorhub"
    )]
    pub database_url: String,
    /// The operator's key directory (`signing-key.pem`): every device of the fleet is registered in
    /// Sensorhub's database and sends with its own token, as in production. Without it, requests
    /// carry no token (an ingest-http in development mode).
    #[arg(long, env = "LOADGEN_KEYS_DIR")]
    pub keys_dir: Option<std::path::PathBuf>,
    /// The Mosquitto that ingest-mqtt reads (`devices/<id>/readings`); empty: no MQTT workload.
    #[arg(
        long,
        env = "LOADGEN_MQTT_URL",
        default_value = "mqtt://127.0.0.1:1883"
    )]
    pub mqtt_url: String,
    /// The MQTT broker's name in the figures (`mosquitto`, `rabbitmq`).
    #[arg(long, default_value = "mosquitto")]
    pub mqtt_broker: String,
    /// Sensorhub's MQTT devices log in as in broker mode `rabbitmq`: user name and client id their
    /// device id, password their token (needs --keys-dir, and --mqtt-devices at most --fleet).
    #[arg(long)]
    pub mqtt_device_logins: bool,
    /// The seed design's HTTP address (POST /data); unset: Sensorhub alone, no ratios.
    #[arg(long, env = "LOADGEN_PEER_URL")]
    pub peer_url: Option<String>,
    /// The seed design's database.
    #[arg(
        long,
        env = "LOADGEN_PEER_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/peer"
    )]
    pub peer_database_url: String,
    /// The seed design's table (GORM names `SensorData` `sensor_data`).
    #[arg(long, default_value = "sensor_data")]
    pub peer_table: String,
    /// The Mosquitto the seed design subscribes to (sensor/data); unset: no MQTT for the seed.
    #[arg(long, env = "LOADGEN_PEER_MQTT_URL")]
    pub peer_mqtt_url: Option<String>,
    /// Where the COPY ceiling's scratch table is created and dropped (default: --database-url).
    #[arg(long)]
    pub copy_database_url: Option<String>,

    /// Runs of each workload; each figure is their median, with min–max.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Seconds of load per HTTP run.
    #[arg(long, default_value_t = 10.0)]
    pub duration_secs: f64,
    /// Keep-alive connections of the POST /data workloads.
    #[arg(long, value_delimiter = ',', default_value = "64,256")]
    pub connections: Vec<usize>,
    /// Connections of the POST /v1/readings workload.
    #[arg(long, default_value_t = 16)]
    pub batch_connections: usize,
    /// Readings per POST /v1/readings request.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// Devices the HTTP readings are spread over.
    #[arg(long, default_value_t = 1000)]
    pub fleet: usize,
    /// MQTT device clients, each with its own connection.
    #[arg(long, default_value_t = 200)]
    pub mqtt_devices: usize,
    /// Messages of one MQTT burst, over all devices.
    #[arg(long, default_value_t = 100_000)]
    pub mqtt_messages: usize,
    /// Messages of the seed design's MQTT burst (default: --mqtt-messages).
    #[arg(long)]
    pub peer_mqtt_messages: Option<usize>,
    /// Unacknowledged QoS 1 publishes per device at once.
    #[arg(long, default_value_t = 20)]
    pub mqtt_inflight: u16,
    /// Seconds of each COPY ceiling run and of each writer run.
    #[arg(long, default_value_t = 5.0)]
    pub copy_secs: f64,
    /// Rows per COPY statement.
    #[arg(long, default_value_t = 10_000)]
    pub copy_rows: usize,
    /// Readings per batch of the `writer` workload (the persister's write path alone).
    #[arg(long, value_delimiter = ',', default_value = "250,5000")]
    pub write_batches: Vec<usize>,
    /// Seconds of the half-load (end-to-end latency) runs.
    #[arg(long, default_value_t = 10.0)]
    pub e2e_secs: f64,
    /// Requests/s of the half-load runs (default: half the persisted readings/s of the first
    /// POST /data workload).
    #[arg(long)]
    pub e2e_rate: Option<f64>,
    /// After the load, how long to wait for the readings to be stored.
    #[arg(long, default_value_t = 300.0)]
    pub drain_timeout_secs: f64,
    /// ...giving up earlier when the count has not grown for this long.
    #[arg(long, default_value_t = 15.0)]
    pub stall_secs: f64,
    /// Empty `readings`, `devices` and the seed's table before each run (dedicated database only).
    #[arg(long)]
    pub reset_db: bool,
    /// A Sensorhub process to watch (CPU, peak RSS): NAME=PID; repeat.
    #[arg(long = "pid", value_parser = Watched::parse)]
    pub pids: Vec<Watched>,
    /// A process of Sensorhub's side and its children (CPU only): NAME=PID; repeat.
    #[arg(long = "pid-tree", value_parser = Watched::parse_tree)]
    pub pid_trees: Vec<Watched>,
    /// The seed design's process: NAME=PID; repeat.
    #[arg(long = "peer-pid", value_parser = Watched::parse)]
    pub peer_pids: Vec<Watched>,
    /// A process of the seed design's side and its children (CPU only): NAME=PID; repeat.
    #[arg(long = "peer-pid-tree", value_parser = Watched::parse_tree)]
    pub peer_pid_trees: Vec<Watched>,
    /// A process both sides use, and its children (CPU only; PostgreSQL's postmaster, RabbitMQ):
    /// NAME=PID; repeat.
    #[arg(long = "shared-pid-tree", value_parser = Watched::parse_tree)]
    pub shared_pid_trees: Vec<Watched>,
    /// The workloads to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "copy,writer,http,batch,mqtt,e2e,series"
    )]
    pub only: Vec<Workload>,
    /// Directory for the JSON figures (`bench-<time>.json` and `latest.json`).
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// A short run to try things out: 1 run, 3 s of HTTP load, 10,000-message MQTT bursts, 2 s of
    /// COPY, 4 s at half load (overrides those settings).
    #[arg(long)]
    pub quick: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    Copy,
    /// `store::write_readings`, the persister's write path, without RabbitMQ (needs --reset-db).
    Writer,
    Http,
    Batch,
    Mqtt,
    E2e,
    /// A year of one device's one-minute readings charted from the rollups and from raw readings
    /// (needs --reset-db).
    Series,
}

/// Runs the workloads `args` names and writes the figures.
pub async fn run(mut args: Args) -> anyhow::Result<()> {
    if args.quick {
        args.runs = 1;
        args.duration_secs = 3.0;
        args.mqtt_messages = 10_000;
        args.peer_mqtt_messages = Some(args.peer_mqtt_messages.unwrap_or(10_000).min(10_000));
        args.copy_secs = 2.0;
        args.e2e_secs = 4.0;
    }
    anyhow::ensure!(args.runs >= 1, "--runs must be at least 1");
    db::check_table_name(&args.peer_table)?;
    bench::Bench::new(args).run().await
}
