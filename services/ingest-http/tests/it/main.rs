//! ingest-http driven as a Pi drives it, against real RabbitMQ and PostgreSQL, with the persister
//! and query-api running beside it for the round trips.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first thing that is not as it must be"
)]

mod commands;
mod connections;
mod input;
mod openapi;
mod registry;
mod security;
mod ws;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Value, json};
use testkit::spawn::{self, Running};
use testkit::{AmqpPrefix, TcpProxy, TestDb, TestKeys, count_rows, eventually};

const WAIT: Duration = Duration::from_secs(60);
/// How often ingest-http re-reads the device registry in these tests.
const REGISTRY_REFRESH: Duration = Duration::from_millis(200);

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A valid reading of `device`, always the same one.
fn reading(device: &str) -> Value {
    json!({"device_id": device, "id": "x", "ts": 1_795_000_000_000u64, "temperature": 21.5})
}

/// One test's stack: its own database and queue names (deleted when it is dropped); services
/// started on demand on free ports.
struct Stack {
    db: TestDb,
    prefix: AmqpPrefix,
    client: reqwest::Client,
    keys: TestKeys,
    /// Registered devices' tokens.
    tokens: Mutex<HashMap<String, String>>,
}

type Ingest = Running;

impl Stack {
    fn new() -> Self {
        service_kit::telemetry::init_for_tests();
        let db = TestDb::migrated();
        let keys = TestKeys::new();
        keys.record_app_tokens_in(&db.url);
        Self {
            db,
            prefix: AmqpPrefix::new("ingest-test"),
            client: reqwest::Client::new(),
            keys,
            tokens: Mutex::new(HashMap::new()),
        }
    }

    /// The token of `device`, registered on first use: ingest-http lets a device in right after
    /// it is added (it asks the registry about a token it does not know), so no wait.
    async fn token(&self, device: &str) -> String {
        if let Some(token) = self.tokens.lock().unwrap().get(device) {
            return token.clone();
        }
        let token = self.keys.register_device(&self.db.url, device);
        self.tokens
            .lock()
            .unwrap()
            .insert(device.to_owned(), token.clone());
        token
    }

    async fn ingest_via(&self, amqp_url: String) -> Ingest {
        self.ingest_with(|s| s.bus.amqp_url = amqp_url).await
    }

    /// ingest-http with this stack's keys and database; `adjust` changes settings first.
    async fn ingest_with(&self, adjust: impl FnOnce(&mut ingest_http::Settings)) -> Ingest {
        let mut settings = spawn::ingest_http_settings(
            &self.db.url,
            &self.prefix,
            &self.keys.verifying_key_file(),
        );
        settings.auth_refresh_ms = REGISTRY_REFRESH.as_millis() as u64;
        settings.max_body_bytes = 256 * 1024;
        adjust(&mut settings);
        spawn::ingest_http(&settings).await
    }

    async fn ingest(&self) -> Ingest {
        self.ingest_via(testkit::amqp_url()).await
    }

    /// The persister, stopped when the returned value is dropped.
    async fn persister(&self) -> Running {
        spawn::persister(&spawn::persister_settings(&self.db.url, &self.prefix)).await
    }

    async fn query_api(&self) -> Running {
        spawn::query_api(&spawn::query_api_settings(
            &self.db.url,
            &self.keys.verifying_key_file(),
        ))
        .await
    }

