/// What `--help` says of the service.
const ABOUT: &str = "Sensorhub's HTTP ingest: `POST /data` (the flat seed format) and `POST /v1/readings`. \
                     Answers 2xx only after RabbitMQ confirmed the readings, 503 with Retry-After when it cannot";

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    service_kit::service::main::<ingest_http::Application>(env!("CARGO_PKG_VERSION"), ABOUT).await
}
