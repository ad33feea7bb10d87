use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// What can become of a published message (the `messages` metric's outcomes).
/// Every outcome of a publish, as `sensorhub_amqp_publish_messages_total` labels it.
pub const OUTCOMES: [&str; 5] = ["confirmed", "nacked", "unroutable", "timeout", "failed"];

/// What the publisher did, for `/metrics`.
#[derive(Clone)]
pub struct PublisherMetrics {
    /// Messages by outcome: `confirmed`, `nacked`, `unroutable`, `timeout`, `failed`.
    pub messages: Family<OutcomeLabels, Counter>,
    /// Readings in confirmed messages.
    pub readings_confirmed: Counter,
    pub readings_per_message: Histogram,
    pub confirm_seconds: Histogram,
    /// 1 while connected to RabbitMQ.
    pub connected: Gauge,
    /// 1 while RabbitMQ blocks publishers (a memory or disk alarm).
    pub blocked: Gauge,
}

impl PublisherMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::unregistered();
        let r = registry.sub_registry_with_prefix("amqp_publish");
        r.register(
            "messages",
            "AMQP messages published, by outcome",
            metrics.messages.clone(),
        );
        r.register(
            "readings_confirmed",
            "Readings RabbitMQ confirmed",
            metrics.readings_confirmed.clone(),
        );
        r.register(
            "readings_per_message",
            "Readings packed into one AMQP message",
            metrics.readings_per_message.clone(),
        );
        r.register(
            "confirm_seconds",
            "Time from publish to RabbitMQ's confirm",
            metrics.confirm_seconds.clone(),
        );
        r.register(
            "connected",
            "1 while connected to RabbitMQ",
            metrics.connected.clone(),
        );
        r.register(
            "blocked",
            "1 while RabbitMQ blocks publishers (resource alarm)",
            metrics.blocked.clone(),
        );
        // Each outcome exists from start-up at 0, so an alert sees the first failure.
        for outcome in OUTCOMES {
            metrics
                .messages
                .get_or_create_owned(&OutcomeLabels { outcome });
        }
        metrics
    }

    /// For callers that do not export metrics (tools, tests).
    pub fn unregistered() -> Self {
        Self {
            messages: Family::default(),
            readings_confirmed: Counter::default(),
            readings_per_message: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            confirm_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            connected: Gauge::default(),
            blocked: Gauge::default(),
        }
    }

    pub(crate) fn message(&self, outcome: &'static str) {
        self.messages
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}