    /// Posts as the device the body names (its first reading's), with that device's token.
    async fn post(&self, url: String, body: Value) -> (u16, Value) {
        let named = |v: &Value| {
            v.get("device_id")
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let device = named(&body)
            .or_else(|| body.get(0).and_then(named))
            .filter(|d| models::DeviceId::parse(d.as_str()).is_ok())
            .unwrap_or_else(|| "a".to_owned());
        let token = self.token(&device).await;
        self.post_with(url, Some(&token), body).await
    }

    async fn post_with(&self, url: String, token: Option<&str>, body: Value) -> (u16, Value) {
        let mut request = self.client.post(url).json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The status of [`Stack::post_with`].
    async fn post_status(&self, url: String, token: Option<&str>, body: Value) -> u16 {
        self.post_with(url, token, body).await.0
    }

    /// The status of posting `body` as it is, of `content_type`, to `url` as `device` (with its
    /// token).
    async fn post_raw(
        &self,
        url: &str,
        device: &str,
        content_type: &str,
        body: &'static str,
    ) -> u16 {
        self.client
            .post(url)
            .bearer_auth(self.token(device).await)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// The status of posting [`reading`]`(device)` to `url` with `token`.
    async fn post_reading(&self, url: &str, token: &str, device: &str) -> u16 {
        self.post_status(url.to_owned(), Some(token), reading(device))
            .await
    }

    async fn get(&self, url: String) -> Value {
        let reader = self.keys.app_token(auth::Role::Reader);
        testkit::get_json(&self.client, &url, &reader).await
    }

    fn stored(&self) -> i64 {
        count_rows(&self.db.url, "readings")
    }

    async fn wait_stored(&self, n: i64) {
        testkit::wait_for_exactly(&self.db.url, "readings", n, WAIT).await;
    }

    /// Messages waiting in this test's readings queue.
    async fn queued_messages(&self) -> u32 {
        testkit::queued_messages(&self.prefix).await
    }
}

#[tokio::test]
async fn the_seed_snippet_is_stored_and_read_back_through_query_api() {
    let stack = Stack::new();
    let ingest = stack.ingest().await;
    let _persister = stack.persister().await;
    let query = stack.query_api().await;

    // requests.post(url, json={"device_id": "raspi-01", "temperature": 25.5, "humidity": 60.3})
    let (status, body) = stack
        .post(
            format!("{}/data", ingest.url),
            json!({"device_id": "raspi-01", "temperature": 25.5, "humidity": 60.3}),
        )
        .await;
    assert_eq!((status, body), (200, json!({"status": "success"})));

    let page = eventually(WAIT, "the reading in query-api", || async {
        let page = stack
            .get(format!("{}/v1/devices/raspi-01/readings", query.url))
            .await;
        (page["readings"].as_array().map_or(0, Vec::len) == 1).then_some(page)
    })
    .await;
    assert_eq!(
        page["readings"][0]["metrics"],
        json!({"temperature": 25.5, "humidity": 60.3})
    );
    assert_eq!(page["next_cursor"], Value::Null);
    let latest = stack
        .get(format!("{}/v1/devices/raspi-01/latest", query.url))
        .await;
    assert_eq!(latest["metrics"]["humidity"]["value"], json!(60.3));
    let devices = stack.get(format!("{}/v1/devices", query.url)).await;
    assert_eq!(
        devices["devices"][0]["metrics"],
        json!(["humidity", "temperature"])
    );

    ingest.stop().await;
}

#[tokio::test]
async fn batches_are_stored_exactly_and_a_retried_reading_once() {
    let stack = Stack::new();
    let ingest = stack.ingest().await;
    let _persister = stack.persister().await;
    let batch: Vec<Value> = (0..1000)
        .map(|i| {
            json!({"device_id": format!("pi-{}", i % 10), "id": format!("r{i}"),
                   "ts": 1_795_000_000_000u64 + i, "metrics": {"t": i as f64 / 4.0, "n": -(i as f64)}})
        })
        .collect();
    // each device sends its own 100 (a device token writes only as its device)
    for d in 0..10 {
        let own: Vec<Value> = batch.iter().skip(d).step_by(10).cloned().collect();
        let (status, body) = stack
            .post(format!("{}/v1/readings", ingest.url), Value::Array(own))
            .await;
        assert_eq!((status, body), (202, json!({"accepted": 100})));
    }
    // a device did not hear the answer and sends some again, same ids and times
    let again: Vec<Value> = batch.iter().step_by(10).take(50).cloned().collect();
    let (status, _) = stack
        .post(format!("{}/v1/readings", ingest.url), Value::Array(again))
        .await;
    assert_eq!(status, 202);
    let (status, _) = stack
        .post(format!("{}/v1/readings", ingest.url), batch[7].clone())
        .await;
    assert_eq!(status, 202);
    stack.wait_stored(1000).await;
    let page = testkit::stored_readings(&stack.db.url, "pi-7", 1);
    assert_eq!(page[0].reading_id, "r997");
    assert_eq!(page[0].metrics, json!({"t": 249.25, "n": -997.0}));
    assert_eq!(page[0].ts.timestamp_millis(), 1_795_000_000_997);
    ingest.stop().await;
}

#[tokio::test]
async fn a_reading_retried_without_a_time_is_stored_once_and_a_changed_one_kept_as_a_conflict() {
    let stack = Stack::new();
    let ingest = stack.ingest().await;
    let _persister = stack.persister().await;
    // a Pi that sends an id and no ts, and retries: each attempt is stamped anew by the server
    let seed = json!({"device_id": "pi-r", "id": "pi-r-1", "temperature": 20.5});
    for _ in 0..3 {
        let (status, _) = stack
            .post(format!("{}/data", ingest.url), seed.clone())
            .await;
        assert_eq!(status, 200);
    }
    let structured = json!({"device_id": "pi-r", "id": "pi-r-1", "metrics": {"temperature": 20.5}});
    let (status, _) = stack
        .post(format!("{}/v1/readings", ingest.url), structured)
        .await;
    assert_eq!(status, 202);
    // the same id with another value: acknowledged, not stored over the first, kept for an operator
    let changed = json!({"device_id": "pi-r", "id": "pi-r-1", "temperature": 99.0});
    let (status, _) = stack.post(format!("{}/data", ingest.url), changed).await;
    assert_eq!(status, 200);
    testkit::wait_for_exactly(&stack.db.url, "reading_conflicts", 1, WAIT).await;
    assert_eq!(stack.stored(), 1);
    let page = testkit::stored_readings(&stack.db.url, "pi-r", 10);
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].metrics, json!({"temperature": 20.5}));
    ingest.stop().await;
}

#[tokio::test]
async fn every_invalid_request_is_refused_with_its_field_and_nothing_is_queued() {
    let stack = Stack::new();
    let ingest = stack.ingest().await;
    let data = format!("{}/data", ingest.url);
    let readings = format!("{}/v1/readings", ingest.url);
    let future = (chrono::Utc::now() + chrono::Duration::minutes(6)).to_rfc3339();
    let many: Vec<Value> = (0..1001)
        .map(|_| json!({"device_id": "a", "metrics": {"t": 1}}))
        .collect();
    let cases: Vec<(&str, Value, &str)> = vec![
        (&data, json!({"temperature": 1}), "device_id"),
        (&data, json!({"device_id": "", "t": 1}), "device_id"),
        (
            &data,
            json!({"device_id": "x".repeat(65), "t": 1}),
            "device_id",
        ),
        (&data, json!({"device_id": "bad/id", "t": 1}), "device_id"),
        (&data, json!({"device_id": "a"}), "body"),
        (
            &data,
            json!({"device_id": "a", "temperature": "hot"}),
            "temperature",
        ),
        (&data, json!({"device_id": "a", "bad name": 1}), "bad name"),
        (&data, json!({"device_id": "a", "t": 1, "ts": future}), "ts"),
        (&data, json!({"device_id": "a", "t": 1, "ts": "noon"}), "ts"),
        (&data, json!({"device_id": "a", "t": 1, "ts": 0}), "ts"),
        (
            &data,
            json!({"device_id": "a", "t": 1, "id": "x".repeat(65)}),
            "id",
        ),
        (&data, json!([1, 2]), "body"),
        (
            &readings,
            json!({"device_id": "a", "metrics": {}}),
            "metrics",
        ),
        (&readings, json!({"device_id": "a"}), "metrics"),
        (
            &readings,
            json!({"device_id": "a", "metrics": {"t": null}}),
            "metrics.t",
        ),
        (
            &readings,
            json!({"device_id": "a", "metrics": {"t": 1}, "extra": 1}),
            "extra",
        ),
        (
            &readings,
            json!([{"device_id": "a", "metrics": {"t": 1}}, {"device_id": "a", "metrics": {"t": true}}]),
            "[1].metrics.t",
        ),
        (&readings, json!([]), "body"),
        (&readings, Value::Array(many), "body"),
    ];
    for (url, body, field) in cases {
        let (status, answer) = stack.post(url.to_owned(), body.clone()).await;
        assert_eq!(status, 400, "{body} -> {answer}");
        assert_eq!(answer["error"], "invalid_input", "{answer}");
        assert_eq!(answer["field"], field, "{body} -> {answer}");
    }

    let too_big = json!({"device_id": "a", "t": 1, "pad": "x".repeat(300 * 1024)});
    let (status, answer) = stack.post(data.clone(), too_big).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (413, Some("payload_too_large"))
    );

