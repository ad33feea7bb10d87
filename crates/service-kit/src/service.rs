//! The one way a service runs: arguments, settings, telemetry, build, serve until SIGTERM or SIGINT.

use std::future::Future;

use serde::Deserialize;

use crate::cli::ServiceArgs;
use crate::config::ServiceSettings;
use crate::telemetry::LogFormat;

/// A service, built from its settings and run until asked to stop; its binary's `main` is
/// [`main`].
pub trait Service: Sized {
    /// As in its logs, and the name `--version` prints.
    const NAME: &'static str;
    type Settings: ServiceSettings;

    /// Builds the service (its ports bound), ready to run, and logs that it is up with what an
    /// operator wants to know of it (its ports).
    fn start(settings: &Self::Settings) -> impl Future<Output = anyhow::Result<Self>>;

    /// Runs until `stop` resolves, then stops gracefully.
    fn run(self, stop: impl Future<Output = ()>) -> impl Future<Output = anyhow::Result<()>>;
}

/// The settings every service has besides its own (in its `defaults.toml` all the same), read
/// here from the same layers as the service's.
#[derive(Deserialize)]
struct Shared {
    log_format: LogFormat,
}

/// A service's whole `main`, under whichever runtime the service needs: parses the command line
/// (`--help` shows `about`), loads the settings, starts telemetry, builds the service and runs it
/// until SIGTERM or SIGINT.
pub async fn main<S: Service>(version: &'static str, about: &'static str) -> anyhow::Result<()> {
    let args = ServiceArgs::parse_for(S::NAME, version, about);
    let file = args.config.as_deref();
    let settings = crate::config::load::<S::Settings>(S::Settings::DEFAULTS, file)?;
    let Shared { log_format } = crate::config::load(S::Settings::DEFAULTS, file)?;
    crate::telemetry::init(log_format);
    let service = S::start(&settings).await?;
    service.run(crate::shutdown::signal()).await?;
    tracing::info!("{} stopped", S::NAME);
    Ok(())
}
