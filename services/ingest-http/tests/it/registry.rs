//! The device registry as ingest-http follows it: a device added a moment ago is let in at once, a
//! revoked one refused at once, and tokens of devices it does not know cannot make it hammer the
//! database. The scheduled re-read is set to a minute here, so only the prompt paths can pass.

use std::time::{Duration, Instant};

use auth::Claims;

use crate::{Stack, now, reading};
use testkit::spawn::Running;

const SCHEDULED_REFRESH_MS: u64 = 60_000;
/// How soon a revoked device must be refused, well within the scheduled re-read.
const REFUSED_WITHIN: Duration = Duration::from_secs(1);

/// Reads of the registry so far, whatever their cause.
async fn registry_reads(ingest: &Running) -> f64 {
    testkit::metric_sum(
        &ingest.metrics().await,
        "sensorhub_device_registry_reads_total",
    )
}

#[tokio::test]
async fn a_device_is_let_in_right_after_it_is_added_and_refused_right_after_it_is_revoked() {
    let stack = Stack::new();
    let ingest = stack
        .ingest_with(|s| s.auth_refresh_ms = SCHEDULED_REFRESH_MS)
        .await;
    let data = format!("{}/data", ingest.url);

    let token = stack.keys.register_device(&stack.db.url, "raspi-new");
    let (status, body) = stack
        .post_with(data.clone(), Some(&token), reading("raspi-new"))
        .await;
    assert_eq!(
        status, 200,
        "the first write right after `device add`: {body}"
    );

    let mut conn = store::connect(&stack.db.url).unwrap();
    assert!(store::credentials::revoke_device(&mut conn, "raspi-new").unwrap());
    testkit::eventually(REFUSED_WITHIN, "the revoked device refused", || async {
        let status = stack.post_reading(&data, &token, "raspi-new").await;
        if status != 401 {
            assert_eq!(status, 200);
        }
        (status == 401).then_some(())
    })
    .await;

    // added again, with a new token: the new token works at once, the old one stays refused
    let renewed = stack.keys.register_device(&stack.db.url, "raspi-new");
    assert_eq!(stack.post_reading(&data, &renewed, "raspi-new").await, 200);
    assert_eq!(stack.post_reading(&data, &token, "raspi-new").await, 401);
    ingest.stop().await;
}

#[tokio::test]
async fn a_burst_of_tokens_of_unknown_devices_costs_a_bounded_number_of_registry_reads() {
    let stack = Stack::new();
    let ingest = stack
        .ingest_with(|s| {
            s.auth_refresh_ms = SCHEDULED_REFRESH_MS;
            s.auth_prompt_read_interval_ms = 100;
            // a thousand refusals from one address: its refusal budget is another test's
            s.refusal_limit_per_second = 0;
        })
        .await;
    let data = format!("{}/data", ingest.url);
    // validly signed, never registered: 200 devices, each token sent 5 times
    let forged: Vec<(String, String)> = (0..200)
        .map(|i| {
            let device = format!("ghost-{i:03}");
            let token = stack.keys.sign(&Claims::device(&device, now()));
            (device, token)
        })
        .collect();
    let before = registry_reads(&ingest).await;
    let started = Instant::now();
    let mut statuses = Vec::new();
    let mut after_first_round = before;
    for round in 0..5 {
        let requests = forged
            .iter()
            .map(|(device, token)| stack.post_with(data.clone(), Some(token), reading(device)));
        let answers = futures_util::future::join_all(requests).await;
        statuses.extend(answers.into_iter().map(|(status, _)| status));
        if round == 0 {
            after_first_round = registry_reads(&ingest).await;
        }
        if round == 2 {
            // a real device added in the middle of it still gets in at once
            let token = stack.keys.register_device(&stack.db.url, "raspi-real");
            assert_eq!(stack.post_reading(&data, &token, "raspi-real").await, 200);
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(statuses.len(), 1000);
    assert!(statuses.iter().all(|s| *s == 401), "{statuses:?}");
    let reads = registry_reads(&ingest).await - before;
    // at most one read per prompt-read interval, plus the one the registration notified
    let bound = 2.0 + elapsed.as_millis() as f64 / 100.0;
    assert!(
        reads <= bound,
        "{reads} registry reads for 1,000 requests in {elapsed:?} (bound {bound})"
    );
    assert!(reads >= 1.0, "the unknown devices were looked up");
    // the same unknown tokens again within seconds are refused without asking (only the real
    // device's registration causes reads: its notification, its prompt read)
    let later = registry_reads(&ingest).await - after_first_round;
    assert!(
        later <= 3.0,
        "{later} reads for tokens already found unknown"
    );
    ingest.stop().await;
}
