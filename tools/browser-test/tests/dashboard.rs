//! The dashboard in a real browser, against the real services: ingest-http, the persister and
//! query-api on a database of their own, the machine's PostgreSQL and RabbitMQ. The test fills
//! the database (Pis posting through ingest-http; 10,000 devices and a year of one-minute readings
//! inserted with SQL, as only their size matters), mints the tokens, and runs `dashboard.mjs` in
//! Node with Debian's Chromium, which drives the pages, prints the budgets and fails over them.
//!
//! The modules' own logic (the SSE parser, the charts' buckets) is tested in Node alone
//! (`unit/`), without a browser.
//!
//! What it needs beyond `cargo`: `node` and `npm` (Debian's `nodejs`, `npm`), `/usr/bin/chromium`
//! (Debian's `chromium`), and `npm ci` run in this directory (`scripts/test` sees to all three;
//! the test runs `npm ci` itself when `node_modules` is missing).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first thing that is not as it must be"
)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use auth::Role;
use diesel::connection::SimpleConnection;
use serde_json::json;
use testkit::{AmqpPrefix, TestDb, TestKeys, spawn};

const FLEET_SIZE: u32 = 10_000;
const DEVICE: &str = "raspi-01";
const LIVE_DEVICE: &str = "raspi-live";
const YEAR_DEVICE: &str = "year-01";

fn here() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chromium() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned())
}

/// `npm ci` of the pinned playwright-core, once, when it is not there yet.
async fn node_modules() {
    if here()
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        return;
    }
    let status = tokio::process::Command::new("npm")
        .args(["ci", "--ignore-scripts", "--no-audit", "--no-fund"])
        .current_dir(here())
        .status()
        .await
        .expect("run npm (Debian's npm): the browser test needs Node");
    assert!(status.success(), "npm ci in {}", here().display());
}

/// 10,000 devices with one reading each, a year of one-minute readings for one device, the daily
/// partitions they need and their rollups (as the migration computes them for readings stored
/// before rollups), as plain SQL: their size is what the budgets are about.
fn fill_database(db: &TestDb) {
    let mut conn = db.connect();
    conn.batch_execute(&format!(
        "SELECT sensorhub_ensure_readings_partition(d)
           FROM generate_series(date_trunc('day', now() - interval '365 days'), now(), interval '1 day') d;
         SELECT sensorhub_ensure_readings_partition(now());
         INSERT INTO devices (device_id, first_seen, last_seen, metrics)
           SELECT format('fleet-%s', lpad(i::text, 5, '0')), now() - interval '1 day',
                  now() - i * interval '1 second', ARRAY['humidity', 'temperature']
             FROM generate_series(1, {FLEET_SIZE}) i;
         INSERT INTO readings (device_id, ts, reading_id, metrics)
           SELECT format('fleet-%s', lpad(i::text, 5, '0')), now() - i * interval '1 second', 'seed',
                  jsonb_build_object('temperature', 18 + i % 10, 'humidity', 40 + i % 20)
             FROM generate_series(1, {FLEET_SIZE}) i;
         INSERT INTO readings (device_id, ts, reading_id, metrics)
           SELECT '{YEAR_DEVICE}', t, 'y' || extract(epoch FROM t)::bigint,
                  jsonb_build_object('temperature', round((12 + 8 * sin(extract(epoch FROM t) / 31557600 * 2 * pi())
                                                              + 4 * sin(extract(epoch FROM t) / 86400 * 2 * pi()))::numeric, 2))
             FROM generate_series(now() - interval '365 days' + interval '1 minute', now() - interval '1 minute',
                                  interval '1 minute') t;
         INSERT INTO devices (device_id, first_seen, last_seen, metrics)
           SELECT '{YEAR_DEVICE}', min(ts), max(ts), ARRAY['temperature'] FROM readings
            WHERE device_id = '{YEAR_DEVICE}';
         INSERT INTO rollups_1m (device_id, metric, bucket, count, sum, min, max, first_ts, last_ts)
           SELECT r.device_id, m.key, date_trunc('minute', r.ts, 'UTC'), count(*), sum(m.value::numeric),
                  min(m.value::float8), max(m.value::float8), min(r.ts), max(r.ts)
             FROM readings r, jsonb_each(r.metrics) AS m GROUP BY 1, 2, 3;
         INSERT INTO rollups_1h (device_id, metric, bucket, count, sum, min, max, first_ts, last_ts)
           SELECT device_id, metric, date_trunc('hour', bucket, 'UTC'), sum(count), sum(sum), min(min),
                  max(max), min(first_ts), max(last_ts)
             FROM rollups_1m GROUP BY 1, 2, 3;
         INSERT INTO rollups_1d (device_id, metric, bucket, count, sum, min, max, first_ts, last_ts)
           SELECT device_id, metric, date_trunc('day', bucket, 'UTC'), sum(count), sum(sum), min(min),
                  max(max), min(first_ts), max(last_ts)
             FROM rollups_1h GROUP BY 1, 2, 3;
         ANALYZE readings; ANALYZE devices; ANALYZE rollups_1m; ANALYZE rollups_1h; ANALYZE rollups_1d;"
    ))
    .expect("fill the database");
}

