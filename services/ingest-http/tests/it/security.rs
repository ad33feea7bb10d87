//! Every way to write that must fail, fails with the right status, and stores nothing.

use std::time::{Duration, Instant};

use auth::{Claims, Role};
use serde_json::{Value, json};
use service_kit::config::ServiceSettings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Stack, WAIT, now, reading};
use testkit::eventually;

#[tokio::test]
async fn writes_without_a_valid_device_token_are_refused_and_store_nothing() {
    let stack = Stack::new();
    let ingest = stack.ingest().await;
    let _persister = stack.persister().await;
    let data = format!("{}/data", ingest.url);
    let other_keys = testkit::TestKeys::new();
    let a_token = stack.token("raspi-a").await;
    stack.token("raspi-b").await;

    let mut expiring = Claims::device("raspi-a", now() - 7200);
    expiring.exp = Some(now() - 3600);
    let expired = stack.keys.sign(&expiring);
    let foreign = other_keys.register_device(&stack.db.url, "raspi-f"); // registered, wrong key
    let unregistered = stack.keys.sign(&Claims::device("raspi-u", now()));
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let unsigned = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&json!({"iss": "sensorhub", "sub": "raspi-a", "role": "device", "jti": "x", "iat": now()}).to_string())
    );

    let response = stack
        .client
        .post(&data)
        .json(&reading("raspi-a"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401, "no token");
    assert_eq!(
        response.headers()["www-authenticate"],
        "Bearer realm=\"sensorhub\""
    );
    for (what, token, device) in [
        ("malformed", "garbage", "raspi-a"),
        ("expired", expired.as_str(), "raspi-a"),
        ("signed with another key", foreign.as_str(), "raspi-f"),
        ("alg none", unsigned.as_str(), "raspi-a"),
        ("not registered", unregistered.as_str(), "raspi-u"),
    ] {
        let (status, body) = stack
            .post_with(data.clone(), Some(token), reading(device))
            .await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["error"], "unauthorized");
    }
    let reader = stack.keys.app_token(Role::Reader);
    assert_eq!(
        stack.post_reading(&data, &reader, "raspi-a").await,
        403,
        "reader token"
    );

    // device A writing as device B, alone or hidden in a batch: 403, and none of the batch is kept
    let (status, body) = stack
        .post_with(data.clone(), Some(&a_token), reading("raspi-b"))
        .await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));
    let mixed = json!([
        {"device_id": "raspi-a", "id": "1", "metrics": {"t": 1}},
        {"device_id": "raspi-b", "id": "2", "metrics": {"t": 2}},
    ]);
    let (status, _) = stack
        .post_with(format!("{}/v1/readings", ingest.url), Some(&a_token), mixed)
        .await;
    assert_eq!(status, 403);

    // the one legitimate write goes through, and is all that is stored
    assert_eq!(stack.post_reading(&data, &a_token, "raspi-a").await, 200);
    stack.wait_stored(1).await;
    ingest.stop().await;
}

#[tokio::test]
async fn a_revoked_device_is_refused_within_seconds_without_a_restart() {
    let stack = Stack::new();
    let token = stack.token("raspi-r").await;
    // the production default refresh, not the tests' quick one
    let ingest = stack.ingest_with(|s| s.auth_refresh_ms = 2000).await;
    let data = format!("{}/data", ingest.url);
    assert_eq!(stack.post_reading(&data, &token, "raspi-r").await, 200);
    let mut conn = store::connect(&stack.db.url).unwrap();
    assert!(store::credentials::revoke_device(&mut conn, "raspi-r").unwrap());
    let revoked_at = Instant::now();
    eventually(
        Duration::from_secs(10),
        "the revocation to take effect",
        || async { (stack.post_reading(&data, &token, "raspi-r").await == 401).then_some(()) },
    )
    .await;
    assert!(revoked_at.elapsed() < Duration::from_secs(10));
    ingest.stop().await;
}