    let form = "application/x-www-form-urlencoded";
    assert_eq!(
        stack.post_raw(&data, "a", form, "device_id=a&t=1").await,
        415
    );
    assert_eq!(
        stack
            .post_raw(&data, "a", "application/json", "{oops")
            .await,
        400
    );

    assert_eq!(
        stack.queued_messages().await,
        0,
        "nothing invalid reaches the queue"
    );
    let metrics = ingest.metrics().await;
    assert!(
        metrics.contains(
            "sensorhub_requests_rejected_total{endpoint=\"/data\",reason=\"invalid\"} 13"
        ),
        "{metrics}"
    );
    ingest.stop().await;
}

/// PostgreSQL going away must not stop ingest (readings wait in RabbitMQ): readiness fails only
/// once the device registry has not been re-read for AUTH_REGISTRY_MAX_AGE_SECS.
#[tokio::test]
async fn a_database_outage_does_not_stop_ingest_until_the_registry_is_too_old() {
    let stack = Stack::new();
    let token = stack.token("raspi-01").await;
    let (user, rest) = stack.db.url.split_once('@').unwrap();
    let (server, database) = rest.split_once('/').unwrap();
    let proxy = TcpProxy::start(server).await;
    let via_proxy = format!("{user}@127.0.0.1:{}/{database}", proxy.port);
    let patient = stack
        .ingest_with(|s| s.database_url = via_proxy.clone())
        .await;
    let strict = stack
        .ingest_with(|s| {
            s.database_url = via_proxy.clone();
            s.auth_registry_max_age_secs = 1; // raised to 5 refreshes + 5 s
        })
        .await;
    proxy.cut();
    let readiness = |url: &str| {
        let request = stack.client.get(format!("{url}/readyz")).send();
        async move { request.await.unwrap().status().as_u16() }
    };
    eventually(
        WAIT,
        "the strict one to give up on its registry",
        || async { (readiness(&strict.url).await == 503).then_some(()) },
    )
    .await;
    assert_eq!(readiness(&patient.url).await, 200);
    let reading =
        json!({"device_id": "raspi-01", "id": "during-outage", "ts": 1_795_000_000_000u64, "t": 1});
    assert_eq!(
        stack
            .post_status(format!("{}/data", patient.url), Some(&token), reading)
            .await,
        200,
        "a known device is still accepted while the database is away"
    );
    proxy.restore();
    eventually(WAIT, "ready again once the registry is read", || async {
        (readiness(&strict.url).await == 200).then_some(())
    })
    .await;
    patient.stop().await;
    strict.stop().await;
}

