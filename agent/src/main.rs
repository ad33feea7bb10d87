//! `sensorhub-agent`: wires the command line to the agent's parts.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sensorhub_agent::{check, config, run, status};

#[derive(Parser)]
#[command(
    name = "sensorhub-agent",
    version,
    about = "Reads a Raspberry Pi's sensors, keeps every reading on disk until Sensorhub has it, and runs the commands Sensorhub sends."
)]
struct Cli {
    /// The configuration file (TOML; deploy/pi/agent.toml is an example).
    #[arg(long, short, global = true, env = "SENSORHUB_AGENT_CONFIG", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Take readings, send them, run commands: what the systemd unit runs.
    Run,
    /// Check the configuration, the token, each source (read once) and the server; exits 1 if
    /// anything is wrong.
    Check,
    /// Show the outbox's depth, its oldest unsent reading, the last success and the last error.
    Status {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // colours only for a person at a terminal, not in the journal
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // one thread: a Pi Zero has one core, and the agent waits on the network and the disk
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Run => {
                let config = config::Config::load(&cli.config)?;
                run::run(config).await.map(|()| true)
            }
            Command::Check => Ok(check::check(&cli.config).await),
            Command::Status { json } => {
                let config = config::Config::load(&cli.config)?;
                let status = status::status(&config)?;
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&status).unwrap_or_default()
                    );
                } else {
                    println!("{}", status::render(&status));
                }
                Ok::<_, sensorhub_agent::Error>(true)
            }
        }
    });
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
