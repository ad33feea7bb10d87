//! Readings older than the backfill horizon are invalid over MQTT too: acknowledged (so Mosquitto
//! does not redeliver them forever), kept on the invalid queue with the reason, never stored.

use chrono::Utc;
use serde_json::json;

use crate::{Stack, invalid, publish_until_acknowledged};

#[tokio::test]
async fn readings_older_than_the_backfill_horizon_are_kept_as_invalid_not_stored() {
    let stack = Stack::new();
    let _persister = stack.persister().await;
    let mut settings = stack.settings("ingest-horizon");
    settings.backfill_horizon_days = models::BackfillHorizon::days(30).unwrap();
    let ingest = stack.ingest(&settings).await;
    let topic = "devices/raspi-h/readings".to_owned();
    let at = |days: i64| (Utc::now() - chrono::Duration::days(days)).to_rfc3339();
    let messages = vec![
        // beyond the configured 30 days, alone and as part of a batch
        (
            topic.clone(),
            json!({"id": "old", "ts": at(31), "metrics": {"t": 1}}),
        ),
        (
            topic.clone(),
            json!([{"id": "new-1", "ts": at(1), "metrics": {"t": 1}},
                   {"id": "old-2", "ts": "2001-03-15T00:00:00Z", "metrics": {"t": 1}}]),
        ),
        // and a bidi override in an id
        (
            topic.clone(),
            json!({"id": "r\u{202E}vil", "metrics": {"t": 1}}),
        ),
        (
            topic.clone(),
            json!({"id": "new-2", "ts": at(29), "metrics": {"t": 1}}),
        ),
    ];
    let messages: Vec<(String, Vec<u8>)> = messages
        .into_iter()
        .map(|(t, body)| (t, body.to_string().into_bytes()))
        .collect();
    publish_until_acknowledged(
        &stack.device("horizon"),
        messages,
        &ingest,
        &stack.db.url,
        1,
    )
    .await;
    assert_eq!(invalid(&ingest, "invalid_reading").await, 3.0);
    assert_eq!(stack.stored_ids("raspi-h"), ["new-2"]);

    let mut reasons: Vec<String> = stack
        .take_invalid()
        .await
        .into_iter()
        .map(|kept| kept.reason)
        .collect();
    reasons.sort();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons[0].starts_with("[1].ts:") && reasons[0].contains("30 days"),
        "{reasons:?}"
    );
    assert!(reasons[1].starts_with("id:"), "{reasons:?}");
    assert!(
        reasons[2].starts_with("ts:") && reasons[2].contains("30 days"),
        "{reasons:?}"
    );
    ingest.stop().await;
}