#[tokio::test]
async fn a_broker_that_is_down_gets_503_and_no_acknowledged_reading_is_lost() {
    let stack = Stack::new();
    let proxy = TcpProxy::start("127.0.0.1:5672").await;
    let ingest = stack.ingest_via(proxy.amqp_url()).await;
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    for i in 0..120 {
        if i == 40 {
            proxy.cut();
        }
        if i == 80 {
            proxy.restore();
            // the publisher reconnects with backoff; ingest answers 503 until then
        }
        let id = format!("r{i}");
        let response = stack
            .client
            .post(format!("{}/data", ingest.url))
            .bearer_auth(stack.token("raspi-01").await)
            .json(
                &json!({"device_id": "raspi-01", "id": id, "ts": 1_795_000_000_000u64 + i, "t": i}),
            )
            .send()
            .await
            .unwrap();
        match response.status().as_u16() {
            200 => acknowledged.push(id),
            503 => {
                assert!(response.headers().contains_key("retry-after"));
                refused += 1;
            }
            other => panic!("unexpected status {other}"),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(refused >= 10, "the outage was seen ({refused} refused)");
    assert!(
        acknowledged.len() >= 40,
        "service resumed ({} acknowledged)",
        acknowledged.len()
    );
    let _persister = stack.persister().await;
    let acked = acknowledged.len() as i64;
    testkit::wait_for_rows(&stack.db.url, "readings", acked, WAIT).await;
    let stored = testkit::stored_readings(&stack.db.url, "raspi-01", 1000);
    for id in &acknowledged {
        assert!(
            stored.iter().any(|r| &r.reading_id == id),
            "acknowledged reading {id} was lost"
        );
    }
    ingest.stop().await;
}

#[tokio::test]
async fn the_openapi_description_lists_exactly_the_served_routes() {
    let stack = Stack::new();
    let ingest = stack.ingest().await;
    let doc = stack.get(format!("{}/openapi.json", ingest.url)).await;
    let paths: Vec<&String> = doc["paths"].as_object().unwrap().keys().collect();
    assert_eq!(
        paths,
        [
            "/data",
            "/healthz",
            "/metrics",
            "/openapi.json",
            "/readyz",
            "/v1/commands/next",
            "/v1/commands/{id}/result",
            "/v1/readings",
            "/v1/ws"
        ]
    );
    // the ops endpoints are checked with the description's other claims (openapi.rs)
    for path in paths
        .into_iter()
        .filter(|p| *p == "/data" || p.starts_with("/v1/"))
    {
        let methods: Vec<&String> = doc["paths"][path].as_object().unwrap().keys().collect();
        let expected = if path == "/v1/commands/next" || path == "/v1/ws" {
            "get"
        } else {
            "post"
        };
        assert_eq!(methods, [expected]);
        // served: a bad body (or query, or handshake) is this route's 400, not the unknown-route 404
        let url = format!("{}{}", ingest.url, path.replace("{id}", "c-1"));
        let (status, answer) = if expected == "get" {
            let token = stack.token("a").await;
            let response = stack
                .client
                .get(format!("{url}?wait=never"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), response.json().await.unwrap())
        } else {
            stack.post(url, json!(null)).await
        };
        assert_eq!(status, 400, "{path}: {answer}");
    }
    ingest.stop().await;
}

/// What an operator alerts on exists from start-up at 0, so an alert on the first increase fires
/// at the first refusal or failed publish; every name carries the `sensorhub_` prefix.
#[tokio::test]
async fn every_watched_counter_is_exported_at_zero_from_the_start() {
    let stack = Stack::new();
    let ingest = stack.ingest().await;
    let text = ingest.metrics().await;
    let mut series = Vec::new();
    for endpoint in ["/data", "/v1/readings", "/v1/ws"] {
        series.push(format!(
            "sensorhub_readings_accepted_total{{endpoint=\"{endpoint}\"}}"
        ));
    }
    for endpoint in ["/data", "/v1/readings", "/v1/ws", "unmatched"] {
        for reason in [
            "invalid",
            "too_large",
            "unavailable",
            "unauthorized",
            "forbidden",
            "rate_limited",
            "timeout",
        ] {
            series.push(format!(
                "sensorhub_requests_rejected_total{{endpoint=\"{endpoint}\",reason=\"{reason}\"}}"
            ));
        }
    }
    series.extend(testkit::publish_outcome_series());
    testkit::assert_fresh_metrics(&text, &series);
    ingest.stop().await;
}
