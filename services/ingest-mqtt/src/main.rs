/// What `--help` says of the service.
const ABOUT: &str = "Sensorhub's MQTT ingest: subscribes to devices/+/readings (and the seed's sensor/data) at \
                     QoS 1, and acknowledges each message to Mosquitto only once RabbitMQ confirmed its readings; \
                     publishes commands on devices/<id>/commands and hands devices' answers to the persister";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    service_kit::service::main::<ingest_mqtt::IngestMqtt>(env!("CARGO_PKG_VERSION"), ABOUT).await
}
