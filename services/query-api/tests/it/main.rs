//! query-api over a known data set in a real PostgreSQL: exact rows, pages and buckets.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first thing that is not as it must be"
)]

use chrono::{DateTime, Duration, Utc};
use models::{DeviceId, MetricName, Metrics, Reading, ReadingId};
use serde_json::{Value, json};
use testkit::spawn;
use testkit::{TestDb, TestKeys};

mod commands;
mod dashboard;
mod input;
mod live;
mod openapi;
mod reads;
mod retention;
mod security;
mod tokens;

struct Api {
    url: String,
    /// query-api itself, stopped with the test.
    _running: spawn::Running,
    client: reqwest::Client,
    keys: TestKeys,
    reader: String,
    db: TestDb,
}

fn t0() -> DateTime<Utc> {
    models::parse_timestamp_rfc3339("2026-11-24T00:00:00Z").unwrap()
}

fn reading(device: &str, id: &str, ts: DateTime<Utc>, metrics: &[(&str, f64)]) -> Reading {
    let metrics = metrics
        .iter()
        .map(|(n, v)| (MetricName::parse(*n).unwrap(), *v))
        .collect();
    Reading::new(
        DeviceId::parse(device).unwrap(),
        ReadingId::parse(id).unwrap(),
        ts,
        Metrics::new(metrics).unwrap(),
    )
    .unwrap()
}

/// pi-1: 250 readings a minute apart from t0, `t` = i, every 10th also `h` = 100 + i.
/// pi-2: one reading. dev-000..dev-004: one reading each.
async fn api_with_data() -> Api {
    api_with_data_and(|_| {}).await
}

/// [`api_with_data`], with `adjust` changing settings before query-api starts.
async fn api_with_data_and(adjust: impl FnOnce(&mut query_api::Settings)) -> Api {
    service_kit::telemetry::init_for_tests();
    let db = TestDb::migrated();
    let mut batch: Vec<Reading> = (0..250)
        .map(|i| {
            let ts = t0() + Duration::minutes(i);
            if i % 10 == 0 {
                reading(
                    "pi-1",
                    &format!("r{i:03}"),
                    ts,
                    &[("t", i as f64), ("h", 100.0 + i as f64)],
                )
            } else {
                reading("pi-1", &format!("r{i:03}"), ts, &[("t", i as f64)])
            }
        })
        .collect();
    batch.push(reading("pi-2", "only", t0(), &[("co2", 415.0)]));
    batch.extend((0..5).map(|i| reading(&format!("dev-{i:03}"), "x", t0(), &[("v", 1.0)])));
    store::write_readings(&mut db.connect(), &batch, &mut Default::default()).unwrap();

    start(db, adjust).await
}

/// query-api on a migrated database of its own, without data; `adjust` changes settings before it
/// starts.
async fn start_empty(adjust: impl FnOnce(&mut query_api::Settings)) -> Api {
    start(TestDb::migrated(), adjust).await
}

/// query-api on `db`, with its own keys; `adjust` changes settings before it starts.
async fn start(db: TestDb, adjust: impl FnOnce(&mut query_api::Settings)) -> Api {
    let keys = TestKeys::new();
    keys.record_app_tokens_in(&db.url);
    let mut settings = spawn::query_api_settings(&db.url, &keys.verifying_key_file());
    adjust(&mut settings);
    let running = spawn::query_api(&settings).await;
    let reader = keys.app_token(auth::Role::Reader);
    Api {
        url: running.url.clone(),
        _running: running,
        client: reqwest::Client::new(),
        keys,
        reader,
        db,
    }
}

impl Api {
    async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .client
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.reader)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    async fn ok(&self, path: &str) -> Value {
        let (status, body) = self.get(path).await;
        assert_eq!(status, 200, "{path}: {body}");
        body
    }
}

