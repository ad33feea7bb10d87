//! The deployment's routing, TLS, middlewares, load balancing and authentication, through a real
//! Traefik in front of real, scaled service processes (see the crate's documentation for how they
//! are started). Every device posts its own readings with its own token; apps read with a reader
//! token.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first thing that is not as it must be"
)]

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use auth::Role;
use deploy_tests::{Options, Process, Topology, WAIT, reading, traefik_or_skip};
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::json;

type Acknowledged = HashSet<(String, String)>;
/// Device id → its token.
type Tokens = HashMap<String, String>;

/// The default topology, with `device` registered: the topology and the device's token.
async fn topology_with_device(device: &str) -> (Topology, String) {
    let mut t = Topology::start(Options::default()).await;
    let mut tokens = t.register_devices([device]).await;
    let token = tokens.remove(device).expect("the device registered");
    (t, token)
}

/// One POST of `body` to `url` with `token`: its status, or why it got none.
async fn post_reading(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    body: &serde_json::Value,
) -> reqwest::Result<StatusCode> {
    let response = client
        .post(url)
        .bearer_auth(token)
        .json(body)
        .send()
        .await?;
    Ok(response.status())
}

/// Three ingest-http and two persisters behind Traefik, with `ingest_mqtt` ingest-mqtt, and
/// `devices` devices registered, named `{prefix}-0`, `{prefix}-1`, ...
async fn scaled_topology(ingest_mqtt: usize, prefix: &str, devices: usize) -> (Topology, Tokens) {
    let mut t = Topology::start(Options {
        ingest_http: 3,
        persisters: 2,
        ingest_mqtt,
        ..Options::default()
    })
    .await;
    let devices: Vec<String> = (0..devices).map(|d| format!("{prefix}-{d}")).collect();
    let tokens = t.register_devices(devices.iter().map(String::as_str)).await;
    (t, tokens)
}

/// A sample of every replica's `/metrics` (see [`Process::metric`]), in the replicas' order.
async fn metric_per_replica(replicas: &[Process], name: &str) -> Vec<f64> {
    let mut values = Vec::new();
    for replica in replicas {
        values.push(replica.metric(name).await);
    }
    values
}

fn key(reading: &serde_json::Value) -> (String, String) {
    (
        reading["device_id"].as_str().unwrap_or_default().to_owned(),
        reading["id"].as_str().unwrap_or_default().to_owned(),
    )
}

/// The token of the device a reading is from: each device writes only as itself.
fn token_of<'a>(tokens: &'a Tokens, reading: &serde_json::Value) -> &'a str {
    let device = reading["device_id"].as_str().unwrap_or_default();
    tokens
        .get(device)
        .unwrap_or_else(|| panic!("{device} is not registered"))
}

/// Outcome of sending one reading as a careful device does: again, with the same `id` and `ts`,
/// until it is acknowledged or the attempts run out.
struct Sent {
    acknowledged: bool,
    failed_attempts: usize,
}

