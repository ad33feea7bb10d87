#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a measuring tool stops, with the message, where the system it drives is not as it must be; it serves no one"
)]
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use chaos::{Options, plan};
use system::devices::FleetPlan;
use system::stack::Broker;

/// Sensorhub's chaos run: while simulated Pis send readings over HTTP (single and batch) and MQTT
/// (QoS 1), retrying each with the same id until acknowledged, it kills and restarts the services,
/// RabbitMQ, PostgreSQL and Mosquitto, one at a time and in combination; then it compares what was
/// acknowledged with what PostgreSQL stored and prints a table per fault: sent, acknowledged,
/// stored, lost, duplicated, and how long the system took to catch up.
///
/// It runs its own PostgreSQL, RabbitMQ node and MQTT broker (Mosquitto, or with --broker rabbitmq
/// RabbitMQ's own MQTT plugin, devices logging in with their token) (on --port-base and the next ports, data
/// in --work-dir), so the machine's are not disturbed. Exits 1 when an acknowledged reading was lost
/// or stored twice (steps marked as a known gap only with --strict).
///
/// With --cluster, PostgreSQL and RabbitMQ are replicated instead: a three-node RabbitMQ cluster
/// and a pg_auto_failover formation (monitor, primary, synchronous standby), all on this machine,
/// and the faults are theirs (each RabbitMQ node killed, the PostgreSQL primary killed, a node cut
/// off, the whole RabbitMQ cluster killed); the table also says how soon after each fault the
/// devices were acknowledged, and readings stored, again.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Every fault, graceful stops, a 30 s database outage, RabbitMQ's memory alarm and
    /// combinations (a few minutes more); without it, one kill of each process of the write path.
    #[arg(long)]
    full: bool,
    /// A step marked as a known gap (a limit of a component we do not control) fails the run too.
    #[arg(long)]
    strict: bool,
    /// Against a three-node RabbitMQ cluster (pause_minority) and PostgreSQL with a synchronous
    /// standby and automatic failover (pg_auto_failover; needs Debian's
    /// postgresql-15-auto-failover, pg-auto-failover-cli and iptables, and root), with the
    /// cluster's faults; MQTT through one Mosquitto. Default --port-base 28500.
    #[arg(long, conflicts_with_all = ["full", "broker"])]
    cluster: bool,
    /// The MQTT broker mode (the services' MQTT_BROKER).
    #[arg(long, value_enum, default_value_t = BrokerArg::Mosquitto)]
    broker: BrokerArg,
    /// Where ingest-http, ingest-mqtt and persister are.
    #[arg(long, default_value = "target/debug")]
    bin_dir: PathBuf,
    /// Data directories and logs of this run's processes (emptied first) [default:
    /// $TMPDIR/sensorhub-chaos, with --cluster $TMPDIR/sensorhub-chaos-cluster].
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// First of 7 consecutive ports: PostgreSQL, AMQP, RabbitMQ's distribution, MQTT, ingest-http,
    /// persister, ingest-mqtt; with --cluster also base+10..12 (the RabbitMQ nodes' AMQP),
    /// base+20..22 (their distribution), base+30 (pg_auto_failover's monitor) and base+31..32 (the
    /// PostgreSQL nodes) [default: 28400, with --cluster 28500].
    #[arg(long)]
    port_base: Option<u16>,
    /// Where the table (latest.md) and the figures (latest.json) go.
    #[arg(long, default_value = "target/chaos")]
    out: PathBuf,
    /// Devices posting single readings (POST /data).
    #[arg(long, default_value_t = 8)]
    http_devices: usize,
    /// Devices posting batches (POST /v1/readings).
    #[arg(long, default_value_t = 2)]
    batch_devices: usize,
    #[arg(long, default_value_t = 25)]
    batch_size: usize,
    /// Devices publishing over MQTT at QoS 1.
    #[arg(long, default_value_t = 8)]
    mqtt_devices: usize,
    /// Each device's pause after an acknowledged reading, in milliseconds.
    #[arg(long, default_value_t = 5)]
    pace_ms: u64,
    /// Commands an app issues to each of a step's two commanded Pis (one on MQTT, one by
    /// long-poll) before the fault and again after it; each must end succeeded (0: none).
    #[arg(long, default_value_t = 2)]
    commands: usize,
    /// Seconds of load before each fault.
    #[arg(long, default_value_t = 3.0)]
    before_secs: f64,
    /// Seconds of load once everything is back.
    #[arg(long, default_value_t = 3.0)]
    after_secs: f64,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum BrokerArg {
    Mosquitto,
    Rabbitmq,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let broker = match args.broker {
        BrokerArg::Mosquitto => Broker::Mosquitto,
        BrokerArg::Rabbitmq => Broker::Rabbitmq,
    };
    let options = Options {
        steps: if args.cluster {
            plan::cluster()
        } else if args.full {
            plan::full(broker)
        } else {
            plan::short()
        },
        cluster: args.cluster,
        broker,
        fleet: FleetPlan {
            http_devices: args.http_devices,
            batch_devices: args.batch_devices,
            batch_size: args.batch_size,
            mqtt_devices: args.mqtt_devices,
            pace: Duration::from_millis(args.pace_ms),
        },
        timing: chaos::timing(
            Duration::from_secs_f64(args.before_secs),
            Duration::from_secs_f64(args.after_secs),
        ),
        bin_dir: args.bin_dir,
        work_dir: args.work_dir.unwrap_or_else(|| {
            std::env::temp_dir().join(if args.cluster {
                "sensorhub-chaos-cluster"
            } else {
                "sensorhub-chaos"
            })
        }),
        port_base: args
            .port_base
            .unwrap_or(if args.cluster { 28500 } else { 28400 }),
        out: args.out,
        strict: args.strict,
        commands: chaos::commands::CommandPlan {
            per_device: args.commands,
            mqtt: true,
        },
    };
    // Interrupted, the run is dropped, and with it every process it started (`Stack`'s Drop).
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    let outcome = tokio::select! {
        outcome = chaos::run(options) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        _ = terminate.recv() => Err(anyhow::anyhow!("terminated")),
    };
    match outcome {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
