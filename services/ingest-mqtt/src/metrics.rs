use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// What became of a command taken from the commands queue (fixed values, never from input).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone)]
pub struct MqttMetrics {
    pub messages_received: Counter,
    pub messages_acked: Counter,
    /// By kind: `classify::INVALID_KINDS`.
    pub messages_invalid: Family<KindLabels, Counter>,
    pub readings_accepted: Counter,
    /// Devices' answers to commands handed to the persister (confirmed by RabbitMQ).
    pub command_answers: Counter,
    /// Commands taken from the commands queue, by outcome: `commands::OUTCOMES`.
    pub commands: Family<OutcomeLabels, Counter>,
    /// Messages received and not yet acknowledged (waiting for RabbitMQ).
    pub messages_in_flight: Gauge,
    pub publish_retries: Counter,
    pub connected: Gauge,
}

impl MqttMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            messages_received: Counter::default(),
            messages_acked: Counter::default(),
            messages_invalid: Family::default(),
            readings_accepted: Counter::default(),
            command_answers: Counter::default(),
            commands: Family::default(),
            messages_in_flight: Gauge::default(),
            publish_retries: Counter::default(),
            connected: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("mqtt");
        r.register(
            "messages_received",
            "MQTT messages received",
            m.messages_received.clone(),
        );
        r.register(
            "messages_acked",
            "MQTT messages acknowledged (PUBACK) after RabbitMQ confirmed them",
            m.messages_acked.clone(),
        );
        r.register(
            "messages_invalid",
            "MQTT messages refused (kept on the invalid queue), by kind",
            m.messages_invalid.clone(),
        );
        r.register(
            "messages_in_flight",
            "MQTT messages waiting for RabbitMQ",
            m.messages_in_flight.clone(),
        );
        r.register(
            "publish_retries",
            "Publishes to RabbitMQ retried while it was unavailable",
            m.publish_retries.clone(),
        );
        r.register(
            "connected",
            "1 while connected to Mosquitto and subscribed",
            m.connected.clone(),
        );
        r.register(
            "command_answers",
            "Devices' answers to commands handed to the persister",
            m.command_answers.clone(),
        );
        r.register(
            "commands",
            "Commands taken from the commands queue, by outcome (sent: the broker acknowledged the \
             publish to a subscribed device and the persister was told)",
            m.commands.clone(),
        );
        registry.register(
            "readings_accepted",
            "Readings confirmed by RabbitMQ and acknowledged to the device",
            m.readings_accepted.clone(),
        );
        // Every label set known in advance exists from start-up at 0, so an alert sees the first
        // increase (a series that appears with its first event has no earlier value to rise from).
        for kind in crate::classify::INVALID_KINDS {
            m.messages_invalid.get_or_create_owned(&KindLabels { kind });
        }
        for outcome in crate::commands::OUTCOMES {
            m.commands.get_or_create_owned(&OutcomeLabels { outcome });
        }
        m
    }
}
