use clap::Parser;
use persister::{Persister, Settings};
use service_kit::cli::ServiceArgs;

/// Sensorhub's persister: stores the readings queued on RabbitMQ in PostgreSQL, in batches, and
/// acknowledges them only after the commit. Run as many as you like; they share the queue.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = Settings::load(args.service.config.as_deref())?;
    service_kit::telemetry::init(settings.log_format);
    let persister = Persister::build(&settings).await?;
    tracing::info!(ops_port = persister.ops_port(), "persister started");
    persister.run_until(service_kit::shutdown::signal()).await;
    tracing::info!("persister stopped");
    Ok(())
}
