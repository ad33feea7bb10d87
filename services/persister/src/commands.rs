//! The persister's half of commands: publishing what is due (new commands, and re-sends of those
//! not yet answered) on RabbitMQ's commands exchange, and recording what the ingest services report
//! back (sent, succeeded, failed) in PostgreSQL, the only place command statuses are written.
//!
//! The commands table is its own outbox (see the migration `command_delivery`): query-api only
//! stores a command; a persister claims it, publishes it, and hands it back if the publish failed.
//! A new command wakes the dispatchers at once (PostgreSQL's NOTIFY, sent on commit); a tick every
//! [`DISPATCH_TICK`] catches re-sends, and anything a lost notification would have missed.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use bus::{Backoff, ConsumedQueue, Delivery, Publisher, QueueConsumer};
use models::{CommandReport, DeviceCommand};
use store::commands::{Command, Reported};
use store::listen::{COMMANDS_CHANNEL, ListenEvent};
use tokio::sync::{Notify, watch};

use crate::metrics::{OutcomeLabels, PersisterMetrics};
use crate::settings::Settings;

/// How often due commands are looked for without a notification.
const DISPATCH_TICK: Duration = Duration::from_secs(1);
/// Commands claimed, and published concurrently, at once.
const CLAIM_BATCH: i64 = 100;
/// Reports RabbitMQ may hand over unacknowledged.
const REPORTS_PREFETCH: u16 = 32;
/// The first reconnection or retry waits about this long.
const FIRST_RETRY: Duration = Duration::from_millis(100);