fn ids(page: &Value) -> Vec<String> {
    page["readings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn readings_come_newest_first_in_pages_that_end_exactly() {
    let api = api_with_data().await;
    let first = api.ok("/v1/devices/pi-1/readings").await;
    assert_eq!(ids(&first).len(), 100, "default limit");
    assert_eq!(ids(&first)[0], "r249");
    assert_eq!(first["readings"][0]["ts"], "2026-11-24T04:09:00Z");

    // walk everything in pages of 100: 100 + 100 + 50, and the last page says so
    let mut all = ids(&first);
    let mut cursor = first["next_cursor"].as_str().unwrap().to_owned();
    loop {
        let page = api
            .ok(&format!("/v1/devices/pi-1/readings?cursor={cursor}"))
            .await;
        all.extend(ids(&page));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => break,
        }
    }
    let expected: Vec<String> = (0..250).rev().map(|i| format!("r{i:03}")).collect();
    assert_eq!(all, expected);

    // a page that ends exactly at the last reading has no next cursor
    let exact = api.ok("/v1/devices/pi-1/readings?limit=250").await;
    assert_eq!(exact["next_cursor"], Value::Null);
    let one_short = api.ok("/v1/devices/pi-1/readings?limit=249").await;
    assert!(one_short["next_cursor"].is_string());
}

#[tokio::test]
async fn readings_filter_by_time_range_and_metric() {
    let api = api_with_data().await;
    // [00:10, 00:20): ten readings, 19 down to 10
    let page = api
        .ok("/v1/devices/pi-1/readings?from=2026-11-24T00:10:00Z&to=2026-11-24T00:20:00Z")
        .await;
    assert_eq!(
        ids(&page),
        (10..20)
            .rev()
            .map(|i| format!("r{i:03}"))
            .collect::<Vec<_>>()
    );
    // epoch milliseconds work too, and an unencoded +00:00 offset
    let from_ms = (t0() + Duration::minutes(10)).timestamp_millis();
    let page = api
        .ok(&format!(
            "/v1/devices/pi-1/readings?from={from_ms}&to=2026-11-24T00:20:00+00:00"
        ))
        .await;
    assert_eq!(ids(&page).len(), 10);
    // metric=h: only the 25 readings with h, showing only h
    let page = api
        .ok("/v1/devices/pi-1/readings?metric=h&limit=1000")
        .await;
    assert_eq!(ids(&page).len(), 25);
    assert_eq!(page["readings"][0]["metrics"], json!({"h": 340.0}));
}

#[tokio::test]
async fn devices_are_listed_with_their_metrics_in_pages() {
    let api = api_with_data().await;
    let all = api.ok("/v1/devices").await;
    let names: Vec<&str> = all["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "dev-000", "dev-001", "dev-002", "dev-003", "dev-004", "pi-1", "pi-2"
        ]
    );
    let pi1 = &all["devices"][5];
    assert_eq!(pi1["metrics"], json!(["h", "t"]));
    assert_eq!(pi1["first_seen"], "2026-11-24T00:00:00Z");
    assert_eq!(pi1["last_seen"], "2026-11-24T04:09:00Z");

    let page1 = api.ok("/v1/devices?limit=3").await;
    assert_eq!(page1["devices"].as_array().unwrap().len(), 3);
    let cursor = page1["next_cursor"].as_str().unwrap();
    let page2 = api
        .ok(&format!("/v1/devices?limit=4&cursor={cursor}"))
        .await;
    assert_eq!(page2["devices"][0]["device_id"], "dev-003");
    assert_eq!(page2["next_cursor"], Value::Null);

    assert_eq!(api.ok("/v1/devices/pi-2").await["metrics"], json!(["co2"]));
}