/// A Pi's readings of the last hour, posted through ingest-http with its token and stored by the
/// persister, as in production.
async fn post_last_hour(ingest: &str, token: &str, db: &TestDb) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let readings: Vec<_> = (1..=6)
        .map(|i| {
            json!({"device_id": DEVICE, "id": format!("hour-{i}"), "ts": now - i * 9 * 60_000,
                   "metrics": {"temperature": 20.0 + i as f64 / 2.0, "humidity": 50 + i}})
        })
        .collect();
    let response = reqwest::Client::new()
        .post(format!("{ingest}/v1/readings"))
        .bearer_auth(token)
        .json(&readings)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    let url = db.url.clone();
    testkit::eventually(Duration::from_secs(30), "the Pi's readings stored", || {
        let url = url.clone();
        async move { (testkit::stored_readings(&url, DEVICE, 10).len() >= 6).then_some(()) }
    })
    .await;
}

/// The dashboard's modules on their own, in Node's test runner (`unit/*.test.mjs`): the live
/// feed's SSE parser on streams cut anywhere, the charts' choice of bucket.
#[tokio::test]
async fn the_dashboards_modules_pass_their_unit_tests() {
    let status = tokio::process::Command::new("node")
        .args(["--test", "unit/"])
        .current_dir(here())
        .status()
        .await
        .expect("run node (Debian's nodejs)");
    assert!(
        status.success(),
        "node --test unit/ in {}",
        here().display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_works_in_chromium_within_its_budgets() {
    assert!(
        Path::new(&chromium()).exists(),
        "{} is missing: apt-get install chromium (scripts/test does)",
        chromium()
    );
    node_modules().await;
    service_kit::telemetry::init_for_tests();

    let db = TestDb::migrated();
    let keys = TestKeys::new();
    keys.record_app_tokens_in(&db.url);
    let device_token = keys.register_device(&db.url, DEVICE);
    let live_token = keys.register_device(&db.url, LIVE_DEVICE);
    fill_database(&db);

    let prefix = AmqpPrefix::new("browser");
    let _persister = spawn::persister(&spawn::persister_settings(&db.url, &prefix)).await;
    let ingest = spawn::ingest_http(&spawn::ingest_http_settings(
        &db.url,
        &prefix,
        &keys.verifying_key_file(),
    ))
    .await;
    let mut settings = spawn::query_api_settings(&db.url, &keys.verifying_key_file());
    settings.http.http_workers = 2;
    // the persister's announcements of what it stored, relayed on GET /v1/live
    settings.bus.amqp_prefix = prefix.to_string();
    let query = spawn::query_api(&settings).await;
    post_last_hour(&ingest.url, &device_token, &db).await;

    let out = here().join("../../target/browser-test");
    let mut node = tokio::process::Command::new("node");
    node.arg(here().join("dashboard.mjs"))
        .current_dir(here())
        .env("DASHBOARD_URL", &query.url)
        .env("INGEST_URL", &ingest.url)
        .env("READER_TOKEN", keys.app_token(Role::Reader))
        .env("OPERATOR_TOKEN", keys.app_token(Role::Operator))
        .env("DEVICE_ID", DEVICE)
        .env("DEVICE_TOKEN", &device_token)
        .env("LIVE_DEVICE_ID", LIVE_DEVICE)
        .env("LIVE_DEVICE_TOKEN", &live_token)
        .env("YEAR_DEVICE_ID", YEAR_DEVICE)
        .env("FLEET_SIZE", FLEET_SIZE.to_string())
        .env("OUT_DIR", &out)
        .env("CHROMIUM", chromium())
        // a group of its own, so that Chromium goes with it if it must be stopped
        .process_group(0);
    // its output goes straight to the test's: what it checks, then the budgets (cargo test shows
    // a passing test's output with --nocapture; the report is also kept in OUT_DIR/report.txt)
    let mut child = node.spawn().expect("run node (Debian's nodejs)");
    let status = match tokio::time::timeout(Duration::from_secs(300), child.wait()).await {
        Ok(status) => status.expect("wait for node"),
        Err(_) => {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pid}")])
                    .status();
            }
            panic!("the browser test did not finish within 5 minutes");
        }
    };
    assert!(
        status.success(),
        "the browser test failed (report above, screenshots in {})",
        out.display()
    );
}