#[tokio::test]
async fn a_device_flooding_ingest_gets_429_with_retry_after() {
    let stack = Stack::new();
    let ingest = stack
        .ingest_with(|s| {
            s.rate_limit_per_second = 1;
            s.rate_limit_burst = 3;
        })
        .await;
    let data = format!("{}/data", ingest.url);
    let token = stack.token("raspi-flood").await;
    let mut statuses = Vec::new();
    for i in 0..10 {
        let response = stack
            .client
            .post(&data)
            .bearer_auth(&token)
            .json(&json!({"device_id": "raspi-flood", "id": format!("{i}"), "t": i}))
            .send()
            .await
            .unwrap();
        if response.status() == 429 {
            assert!(response.headers().contains_key("retry-after"));
        }
        statuses.push(response.status().as_u16());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        3,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        7,
        "{statuses:?}"
    );
    // other devices are not held back by one that floods
    assert_eq!(stack.post(data.clone(), reading("raspi-calm")).await.0, 200);
    assert_eq!(
        stack.queued_messages().await,
        4,
        "refused requests queue nothing"
    );
    ingest.stop().await;
}

#[tokio::test]
async fn anonymous_ingest_is_off_by_default_and_only_explicitly_on() {
    let defaults = ingest_http::Settings::defaults();
    assert!(!defaults.auth_allow_anonymous);
    let mut no_key = defaults.clone();
    no_key.http.http_addr = "127.0.0.1:0".into();
    let err = ingest_http::Application::build(&no_key)
        .err()
        .expect("refused without a key");
    assert!(err.to_string().contains("auth_public_key_file"), "{err}");

    let stack = Stack::new();
    let ingest = stack
        .ingest_with(|s| {
            s.auth_public_key_file = String::new();
            s.auth_allow_anonymous = true;
        })
        .await;
    let (status, _) = stack
        .post_with(format!("{}/data", ingest.url), None, reading("anyone"))
        .await;
    assert_eq!(status, 200);
    ingest.stop().await;
}

#[tokio::test]
async fn slow_clients_cannot_hold_a_connection() {
    let stack = Stack::new();
    let ingest = stack
        .ingest_with(|s| {
            s.http.http_header_timeout_ms = 300;
            s.http.http_body_timeout_ms = 500;
        })
        .await;
    let addr = ingest.url.trim_start_matches("http://").to_owned();
    // headers that never finish
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"POST /data HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut answer)).await;
    assert!(
        read.is_ok(),
        "the server closed the connection of a client that never sent its headers"
    );
    // a body that never finishes
    let token = stack.token("raspi-slow").await;
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /data HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"device_id\""
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    let text = testkit::read_until_closed(&mut slow, Duration::from_secs(5), "the answer").await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    ingest.stop().await;
}

