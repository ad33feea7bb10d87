//! Starts the services as replicas for `scripts/up --scale`: each its own process on its own port,
//! with its log and pid file in the run directory (where `scripts/down` finds them), and returns
//! once every one is ready. They run on after it; the script then puts Traefik in front.
//!
//! Settings the replicas share (`DATABASE_URL`, `AMQP_URL`, `AMQP_PREFIX`, `AUTH_PUBLIC_KEY_FILE`;
//! `LOG_FORMAT` and `RUST_LOG` when set) come from this program's environment.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a measuring tool stops, with the message, where the system it drives is not as it must be; it serves no one"
)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use system::Process;
use system::service::{self, Binaries};

#[derive(Parser, Debug)]
#[command(about = "Starts Sensorhub's services as replicas for scripts/up --scale")]
struct Args {
    /// Where the services' binaries are (target/debug, target/release).
    #[arg(long)]
    bin_dir: PathBuf,
    /// Logs (`<replica>.log`) and pid files (`<replica>.pid`).
    #[arg(long)]
    run_dir: PathBuf,
    #[arg(long, default_value_t = 3)]
    ingest_http: u16,
    #[arg(long, default_value_t = 2)]
    persisters: u16,
    #[arg(long, default_value_t = 2)]
    ingest_mqtt: u16,
    /// query-api's port; ingest-http's replicas listen from --ingest-http-port on, the persisters'
    /// and ingest-mqtt's ops endpoints from --persister-port and --ingest-mqtt-port on.
    #[arg(long, default_value_t = 8170)]
    query_api_port: u16,
    #[arg(long, default_value_t = 8180)]
    ingest_http_port: u16,
    #[arg(long, default_value_t = 8190)]
    persister_port: u16,
    #[arg(long, default_value_t = 8195)]
    ingest_mqtt_port: u16,
    /// The Mosquitto ingest-mqtt subscribes to.
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    mqtt_url: String,
    /// Client ids are `<group>-ingest-mqtt-<n>` (stable: persistent sessions), in one shared
    /// subscription group.
    #[arg(long, default_value = "sensorhub-scaled")]
    mqtt_group: String,
    /// How long the replicas may take to be ready.
    #[arg(long, default_value_t = 60)]
    ready_secs: u64,
    /// A setting for every replica, as `NAME=value` (repeatable), e.g. the benchmark's
    /// `RATE_LIMIT_PER_SECOND=0`; it wins over what this program sets itself.
    #[arg(long = "env", value_name = "NAME=value", value_parser = parse_setting)]
    settings: Vec<(String, String)>,
}

fn parse_setting(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("`{arg}` is not NAME=value")),
    }
}

struct Replica {
    label: String,
    binary: &'static str,
    port: u16,
    env: Vec<(String, String)>,
}

fn replicas(args: &Args) -> anyhow::Result<Vec<Replica>> {
    let mut shared = Vec::new();
    for var in [
        "DATABASE_URL",
        "AMQP_URL",
        "AMQP_PREFIX",
        "AUTH_PUBLIC_KEY_FILE",
    ] {
        let value = std::env::var(var).with_context(|| format!("{var} is not set"))?;
        shared.push((var.to_owned(), value));
    }
    // how they log, when the caller says
    for var in ["LOG_FORMAT", "RUST_LOG"] {
        if let Ok(value) = std::env::var(var) {
            shared.push((var.to_owned(), value));
        }
    }
    let with = |extra: Vec<(&'static str, String)>| {
        let mut env = shared.clone();
        env.extend(
            extra
                .into_iter()
                .map(|(name, value)| (name.to_owned(), value)),
        );
        env.extend(args.settings.iter().cloned());
        env
    };
    let mut all = Vec::new();
    // persisters first: they declare the queue the ingest services publish to
    all.extend(numbered(
        "persister",
        args.persisters,
        args.persister_port,
        |_| with(vec![]),
    ));
    // behind Traefik, ingest-http and query-api believe X-Forwarded-For from Traefik alone
    all.extend(numbered(
        "ingest-http",
        args.ingest_http,
        args.ingest_http_port,
        |_| {
            with(vec![
                ("HTTP_WORKERS", "2".into()),
                ("TRUSTED_PROXIES", "127.0.0.1".into()),
            ])
        },
    ));
    all.push(Replica {
        label: "query-api".into(),
        binary: "query-api",
        port: args.query_api_port,
        env: with(vec![("TRUSTED_PROXIES", "127.0.0.1".into())]),
    });
    all.extend(numbered(
        "ingest-mqtt",
        args.ingest_mqtt,
        args.ingest_mqtt_port,
        |n| {
            with(vec![
                ("MQTT_URL", args.mqtt_url.clone()),
                (
                    "MQTT_CLIENT_ID",
                    format!("{}-ingest-mqtt-{n}", args.mqtt_group),
                ),
                ("MQTT_SHARED_GROUP", args.mqtt_group.clone()),
            ])
        },
    ));
    Ok(all)
}

/// `count` replicas of `binary`, `<binary>-1` on `first_port` and on from there, replica `n` with
/// the environment `env(n)`.
fn numbered(
    binary: &'static str,
    count: u16,
    first_port: u16,
    env: impl Fn(u16) -> Vec<(String, String)>,
) -> impl Iterator<Item = Replica> {
    (1..=count).map(move |n| Replica {
        label: format!("{binary}-{n}"),
        binary,
        port: first_port + n - 1,
        env: env(n),
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let binaries = Binaries::in_dir(&args.bin_dir, &service::SERVICES)?;
    std::fs::create_dir_all(&args.run_dir)?;
    let mut started = Vec::new();
    for replica in replicas(&args)? {
        let log = args.run_dir.join(format!("{}.log", replica.label));
        let _ = std::fs::remove_file(&log);
        let env: Vec<(&str, String)> = replica
            .env
            .iter()
            .map(|(name, value)| (name.as_str(), value.clone()))
            .collect();
        let command = service::command(binaries.get(replica.binary)?, replica.port, &env);
        let process = Process::start(&replica.label, command, &log)?;
        if let Some(pid) = process.pid() {
            std::fs::write(
                args.run_dir.join(format!("{}.pid", replica.label)),
                format!("{pid}\n"),
            )?;
        }
        started.push((process, replica.port));
    }
    // Not ready in time: every replica is stopped again (dropped) and the script says why.
    let deadline = Instant::now() + Duration::from_secs(args.ready_secs);
    for (process, port) in &mut started {
        service::wait_ready(process, &format!("http://127.0.0.1:{port}"), deadline).await?;
    }
    for (process, port) in started {
        let label = process.label().to_owned();
        process.detach();
        eprintln!("    {label} ready on 127.0.0.1:{port}");
    }
    Ok(())
}