/// What the dashboard's fleet page asks: a search by part of the id, each device's latest values,
/// and whether it is online.
#[tokio::test]
async fn devices_are_found_by_part_of_their_id_with_latest_values_and_online_state() {
    let api = api_with_data().await;
    let ids = |page: &Value| -> Vec<String> {
        page["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["device_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let found = api.ok("/v1/devices?q=DEV-00&limit=2").await;
    assert_eq!(
        ids(&found),
        ["dev-000", "dev-001"],
        "ignoring case, in pages"
    );
    let cursor = found["next_cursor"].as_str().unwrap();
    let rest = api
        .ok(&format!("/v1/devices?q=DEV-00&cursor={cursor}"))
        .await;
    assert_eq!(ids(&rest), ["dev-002", "dev-003", "dev-004"]);
    assert_eq!(ids(&api.ok("/v1/devices?q=1").await), ["dev-001", "pi-1"]);
    // `_` and `.` are the id's own characters, not patterns
    assert!(ids(&api.ok("/v1/devices?q=_").await).is_empty());
    assert!(ids(&api.ok("/v1/devices?q=pi.").await).is_empty());

    let fleet = api.ok("/v1/devices?q=pi-&latest=true").await;
    assert_eq!(fleet["offline_after_secs"], 300);
    assert_eq!(
        fleet["devices"][0]["latest"],
        json!([
            {"metric": "h", "ts": "2026-11-24T04:00:00Z", "value": 340.0},
            {"metric": "t", "ts": "2026-11-24T04:09:00Z", "value": 249.0},
        ])
    );
    assert_eq!(
        fleet["devices"][1]["latest"],
        json!([{"metric": "co2", "ts": "2026-11-24T00:00:00Z", "value": 415.0}])
    );
    assert_eq!(
        fleet["devices"][0]["online"], false,
        "silent since 2026-11-24"
    );
    assert!(
        api.ok("/v1/devices").await["devices"][0]
            .get("latest")
            .is_none(),
        "latest values only when asked for"
    );

    // a device that sent a moment ago is online
    let now = chrono::SubsecRound::trunc_subsecs(Utc::now(), 6);
    store::write_readings(
        &mut api.db.connect(),
        &[reading("pi-now", "x", now, &[("v", 1.0)])],
        &mut Default::default(),
    )
    .unwrap();
    assert_eq!(api.ok("/v1/devices/pi-now").await["online"], true);

    for bad in ["q=%25", "q=a%20b", "latest=yes", "latest=true&limit=1001"] {
        let (status, body) = api.get(&format!("/v1/devices?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
}

#[tokio::test]
async fn latest_gives_each_metrics_newest_value() {
    let api = api_with_data().await;
    let latest = api.ok("/v1/devices/pi-1/latest").await;
    assert_eq!(
        latest["metrics"],
        json!({
            "t": {"value": 249.0, "ts": "2026-11-24T04:09:00Z"},
            "h": {"value": 340.0, "ts": "2026-11-24T04:00:00Z"},
        })
    );
}

#[tokio::test]
async fn series_buckets_are_computed_exactly() {
    let api = api_with_data().await;
    let base = "/v1/devices/pi-1/series?metric=t&from=2026-11-24T00:00:00Z&to=2026-11-24T02:00:00Z";
    let hourly = api.ok(&format!("{base}&bucket=1h&agg=avg")).await;
    // hour 0: t = 0..59 → avg 29.5; hour 1: 60..119 → 89.5
    assert_eq!(
        hourly["points"],
        json!([{"ts": "2026-11-24T00:00:00Z", "value": 29.5}, {"ts": "2026-11-24T01:00:00Z", "value": 89.5}])
    );
    let sums = api.ok(&format!("{base}&bucket=30m&agg=sum")).await;
    let values: Vec<f64> = sums["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["value"].as_f64().unwrap())
        .collect();
    // 0..29, 30..59, 60..89, 90..119
    assert_eq!(values, [435.0, 1335.0, 2235.0, 3135.0]);
    let counts = api.ok(&format!("{base}&bucket=1d&agg=count")).await;
    assert_eq!(
        counts["points"],
        json!([{"ts": "2026-11-24T00:00:00Z", "value": 120.0}])
    );
    // several aggregates from one pass: the same numbers, by name, `value` the first's
    let band = api.ok(&format!("{base}&bucket=1h&agg=min,max,avg")).await;
    assert_eq!(
        band["points"],
        json!([
            {"ts": "2026-11-24T00:00:00Z", "value": 0.0,
             "values": {"min": 0.0, "max": 59.0, "avg": 29.5}},
            {"ts": "2026-11-24T01:00:00Z", "value": 60.0,
             "values": {"min": 60.0, "max": 119.0, "avg": 89.5}},
        ])
    );
    assert_eq!(band["agg"], "min,max,avg");
    let max_h = api.ok("/v1/devices/pi-1/series?metric=h&from=2026-11-24T00:00:00Z&to=2026-11-25T00:00:00Z&bucket=1d&agg=max").await;
    assert_eq!(max_h["points"][0]["value"], 340.0);
    let min_10m = api.ok(&format!("{base}&bucket=10m&agg=min")).await;
    assert_eq!(min_10m["points"].as_array().unwrap().len(), 12);
    assert_eq!(min_10m["points"][11]["value"], 110.0);
    // a week starts on Monday (ISO 8601): Tuesday 2026-11-24's readings are in the week of the 23rd
    let weekly = api
        .ok("/v1/devices/pi-1/series?metric=t&from=2026-11-16T00:00:00Z&to=2026-12-07T00:00:00Z&bucket=1w&agg=count")
        .await;
    assert_eq!(
        weekly["points"],
        json!([{"ts": "2026-11-23T00:00:00Z", "value": 250.0}])
    );
}

#[tokio::test]
async fn unknown_devices_are_404_and_bad_parameters_400_in_one_shape() {
    let api = api_with_data().await;
    for path in [
        "/v1/devices/nobody",
        "/v1/devices/nobody/readings",
        "/v1/devices/nobody/latest",
        "/v1/devices/nobody/series?metric=t",
    ] {
        let (status, body) = api.get(path).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(body["error"], "not_found");
    }
    let cases = [
        ("/v1/devices/pi-1/readings?limit=0", "limit"),
        ("/v1/devices/pi-1/readings?limit=10001", "limit"),
        ("/v1/devices/pi-1/readings?limit=many", "limit"),
        ("/v1/devices/pi-1/readings?from=yesterday", "from"),
        ("/v1/devices/pi-1/readings?to=later", "to"),
        ("/v1/devices/pi-1/readings?cursor=forged", "cursor"),
        ("/v1/devices/pi-1/readings?metric=a%20b", "metric"),
        ("/v1/devices?cursor=%25%25", "cursor"),
        ("/v1/devices/pi-1/series", "metric"),
        ("/v1/devices/pi-1/series?metric=t&bucket=1y", "bucket"),
        (
            "/v1/devices/pi-1/series?metric=t&bucket=1s&from=2026-01-01T00:00:00Z",
            "bucket",
        ),
        ("/v1/devices/pi-1/series?metric=t&agg=median", "agg"),
        (
            "/v1/devices/pi-1/series?metric=t&from=2026-11-25T00:00:00Z&to=2026-11-24T00:00:00Z",
            "from",
        ),
    ];
    for (path, field) in cases {
        let (status, body) = api.get(path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"], "invalid_input", "{path}");
        assert_eq!(body["field"], field, "{path}: {body}");
    }
}

#[tokio::test]
async fn the_openapi_description_lists_exactly_the_served_routes() {
    let api = api_with_data().await;
    let doc = api.ok("/openapi.json").await;
    let paths: Vec<&String> = doc["paths"].as_object().unwrap().keys().collect();
    assert_eq!(
        paths,
        [
            "/healthz",
            "/metrics",
            "/openapi.json",
            "/readyz",
            "/v1/commands/{id}",
            "/v1/devices",
            "/v1/devices/{id}",
            "/v1/devices/{id}/commands",
            "/v1/devices/{id}/latest",
            "/v1/devices/{id}/readings",
            "/v1/devices/{id}/series",
            "/v1/live",
            "/v1/me",
            "/v1/retention",
            "/v1/tokens",
            "/v1/tokens/{id}"
        ]
    );
    // every documented read of the API is served (to an admin: the token list is for admins
    // only); the ops endpoints are checked with the description's other claims (openapi.rs)
    let admin = api.keys.app_token(auth::Role::Admin);
    let (status, _, command) = api
        .call(
            reqwest::Method::POST,
            "/v1/devices/pi-1/commands",
            Some(&admin),
            Some(json!({"name": "led"})),
        )
        .await;
    assert_eq!(status, 201, "{command}");
    // (the live stream never ends: live.rs reads it)
    for path in paths.iter().filter(|p| {
        p.starts_with("/v1/")
            && p.as_str() != "/v1/live"
            && doc["paths"][p.as_str()].get("get").is_some()
    }) {
        let id = match path.starts_with("/v1/commands/") {
            true => command["id"].as_str().unwrap(),
            false => "pi-1",
        };
        let served = path.replace("{id}", id) + "?metric=t";
        let (status, _, body) = api
            .call(reqwest::Method::GET, &served, Some(&admin), None)
            .await;
        assert_eq!(
            status, 200,
            "{path} is documented but {served} answers {body}"
        );
    }
}

/// `Accept: text/csv`: the whole range, newest first, a column per metric, streamed in pages (the
/// device here has more readings than one page holds), ids quoted; 404 for an unknown device.
#[tokio::test]
async fn readings_download_as_csv_over_many_pages() {
    service_kit::telemetry::init_for_tests();
    let db = TestDb::migrated();
    let mut batch: Vec<Reading> = (0..12_001)
        .map(|i| {
            let ts = t0() + Duration::seconds(i);
            if i % 2 == 0 {
                reading("pi-c", &format!("c{i:05}"), ts, &[("t", i as f64 + 0.5)])
            } else {
                reading(
                    "pi-c",
                    &format!("c{i:05}"),
                    ts,
                    &[("t", 1.0), ("h", -(i as f64))],
                )
            }
        })
        .collect();
    batch.push(reading(
        "pi-c",
        "a,\"quoted\"",
        t0() - Duration::days(1),
        &[("t", 7.0)],
    ));
    store::write_readings(&mut db.connect(), &batch, &mut Default::default()).unwrap();
    let api = start(db, |_| {}).await;
    let csv = |path: &str| {
        api.client
            .get(format!("{}{path}", api.url))
            .bearer_auth(&api.reader)
            .header("Accept", "text/csv")
            .send()
    };

    let response = csv("/v1/devices/pi-c/readings").await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/csv; charset=utf-8"
    );
    let text = response.text().await.unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "ts,id,h,t", "every metric the device sent");
    assert_eq!(lines.len(), 1 + 12_002, "a row per reading, across pages");
    assert_eq!(lines[1], "2026-11-24T03:20:00Z,\"c12000\",,12000.5");
    assert_eq!(lines[2], "2026-11-24T03:19:59Z,\"c11999\",-11999,1");
    assert_eq!(
        lines[12_002],
        "2026-11-23T00:00:00Z,\"a,\"\"quoted\"\"\",,7"
    );

    let from_to = "?from=2026-11-24T00:00:00Z&to=2026-11-24T00:00:03Z&metric=h";
    let text = csv(&format!("/v1/devices/pi-c/readings{from_to}"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        text, "ts,id,h\n2026-11-24T00:00:01Z,\"c00001\",-1\n",
        "the range, and only readings with the metric asked for"
    );
    assert_eq!(
        csv("/v1/devices/nobody/readings").await.unwrap().status(),
        404
    );
    let json = api.ok("/v1/devices/pi-c/readings?limit=1").await;
    assert_eq!(ids(&json), ["c12000"], "JSON unless CSV is asked for");
}

/// query-api's metrics carry the `sensorhub_` prefix, and its readiness is one of them (what the
/// not-ready alert watches).
#[tokio::test]
async fn its_metrics_carry_the_prefix_and_its_readiness() {
    let api = start_empty(|_| {}).await;
    let text = testkit::get_text(&api.client, &format!("{}/metrics", api.url)).await;
    testkit::assert_fresh_metrics(&text, &["sensorhub_live_streams".to_owned()]);
    assert!(
        testkit::sample_names(&text).contains("sensorhub_http_requests_total"),
        "{text}"
    );
}