#[tokio::test]
async fn every_write_is_audited_with_who_when_where_and_never_the_token() {
    let stack = Stack::new();
    let token = stack.token("raspi-audit").await;
    let (_child, mut lines, port) = spawn_logged(&stack, &[("AUDIT_ACCEPTED", "each")], "json");
    let mut log = Vec::new();
    let data = format!("http://127.0.0.1:{port}/data");
    eventually(WAIT, "ready", || async {
        let r = stack
            .client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            .ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    assert_eq!(stack.post_reading(&data, &token, "raspi-audit").await, 200);
    assert_eq!(stack.post_reading(&data, &token, "raspi-other").await, 403);
    assert_eq!(
        stack
            .post_status(data.clone(), None, reading("raspi-audit"))
            .await,
        401
    );
    let audit = std::thread::spawn(move || {
        let mut audit = Vec::new();
        while audit.len() < 3 {
            let mut line = String::new();
            if std::io::BufRead::read_line(&mut lines, &mut line).unwrap_or(0) == 0 {
                break;
            }
            log.push(line.clone());
            let event: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            if event["target"] == "audit" {
                audit.push(event);
            }
        }
        (audit, log)
    })
    .join()
    .unwrap();
    let (audit, log) = audit;
    let token_id =
        auth::TokenVerifier::from_file(std::path::Path::new(&stack.keys.verifying_key_file()))
            .unwrap()
            .verify(&token)
            .unwrap()
            .jti;
    assert_eq!(audit[0]["outcome"], "accepted");
    assert_eq!(audit[0]["device.id"], "raspi-audit");
    assert_eq!(audit[0]["token.id"], token_id.as_str());
    assert_eq!(audit[0]["client.addr"], "127.0.0.1");
    assert_eq!(audit[0]["readings"], 1);
    assert!(audit[0]["timestamp"].is_string());
    assert_eq!(
        (audit[1]["outcome"].as_str(), audit[1]["reason"].as_str()),
        (Some("refused"), Some("forbidden"))
    );
    assert_eq!(
        (audit[2]["outcome"].as_str(), audit[2]["reason"].as_str()),
        (Some("refused"), Some("unauthorized"))
    );
    assert!(
        !log.concat().contains(&token),
        "the token itself is never logged"
    );
}

/// ingest-http as a process with its log on a pipe (`format` "json" or "text"), with this stack's
/// keys and database and `env` on top: the process, its log lines, its port.
fn spawn_logged(
    stack: &Stack,
    env: &[(&str, &str)],
    format: &str,
) -> (
    testkit::spawn::Binary,
    std::io::BufReader<std::process::ChildStdout>,
    u64,
) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ingest-http"));
    command
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env("HTTP_WORKERS", "1")
        .env("AMQP_URL", testkit::amqp_url())
        .env("AMQP_PREFIX", &*stack.prefix)
        .env("DATABASE_URL", &stack.db.url)
        .env("AUTH_PUBLIC_KEY_FILE", stack.keys.verifying_key_file())
        .env("AUTH_REFRESH_MS", "200")
        .env("LOG_FORMAT", format)
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped());
    let mut child = testkit::spawn::Binary::spawn(command);
    let mut lines = std::io::BufReader::new(child.take_stdout().unwrap());
    let port = loop {
        let mut line = String::new();
        assert!(
            std::io::BufRead::read_line(&mut lines, &mut line).unwrap() > 0,
            "ingest-http exited"
        );
        if !line.contains("ingest-http listening") {
            continue;
        }
        let port = match serde_json::from_str::<Value>(&line) {
            Ok(event) => event["port"].as_u64(),
            Err(_) => line
                .split("port=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|p| p.parse().ok()),
        };
        break port.expect("the listening line names the port");
    };
    (child, lines, port)
}

/// By default accepted writes are summed per device and token over an interval (a line per
/// request would fill a disk at full load); refusals stay a line each, and nothing a client sends
/// can start a line of its own in the text log.
#[tokio::test]
async fn accepted_writes_are_summed_and_no_request_can_forge_an_audit_line() {
    let stack = Stack::new();
    let token = stack.token("raspi-sum").await;
    let (child, lines, port) =
        spawn_logged(&stack, &[("AUDIT_SUMMARY_INTERVAL_SECS", "1")], "text");
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader_log = log.clone();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(lines) {
            let Ok(line) = line else { break };
            reader_log.lock().unwrap().push(line);
        }
    });
    let base = format!("http://127.0.0.1:{port}");
    eventually(WAIT, "ready", || async {
        let r = stack
            .client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    for n in 0..3 {
        let body = json!([
            {"device_id": "raspi-sum", "id": format!("a{n}"), "ts": 1_795_000_000_000u64 + n * 1000, "metrics": {"t": 1.0}},
            {"device_id": "raspi-sum", "id": format!("b{n}"), "ts": 1_795_000_000_500u64 + n * 1000, "metrics": {"t": 2.0}}
        ]);
        let (status, _) = stack
            .post_with(format!("{base}/v1/readings"), Some(&token), body)
            .await;
        assert_eq!(status, 202);
    }
    // a token whose header carries a line break and a forged accepted line after it
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let forged_line = "2026-11-30T00:00:00.000000Z  INFO audit: outcome=\"accepted\" device.id=victim readings=1000";
    let header = json!({"alg": format!("EdDSA\n{forged_line}"), "typ": "JWT"}).to_string();
    let evil = format!("{}.{}.c2ln", b64(&header), b64("{}"));
    let (status, _) = stack
        .post_with(format!("{base}/data"), Some(&evil), reading("raspi-sum"))
        .await;
    assert_eq!(status, 401);

    let summary = eventually(WAIT, "the accepted writes' summary", || async {
        let log = log.lock().unwrap();
        log.iter()
            .find(|l| l.contains("outcome=\"accepted\"") && l.contains("summary=true"))
            .cloned()
    })
    .await;
    for expected in [
        "device.id=raspi-sum",
        "requests=3",
        "readings=6",
        "readings.earliest=2026-11-18T11:06:40+00:00",
        "readings.latest=2026-11-18T11:06:42.500+00:00",
        "client.addrs=127.0.0.1",
    ] {
        assert!(summary.contains(expected), "{expected} in {summary}");
    }
    let log = log.lock().unwrap().clone();
    let refusal = log
        .iter()
        .find(|l| l.contains("outcome=\"refused\""))
        .expect("the refusal is a line of its own");
    assert!(refusal.contains("reason=\"unauthorized\""), "{refusal}");
    assert!(
        log.iter().all(|l| !l.starts_with("2026-11-30T00:00:00")),
        "a client's text started a line: {log:#?}"
    );
    assert_eq!(
        log.iter()
            .filter(|l| l.contains("outcome=\"accepted\""))
            .count(),
        1,
        "one summary line for three requests: {log:#?}"
    );
    drop(child);
}

/// Every spelling of the write routes, and of no route, needs a device token: 401, nothing
/// published, whatever the router makes of the path.
#[tokio::test]
async fn every_spelling_of_every_route_needs_a_device_token() {
    let stack = Stack::new();
    let ingest = stack.ingest_with(|s| s.refusal_limit_per_second = 0).await;
    let addr = ingest.url.trim_start_matches("http://").to_owned();
    let body = r#"{"device_id": "raspi-a", "temperature": 21.5}"#;
    let mut probes = 0;
    for (method, path) in [
        ("POST", "/data"),
        ("POST", "/v1/readings"),
        ("GET", "/data"),
        ("GET", "/v1/commands/next"),
        ("POST", "/v1/commands/c-1/result"),
        ("GET", "/v1/ws"),
        ("POST", "/nothing-here"),
    ] {
        for target in testkit::path_spellings(path, &addr) {
            let head = format!(
                "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json"
            );
            let (status, answer) = testkit::raw_http(&addr, &head, body).await;
            assert_eq!(status, 401, "{head:?} answered {answer}");
            probes += 1;
        }
    }
    assert!(probes > 40, "{probes} probes");
    let metrics = ingest.metrics().await;
    assert_eq!(
        testkit::metric_sum(&metrics, "sensorhub_readings_accepted_total"),
        0.0
    );
    assert!(
        testkit::metric_sum(&metrics, "sensorhub_requests_rejected_total") >= probes as f64,
        "{metrics}"
    );
    // a device's wrong method on a known route is a 405 naming the right one
    let token = stack.token("raspi-a").await;
    let response = stack
        .client
        .get(format!("{}/data", ingest.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "POST");
    ingest.stop().await;
}

/// Forged tokens cost a signature check each: past its refusal budget a client address gets 429
/// before any check, even with a good token, while other addresses write as usual.
#[tokio::test]
async fn an_address_that_keeps_being_refused_is_slowed_down() {
    let stack = Stack::new();
    let ingest = stack
        .ingest_with(|s| {
            s.refusal_limit_per_second = 1;
            s.refusal_limit_burst = 5;
        })
        .await;
    let data = format!("{}/data", ingest.url);
    let token = stack.token("raspi-honest").await;
    let forged = testkit::TestKeys::new().sign(&Claims::device("raspi-honest", now()));
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(stack.post_reading(&data, &forged, "raspi-honest").await);
    }
    assert_eq!(statuses, [401, 401, 401, 401, 401, 401, 429, 429]);
    let (status, _) = stack
        .post_with(data.clone(), Some(&token), reading("raspi-honest"))
        .await;
    assert_eq!(status, 429, "the address is slowed down, whatever it sends");
    let elsewhere = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 3]))
        .build()
        .unwrap();
    let response = elsewhere
        .post(&data)
        .bearer_auth(&token)
        .json(&reading("raspi-honest"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "another address is not");
    assert_eq!(stack.queued_messages().await, 1, "refusals queue nothing");
    ingest.stop().await;
}
