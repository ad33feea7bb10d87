//! The per-replica command router: a subscriber gets its device's commands only, the binding
//! goes with the last subscriber, and a lost connection is followed by a re-bound queue.

use std::time::Duration;

use bus::{DeviceCommands, Topology};
use models::DeviceCommand;

fn command(id: &str) -> DeviceCommand {
    DeviceCommand {
        id: id.to_owned(),
        name: "led".to_owned(),
        args: serde_json::json!({"on": true}),
        expires_at: chrono::Utc::now() + chrono::Duration::minutes(5),
    }
}

async fn next(subscription: &mut bus::Subscription) -> Option<DeviceCommand> {
    tokio::time::timeout(Duration::from_secs(5), subscription.next())
        .await
        .ok()
        .flatten()
}

#[tokio::test]
async fn a_subscriber_gets_its_devices_commands_and_only_while_subscribed() {
    let bus = super::TestBus::new().await;
    let publisher = bus.publisher(testkit::publisher_settings()).await;
    let router = DeviceCommands::start(
        testkit::amqp_url(),
        bus.topology.clone(),
        "router-test".into(),
    );
    let mut a = router.subscribe("dev-a").await.unwrap();
    let mut a_again = router.subscribe("dev-a").await.unwrap();
    let mut b = router.subscribe("dev-b").await.unwrap();
    publisher
        .publish_command("dev-a", &command("c1"))
        .await
        .unwrap();
    assert_eq!(next(&mut a).await.unwrap().id, "c1");
    assert_eq!(next(&mut a_again).await.unwrap().id, "c1");
    // an expired one is never handed over
    let mut expired = command("old");
    expired.expires_at = chrono::Utc::now() + chrono::Duration::milliseconds(30);
    publisher.publish_command("dev-b", &expired).await.unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    publisher
        .publish_command("dev-b", &command("c2"))
        .await
        .unwrap();
    assert_eq!(next(&mut b).await.unwrap().id, "c2");
    // the last one out unbinds: what is published meanwhile is not waiting for the next one in
    drop((a, a_again));
    tokio::time::sleep(Duration::from_millis(300)).await;
    publisher
        .publish_command("dev-a", &command("c3"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut a = router.subscribe("dev-a").await.unwrap();
    publisher
        .publish_command("dev-a", &command("c4"))
        .await
        .unwrap();
    assert_eq!(next(&mut a).await.unwrap().id, "c4");
    router.close().await;
    publisher.close().await;
}

#[tokio::test]
async fn after_a_lost_connection_the_subscribed_devices_are_bound_again() {
    let bus = super::TestBus::new().await;
    let publisher = bus.publisher(testkit::publisher_settings()).await;
    let proxy = testkit::TcpProxy::start("127.0.0.1:5672").await;
    let router =
        DeviceCommands::start(proxy.amqp_url(), bus.topology.clone(), "router-test".into());
    let mut a = router.subscribe("dev-a").await.unwrap();
    proxy.cut();
    testkit::eventually(Duration::from_secs(20), "the router notices", || async {
        (!router.is_connected()).then_some(())
    })
    .await;
    proxy.restore();
    testkit::eventually(Duration::from_secs(20), "the router reconnects", || async {
        router.is_connected().then_some(())
    })
    .await;
    publisher
        .publish_command("dev-a", &command("c1"))
        .await
        .unwrap();
    assert_eq!(next(&mut a).await.unwrap().id, "c1");
    router.close().await;
    publisher.close().await;
}

#[tokio::test]
async fn without_rabbitmq_a_subscription_is_refused() {
    let topology = Topology::with_prefix(&testkit::unique_name("bus-test"));
    let router = DeviceCommands::start(
        "amqp://guest:guest@127.0.0.1:1/%2f".into(),
        topology,
        "router-test".into(),
    );
    let refused = router.subscribe("dev-a").await.unwrap_err();
    assert!(
        matches!(refused, bus::RouterError::Unavailable(_)),
        "{refused:?}"
    );
    router.close().await;
}
