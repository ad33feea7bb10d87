use clap::Parser;
use query_api::{Application, Settings};
use service_kit::cli::ServiceArgs;

/// Sensorhub's read API: devices, readings by time range, latest values, time buckets.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = Settings::load(args.service.config.as_deref())?;
    service_kit::telemetry::init(settings.log_format);
    let app = Application::build(&settings).await?;
    tracing::info!(addr = %settings.http.http_addr, port = app.port(), "query-api listening");
    app.run_until(service_kit::shutdown::signal()).await?;
    tracing::info!("query-api stopped");
    Ok(())
}
