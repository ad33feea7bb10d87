//! The command line every service shares: `--help`, `--version`, and where the configuration file is.

use std::path::PathBuf;

use clap::{Args, FromArgMatches};

/// Every service's arguments; the service adds its name, version and description (see
/// [`ServiceArgs::parse_for`]).
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    /// A TOML file of settings, layered over the built-in defaults and under environment variables
    /// (`DATABASE_URL`, `AMQP_URL`, `HTTP_ADDR`, ...; README lists them all).
    #[arg(long, env = "SENSORHUB_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl ServiceArgs {
    /// Parses the process's arguments for the service `name`: `--help` shows `about`, `--version`
    /// shows `version`, and either (or a wrong argument) exits, as `clap::Parser::parse` does.
    pub fn parse_for(name: &'static str, version: &'static str, about: &'static str) -> Self {
        // `about` after the arguments are added: they would otherwise describe the command with
        // this struct's own documentation
        let command = Self::augment_args(clap::Command::new(name).version(version)).about(about);
        Self::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit())
    }
}