async fn send_until_acknowledged(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    body: &serde_json::Value,
) -> Sent {
    let mut failed_attempts = 0;
    for _ in 0..60 {
        match post_reading(client, url, token, body).await {
            Ok(status) if status.is_success() => {
                return Sent {
                    acknowledged: true,
                    failed_attempts,
                };
            }
            _ => failed_attempts += 1,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Sent {
        acknowledged: false,
        failed_attempts,
    }
}

/// Publishes each payload at QoS 1 to `topic` through Traefik's MQTT TLS entry point with
/// mosquitto_pub, which checks the certificate against the local one and the name `localhost`.
fn publish_mqtts(t: &Topology, topic: &str, payloads: &[serde_json::Value]) {
    use std::io::Write;
    let mut child = Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &t.traefik.mqtts.to_string()])
        .arg("--cafile")
        .arg(t.traefik.cert_path())
        .args(["-q", "1", "-t", topic, "-l"])
        .args(["-i", &testkit::unique_name("pi")])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub (mosquitto-clients; scripts/test installs it)");
    {
        let mut stdin = child.stdin.take().expect("stdin");
        for payload in payloads {
            writeln!(stdin, "{payload}").expect("write to mosquitto_pub");
        }
    }
    let out = child.wait_with_output().expect("mosquitto_pub");
    assert!(
        out.status.success(),
        "mosquitto_pub through Traefik failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_public_path_is_routed_over_tls_and_nothing_else() {
    if !traefik_or_skip("every_public_path_is_routed_over_tls_and_nothing_else") {
        return;
    }
    let (t, ref device) = topology_with_device("raspi-01").await;
    let reader = t.app_token(Role::Reader);
    let client = t.https();
    let base = chrono::Utc::now() - chrono::Duration::hours(1);

    // the seed's POST /data, answered by ingest-http
    let r = client
        .post(t.url("/data"))
        .bearer_auth(device)
        .json(
            &json!({"device_id": "raspi-01", "id": "seed-1", "ts": base.to_rfc3339(),
                      "temperature": 25.5, "humidity": 60.3}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let headers = r.headers().clone();
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap(),
        json!({"status": "success"})
    );
    // the security headers middleware
    assert!(headers.contains_key("strict-transport-security"));
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["x-frame-options"], "DENY");

    // POST /v1/readings
    let batch: Vec<_> = (0..3).map(|i| reading("raspi-01", i, base)).collect();
    let r = client
        .post(t.url("/v1/readings"))
        .bearer_auth(device)
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap(),
        json!({"accepted": 3})
    );

    // MQTT over TLS, through Traefik's TCP router to Mosquitto, ingest-mqtt and the persister
    publish_mqtts(
        &t,
        "devices/raspi-02/readings",
        &[json!({"id": "mqtt-1", "ts": base.to_rfc3339(), "metrics": {"temperature": 21.0}})],
    );

    testkit::eventually(WAIT, "5 readings stored", || async {
        (t.stored_count() == 5).then_some(())
    })
    .await;

    // the read API, answered by query-api
    for path in [
        "/v1/devices",
        "/v1/devices/raspi-01",
        "/v1/devices/raspi-01/readings?limit=10",
        "/v1/devices/raspi-01/latest",
        "/v1/devices/raspi-01/series?metric=temperature&bucket=1h",
        "/v1/devices/raspi-02/readings",
    ] {
        let r = client
            .get(t.url(path))
            .bearer_auth(&reader)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "GET {path}");
    }
    let readings =
        testkit::get_json(&client, &t.url("/v1/devices/raspi-02/readings"), &reader).await;
    assert!(readings.to_string().contains("mqtt-1"), "{readings}");

    // commands (an operator issues and cancels, a reader follows) and the token list (admins)
    let operator = t.app_token(Role::Operator);
    let r = client
        .post(t.url("/v1/devices/raspi-01/commands"))
        .bearer_auth(&operator)
        .json(&json!({"name": "led", "args": {"on": true}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let command: serde_json::Value = r.json().await.unwrap();
    let follow = format!("/v1/commands/{}", command["id"].as_str().unwrap());
    for (method, path, token) in [
        (reqwest::Method::GET, follow.as_str(), &reader),
        (
            reqwest::Method::GET,
            "/v1/devices/raspi-01/commands",
            &reader,
        ),
        (reqwest::Method::DELETE, follow.as_str(), &operator),
        (
            reqwest::Method::GET,
            "/v1/tokens",
            &t.app_token(Role::Admin),
        ),
    ] {
        let r = client
            .request(method.clone(), t.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{method} {path}");
    }

    // the two OpenAPI descriptions: the read API's at /openapi.json, ingest's under /ingest/
    let read_api = testkit::get_text(&client, &t.url("/openapi.json")).await;
    assert!(read_api.contains("/v1/devices"), "{read_api}");
    let ingest_api = testkit::get_text(&client, &t.url("/ingest/openapi.json")).await;
    assert!(ingest_api.contains("/v1/readings"), "{ingest_api}");
    // the compress middleware
    let r = client
        .get(t.url("/openapi.json"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-encoding"], "gzip");

    // the web dashboard and the docs viewer, served by query-api without a token (the page signs
    // in itself), with query-api's Content-Security-Policy; its assets compressed
    let page = client.get(t.url("/")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.starts_with("default-src 'self'"), "{csp}");
    let page = page.text().await.unwrap();
    let app = page
        .split('"')
        .find(|s| s.starts_with("/ui/") && s.ends_with("/app.js"))
        .unwrap_or_else(|| panic!("no app.js in the page: {page}"));
    let r = client
        .get(t.url(app))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "GET {app}");
    assert_eq!(r.headers()["content-encoding"], "gzip");
    let docs = testkit::get_text(&client, &t.url("/docs")).await;
    assert!(docs.contains("swagger-ui-bundle.js"), "{docs}");

    // nothing else is routed: the ops endpoints stay private
    for path in [
        "/metrics",
        "/healthz",
        "/readyz",
        "/index.html",
        "/v1",
        "/v1/readingsx",
    ] {
        let r = client.get(t.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "GET {path}");
    }

    // the dashboard only with the password
    let r = client.get(t.url("/dashboard/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = client
        .get(t.url("/api/rawdata"))
        .basic_auth("admin", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let routers = t.traefik_api("/http/routers").await;
    for router in [
        "ingest@file",
        "ingest-openapi@file",
        "ingest-commands@file",
        "read@file",
        "web-ui@file",
        "dashboard@file",
    ] {
        let found = routers
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == router)
            .unwrap_or_else(|| panic!("no router {router}"));
        assert_eq!(found["status"], "enabled", "{found}");
    }

    // plain HTTP is redirected to HTTPS (a POST keeps its method and body: 308)
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = plain
        .post(format!("http://127.0.0.1:{}/data", t.traefik.web))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        r.headers()["location"].to_str().unwrap(),
        format!("https://127.0.0.1:{}/data", t.traefik.websecure)
    );
    let r = plain
        .get(format!("http://127.0.0.1:{}/v1/devices", t.traefik.web))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::MOVED_PERMANENTLY);

    // TLS: the certificate is the one generated for this topology, so a client that trusts only
    // the usual authorities refuses it; plain HTTP on the TLS port matches no router (they all
    // require TLS)
    let stranger = reqwest::Client::builder()
        .resolve("localhost", ([127, 0, 0, 1], t.traefik.websecure).into())
        .build()
        .unwrap();
    let refused = stranger.get(t.url("/v1/devices")).send().await;
    assert!(refused.is_err(), "an unknown certificate was accepted");
    let plain_on_tls = plain
        .get(format!(
            "http://127.0.0.1:{}/v1/devices",
            t.traefik.websecure
        ))
        .send()
        .await;
    assert!(
        plain_on_tls.map_or(true, |r| matches!(
            r.status(),
            StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND
        )),
        "plain HTTP served on the TLS entry point"
    );
}

/// A device long-polls its command and answers it through Traefik (ingest-http's routes), while
/// query-api keeps the rest of /v1/commands/ (an app follows the command there).
#[tokio::test]
async fn a_device_long_polls_and_answers_its_command_through_traefik() {
    if !traefik_or_skip("a_device_long_polls_and_answers_its_command_through_traefik") {
        return;
    }
    let (t, ref device) = topology_with_device("raspi-01").await;
    let client = t.https();
    let reader = t.app_token(Role::Reader);
    // nothing due: 204 after the wait, from ingest-http
    let r = client
        .get(t.url("/v1/commands/next?wait=1"))
        .bearer_auth(device)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let issued: serde_json::Value = client
        .post(t.url("/v1/devices/raspi-01/commands"))
        .bearer_auth(t.app_token(Role::Operator))
        .json(&json!({"name": "led", "args": {"on": true}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = issued["id"].as_str().unwrap().to_owned();
    let r = client
        .get(t.url("/v1/commands/next?wait=10"))
        .bearer_auth(device)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let command: serde_json::Value = r.json().await.unwrap();
    assert_eq!(command["id"], json!(id), "{command}");
    let r = client
        .post(t.url(&format!("/v1/commands/{id}/result")))
        .bearer_auth(device)
        .json(&json!({"status": "succeeded", "result": {"led": "on"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let follow = t.url(&format!("/v1/commands/{id}"));
    testkit::eventually(WAIT, "the command succeeded", || async {
        let r = client.get(&follow).bearer_auth(&reader).send().await.ok()?;
        let body: serde_json::Value = r.json().await.ok()?;
        (body["status"] == "succeeded").then_some(())
    })
    .await;
}

/// A browser's live stream through Traefik: a reading posted through Traefik comes out of the
/// stream at once (not held in a compression buffer), and `/v1/me` is routed.
#[tokio::test]
async fn a_live_stream_gets_a_posted_reading_through_traefik() {
    if !traefik_or_skip("a_live_stream_gets_a_posted_reading_through_traefik") {
        return;
    }
    let (t, ref device) = topology_with_device("raspi-01").await;
    let client = t.https();
    let reader = t.app_token(Role::Reader);
    let me = testkit::get_json(&client, &t.url("/v1/me"), &reader).await;
    assert_eq!(me["role"], "reader", "{me}");

    let mut stream = client
        .get(t.url("/v1/live"))
        .bearer_auth(&reader)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    assert!(!stream.headers().contains_key("content-encoding"));
    // the feed of query-api's replica is connected once its first bytes arrive; a reading
    // posted now is announced to it
    let first = tokio::time::timeout(WAIT, stream.chunk()).await;
    assert!(matches!(first, Ok(Ok(Some(_)))), "the stream starts");
    testkit::eventually(WAIT, "query-api's live feed connected", || async {
        let text = testkit::get_text(
            &reqwest::Client::new(),
            &format!("{}/metrics", t.query_api.url()),
        )
        .await;
        (testkit::metric(&text, "sensorhub_live_feed_connected") == 1.0).then_some(())
    })
    .await;
    let batch = vec![reading("raspi-01", 0, chrono::Utc::now())];
    let status = post_reading(&client, &t.url("/v1/readings"), device, &json!(batch))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED);
    let id = batch[0]["id"].as_str().unwrap().to_owned();
    let mut received = String::new();
    let arrived = tokio::time::timeout(WAIT, async {
        while !received.contains(&id) {
            match stream.chunk().await {
                Ok(Some(bytes)) => received.push_str(&String::from_utf8_lossy(&bytes)),
                _ => return false,
            }
        }
        true
    })
    .await;
    assert!(
        matches!(arrived, Ok(true)),
        "the reading's event came through Traefik; got {received:?}"
    );
    assert!(received.contains("event: readings"), "{received}");
}

/// The next JSON text frame of a WebSocket (pings and pongs skipped).
async fn next_text<S>(socket: &mut S) -> serde_json::Value
where
    S: futures_util::Stream<
            Item = Result<
                tokio_tungstenite::tungstenite::Message,
                tokio_tungstenite::tungstenite::Error,
            >,
        > + Unpin,
{
    loop {
        let message = tokio::time::timeout(Duration::from_secs(15), socket.next())
            .await
            .expect("a frame within 15 s")
            .expect("the socket open")
            .unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
            return serde_json::from_str(text.as_str()).unwrap();
        }
    }
}

/// A device's WebSocket through Traefik (TLS, the upgrade, the ingest-commands router): a command
/// issued through the read API is pushed, and its answer acknowledged.
#[tokio::test]
async fn a_device_websocket_gets_its_command_through_traefik() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    if !traefik_or_skip("a_device_websocket_gets_its_command_through_traefik") {
        return;
    }
    let (t, ref device) = topology_with_device("raspi-01").await;
    let pem = std::fs::read(t.traefik.cert_path()).unwrap();
    let tls = native_tls::TlsConnector::builder()
        .add_root_certificate(native_tls::Certificate::from_pem(&pem).unwrap())
        .disable_built_in_roots(true)
        .build()
        .unwrap();
    let mut request = format!("wss://localhost:{}/v1/ws", t.traefik.websecure)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {device}").parse().unwrap());
    let connector = tokio_tungstenite::Connector::NativeTls(tls);
    let (mut socket, _) =
        tokio_tungstenite::connect_async_tls_with_config(request, None, false, Some(connector))
            .await
            .unwrap();
    let client = t.https();
    let issued: serde_json::Value = client
        .post(t.url("/v1/devices/raspi-01/commands"))
        .bearer_auth(t.app_token(Role::Operator))
        .json(&json!({"name": "led", "args": {"on": true}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = issued["id"].as_str().unwrap().to_owned();
    let command = next_text(&mut socket).await;
    assert_eq!(
        (&command["type"], &command["id"]),
        (&json!("command"), &json!(id))
    );
    let answer = json!({"type": "result", "id": id, "status": "succeeded"});
    socket
        .send(Message::Text(answer.to_string().into()))
        .await
        .unwrap();
    let ack = next_text(&mut socket).await;
    assert_eq!(ack, json!({"type": "ack", "id": id}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_answers_429() {
    if !traefik_or_skip("the_rate_limit_answers_429") {
        return;
    }
    let mut t = Topology::start(Options {
        traefik_env: vec![
            ("SENSORHUB_INGEST_RATE_AVERAGE", "2".into()),
            ("SENSORHUB_INGEST_RATE_BURST", "4".into()),
            ("SENSORHUB_READ_RATE_AVERAGE", "2".into()),
            ("SENSORHUB_READ_RATE_BURST", "4".into()),
        ],
        ..Options::default()
    })
    .await;
    let tokens = t.register_devices(["burst"]).await;
    let device = &tokens["burst"];
    let reader = t.app_token(Role::Reader);
    let client = t.https();
    let base = chrono::Utc::now() - chrono::Duration::hours(1);

    let readings: Vec<_> = (0..30).map(|i| reading("burst", i, base)).collect();
    let statuses: Vec<(StatusCode, serde_json::Value)> = futures_util::stream::iter(&readings)
        .map(|r| {
            let client = client.clone();
            let url = t.url("/v1/readings");
            async move {
                let status = post_reading(&client, &url, device, r).await.unwrap();
                (status, r.clone())
            }
        })
        .buffer_unordered(30)
        .collect()
        .await;
    let accepted: HashSet<_> = statuses
        .iter()
        .filter(|(s, _)| *s == StatusCode::ACCEPTED)
        .map(|(_, r)| key(r))
        .collect();
    let limited = statuses
        .iter()
        .filter(|(s, _)| *s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(
        accepted.len() + limited,
        30,
        "only 202 and 429 expected: {:?}",
        statuses.iter().map(|(s, _)| s).collect::<Vec<_>>()
    );
    assert!(limited > 0, "the rate limit let all 30 through");
    assert!(!accepted.is_empty(), "the rate limit let nothing through");
    // what Traefik refused never reached ingest-http; what it let through is stored
    t.assert_stored_exactly(&accepted).await;
    assert_eq!(
        t.ingest_http[0]
            .metric("sensorhub_readings_accepted_total")
            .await,
        accepted.len() as f64
    );

    // the read API has its own limit
    let reads: Vec<StatusCode> = futures_util::stream::iter(0..30)
        .map(|_| {
            let client = client.clone();
            let url = t.url("/v1/devices");
            let reader = reader.clone();
            async move {
                let r = client.get(url).bearer_auth(reader).send().await.unwrap();
                r.status()
            }
        })
        .buffer_unordered(30)
        .collect()
        .await;
    assert!(reads.contains(&StatusCode::TOO_MANY_REQUESTS), "{reads:?}");
    assert!(reads.contains(&StatusCode::OK), "{reads:?}");

    // and once the bucket refills, the client's allowance is back
    testkit::eventually(WAIT, "the allowance back", || async {
        let url = t.url("/v1/readings");
        let status = post_reading(&client, &url, device, &reading("burst", 99, base)).await;
        (status.ok()? == StatusCode::ACCEPTED).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_spreads_across_every_replica() {
    if !traefik_or_skip("load_spreads_across_every_replica") {
        return;
    }
    let (t, tokens) = scaled_topology(2, "http", 7).await;
    let client = t.https();
    let base = chrono::Utc::now() - chrono::Duration::hours(1);

    // over HTTP: one reading per request, alternating the two ingest formats' endpoints
    let http: Vec<_> = (0..600)
        .map(|i| reading(&format!("http-{}", i % 7), i, base))
        .collect();
    let sent: Vec<(bool, serde_json::Value)> = futures_util::stream::iter(&http)
        .map(|r| {
            let client = client.clone();
            let url = t.url("/v1/readings");
            let token = token_of(&tokens, r);
            async move {
                let sent = send_until_acknowledged(&client, &url, token, r).await;
                (sent.acknowledged && sent.failed_attempts == 0, r.clone())
            }
        })
        .buffer_unordered(12)
        .collect()
        .await;
    assert!(
        sent.iter().all(|(ok, _)| *ok),
        "every request succeeds at once"
    );
    let mut acknowledged: Acknowledged = http.iter().map(key).collect();

    // over MQTT: through Traefik's TLS entry point, shared by the two ingest-mqtt
    let mqtt: Vec<_> = (0..200)
        .map(|i| {
            let mut r = reading("mqtt-dev", i, base);
            r.as_object_mut().unwrap().remove("device_id");
            r
        })
        .collect();
    publish_mqtts(&t, "devices/mqtt-dev/readings", &mqtt);
    acknowledged.extend((0..200).map(|i| ("mqtt-dev".to_owned(), format!("mqtt-dev-{i:06}"))));

    t.assert_stored_exactly(&acknowledged).await;

    let per_ingest = metric_per_replica(&t.ingest_http, "sensorhub_readings_accepted_total").await;
    assert_eq!(per_ingest.iter().sum::<f64>(), 600.0, "{per_ingest:?}");
    assert!(
        per_ingest.iter().all(|n| *n >= 60.0),
        "Traefik spreads the requests over the 3 ingest-http: {per_ingest:?}"
    );
    let per_mqtt = metric_per_replica(&t.ingest_mqtt, "sensorhub_mqtt_messages_acked_total").await;
    assert_eq!(per_mqtt.iter().sum::<f64>(), 200.0, "{per_mqtt:?}");
    assert!(
        per_mqtt.iter().all(|n| *n > 0.0),
        "the shared subscription spreads the messages: {per_mqtt:?}"
    );
    let per_persister = metric_per_replica(&t.persisters, "sensorhub_readings_stored_total").await;
    assert_eq!(
        per_persister.iter().sum::<f64>(),
        800.0,
        "{per_persister:?}"
    );
    assert!(
        per_persister.iter().all(|n| *n > 0.0),
        "the persisters compete for the queue: {per_persister:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_load_is_taken_out_and_nothing_is_lost_or_doubled() {
    if !traefik_or_skip("a_replica_killed_mid_load_is_taken_out_and_nothing_is_lost_or_doubled") {
        return;
    }
    let (mut t, tokens) = scaled_topology(1, "pi", 11).await;
    let client = t.https();
    let base = chrono::Utc::now() - chrono::Duration::hours(1);
    let victim = t.ingest_http[0].url();

    let readings: Vec<_> = (0..1500)
        .map(|i| reading(&format!("pi-{}", i % 11), i, base))
        .collect();
    let acked = Arc::new(AtomicUsize::new(0));
    let url = t.url("/v1/readings");
    let load = {
        let acked = acked.clone();
        let readings = readings.clone();
        let client = client.clone();
        let tokens = tokens.clone();
        tokio::spawn(async move {
            futures_util::stream::iter(readings)
                .map(|r| {
                    let client = client.clone();
                    let url = url.clone();
                    let acked = acked.clone();
                    let token = token_of(&tokens, &r).to_owned();
                    async move {
                        let sent = send_until_acknowledged(&client, &url, &token, &r).await;
                        if sent.acknowledged {
                            acked.fetch_add(1, Ordering::SeqCst);
                        }
                        (sent, r)
                    }
                })
                .buffer_unordered(16)
                .collect::<Vec<_>>()
                .await
        })
    };

    // mid-load: SIGKILL one ingest-http and one persister
    testkit::eventually(WAIT, "300 readings acknowledged", || async {
        (acked.load(Ordering::SeqCst) >= 300).then_some(())
    })
    .await;
    t.ingest_http[0].kill();
    t.persisters[0].kill();
    let at_kill = acked.load(Ordering::SeqCst);

    // Traefik's health check takes the dead replica out
    testkit::eventually(
        Duration::from_secs(15),
        "the killed replica DOWN",
        || async {
            let status = t.server_status("ingest-http@file").await;
            (status.get(&victim).map(String::as_str) == Some("DOWN")).then_some(())
        },
    )
    .await;

    let results = load.await.expect("the load");
    assert!(
        acked.load(Ordering::SeqCst) > at_kill,
        "the load went on after the kill"
    );
    let retried = results
        .iter()
        .filter(|(s, _)| s.failed_attempts > 0)
        .count();
    let lost: Vec<_> = results
        .iter()
        .filter(|(s, _)| !s.acknowledged)
        .map(|(_, r)| key(r))
        .collect();
    assert!(lost.is_empty(), "never acknowledged: {lost:?}");
    eprintln!("readings a client had to send again around the kill: {retried}");

    // With the replica out, every request is answered by the two left, at the first attempt.
    let before = metric_per_replica(&t.ingest_http[1..], "sensorhub_readings_accepted_total").await;
    let after_kill: Vec<_> = (1500..1560)
        .map(|i| reading(&format!("pi-{}", i % 11), i, base))
        .collect();
    for r in &after_kill {
        let status = post_reading(&client, &t.url("/v1/readings"), token_of(&tokens, r), r).await;
        assert_eq!(
            status.ok(),
            Some(StatusCode::ACCEPTED),
            "a request after the replica was taken out"
        );
    }
    let after = metric_per_replica(&t.ingest_http[1..], "sensorhub_readings_accepted_total").await;
    let grown: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert_eq!(grown.iter().sum::<f64>(), 60.0, "{grown:?}");
    assert!(grown.iter().all(|n| *n > 0.0), "{grown:?}");

    // Every acknowledged reading is stored, once: the retries (the client's, Traefik's) and the
    // killed persister's redelivered messages stored nothing twice.
    let acknowledged: Acknowledged = readings.iter().chain(&after_kill).map(key).collect();
    t.assert_stored_exactly(&acknowledged).await;
}

/// Behind Traefik, ingest-http and query-api see Traefik's address; they believe the
/// `X-Forwarded-For` Traefik adds (Traefik is their trusted proxy), so the audit trail names the
/// real client, and never what a client claims in that header itself. Revoking a device through
/// the read API shuts it out of ingest, through Traefik, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_traefik_the_audit_trail_has_the_real_client_address() {
    if !traefik_or_skip("behind_traefik_the_audit_trail_has_the_real_client_address") {
        return;
    }
    let (t, ref token) = topology_with_device("audit-pi").await;
    let token_id =
        auth::TokenVerifier::from_file(std::path::Path::new(&t.keys.verifying_key_file()))
            .unwrap()
            .verify(token)
            .unwrap()
            .jti;
    // register_devices' requests, each audited before it was answered
    let probes = t.ingest_http[0].audit_trail().len();
    let base = chrono::Utc::now() - chrono::Duration::hours(1);
    // Traefik and the services are on 127.0.0.1: the device connects from 127.0.0.2
    let pi: IpAddr = [127, 0, 0, 2].into();
    let client = t.https_from(Some(pi));
    let readings = t.url("/v1/readings");

    // accepted, though the device claims to be elsewhere
    let r = client
        .post(&readings)
        .bearer_auth(token)
        .header("x-forwarded-for", "203.0.113.66")
        .json(&reading("audit-pi", 0, base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    // no token: 401 with its challenge, through Traefik
    let r = client
        .post(t.url("/data"))
        .json(&json!({"device_id": "audit-pi", "temperature": 20.5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().contains_key("www-authenticate"));
    // another device's reading with this device's token: 403
    let status = post_reading(&client, &readings, token, &reading("someone-else", 0, base)).await;
    assert_eq!(status.unwrap(), StatusCode::FORBIDDEN);
    // straight to the replica, around Traefik, from 127.0.0.3: not a trusted proxy, so the
    // X-Forwarded-For it sends is not believed
    let direct = reqwest::Client::builder()
        .local_address(IpAddr::from([127, 0, 0, 3]))
        .build()
        .unwrap();
    let r = direct
        .post(format!("{}/v1/readings", t.ingest_http[0].url()))
        .bearer_auth(token)
        .header("x-forwarded-for", "203.0.113.77")
        .json(&reading("audit-pi", 1, base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);

    let trail = testkit::eventually(WAIT, "4 more writes in the audit trail", || async {
        let trail = t.ingest_http[0].audit_trail().split_off(probes);
        (trail.len() >= 4).then_some(trail)
    })
    .await;
    let summary: Vec<_> = trail
        .iter()
        .map(|e| {
            (
                e["outcome"].as_str().unwrap_or_default(),
                e["reason"].as_str().unwrap_or_default(),
                e["device.id"].as_str().unwrap_or_default(),
                e["client.addr"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("accepted", "", "audit-pi", "127.0.0.2"),
            ("refused", "unauthorized", "-", "127.0.0.2"),
            ("refused", "forbidden", "audit-pi", "127.0.0.2"),
            ("accepted", "", "audit-pi", "127.0.0.3"),
        ]
    );
    assert_eq!(trail[0]["token.id"], token_id.as_str());
    assert_eq!(trail[0]["readings"], 1);
    let log = std::fs::read_to_string(&t.ingest_http[0].log).unwrap();
    assert!(!log.contains("203.0.113."), "a claimed address was logged");
    assert!(!log.contains(token.as_str()), "the token itself was logged");

    // an admin revokes the device through Traefik (a reader may not); query-api's audit trail
    // has the admin's real address too
    let r = client
        .delete(t.url("/v1/devices/audit-pi"))
        .bearer_auth(t.app_token(Role::Reader))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = client
        .delete(t.url("/v1/devices/audit-pi"))
        .bearer_auth(t.app_token(Role::Admin))
        .header("x-forwarded-for", "203.0.113.88")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let admin = testkit::eventually(WAIT, "the revocation audited", || async {
        t.query_api
            .audit_trail()
            .into_iter()
            .find(|e| e["outcome"] == "admin_request")
    })
    .await;
    // (what the client sent is logged escaped: the path as a quoted string)
    assert_eq!(
        (
            &admin["outcome"],
            &admin["method"],
            &admin["route"],
            &admin["path"],
            &admin["client.addr"]
        ),
        (
            &json!("admin_request"),
            &json!("DELETE"),
            &json!("/v1/devices/{id}"),
            &json!("\"/v1/devices/audit-pi\""),
            &json!("127.0.0.2")
        )
    );

    // a command to the revoked device is refused, and the refusal is a line of the trail too
    let r = client
        .post(t.url("/v1/devices/audit-pi/commands"))
        .bearer_auth(t.app_token(Role::Operator))
        .json(&json!({"name": "led", "args": {"on": true}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let refused = testkit::eventually(WAIT, "the refused command audited", || async {
        t.query_api
            .audit_trail()
            .into_iter()
            .find(|e| e["outcome"] == "command_refused")
    })
    .await;
    assert_eq!(
        (&refused["action"], &refused["subject"], &refused["reason"]),
        (&json!("issue"), &json!("\"audit-pi\""), &json!("conflict"))
    );

    // ingest refuses the revoked token within its registry refresh, without a restart (asked with
    // a body that is no reading: 400 while the token still passes, so nothing is stored meanwhile)
    testkit::eventually(WAIT, "the revoked token refused", || async {
        let status = post_reading(&client, &readings, token, &json!({})).await;
        (status.ok()? == StatusCode::UNAUTHORIZED).then_some(())
    })
    .await;
    let status = post_reading(&client, &readings, token, &reading("audit-pi", 2, base)).await;
    assert_eq!(status.unwrap(), StatusCode::UNAUTHORIZED);
    let acknowledged: Acknowledged = [0, 1]
        .iter()
        .map(|&i| key(&reading("audit-pi", i, base)))
        .collect();
    t.assert_stored_exactly(&acknowledged).await;
}

/// Every metric the Grafana dashboard and the alert rules name is one the running services export
/// (scripts/check-deploy checks the same against the code's registrations, without running them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alert_rules_name_only_exported_metrics() {
    if !traefik_or_skip("the_dashboard_and_the_alert_rules_name_only_exported_metrics") {
        return;
    }
    let t = Topology::start(Options::default()).await;
    let client = reqwest::Client::new();
    let mut exported = std::collections::BTreeSet::new();
    let processes = t
        .ingest_http
        .iter()
        .chain(&t.ingest_mqtt)
        .chain(&t.persisters);
    for process in processes.chain([&t.query_api]) {
        let page = testkit::get_text(&client, &format!("{}/metrics", process.url())).await;
        exported.extend(testkit::exported_names(&page));
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    for file in [
        "deploy/prometheus/alerts.yml",
        "deploy/grafana/dashboards/sensorhub.json",
    ] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        let used: std::collections::BTreeSet<&str> = text
            .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .filter(|word| word.starts_with("sensorhub_"))
            .collect();
        assert!(used.len() > 5, "{file}: the metric names were found");
        let missing: Vec<&&str> = used
            .iter()
            .filter(|name| !exported.contains(**name))
            .collect();
        assert!(
            missing.is_empty(),
            "{file} names metrics no service exports: {missing:?}"
        );
    }
}
