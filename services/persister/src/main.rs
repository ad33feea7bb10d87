/// What `--help` says of the service.
const ABOUT: &str = "Sensorhub's persister: stores the readings queued on RabbitMQ in PostgreSQL, in batches, \
                     and acknowledges them only after the commit. Run as many as you like; they share the queue";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    service_kit::service::main::<persister::Persister>(env!("CARGO_PKG_VERSION"), ABOUT).await
}
