use clap::Parser;
use ingest_mqtt::{IngestMqtt, Settings};
use service_kit::cli::ServiceArgs;

/// Sensorhub's MQTT ingest: subscribes to devices/+/readings (and the seed's sensor/data) at QoS 1,
/// and acknowledges each message to Mosquitto only once RabbitMQ confirmed its readings.
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
    let ingest = IngestMqtt::build(&settings)?;
    tracing::info!(ops_port = ingest.ops_port(), client_id = %ingest.client_id(), "ingest-mqtt started");
    ingest.run_until(service_kit::shutdown::signal()).await;
    tracing::info!("ingest-mqtt stopped");
    Ok(())
}
