//! The step both sources share: one MQTT message to RabbitMQ, its readings to the readings exchange,
//! a device's answer to a command to the persister's reports queue, or the payload to the invalid
//! queue with the reason, retried while RabbitMQ is away. The source
//! acknowledges the message only when this says [`Forwarded::Confirmed`].

use std::time::Duration;

use bus::{PublishError, Publisher};
use tokio::sync::watch;

use crate::classify::{Classified, classify};
use crate::metrics::{KindLabels, MqttMetrics};
use crate::settings::Settings;

/// What became of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarded {
    /// RabbitMQ confirmed it (readings, or the payload kept as invalid): acknowledge it.
    Confirmed,
    /// Stopping before RabbitMQ confirmed it: leave it unacknowledged, so the broker delivers it
    /// again (next session, or another consumer).
    Abandoned,
}

pub struct Forwarder {
    publisher: Publisher,
    metrics: MqttMetrics,
    legacy_topic: Option<String>,
    backfill_horizon: models::BackfillHorizon,
    max_backoff: Duration,
    shutdown: watch::Receiver<bool>,
}

impl Forwarder {
    pub fn new(
        settings: &Settings,
        publisher: Publisher,
        metrics: MqttMetrics,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            publisher,
            metrics,
            legacy_topic: (!settings.mqtt_legacy_topic.is_empty())
                .then(|| settings.mqtt_legacy_topic.clone()),
            backfill_horizon: settings.backfill_horizon_days,
            max_backoff: Duration::from_millis(settings.retry_max_backoff_ms.max(100)),
            shutdown,
        }
    }

    /// Forwards the message published on `topic`; counts it in flight meanwhile.
    pub async fn forward(&self, topic: &[u8], payload: &[u8]) -> Forwarded {
        self.metrics.messages_in_flight.inc();
        let classified = classify(
            topic,
            payload,
            self.legacy_topic.as_deref(),
            models::TimeWindow::new(chrono::Utc::now(), self.backfill_horizon),
        );
        let forwarded = self
            .publish_until_confirmed(&classified, topic, payload)
            .await;
        if forwarded == Forwarded::Confirmed {
            self.count(&classified);
        }
        self.metrics.messages_in_flight.dec();
        forwarded
    }

    async fn publish_until_confirmed(
        &self,
        classified: &Classified,
        topic: &[u8],
        payload: &[u8],
    ) -> Forwarded {
        let mut backoff = bus::Backoff::new(Duration::from_millis(50), self.max_backoff);
        loop {
            let result = match classified {
                Classified::Readings(readings) => self.publisher.publish(readings.clone()).await,
                Classified::Answer(report) => self.publisher.publish_report(report).await,
                Classified::Invalid { kind, reason } => {
                    tracing::debug!(%reason, kind, "refusing an MQTT message");
                    self.publisher
                        .keep_invalid(
                            payload.to_vec(),
                            reason,
                            vec![("x-mqtt-topic", String::from_utf8_lossy(topic).into_owned())],
                        )
                        .await
                }
            };
            match result {
                Ok(()) => return Forwarded::Confirmed,
                Err(PublishError::ShuttingDown) => return Forwarded::Abandoned,
                Err(_) if *self.shutdown.borrow() => return Forwarded::Abandoned,
                Err(e) => {
                    self.metrics.publish_retries.inc();
                    tracing::debug!(error = %e, "RabbitMQ unavailable; holding the MQTT message");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    fn count(&self, classified: &Classified) {
        match classified {
            Classified::Readings(readings) => {
                self.metrics.readings_accepted.inc_by(readings.len() as u64);
            }
            Classified::Answer(_) => {
                self.metrics.command_answers.inc();
            }
            Classified::Invalid { kind, .. } => {
                self.metrics
                    .messages_invalid
                    .get_or_create(&KindLabels { kind })
                    .inc();
            }
        }
    }
}
