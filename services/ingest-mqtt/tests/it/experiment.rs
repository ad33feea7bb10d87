//! Investigation (ignored; run by name): which layer of the durable MQTT mode holds acknowledged
//! readings back when RabbitMQ is SIGKILLed under load. Each publishes as the broker kill test
//! does, kills the node, restarts it, and looks in the queues themselves (no persister):
//! - `experiment_broker_only`: the MQTT plugin and the quorum queue, nobody consuming;
//! - `experiment_with_ingest`: ingest-mqtt consuming until the kill, stopped before the restart;
//! - `experiment_ingest_through_restart`: ingest-mqtt living through the kill, as in production.
//!
//! After a restart a quorum queue's count grows for a few seconds (its log is applied again), so
//! the queues are looked at 5 and 15 s later, not at once.

use std::collections::HashSet;
use std::time::Duration;

use testkit::rabbitmq::MqttAuth;

use crate::rabbitmq::DurableStack;
use crate::{WAIT, device_messages};

async fn run(with_ingest: bool, through: bool) {
    let mut stack = DurableStack::new(MqttAuth::Anonymous);
    stack.declare_mqtt_topology().await;
    let ingest = if with_ingest {
        Some(stack.ingest(&stack.settings("ingest-exp")).await)
    } else {
        None
    };
    let devices: Vec<_> = (0..3)
        .map(|d| {
            let (device, id) = (stack.device(&format!("exp{d}")), format!("exp-{d}"));
            let messages = device_messages(&id, 50_000);
            tokio::spawn(async move {
                device
                    .publish_all_tracked(messages, Duration::ZERO, WAIT)
                    .await
            })
        })
        .collect();
    let topology = bus::MqttTopology::with_prefix(&stack.prefix);
    let t = bus::Topology::with_prefix(&stack.prefix);
    // until ingest-mqtt acknowledged 2000 (with it) or 3000 are in the MQTT queue (without)
    loop {
        if let Some(ingest) = &ingest {
            if ingest.metric("mqtt_messages_acked_total").await >= 2000.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let depths = stack.queue_depths().await;
        let sum: u32 = depths
            .iter()
            .filter(|(q, _)| *q == topology.readings_queue || *q == t.readings_queue)
            .map(|(_, n)| *n)
            .filter(|n| *n != u32::MAX)
            .sum();
        if sum >= 3000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stack.node.kill();
    let mut acked = Vec::new();
    for device in devices {
        acked.push(device.await.unwrap());
    }
    if let Some(ingest) = ingest {
        eprintln!(
            "EXPERIMENT ingest received {} acked {}",
            ingest.metric("mqtt_messages_received_total").await,
            ingest.metric("mqtt_messages_acked_total").await
        );
        if through {
            stack.node.restart();
            tokio::time::sleep(Duration::from_secs(20)).await;
            eprintln!(
                "EXPERIMENT after restart: ingest received {} acked {} publisher connected {} retries {}",
                ingest.metric("mqtt_messages_received_total").await,
                ingest.metric("mqtt_messages_acked_total").await,
                ingest.metric("amqp_publish_connected").await,
                ingest.metric("mqtt_publish_retries_total").await,
            );
            if ingest.metric("amqp_publish_connected").await == 0.0 {
                panic!("STALLED");
            }
        }
        ingest.stop().await;
    }
    if !through {
        stack.node.restart();
    }
    for wait in [0, 5, 15] {
        tokio::time::sleep(Duration::from_secs(wait)).await;
        eprintln!(
            "EXPERIMENT depths +{wait}s: {:?}",
            stack.queue_depths().await
        );
    }
    let mut present = HashSet::new();
    let mut raw = 0;
    for (_, body) in stack.take_all(&topology.readings_queue).await {
        raw += 1;
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        present.insert(v["id"].as_str().unwrap().to_owned());
    }
    let mut forwarded = 0;
    let taken = if with_ingest {
        stack.take_all(&t.readings_queue).await
    } else {
        Vec::new()
    };
    for (_, body) in taken {
        forwarded += 1;
        let s = String::from_utf8_lossy(&body).into_owned();
        // readings messages: find every "exp-d-i" id in the body
        for part in s.split('"') {
            if part.starts_with("exp-") {
                present.insert(part.to_owned());
            }
        }
    }
    let mut report = Vec::new();
    for (d, indices) in acked.iter().enumerate() {
        let want: HashSet<String> = indices.iter().map(|i| format!("exp-{d}-{i}")).collect();
        let mut missing: Vec<_> = want.difference(&present).cloned().collect();
        missing.sort();
        report.push(format!(
            "exp-{d}: acked {} (last {:?}), missing {}: {:?}",
            indices.len(),
            indices.iter().rev().take(3).collect::<Vec<_>>(),
            missing.len(),
            missing.iter().take(8).collect::<Vec<_>>()
        ));
    }
    eprintln!(
        "EXPERIMENT with_ingest={with_ingest}: mqtt queue after restart {raw} msgs, readings queue {forwarded} msgs, distinct ids {}\n{}",
        present.len(),
        report.join("\n")
    );
}

#[tokio::test]
#[ignore = "investigation, run by name"]
async fn experiment_broker_only() {
    run(false, false).await;
}

#[tokio::test]
#[ignore = "investigation, run by name"]
async fn experiment_with_ingest() {
    run(true, false).await;
}

#[tokio::test]
#[ignore = "investigation, run by name"]
async fn experiment_ingest_through_restart() {
    run(true, true).await;
}
