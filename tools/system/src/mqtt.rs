//! MQTT client chores that the simulated devices of the tools and of the tests share.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, Outgoing};

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
