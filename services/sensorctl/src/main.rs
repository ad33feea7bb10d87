//! sensorctl: what an operator does by hand.

use anyhow::Context;
use clap::{Parser, Subcommand};

/// Sensorhub's operator tool.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// PostgreSQL to work on.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/sensorhub",
        global = true
    )]
    database_url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply every pending database migration (safe to run again: applies nothing then).
    Migrate,
    /// List migrations not applied yet; exits 1 if there are any.
    Pending,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut conn = store::connect(&cli.database_url)
        .with_context(|| format!("cannot connect to {}", redact(&cli.database_url)))?;
    match cli.command {
        Command::Migrate => {
            let applied = store::run_migrations(&mut conn)?;
            if applied.is_empty() {
                println!("database is up to date");
            }
            for name in applied {
                println!("applied {name}");
            }
        }
        Command::Pending => {
            let pending = store::pending_migrations(&mut conn)?;
            for name in &pending {
                println!("pending {name}");
            }
            if !pending.is_empty() {
                std::process::exit(1);
            }
            println!("database is up to date");
        }
    }
    Ok(())
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}
