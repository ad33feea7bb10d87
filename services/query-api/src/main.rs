/// What `--help` says of the service.
const ABOUT: &str =
    "Sensorhub's read API: devices, readings by time range, latest values, time buckets";

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    service_kit::service::main::<query_api::Application>(env!("CARGO_PKG_VERSION"), ABOUT).await
}
