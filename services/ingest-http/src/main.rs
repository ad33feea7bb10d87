use clap::Parser;
use ingest_http::{Application, Settings};
use service_kit::cli::ServiceArgs;

/// Sensorhub's HTTP ingest: `POST /data` (the flat seed format) and `POST /v1/readings`. Answers 2xx
/// only after RabbitMQ confirmed the readings, 503 with Retry-After when it cannot.
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
    let app = Application::build(&settings)?;
    tracing::info!(addr = %settings.http.http_addr, port = app.port(), "ingest-http listening");
    app.run_until(service_kit::shutdown::signal()).await?;
    tracing::info!("ingest-http stopped");
    Ok(())
}
