//! Bad input is a 4xx that names what is wrong, never a database outage; only a real outage is a
//! 503; and a client cannot hold a connection by sending its body slowly.

use std::time::{Duration, Instant};

use auth::Role;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::{api_with_data, reading, start, start_empty, t0};

impl crate::Api {
    async fn send(&self, method: reqwest::Method, path: &str, token: &str) -> (u16, Value) {
        let response = self
            .client
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

#[tokio::test]
async fn ids_cursors_and_times_the_database_cannot_take_are_4xx_not_an_outage() {
    let api = api_with_data().await;
    // a path id that is not a valid device id names no device: 404, on every route
    for path in [
        "/v1/devices/a%00b",
        "/v1/devices/a%00b/readings",
        "/v1/devices/a%00b/latest",
        "/v1/devices/a%00b/series?metric=t",
        "/v1/devices/%E2%80%AEpi-1",
        "/v1/devices/pi%201/readings",
    ] {
        let (status, body) = api.get(path).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (404, Some("not_found")),
            "{path}: {body}"
        );
    }
    let admin = api.keys.app_token(Role::Admin);
    let (status, body) = api
        .send(reqwest::Method::DELETE, "/v1/devices/a%00b", &admin)
        .await;
    assert_eq!(status, 404, "{body}");

    let cursor = |text: &str| URL_SAFE_NO_PAD.encode(text);
    let known = t0().timestamp_micros();
    let cases = [
        // a NUL byte in the id, a time before 4713 BC, and one before any reading
        (
            format!(
                "/v1/devices/pi-1/readings?cursor={}",
                cursor(&format!("{known}.a\0b"))
            ),
            "cursor",
        ),
        (
            format!(
                "/v1/devices/pi-1/readings?cursor={}",
                cursor("-300000000000000000.r001")
            ),
            "cursor",
        ),
        (
            format!(
                "/v1/devices/pi-1/readings?cursor={}",
                cursor("-62000000000000000.r001")
            ),
            "cursor",
        ),
        (format!("/v1/devices?cursor={}", cursor("a\0b")), "cursor"),
        (
            "/v1/devices/pi-1/readings?from=-1000000000000000".to_owned(),
            "from",
        ),
        (
            "/v1/devices/pi-1/readings?to=1000000000000000".to_owned(),
            "to",
        ),
        (
            "/v1/devices/pi-1/series?metric=t&from=-1000000000000000&bucket=1w".to_owned(),
            "from",
        ),
        (
            "/v1/devices/pi-1/series?metric=t&to=-99999999999999".to_owned(),
            "to",
        ),
    ];
    for (path, field) in cases {
        let (status, body) = api.get(&path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["field"], field, "{path}: {body}");
    }
    // the API still answers the good requests
    assert_eq!(api.get("/v1/devices/pi-1").await.0, 200);
}

#[tokio::test]
async fn a_sum_beyond_a_double_is_null_with_a_reason_and_an_average_is_exact() {
    let api = api_with_data().await;
    let huge: Vec<_> = (0..4)
        .map(|i| {
            reading(
                "big",
                &format!("b{i}"),
                t0() + chrono::Duration::seconds(i),
                &[("t", 1e308)],
            )
        })
        .collect();
    store::write_readings(&mut api.db.connect(), &huge, &mut Default::default()).unwrap();
    let base = "/v1/devices/big/series?metric=t&from=2026-11-24T00:00:00Z&to=2026-11-24T01:00:00Z";
    let (status, sum) = api.get(&format!("{base}&agg=sum")).await;
    assert_eq!(status, 200, "{sum}");
    assert_eq!(sum["points"][0]["value"], Value::Null);
    assert!(
        sum["points"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("1.8e308"),
        "{sum}"
    );
    let (status, avg) = api.get(&format!("{base}&agg=avg")).await;
    assert_eq!(status, 200, "{avg}");
    assert_eq!(
        avg["points"][0],
        json!({"ts": "2026-11-24T00:00:00Z", "value": 1e308})
    );
    // ordinary sums carry no reason
    let (_, small) = api
        .get("/v1/devices/pi-1/series?metric=t&from=2026-11-24T00:00:00Z&to=2026-11-24T00:30:00Z&bucket=30m&agg=sum")
        .await;
    assert_eq!(
        small["points"],
        json!([{"ts": "2026-11-24T00:00:00Z", "value": 435.0}])
    );
}

#[tokio::test]
async fn a_database_error_that_is_not_an_outage_is_a_500_and_an_outage_a_503() {
    // PostgreSQL reached through a relay the test can cut
    let db = testkit::TestDb::migrated();
    let proxy = testkit::TcpProxy::start("127.0.0.1:5432").await;
    let proxied = db
        .url
        .replace("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port));
    assert_ne!(proxied, db.url, "the test database is on 127.0.0.1:5432");
    let api = start(db, |s| {
        s.database.database_url = proxied;
        s.database.db_acquire_timeout_ms = 500;
    })
    .await;
    assert_eq!(api.get("/v1/devices").await.0, 200);

    // a broken schema is a bug to fix, not a reason for clients to retry
    testkit::execute(&mut api.db.connect(), "DROP TABLE devices");
    let (status, body) = api.get("/v1/devices").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (500, Some("internal")),
        "{body}"
    );

    proxy.cut();
    let response = api
        .client
        .get(format!("{}/v1/devices", api.url))
        .bearer_auth(&api.reader)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
}

#[tokio::test]
async fn a_request_body_sent_slowly_is_cut_off() {
    let api = start_empty(|s| s.http.http_body_timeout_ms = 500).await;
    let admin = api.keys.app_token(Role::Admin);
    let addr = api.url.trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/devices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"device_id\""
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    let (mut reader, mut writer) = slow.into_split();
    // a byte every 100 ms: always something arriving, never the whole body
    let dribble = tokio::spawn(async move {
        for _ in 0..80 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if writer.write_all(b" ").await.is_err() {
                return;
            }
        }
    });
    let started = Instant::now();
    let text = testkit::read_until_closed(&mut reader, Duration::from_secs(5), "the answer").await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"error\":\"timeout\""), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    dribble.abort();
    // nothing was registered
    assert!(
        store::credentials::list_credentials(&mut api.db.connect())
            .unwrap()
            .is_empty()
    );
}