/// Publishes due commands until shutdown.
pub async fn dispatch(
    settings: Settings,
    pool: store::PgPool,
    publisher: Publisher,
    metrics: PersisterMetrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let wake = Arc::new(Notify::new());
    let _listener = listen_for_new_commands(&settings, wake.clone());
    let resend = chrono::Duration::seconds(i64::from(settings.command_resend_secs.max(1)));
    loop {
        let claimed = match claim(&pool, resend).await {
            Ok(claimed) => claimed,
            Err(e) => {
                tracing::warn!(error = %e, "cannot claim due commands; trying again");
                Vec::new()
            }
        };
        let full = claimed.len() as i64 == CLAIM_BATCH;
        publish(&pool, &publisher, &metrics, claimed).await;
        if full {
            continue;
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(DISPATCH_TICK) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Wakes the dispatcher when a command is stored, and when listening starts again (what was
/// stored meanwhile is due too). Without it, commands still go out at the next tick.
fn listen_for_new_commands(
    settings: &Settings,
    wake: Arc<Notify>,
) -> Option<store::listen::Listener> {
    let listener = store::listen::spawn_listener(
        settings.database.database_url.clone(),
        COMMANDS_CHANNEL,
        "persister-commands",
        move |event| {
            if matches!(event, ListenEvent::Changed | ListenEvent::Listening) {
                wake.notify_one();
            }
            ControlFlow::Continue(())
        },
    );
    match listener {
        Ok(listener) => Some(listener),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for new commands; dispatching on the tick only");
            None
        }
    }
}

async fn claim(pool: &store::PgPool, resend: chrono::Duration) -> Result<Vec<Command>, String> {
    let pool = pool.clone();
    tokio::task::spawn_blocking(move || {
        let mut conn = pool.get()?;
        store::commands::claim_due(&mut conn, resend, CLAIM_BATCH)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

/// Publishes the claimed commands, each confirmed by RabbitMQ; those that were not are handed
/// back, due again at once.
async fn publish(
    pool: &store::PgPool,
    publisher: &Publisher,
    metrics: &PersisterMetrics,
    claimed: Vec<Command>,
) {
    if claimed.is_empty() {
        return;
    }
    let outcomes = futures_util::future::join_all(claimed.iter().map(|command| {
        let message = DeviceCommand {
            id: command.id.clone(),
            name: command.name.clone(),
            args: command.args.clone(),
            expires_at: command.expires_at,
        };
        async move {
            publisher
                .publish_command(&command.device_id, &message)
                .await
        }
    }))
    .await;
    let mut failed = Vec::new();
    for (command, outcome) in claimed.iter().zip(outcomes) {
        match outcome {
            Ok(()) => {
                metrics.commands_published.inc();
            }
            Err(e) => {
                metrics.command_publish_failures.inc();
                tracing::warn!(command = %command.id, device = %command.device_id, error = %e, "cannot publish a command; it stays due");
                failed.push(command.id.clone());
            }
        }
    }
    if failed.is_empty() {
        return;
    }
    let pool = pool.clone();
    let released = tokio::task::spawn_blocking(move || {
        let mut conn = pool.get()?;
        store::commands::release(&mut conn, &failed)
    })
    .await;
    if !matches!(released, Ok(Ok(_))) {
        // They are claimed until the re-send interval has passed, and go out then.
        tracing::warn!("cannot hand back unpublished commands; they are re-sent later");
    }
    // Whatever failed, RabbitMQ is likely down: let the tick, not a busy loop, try again.
    tokio::time::sleep(DISPATCH_TICK).await;
}

/// Records the ingest services' reports until shutdown, reconnecting as needed.
pub async fn record_reports(
    settings: Settings,
    pool: store::PgPool,
    metrics: PersisterMetrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let topology = settings.bus.topology();
    let resend = chrono::Duration::seconds(i64::from(settings.command_resend_secs.max(1)));
    let mut backoff = Backoff::new(
        FIRST_RETRY,
        Duration::from_millis(settings.retry_max_backoff_ms),
    );
    loop {
        let opened = QueueConsumer::open(
            &settings.bus.amqp_url,
            &topology,
            ConsumedQueue::CommandReports,
            REPORTS_PREFETCH,
            "persister-reports",
        )
        .await;
        match opened {
            Ok(mut consumer) => {
                backoff.reset();
                let mut recorder = Recorder {
                    pool: &pool,
                    metrics: &metrics,
                    resend,
                    retry_max: Duration::from_millis(settings.retry_max_backoff_ms),
                };
                let ended = recorder.run(&mut consumer, &mut shutdown).await;
                consumer.close().await;
                if ended.is_none() {
                    return;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot consume command reports"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// What becomes of a command report (`sensorhub_command_reports_total`'s outcomes, each created at
/// start-up): recorded, a repeat, refused for one of [`store::commands::Refusal`]'s reasons, or
/// undecodable.
pub const REPORT_OUTCOMES: [&str; 7] = [
    "recorded",
    "unchanged",
    "no_such_command",
    "not_the_devices",
    "expired",
    "finished",
    "undecodable",
];

/// One connection's worth of recording reports.
struct Recorder<'a> {
    pool: &'a store::PgPool,
    metrics: &'a PersisterMetrics,
    resend: chrono::Duration,
    retry_max: Duration,
}

impl Recorder<'_> {
    /// Records deliveries one at a time until shutdown (`None`) or the connection is lost.
    async fn run(
        &mut self,
        consumer: &mut QueueConsumer,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<String> {
        loop {
            let delivery = tokio::select! {
                next = consumer.next() => next,
                _ = shutdown.changed() => return None,
            };
            let delivery = match delivery {
                Ok(delivery) => delivery,
                Err(e) => return Some(e.to_string()),
            };
            if let Err(e) = self.handle(consumer, delivery, shutdown).await {
                return Some(e);
            }
        }
    }

    /// Records one report (retrying while PostgreSQL is down), then acknowledges it; a report that
    /// cannot be read, or is refused, is kept on the dead-letter queue with the reason.
    async fn handle(
        &mut self,
        consumer: &QueueConsumer,
        delivery: Delivery,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), String> {
        let report = match CommandReport::decode(delivery.body()) {
            Ok(report) => report,
            Err(e) => {
                self.count("undecodable");
                return consumer
                    .dead_letter(delivery, &format!("undecodable report: {e}"))
                    .await
                    .map_err(|e| e.to_string());
            }
        };
        let Some(recorded) = self.record(&report, shutdown).await else {
            // shutting down: unacknowledged, it is delivered again
            return Ok(());
        };
        match recorded {
            Reported::Recorded(_) => self.count("recorded"),
            Reported::Unchanged => self.count("unchanged"),
            Reported::Refused(refusal) => {
                self.count(refusal.reason());
                tracing::warn!(
                    command = %report.command_id,
                    device = %report.device_id,
                    via = report.via.as_str(),
                    reason = %refusal,
                    "command report refused; kept on the dead-letter queue"
                );
                return consumer
                    .dead_letter(delivery, &refusal.to_string())
                    .await
                    .map_err(|e| e.to_string());
            }
        }
        let (_, ack) = delivery.into_parts();
        ack.ack().await.map(|_| ()).map_err(|e| e.to_string())
    }

    /// The report recorded, retried with backoff while the database fails; `None` at shutdown.
    async fn record(
        &self,
        report: &CommandReport,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<Reported> {
        let mut backoff = Backoff::new(FIRST_RETRY, self.retry_max);
        loop {
            let pool = self.pool.clone();
            let owned = report.clone();
            let resend = self.resend;
            let outcome = tokio::task::spawn_blocking(move || {
                let mut conn = pool.get()?;
                store::commands::record_report(&mut conn, &owned, resend)
            })
            .await;
            match outcome {
                Ok(Ok(reported)) => return Some(reported),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot record a command report; retrying")
                }
                Err(e) => tracing::warn!(error = %e, "recording a command report failed; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = shutdown.changed() => return None,
            }
        }
    }

    fn count(&self, outcome: &'static str) {
        self.metrics
            .command_reports
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}
