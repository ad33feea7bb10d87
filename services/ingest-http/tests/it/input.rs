//! What a device may claim about a reading: a time inside the backfill horizon (each month a reading
//! falls in becomes a database partition) and an id that displays as what it is.

use chrono::{Duration, Utc};
use serde_json::{Value, json};

use crate::Stack;

/// Monthly partitions of `readings` in this test's database.
fn partitions(stack: &Stack) -> Vec<String> {
    use diesel::prelude::*;
    #[derive(QueryableByName)]
    struct Partition {
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
    }
    diesel::sql_query(
        "SELECT inhrelid::regclass::text AS name FROM pg_inherits
         WHERE inhparent = 'readings'::regclass ORDER BY 1",
    )
    .load::<Partition>(&mut stack.db.connect())
    .unwrap()
    .into_iter()
    .map(|p| p.name)
    .collect()
}

#[tokio::test]
async fn readings_older_than_the_backfill_horizon_are_refused_and_make_no_partitions() {
    let stack = Stack::new();
    let ingest = stack.ingest().await;
    let _persister = stack.persister().await;
    let readings = format!("{}/v1/readings", ingest.url);
    let data = format!("{}/data", ingest.url);
    let before = partitions(&stack);

    // the attacker's request: three readings in three old months, one request
    let old = |year: i32, id: &str| json!({"device_id": "raspi-old", "id": id, "ts": format!("{year}-03-15T00:00:00Z"), "metrics": {"t": 1}});
    let (status, answer) = stack
        .post(
            readings.clone(),
            json!([old(2001, "a"), old(2010, "b"), old(2020, "c")]),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["field"], "[0].ts", "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("365 days"),
        "{answer}"
    );
    // one day beyond the default horizon, in either format, on either endpoint
    let beyond = Utc::now() - Duration::days(366);
    for (url, body) in [
        (
            &data,
            json!({"device_id": "raspi-old", "t": 1, "ts": beyond.to_rfc3339()}),
        ),
        (
            &data,
            json!({"device_id": "raspi-old", "t": 1, "ts": beyond.timestamp_millis()}),
        ),
        (
            &readings,
            json!({"device_id": "raspi-old", "ts": beyond.to_rfc3339(), "metrics": {"t": 1}}),
        ),
    ] {
        let (status, answer) = stack.post(url.clone(), body.clone()).await;
        assert_eq!(
            (status, answer["field"].as_str()),
            (400, Some("ts")),
            "{body} -> {answer}"
        );
    }
    assert_eq!(
        stack.queued_messages().await,
        0,
        "refused requests queue nothing"
    );

    // inside the horizon: accepted and stored, in this month's and recent months' partitions only
    let inside = Utc::now() - Duration::days(300);
    let (status, answer) = stack
        .post(
            readings.clone(),
            json!([{"device_id": "raspi-old", "id": "in", "ts": inside.to_rfc3339(), "metrics": {"t": 1}}]),
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    stack.wait_stored(1).await;
    let after = partitions(&stack);
    let made: Vec<&String> = after.iter().filter(|p| !before.contains(p)).collect();
    assert!(made.len() <= 1, "{made:?}");
    for old_month in ["readings_2001_03", "readings_2010_03", "readings_2020_03"] {
        assert!(
            !after.iter().any(|p| p == old_month),
            "{old_month} was created"
        );
    }
    ingest.stop().await;
}

#[tokio::test]
async fn the_backfill_horizon_is_configurable() {
    let stack = Stack::new();
    let ingest = stack
        .ingest_with(|s| s.backfill_horizon_days = models::BackfillHorizon::days(7).unwrap())
        .await;
    let readings = format!("{}/v1/readings", ingest.url);
    let at = |days: i64| (Utc::now() - Duration::days(days)).to_rfc3339();
    let (status, _) = stack
        .post(
            readings.clone(),
            json!({"device_id": "raspi-w", "ts": at(6), "metrics": {"t": 1}}),
        )
        .await;
    assert_eq!(status, 202);
    let (status, answer) = stack
        .post(
            readings.clone(),
            json!({"device_id": "raspi-w", "ts": at(8), "metrics": {"t": 1}}),
        )
        .await;
    assert_eq!(
        (status, answer["field"].as_str()),
        (400, Some("ts")),
        "{answer}"
    );
    assert!(
        answer["message"].as_str().unwrap().contains("7 days"),
        "{answer}"
    );
    ingest.stop().await;
}

#[tokio::test]
async fn reading_ids_that_could_spoof_a_display_are_refused() {
    let stack = Stack::new();
    let ingest = stack.ingest().await;
    let readings = format!("{}/v1/readings", ingest.url);
    let data = format!("{}/data", ingest.url);
    for id in [
        "invoice\u{202E}fdp.exe", // right-to-left override
        "raspi\u{200B}-01",       // zero-width space
        "\u{2067}raspi-01",       // right-to-left isolate
        "r\u{0430}spi-01",        // Cyrillic a
        "two words",
    ] {
        for (url, body) in [
            (&data, json!({"device_id": "raspi-id", "id": id, "t": 1})),
            (
                &readings,
                json!({"device_id": "raspi-id", "id": id, "metrics": {"t": 1}}),
            ),
        ] {
            let (status, answer) = stack.post(url.clone(), body.clone()).await;
            assert_eq!(status, 400, "{body} -> {answer}");
            assert_eq!(answer["field"], "id", "{answer}");
            assert!(
                answer["message"]
                    .as_str()
                    .unwrap()
                    .contains("printable ASCII"),
                "{answer}"
            );
        }
    }
    assert_eq!(stack.queued_messages().await, 0);
    // what devices send stays valid: counters, timestamps, UUIDs
    for id in [
        "raspi-01-000042",
        "2026-11-25T19:00:00.123+09:00#2",
        "0192f0c4-5f6e-7a3b-8c1d-2e3f4a5b6c7d",
    ] {
        let (status, answer): (u16, Value) = stack
            .post(
                readings.clone(),
                json!({"device_id": "raspi-id", "id": id, "metrics": {"t": 1}}),
            )
            .await;
        assert_eq!(status, 202, "{id}: {answer}");
    }
    ingest.stop().await;
}
