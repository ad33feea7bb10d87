use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

/// The names of everything Sensorhub keeps on RabbitMQ, all under one prefix (default `sensorhub`;
/// tests use a unique prefix each).
///
/// ```text
/// <p>.readings (direct exchange) ──"readings"──► <p>.readings (quorum queue) ──► persisters
/// <p>.dead     (direct exchange) ──"readings"──► <p>.readings.dead  (what the persister cannot store)
///                                ──"invalid"───► <p>.invalid        (payloads ingest-mqtt refused)
///                                ──"command-reports"──► <p>.command-reports.dead (reports the persister refused)
///
/// <p>.commands (topic exchange, routing key: the device id)
///     ──"#"──────────► <p>.commands.mqtt (quorum) ──► ingest-mqtt ──► devices/<id>/commands
///     ──"<device id>"─► each ingest-http replica's own queue, bound while it holds the device's
///                       WebSocket or long-poll (declared by that replica, not here)
/// (default exchange) ──► <p>.command-reports (quorum) ──► persisters: a command was sent, or answered
///
/// <p>.stored (fanout exchange) ──► each query-api replica's own queue (declared by that replica,
///                                  see `LiveFeed`): what the persisters committed, for live views
/// ```
///
/// A command message carries its expiry as its TTL, so one that waited past it in a queue (no
/// ingest-mqtt running, say) is dropped by RabbitMQ, never delivered late. A device id has no `*`
/// or `#` (see `models::DeviceId`), so binding a device id binds exactly that device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub readings_exchange: String,
    pub readings_queue: String,
    pub dead_letter_exchange: String,
    pub dead_readings_queue: String,
    pub invalid_queue: String,
    pub commands_exchange: String,
    pub mqtt_commands_queue: String,
    pub reports_queue: String,
    pub dead_reports_queue: String,
    pub stored_exchange: String,
}

pub const READINGS_ROUTING_KEY: &str = "readings";
pub const INVALID_ROUTING_KEY: &str = "invalid";
pub const REPORTS_ROUTING_KEY: &str = "command-reports";
/// Every device's commands: ingest-mqtt forwards them all to the MQTT broker.
pub const ALL_DEVICES_BINDING: &str = "#";

impl Topology {
    pub fn with_prefix(prefix: &str) -> Self {
        Self {
            readings_exchange: format!("{prefix}.readings"),
            readings_queue: format!("{prefix}.readings"),
            dead_letter_exchange: format!("{prefix}.dead"),
            dead_readings_queue: format!("{prefix}.readings.dead"),
            invalid_queue: format!("{prefix}.invalid"),
            commands_exchange: format!("{prefix}.commands"),
            mqtt_commands_queue: format!("{prefix}.commands.mqtt"),
            reports_queue: format!("{prefix}.command-reports"),
            dead_reports_queue: format!("{prefix}.command-reports.dead"),
            stored_exchange: format!("{prefix}.stored"),
        }
    }
}

/// Quorum queues: replicated when RabbitMQ is a cluster, fsynced before confirming, and the queue
/// type RabbitMQ recommends for data that must not be lost.
fn quorum_arguments(dead_letter_exchange: Option<&str>) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    if let Some(dlx) = dead_letter_exchange {
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(dlx.into()),
        );
    }
    args
}

/// Declares the whole topology; safe to call from every service at every connect.
pub async fn declare_topology(channel: &Channel, t: &Topology) -> lapin::Result<()> {
    for exchange in [&t.readings_exchange, &t.dead_letter_exchange] {
        declare_exchange(
            channel,
            exchange,
            ExchangeKind::Direct,
            FieldTable::default(),
        )
        .await?;
    }
    declare_exchange(
        channel,
        &t.commands_exchange,
        ExchangeKind::Topic,
        FieldTable::default(),
    )
    .await?;
    declare_stored_exchange(channel, t).await?;
    declare_bound_queues(
        channel,
        [
            (
                &t.readings_queue,
                Some(t.dead_letter_exchange.as_str()),
                &t.readings_exchange,
                READINGS_ROUTING_KEY,
            ),
            (
                &t.dead_readings_queue,
                None,
                &t.dead_letter_exchange,
                READINGS_ROUTING_KEY,
            ),
            (
                &t.invalid_queue,
                None,
                &t.dead_letter_exchange,
                INVALID_ROUTING_KEY,
            ),
            (
                &t.mqtt_commands_queue,
                None,
                &t.commands_exchange,
                ALL_DEVICES_BINDING,
            ),
            (
                &t.dead_reports_queue,
                None,
                &t.dead_letter_exchange,
                REPORTS_ROUTING_KEY,
            ),
        ],
    )
    .await?;
    // Reports are published to the default exchange, which routes by queue name; what RabbitMQ
    // itself dead-letters goes where the persister's refusals go.
    let mut arguments = quorum_arguments(Some(t.dead_letter_exchange.as_str()));
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(REPORTS_ROUTING_KEY.into()),
    );
    channel
        .queue_declare(
            t.reports_queue.as_str().into(),
            QueueDeclareOptions::durable(),
            arguments,
        )
        .await?;
    Ok(())
}

