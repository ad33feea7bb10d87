//! `sensorhub-agent run`: the sources, the sender and the commands loop, until SIGTERM or
//! SIGINT. Stopping at any moment is safe: every reading taken is already in the outbox, and a
//! batch in flight is sent again (same ids) at the next start.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::clock::Clock;
use crate::commands::Commands;
use crate::config::{Config, Transport};
use crate::error::Error;
use crate::http::Server;
use crate::link::Link;
use crate::mqtt::Mqtt;
use crate::outbox::Outbox;
use crate::sampler;
use crate::sender::Sender;

/// How often the drop count is reported when it changed.
const DROPS_REPORT: Duration = Duration::from_secs(10);

/// How commands come in.
enum Incoming {
    /// Long-polled from ingest-http.
    Poll(Box<Server>),
    /// Received on the MQTT connection's subscription.
    Received(tokio::sync::mpsc::Receiver<models::DeviceCommand>),
}

pub async fn run(config: Config) -> Result<(), Error> {
    let outbox = Arc::new(Mutex::new(Outbox::open(
        &config.outbox.path,
        config.outbox.max_readings,
    )?));
    // the commands' way in: a long-poll over HTTP, the connection's subscription over MQTT
    let (link, incoming) = match config.server.transport {
        Transport::Http => {
            let server = Server::new(&config)?;
            (Link::Http(server.clone()), Incoming::Poll(Box::new(server)))
        }
        Transport::Mqtt => {
            let (mqtt, received) = Mqtt::start(&config)?;
            (Link::Mqtt(mqtt), Incoming::Received(received))
        }
    };
    let clock = Clock::new(config.clock.sync);
    let wake = Arc::new(Notify::new());
    let mut tasks = JoinSet::new();
    for source in config.sources.clone() {
        tasks.spawn(sampler::sample(
            source,
            clock.clone(),
            outbox.clone(),
            wake.clone(),
        ));
    }
    tasks.spawn(sampler::report_drops(
        clock.clone(),
        outbox.clone(),
        wake.clone(),
        DROPS_REPORT,
    ));
    tasks.spawn(
        Sender {
            link: link.clone(),
            outbox: outbox.clone(),
            clock: clock.clone(),
            wake,
            batch: config.outbox.batch,
            timeout: config.server.timeout,
            backoff_max: config.server.backoff_max,
        }
        .run(),
    );
    let commands = Commands {
        link: link.clone(),
        outbox,
        handlers: config.commands.clone(),
        device_id: config.device_id.clone(),
        timeout: config.server.timeout,
        backoff_max: config.server.backoff_max,
    };
    match incoming {
        Incoming::Poll(server) => tasks.spawn(commands.poll(*server)),
        Incoming::Received(received) => tasks.spawn(commands.receive(received)),
    };
    tracing::info!(
        device = %config.device_id,
        transport = ?config.server.transport,
        server = %config.server_address(),
        sources = config.sources.len(),
        commands = config.commands.len(),
        outbox = %config.outbox.path.display(),
        "sensorhub-agent started"
    );
    tokio::select! {
        _ = shutdown_signal() => {
            tracing::info!("stopping: what was not sent yet stays in the outbox");
            tasks.shutdown().await;
            Ok(())
        }
        // every task loops forever: one that ended panicked; exit, and let systemd restart us
        ended = tasks.join_next() => Err(Error::Stopped(format!("{ended:?}"))),
    }
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}
