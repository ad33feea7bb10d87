//! MQTT client chores that the simulated devices of the tools and of the tests share.

use std::time::Duration;

use anyhow::Context;
use rumqttc::{AsyncClient, Event, EventLoop, Outgoing, Packet};

/// Drives a new client's `events` until the broker's CONNACK: the connection is then open, and a
/// publish made now is not lost to a refused login. An error: the connection failed (the broker's
/// reason) or no CONNACK came within `wait`.
pub async fn connected(events: &mut EventLoop, wait: Duration) -> anyhow::Result<()> {
    tokio::time::timeout(wait, async {
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = events.poll().await? {
                return anyhow::Ok(());
            }
        }
    })
    .await
    .with_context(|| format!("no CONNACK within {wait:?}"))?
}

/// Sends DISCONNECT and drives `events` until it has gone out, the connection ended or `wait`
/// passed: a client only dropped would leave the broker to find a broken connection, not a
/// clean goodbye.
pub async fn disconnect(client: &AsyncClient, events: &mut EventLoop, wait: Duration) {
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(wait, async {
        while !matches!(
            events.poll().await,
            Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_)
        ) {}
    })
    .await;
}