/// The one exchange a reader of the live feed needs (query-api declares nothing else).
pub async fn declare_stored_exchange(channel: &Channel, t: &Topology) -> lapin::Result<()> {
    declare_exchange(
        channel,
        &t.stored_exchange,
        ExchangeKind::Fanout,
        FieldTable::default(),
    )
    .await
}

/// Removes everything (tests clean up after themselves with this).
pub async fn delete_topology(channel: &Channel, t: &Topology) -> lapin::Result<()> {
    delete_all(
        channel,
        &[
            &t.readings_queue,
            &t.dead_readings_queue,
            &t.invalid_queue,
            &t.mqtt_commands_queue,
            &t.reports_queue,
            &t.dead_reports_queue,
        ],
        &[
            &t.readings_exchange,
            &t.dead_letter_exchange,
            &t.commands_exchange,
            &t.stored_exchange,
        ],
    )
    .await
}

/// A durable exchange.
async fn declare_exchange(
    channel: &Channel,
    name: &str,
    kind: ExchangeKind,
    arguments: FieldTable,
) -> lapin::Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(name.into(), kind, durable, arguments)
        .await
}

/// Durable quorum queues, each bound to its exchange with its routing key, and dead-lettering to
/// the exchange named with it (if any).
async fn declare_bound_queues<'a>(
    channel: &Channel,
    queues: impl IntoIterator<Item = (&'a String, Option<&'a str>, &'a String, &'a str)>,
) -> lapin::Result<()> {
    for (queue, dlx, exchange, key) in queues {
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::durable(),
                quorum_arguments(dlx),
            )
            .await?;
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// Deletes the queues, then the exchanges.
async fn delete_all(
    channel: &Channel,
    queues: &[&String],
    exchanges: &[&String],
) -> lapin::Result<()> {
    for queue in queues {
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    for exchange in exchanges {
        channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await?;
    }
    Ok(())
}

/// Where RabbitMQ's MQTT plugin puts what devices publish, in the `rabbitmq` broker mode (the
/// plugin's `mqtt.exchange` must name [`MqttTopology::exchange`]).
///
/// ```text
/// devices/<id>/readings (MQTT, QoS 1)
///   ──► <p>.mqtt (topic exchange) ──"devices.#.readings"──► <p>.mqtt.readings (quorum) ──► ingest-mqtt
///        └ no binding matched (alternate exchange) ──► <p>.mqtt.unrouted (fanout) ──► <p>.mqtt.unrouted (quorum)
/// ```
///
/// The plugin sends a device its PUBACK once every queue the message reached has confirmed it: a
/// quorum queue confirms once a majority wrote it to disk. A message that reached no queue would be
/// acknowledged and dropped; the alternate exchange keeps it instead. `devices.#.readings` and not
/// `devices.*.readings`: a device id may contain a `.`, which the plugin does not escape.
///
/// Devices' answers to commands (`devices/<id>/commands/<command id>/result`) take the readings'
/// way ([`MQTT_ANSWERS_BINDING`]). Commands go the other way: ingest-mqtt publishes each on this
/// exchange as `devices.<id>.commands`, which reaches the subscription queue the plugin made for
/// that device, if it subscribed. A command for a device not subscribed must not pile up in the
/// unrouted queue (it is re-sent until answered anyway): `commands_unheard` takes every command
/// and keeps none (a queue of length 0), so none is ever unrouted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttTopology {
    pub exchange: String,
    pub readings_queue: String,
    pub unrouted_exchange: String,
    pub unrouted_queue: String,
    pub commands_unheard_queue: String,
}

/// The binding of every device's readings topic, `devices/<id>/readings` as an AMQP routing key.
pub const MQTT_READINGS_BINDING: &str = "devices.#.readings";
/// The binding of every device's answers, `devices/<id>/commands/<command id>/result`.
pub const MQTT_ANSWERS_BINDING: &str = "devices.#.commands.*.result";
/// The binding of every device's commands topic, `devices/<id>/commands`.
pub const MQTT_COMMANDS_BINDING: &str = "devices.#.commands";

impl MqttTopology {
    pub fn with_prefix(prefix: &str) -> Self {
        Self {
            exchange: format!("{prefix}.mqtt"),
            readings_queue: format!("{prefix}.mqtt.readings"),
            unrouted_exchange: format!("{prefix}.mqtt.unrouted"),
            unrouted_queue: format!("{prefix}.mqtt.unrouted"),
            commands_unheard_queue: format!("{prefix}.mqtt.commands-unheard"),
        }
    }
}

/// Declares the MQTT side (idempotent): the exchange the MQTT plugin publishes to, with its
/// alternate exchange, both quorum queues, and the queue that drops commands no device took.
pub async fn declare_mqtt_topology(channel: &Channel, t: &MqttTopology) -> lapin::Result<()> {
    declare_exchange(
        channel,
        &t.unrouted_exchange,
        ExchangeKind::Fanout,
        FieldTable::default(),
    )
    .await?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "alternate-exchange".into(),
        AMQPValue::LongString(t.unrouted_exchange.as_str().into()),
    );
    declare_exchange(channel, &t.exchange, ExchangeKind::Topic, arguments).await?;
    declare_bound_queues(
        channel,
        [
            (&t.readings_queue, None, &t.exchange, MQTT_READINGS_BINDING),
            (&t.readings_queue, None, &t.exchange, MQTT_ANSWERS_BINDING),
            (&t.unrouted_queue, None, &t.unrouted_exchange, ""),
        ],
    )
    .await?;
    // A classic queue of length 0: what it is routed counts as routed, and is dropped at once.
    let mut unheard = FieldTable::default();
    unheard.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    channel
        .queue_declare(
            t.commands_unheard_queue.as_str().into(),
            QueueDeclareOptions::durable(),
            unheard,
        )
        .await?;
    channel
        .queue_bind(
            t.commands_unheard_queue.as_str().into(),
            t.exchange.as_str().into(),
            MQTT_COMMANDS_BINDING.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Removes the MQTT side (tests clean up after themselves with this).
pub async fn delete_mqtt_topology(channel: &Channel, t: &MqttTopology) -> lapin::Result<()> {
    delete_all(
        channel,
        &[
            &t.readings_queue,
            &t.unrouted_queue,
            &t.commands_unheard_queue,
        ],
        &[&t.exchange, &t.unrouted_exchange],
    )
    .await
}

/// The MQTT topic a message from the MQTT plugin was published to, from its routing key. The
/// plugin turns `/` into `.`, and a device id may hold a `.` of its own, so a device's readings
/// topic is recognised by its ends (`devices.` … `.readings`) and the middle kept whole; its
/// answers likewise (`devices.` … `.commands.<command id>.result`, a command id having no `.`).
pub fn mqtt_topic_of(routing_key: &str) -> String {
    let Some(rest) = routing_key.strip_prefix("devices.") else {
        return routing_key.replace('.', "/");
    };
    if let Some(device) = rest.strip_suffix(".readings")
        && !device.is_empty()
    {
        return format!("devices/{device}/readings");
    }
    if let Some((device, command)) = rest
        .strip_suffix(".result")
        .and_then(|rest| rest.rsplit_once('.'))
        .and_then(|(rest, command)| Some((rest.strip_suffix(".commands")?, command)))
        && !device.is_empty()
        && !command.is_empty()
    {
        return format!("devices/{device}/commands/{command}/result");
    }
    routing_key.replace('.', "/")
}

/// The AMQP routing key of an MQTT topic, as the MQTT plugin makes it (`/` becomes `.`).
pub fn routing_key_of(mqtt_topic: &str) -> String {
    mqtt_topic.replace('/', ".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_id_with_dots_survives_the_round_trip() {
        for topic in ["devices/pi-1/readings", "devices/pi.kitchen/readings"] {
            assert_eq!(mqtt_topic_of(&routing_key_of(topic)), topic);
        }
        for topic in [
            "devices/pi-1/commands/c-1/result",
            "devices/pi.kitchen/commands/0193a1b2-c3d4/result",
        ] {
            assert_eq!(mqtt_topic_of(&routing_key_of(topic)), topic);
        }
        assert_eq!(mqtt_topic_of("sensor.data"), "sensor/data");
        assert_eq!(mqtt_topic_of("devices..readings"), "devices//readings");
    }
}
