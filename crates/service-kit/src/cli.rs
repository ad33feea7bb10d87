//! The command line every service shares: `--help`, `--version`, and where the configuration file is.

use std::path::PathBuf;

/// Flatten into a service's own `clap::Parser` (which carries the service's description).
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    /// A TOML file of settings, layered over the built-in defaults and under environment variables
    /// (`DATABASE_URL`, `AMQP_URL`, `HTTP_ADDR`, ...; README lists them all).
    #[arg(long, env = "SENSORHUB_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}
