use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabels {
    pub table: &'static str,
}

#[derive(Clone)]
pub struct PersisterMetrics {
    /// Rows retention deleted one batch at a time, by table (raw, 1m, 1h, 1d).
    pub retention_rows_deleted: Family<TableLabels, Counter>,
    /// Raw partitions retention dropped whole.
    pub retention_partitions_dropped: Counter,
    /// Partitions retention left for its next run: their lock was not had in time.
    pub retention_skipped: Counter,
    /// Commits announced to the live views (query-api's `GET /v1/live`).
    pub announcements_published: Counter,
    /// Announcements that could not be published (RabbitMQ away, or too many waiting).
    pub announcements_dropped: Counter,
    pub commands_published: Counter,
    pub command_publish_failures: Counter,
    /// Reports about commands, by what became of them (a fixed set of outcomes).
    pub command_reports: Family<OutcomeLabels, Counter>,
    pub readings_stored: Counter,
    pub readings_duplicate: Counter,
    pub readings_conflicting: Counter,
    pub messages_acked: Counter,
    pub messages_dead_lettered: Family<ReasonLabels, Counter>,
    pub batch_readings: Histogram,
    pub batch_write_seconds: Histogram,
    pub write_failures: Counter,
    /// Messages waiting in the readings queue, sampled every few seconds.
    pub queue_messages: Gauge,
    pub amqp_connected: Gauge,
    /// Age of the oldest readings message held and not yet stored (see `lag`).
    pub readings_lag_seconds: Gauge<f64, AtomicU64>,
    /// Rollup deltas moved into the minute, hour and day summaries.
    pub rollup_deltas_folded: Counter,
    /// Rollup delta rows (one per writing transaction) not folded yet, after the last fold.
    pub rollup_deltas_waiting: Gauge,
}

impl PersisterMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            retention_rows_deleted: Family::default(),
            retention_partitions_dropped: Counter::default(),
            retention_skipped: Counter::default(),
            announcements_published: Counter::default(),
            announcements_dropped: Counter::default(),
            commands_published: Counter::default(),
            command_publish_failures: Counter::default(),
            command_reports: Family::default(),
            readings_stored: Counter::default(),
            readings_duplicate: Counter::default(),
            readings_conflicting: Counter::default(),
            messages_acked: Counter::default(),
            messages_dead_lettered: Family::default(),
            batch_readings: Histogram::new(exponential_buckets(1.0, 2.0, 15)),
            batch_write_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            write_failures: Counter::default(),
            queue_messages: Gauge::default(),
            amqp_connected: Gauge::default(),
            readings_lag_seconds: Gauge::default(),
            rollup_deltas_folded: Counter::default(),
            rollup_deltas_waiting: Gauge::default(),
        };
        registry.register(
            "rollup_deltas_folded",
            "Rollup deltas (each stored readings' per-minute summary) folded into the minute, hour and day summaries",
            m.rollup_deltas_folded.clone(),
        );
        registry.register(
            "rollup_deltas_waiting",
            "Rollup delta rows (one per writing transaction) not folded into the summaries yet, after this persister's last fold",
            m.rollup_deltas_waiting.clone(),
        );
        registry.register(
            "announcements_published",
            "Commits announced to the live views, after the commit",
            m.announcements_published.clone(),
        );
        registry.register(
            "announcements_dropped",
            "Commits not announced to the live views (RabbitMQ away, or too many waiting); the readings are stored",
            m.announcements_dropped.clone(),
        );
        registry.register(
            "readings_stored",
            "Readings newly stored",
            m.readings_stored.clone(),
        );
        registry.register(
            "readings_duplicate",
            "Readings received again and not stored twice (redeliveries, retries)",
            m.readings_duplicate.clone(),
        );
        registry.register(
            "readings_conflicting",
            "Readings received again with the same id and other content: the first stays, these are kept in reading_conflicts",
            m.readings_conflicting.clone(),
        );
        registry.register(
            "messages_acked",
            "Queue messages acknowledged after their commit",
            m.messages_acked.clone(),
        );
        registry.register(
            "messages_dead_lettered",
            "Queue messages that can never be stored, kept on the dead-letter queue, by reason",
            m.messages_dead_lettered.clone(),
        );
        registry.register(
            "batch_readings",
            "Readings per database batch",
            m.batch_readings.clone(),
        );
        registry.register(
            "batch_write_seconds",
            "Time to write one batch",
            m.batch_write_seconds.clone(),
        );
        registry.register(
            "write_failures",
            "Batch writes that failed and were retried",
            m.write_failures.clone(),
        );
        registry.register(
            "queue_messages",
            "Messages waiting in the readings queue (the persisters' lag)",
            m.queue_messages.clone(),
        );
        registry.register(
            "commands_published",
            "Commands published to the devices' channels, re-sends included, confirmed by RabbitMQ",
            m.commands_published.clone(),
        );
        registry.register(
            "command_publish_failures",
            "Command publishes RabbitMQ did not confirm (the command stays due and is published again)",
            m.command_publish_failures.clone(),
        );
        registry.register(
            "command_reports",
            "Reports about commands (sent, answered) by outcome: recorded, unchanged (a repeat), or refused (no_such_command, not_the_devices, expired, finished, undecodable; kept on the dead-letter queue)",
            m.command_reports.clone(),
        );
        registry.register(
            "readings_lag_seconds",
            "Age of the oldest readings message the persister holds and has not stored yet, from its publish (ingest's confirm) to now; 0 when it holds none",
            m.readings_lag_seconds.clone(),
        );
        registry.register(
            "amqp_connected",
            "1 while consuming from RabbitMQ",
            m.amqp_connected.clone(),
        );
        registry.register(
            "retention_rows_deleted",
            "Rows the retention policy deleted one batch at a time, by table (raw, 1m, 1h, 1d); whole dropped partitions are not counted here",
            m.retention_rows_deleted.clone(),
        );
        registry.register(
            "retention_partitions_dropped",
            "Raw partitions (days, or months from before daily partitions) the retention policy dropped whole",
            m.retention_partitions_dropped.clone(),
        );
        registry.register(
            "retention_skipped",
            "Partitions due to be dropped that were left for the next run because their lock was not had within the timeout",
            m.retention_skipped.clone(),
        );
        // Every label set known in advance exists from start-up at 0, so an alert sees the first
        // increase (a series that appears with its first event has no earlier value to rise from).
        for reason in crate::consumer::DEAD_LETTER_REASONS {
            m.messages_dead_lettered
                .get_or_create_owned(&ReasonLabels { reason });
        }
        for outcome in crate::commands::REPORT_OUTCOMES {
            m.command_reports
                .get_or_create_owned(&OutcomeLabels { outcome });
        }
        for table in store::retention::Table::ALL {
            m.retention_rows_deleted.get_or_create_owned(&TableLabels {
                table: table.as_str(),
            });
        }
        m
    }
}
