//! `sensorhub-agent` as a Pi runs it, against the real ingest-http and persister on the real
//! RabbitMQ and PostgreSQL: through a network outage (a cut TCP proxy in front of ingest-http),
//! SIGKILL mid-flush, a full outbox, a clock that starts in 1970, and a command.
//!
//! The agent is the built binary, or, when `SENSORHUB_AGENT_UNDER_TEST` names another build (the
//! aarch64 one, say), that one, run through `SENSORHUB_AGENT_RUNNER` (`qemu-aarch64 -L ...`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first thing that is not as it must be"
)]

mod fixture;
mod mqtt;

use std::collections::BTreeMap;
use std::time::Duration;

use fixture::Pi;
use serde_json::{Value, json};

/// Every `seq` from 1 to the last taken is stored exactly once, except at most `gaps` of them
/// (a reading the counter script counted but the agent had not yet kept when it was killed),
/// and the stored times rise with `seq`. Answers the stored (seq → time).
pub(crate) fn assert_each_once_in_order(
    pi: &Pi,
    gaps: usize,
) -> BTreeMap<u64, chrono::DateTime<chrono::Utc>> {
    let stored = pi.stored_seqs();
    let taken = pi.taken();
    let mut by_seq = BTreeMap::new();
    for (seq, ts) in &stored {
        assert!(
            by_seq.insert(*seq, *ts).is_none(),
            "seq {seq} stored twice: {stored:?}"
        );
    }
    let missing: Vec<u64> = (1..=taken).filter(|s| !by_seq.contains_key(s)).collect();
    assert!(
        missing.len() <= gaps,
        "{} of {taken} taken readings never stored: {missing:?}",
        missing.len()
    );
    let times: Vec<_> = by_seq.values().collect();
    assert!(
        times.windows(2).all(|w| w[0] < w[1]),
        "stored times do not rise with seq"
    );
    by_seq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_loses_nothing_and_the_backlog_arrives_in_order_with_its_times() {
    let pi = Pi::new("outage").await;
    let mut agent = pi.start_agent();
    pi.wait_stored_at_least(5).await;

    pi.proxy.cut();
    let cut_at = chrono::Utc::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = agent.status();
    assert!(
        during["depth"].as_i64().unwrap() >= 10,
        "readings kept while the server is away: {during}"
    );
    assert!(during["last_error"].is_string(), "{during}");
    let restored_at = chrono::Utc::now();
    pi.proxy.restore();

    pi.wait_all_taken_stored(&mut agent).await;
    agent.stop().await;
    let stored = assert_each_once_in_order(&pi, 0);
    // what was taken during the outage has the time it was taken, not the time it was sent
    let in_outage = stored
        .values()
        .filter(|ts| **ts > cut_at && **ts < restored_at)
        .count();
    assert!(
        in_outage >= 10,
        "{in_outage} readings timed within the outage"
    );
    assert_eq!(agent.status()["depth"], json!(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_flush_stores_everything_once() {
    sigkill_mid_flush(fixture::Transport::Http).await;
}

/// Kills the agent three times while it flushes a backlog (over `transport`): every reading is
/// stored once all the same (a batch whose acknowledgement the kill lost goes again, same ids).
pub(crate) async fn sigkill_mid_flush(transport: fixture::Transport) {
    let pi = Pi::with(&format!("killed-{transport:?}"), |c| {
        c.batch = 2;
        c.transport = transport;
    })
    .await;
    let mut agent = pi.start_agent();
    pi.wait_stored_at_least(3).await;
    pi.proxy.cut();
    tokio::time::sleep(Duration::from_secs(6)).await;
    pi.proxy.restore();
    // kill it three times, each time after it has sent part of its backlog, not all of it
    let kills = 3;
    for kill in 1..=kills {
        let backlog = agent.status()["depth"].as_i64().unwrap();
        assert!(backlog > 0, "kill {kill}: a backlog to flush");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let depth = agent.status()["depth"].as_i64().unwrap();
            if depth < backlog {
                assert!(
                    depth > 0,
                    "kill {kill}: the backlog went out before the kill"
                );
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "kill {kill}: no flush"
            );
        }
        agent.kill();
        agent = pi.start_agent();
    }
    pi.wait_all_taken_stored(&mut agent).await;
    agent.stop().await;
    assert_each_once_in_order(&pi, kills);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_drops_the_oldest_and_the_server_hears_how_many() {
    let pi = Pi::with("full", |c| {
        c.max_readings = 10;
        c.batch = 5;
    })
    .await;
    let mut agent = pi.start_agent();
    pi.wait_stored_at_least(2).await;
    pi.proxy.cut();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let full = agent.status();
    assert!(full["depth"].as_i64().unwrap() <= 10, "{full}");
    assert!(full["dropped_total"].as_i64().unwrap() > 0, "{full}");
    pi.proxy.restore();
    // the drop count reaches the server as the device's own reading
    let reported =
        testkit::eventually(Duration::from_secs(60), "the drop count stored", || async {
            pi.metric_values("agent_outbox_dropped_total")
                .into_iter()
                .max_by(f64::total_cmp)
                .filter(|n| *n > 0.0)
        })
        .await;
    agent.stop().await;
    let dropped = agent.status()["dropped_total"].as_f64().unwrap();
    assert!(
        reported <= dropped && reported > 0.0,
        "{reported} of {dropped}"
    );
    // nothing doubled: each seq at most once
    let seqs: Vec<u64> = pi.stored_seqs().into_iter().map(|(s, _)| s).collect();
    let mut unique = seqs.clone();
    unique.dedup();
    assert_eq!(seqs.len(), unique.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_taken_before_ntp_synced_the_clock_are_stored_at_their_true_time() {
    let pi = Pi::new("clock").await;
    // a Pi that boots in 1970, unsynchronised
    let seventies = -chrono::Utc::now().timestamp() + 1_000;
    pi.set_clock(seventies, false);
    let started = chrono::Utc::now();
    let mut agent = pi.start_agent();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let waiting = agent.status();
    assert!(
        waiting["untimed_waiting"].as_i64().unwrap() >= 5,
        "{waiting}"
    );
    assert_eq!(pi.stored_seqs().len(), 0, "nothing sent with a 1970 time");
    // NTP steps the clock: the waiting readings get the times they were taken at
    pi.set_clock(0, true);
    pi.wait_all_taken_stored(&mut agent).await;
    agent.stop().await;
    let stored = assert_each_once_in_order(&pi, 0);
    let first = stored.values().next().unwrap();
    assert!(
        (*first - started).num_milliseconds().abs() < 1_500,
        "the first reading's time {first} is the time it was taken, about {started}"
    );
    assert!(stored.values().all(|ts| *ts <= chrono::Utc::now()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_runs_its_handler_once_and_its_result_is_stored() {
    let pi = Pi::new("command").await;
    let mut agent = pi.start_agent();
    let id = pi.issue_command("led", json!({"on": true}));
    let command = pi.wait_command_finished(&id).await;
    assert_eq!(command.stored_status, "succeeded");
    assert_eq!(
        command.result,
        Some(json!({"led": "on", "args": {"on": true}}))
    );
    assert_eq!(pi.handler_runs(), 1);
    // a command with no handler here fails, saying so
    let id = pi.issue_command("reboot", json!({}));
    let command = pi.wait_command_finished(&id).await;
    assert_eq!(command.stored_status, "failed");
    assert!(
        command.result.unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("no handler")
    );
    agent.stop().await;
    assert_eq!(agent.status()["commands_run_total"], json!(2));
}

/// The short round trip the cross-built (aarch64) binary runs under emulation: a reading there
/// and a command back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip() {
    let pi = Pi::new("roundtrip").await;
    let mut agent = pi.start_agent();
    pi.wait_stored_at_least(3).await;
    let id = pi.issue_command("led", json!({"on": false}));
    let command = pi.wait_command_finished(&id).await;
    assert_eq!(
        command.result,
        Some(json!({"led": "off", "args": {"on": false}}))
    );
    pi.wait_all_taken_stored(&mut agent).await;
    agent.stop().await;
    assert_each_once_in_order(&pi, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reads_each_source_and_asks_the_server_about_the_token() {
    let pi = Pi::new("check").await;
    let (ok, out) = pi.check();
    assert!(ok, "{out}");
    assert!(out.contains("the token is accepted"), "{out}");
    assert!(out.contains("\"seq\""), "the source was read once: {out}");
    assert_eq!(pi.taken(), 1);

    std::fs::write(pi.dir.join("token"), "not-a-token").unwrap();
    let (ok, out) = pi.check();
    assert!(!ok, "{out}");
    assert!(out.contains("refuses the token"), "{out}");
    let stored: Vec<Value> = Vec::new();
    assert_eq!(pi.stored_seqs().len(), stored.len(), "check stores nothing");
}
