//! Every way into the read API that must fail, fails; and the admin operations work for admins only.

use std::time::Duration;

use auth::{Claims, Role};
use reqwest::Method;
use serde_json::{Value, json};

use crate::{api_with_data, start, start_empty};

impl crate::Api {
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut request = self.client.request(method, format!("{}{path}", self.url));
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        (
            status,
            headers,
            response.json().await.unwrap_or(Value::Null),
        )
    }

    /// The status of `GET path` with `token`.
    pub(crate) async fn get_status(&self, path: &str, token: &str) -> u16 {
        self.call(Method::GET, path, Some(token), None).await.0
    }

    /// `DELETE /v1/tokens/{id}` with `token`.
    pub(crate) async fn revoke_token(
        &self,
        token: &str,
        id: &str,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let path = format!("/v1/tokens/{id}");
        self.call(Method::DELETE, &path, Some(token), None).await
    }

    /// The id (`jti`) of a token signed with this query-api's keys.
    pub(crate) fn token_id(&self, token: &str) -> String {
        let key = self.keys.verifying_key_file();
        auth::TokenVerifier::from_file(std::path::Path::new(&key))
            .unwrap()
            .verify(token)
            .unwrap()
            .jti
    }

    /// `POST /v1/devices` for `device`, with `token`.
    pub(crate) async fn add_device(
        &self,
        token: &str,
        device: &str,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let body = json!({ "device_id": device });
        self.call(Method::POST, "/v1/devices", Some(token), Some(body))
            .await
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[tokio::test]
async fn reading_without_a_good_token_is_refused_on_every_route() {
    let api = api_with_data().await;
    let other_keys = testkit::TestKeys::new();
    let expired = api
        .keys
        .sign(&Claims::app("old", Role::Reader, 60, now() - 7200));
    let foreign = other_keys.app_token(Role::Reader);
    let device = api.keys.sign(&Claims::device("pi-1", now()));
    let mut forged = api.reader.split('.').map(str::to_owned).collect::<Vec<_>>();
    forged[2] = forged[2].chars().rev().collect(); // the signature no longer matches
    let forged = forged.join(".");
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let unsigned = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(
            &json!({"iss": "sensorhub", "sub": "x", "role": "admin", "jti": "x", "iat": now()})
                .to_string()
        )
    );
    for path in [
        "/v1/devices",
        "/v1/devices/pi-1",
        "/v1/devices/pi-1/readings",
        "/v1/devices/pi-1/latest",
        "/v1/devices/pi-1/series?metric=t",
    ] {
        let (status, headers, body) = api.call(Method::GET, path, None, None).await;
        assert_eq!(status, 401, "{path} without a token");
        assert_eq!(headers["www-authenticate"], "Bearer realm=\"sensorhub\"");
        assert_eq!(body["error"], "unauthorized");
        for (what, token) in [
            ("malformed", "not.a.token"),
            ("expired", &expired),
            ("foreign key", &foreign),
            ("forged signature", &forged),
            ("alg none", &unsigned),
        ] {
            let (status, headers, _) = api.call(Method::GET, path, Some(token), None).await;
            assert_eq!(status, 401, "{path} with a {what} token");
            assert!(
                headers["www-authenticate"]
                    .to_str()
                    .unwrap()
                    .contains("invalid_token")
            );
        }
        let (status, _, _) = api.call(Method::GET, path, Some(&device), None).await;
        assert_eq!(status, 403, "{path} with a device token");
    }
    // the ops endpoints and the description stay open (Traefik does not route /metrics outside)
    for path in ["/healthz", "/readyz", "/openapi.json"] {
        assert_eq!(
            api.call(Method::GET, path, None, None).await.0,
            200,
            "{path}"
        );
    }
}

#[tokio::test]
async fn admins_register_and_revoke_devices_readers_cannot() {
    let api = start_empty(|_| {}).await;
    let admin = api.keys.app_token(Role::Admin);
    let reader = api.reader.clone();

    // without a signing key, query-api cannot mint device tokens and says where to get them
    let (status, _, body) = api.add_device(&admin, "pi-9").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (501, Some("not_configured"))
    );

    let (status, _, _) = api.add_device(&reader, "pi-9").await;
    assert_eq!(status, 403);
    api.keys.register_device(&api.db.url, "pi-9");
    let (status, _, _) = api
        .call(Method::DELETE, "/v1/devices/pi-9", Some(&reader), None)
        .await;
    assert_eq!(status, 403);
    let (status, _, _) = api
        .call(Method::DELETE, "/v1/devices/pi-9", Some(&admin), None)
        .await;
    assert_eq!(status, 204);
    let (status, _, _) = api
        .call(Method::DELETE, "/v1/devices/pi-9", Some(&admin), None)
        .await;
    assert_eq!(status, 404, "already revoked");
    let mut conn = store::connect(&api.db.url).unwrap();
    let listed = store::credentials::list_credentials(&mut conn).unwrap();
    assert!(listed[0].revoked_at.is_some());
}

#[tokio::test]
async fn with_the_signing_key_an_admin_gets_a_working_device_token() {
    let db = testkit::TestDb::migrated();
    // a query-api that holds the private key of the pair it verifies with
    let keys = testkit::TestKeys::new();
    keys.record_app_tokens_in(&db.url);
    let (public, private) = (keys.verifying_key_file(), keys.signing_key_file());
    let api = start(db, |s| {
        s.auth_public_key_file = public;
        s.auth_signing_key_file = private;
    })
    .await;
    let admin = keys.app_token(Role::Admin);
    let (status, _, body) = api.add_device(&admin, "pi-7").await;
    assert_eq!(status, 201, "{body}");
    let token = body["token"].as_str().unwrap();
    let verifier =
        auth::TokenVerifier::from_file(std::path::Path::new(&keys.verifying_key_file())).unwrap();
    let claims = verifier.verify(token).unwrap();
    assert_eq!((claims.sub.as_str(), claims.role), ("pi-7", Role::Device));
    assert_eq!(body["token_id"], claims.jti);
    let (status, _, _) = api.add_device(&admin, "pi-7").await;
    assert_eq!(status, 409);
    let (status, _, body) = api.add_device(&admin, "bad id").await;
    assert_eq!((status, body["field"].as_str()), (400, Some("device_id")));
}

#[tokio::test]
async fn a_token_flooding_the_api_gets_429() {
    let api = start_empty(|s| {
        s.rate_limit_per_second = 2;
        s.rate_limit_burst = 5;
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let (status, headers, _) = api
            .call(Method::GET, "/v1/devices", Some(&api.reader), None)
            .await;
        if status == 429 {
            assert!(headers.contains_key("retry-after"));
        }
        statuses.push(status);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        5,
        "{statuses:?}"
    );
    assert!(statuses.iter().all(|s| *s == 200 || *s == 429));
    // another token has its own budget
    let other = api.keys.app_token(Role::Reader);
    assert_eq!(api.get_status("/v1/devices", &other).await, 200);
    testkit::eventually(Duration::from_secs(10), "the budget to refill", || async {
        let status = api.get_status("/v1/devices", &api.reader).await;
        (status == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn browsers_from_allowed_origins_only() {
    let api =
        start_empty(|s| s.cors_allowed_origins = "https://dashboard.example.com".into()).await;
    let preflight = |origin: &'static str| {
        api.client
            .request(Method::OPTIONS, format!("{}/v1/devices", api.url))
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization")
            .send()
    };
    let allowed = preflight("https://dashboard.example.com").await.unwrap();
    assert_eq!(allowed.status(), 200);
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://dashboard.example.com"
    );
    let refused = preflight("https://evil.example.net").await.unwrap();
    assert!(
        !refused
            .headers()
            .contains_key("access-control-allow-origin")
    );
}

/// Every spelling of every route that the router may map onto it (or onto nothing), each sent
/// without a token: 401, and nothing read or changed. Sent byte for byte, as an attacker sends it.
#[tokio::test]
async fn every_spelling_of_every_route_needs_a_token() {
    // hundreds of refusals from one address: its refusal budget is another test's
    let api = crate::api_with_data_and(|s| s.refusal_limit_per_second = 0).await;
    api.keys.register_device(&api.db.url, "pi-9");
    let addr = api.url.trim_start_matches("http://").to_owned();
    let routes = [
        ("GET", "/v1/devices"),
        ("GET", "/v1/devices/pi-1"),
        ("GET", "/v1/devices/pi-1/readings"),
        ("GET", "/v1/devices/pi-1/latest"),
        ("GET", "/v1/devices/pi-1/series?metric=t"),
        ("POST", "/v1/devices"),
        ("DELETE", "/v1/devices/pi-9"),
        ("PUT", "/v1/devices/pi-9"),
        ("GET", "/v1"),
        ("GET", "/nothing-here"),
    ];
    let mut probes = 0;
    for (method, path) in routes {
        for target in testkit::path_spellings(path, &addr) {
            for version in ["HTTP/1.1", "HTTP/1.0"] {
                let head = format!("{method} {target} {version}\r\nHost: {addr}");
                let body = if method == "POST" {
                    r#"{"device_id": "pi-new"}"#
                } else {
                    ""
                };
                let (status, answer) = testkit::raw_http(&addr, &head, body).await;
                assert_eq!(status, 401, "{head:?} answered {answer}");
                assert!(answer.contains("\"error\":\"unauthorized\""), "{answer}");
                probes += 1;
            }
        }
    }
    assert!(probes > 200, "{probes} probes");
    let mut conn = store::connect(&api.db.url).unwrap();
    let listed = store::credentials::list_credentials(&mut conn).unwrap();
    assert_eq!(listed.len(), 1, "nothing registered: {listed:?}");
    assert!(listed[0].revoked_at.is_none(), "nothing revoked");
}

/// A method a route does not take is a 405 naming the ones it does (`Allow`), for any role; an
/// unknown path is a 404 for a token holder; and neither mints metric series.
#[tokio::test]
async fn a_wrong_method_is_405_with_allow_and_metrics_stay_bounded() {
    let api = api_with_data().await;
    let admin = api.keys.app_token(Role::Admin);
    for token in [&api.reader, &admin] {
        for (method, path, allow) in [
            ("PUT", "/v1/devices", "GET, POST"),
            ("PATCH", "/v1/devices/pi-1", "GET, DELETE"),
            ("POST", "/v1/devices/pi-1/readings", "GET"),
            ("DELETE", "/v1/devices/pi-1/latest", "GET"),
            ("FROBNICATE", "/v1/devices", "GET, POST"),
        ] {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let (status, headers, body) = api.call(method.clone(), path, Some(token), None).await;
            assert_eq!(status, 405, "{method} {path}: {body}");
            assert_eq!(headers["allow"], allow, "{method} {path}");
            assert_eq!(body["error"], "method_not_allowed");
        }
        let status = api.get_status("/v1/nothing", token).await;
        assert_eq!(status, 404);
    }
    // the ops endpoints are public, and answer a wrong method the same way
    let (status, headers, _) = api.call(Method::POST, "/healthz", None, None).await;
    assert_eq!((status, headers["allow"].to_str().unwrap()), (405, "GET"));

    for n in 0..20 {
        let method = Method::from_bytes(format!("X{n}").as_bytes()).unwrap();
        api.call(
            method,
            &format!("/no/such/path/{n}"),
            Some(&api.reader),
            None,
        )
        .await;
    }
    let addr = api.url.trim_start_matches("http://");
    let head = format!(
        "GET /%761/devices HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}",
        api.reader
    );
    assert_eq!(testkit::raw_http(addr, &head, "").await.0, 200);
    let metrics = testkit::get_text(&api.client, &format!("{}/metrics", api.url)).await;
    let series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("sensorhub_http_requests_total{"))
        .collect();
    assert!(series.len() < 20, "{series:#?}");
    assert!(!metrics.contains("method=\"X1"), "{metrics}");
    assert!(metrics.contains("method=\"other\""), "{metrics}");
    assert!(metrics.contains("route=\"unmatched\""), "{metrics}");
    assert!(!metrics.contains("/no/such/path"), "{metrics}");
    assert!(
        series
            .iter()
            .any(|l| l.contains("route=\"/v1/devices\"") && l.contains("status=\"200\"")),
        "the encoded path is counted under its route: {series:#?}"
    );
}

/// Refused requests cost a signature check each: past its budget, a client address is answered
/// 429 before any check, even with a good token, while other addresses are served.
#[tokio::test]
async fn a_client_that_keeps_being_refused_is_slowed_down() {
    let api = start_empty(|s| {
        s.refusal_limit_per_second = 1;
        s.refusal_limit_burst = 5;
    })
    .await;
    let forged = testkit::TestKeys::new().app_token(Role::Admin);
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(api.get_status("/v1/devices", &forged).await);
    }
    assert_eq!(statuses[..6], [401; 6], "{statuses:?}");
    assert_eq!(statuses[6..], [429; 2], "{statuses:?}");
    let (status, headers, _) = api
        .call(Method::GET, "/v1/devices", Some(&api.reader), None)
        .await;
    assert_eq!(status, 429, "the address is slowed down, whatever it sends");
    assert!(headers.contains_key("retry-after"));
    let elsewhere = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let response = elsewhere
        .get(format!("{}/v1/devices", api.url))
        .bearer_auth(&api.reader)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "another address is not");
}

/// query-api as deployed with Mosquitto: the signing key and the MQTT admin URL.
async fn with_mqtt(admin_url: String) -> (crate::Api, String) {
    let keys = testkit::TestKeys::new();
    let (public, private) = (keys.verifying_key_file(), keys.signing_key_file());
    let api = start_empty(|s| {
        s.auth_public_key_file = public;
        s.auth_signing_key_file = private;
        s.mqtt_admin_url = admin_url;
    })
    .await;
    keys.record_app_tokens_in(&api.db.url);
    let admin = keys.app_token(Role::Admin);
    (api, admin)
}

fn mqtt_reading(device: &str) -> (String, Vec<u8>) {
    (
        format!("devices/{device}/readings"),
        br#"{"metrics":{"t":1}}"#.to_vec(),
    )
}

#[tokio::test]
async fn devices_added_and_revoked_through_the_api_get_and_lose_their_mqtt_accounts() {
    let mosquitto = testkit::mqtt::Mosquitto::production();
    let broker = mqtt_admin::Broker::from_url(&mosquitto.admin_url()).unwrap();
    let ingest_password = "ingest-pw";
    let accounts = mqtt_admin::IngestAccounts {
        password: ingest_password,
        replicas: 1,
        legacy_topic: None,
    };
    broker.init(&accounts, &[]).await.unwrap();
    let (api, admin) = with_mqtt(mosquitto.admin_url()).await;
    let device = |token: &str| {
        testkit::mqtt::Device::new("raspi-05", mosquitto.port).with_credentials("raspi-05", token)
    };
    let wait = Duration::from_secs(3);

    let (status, _, body) = api.add_device(&admin, "raspi-05").await;
    assert_eq!(status, 201, "{body}");
    let token = body["token"].as_str().unwrap().to_owned();
    assert_eq!(
        device(&token)
            .publish_all(vec![mqtt_reading("raspi-05")], Duration::ZERO, wait)
            .await,
        1,
        "the new device connects with its token"
    );

    // connected, publishing slowly, when an admin revokes it through the API: seen publishing by
    // the broker's ingest account
    let ingest_account = mqtt_admin::ingest_client_id(1);
    let mut ingest = testkit::mqtt::Device::new(&ingest_account, mosquitto.port)
        .with_credentials(&ingest_account, ingest_password)
        .listen(
            "$share/sensorhub/devices/+/readings",
            Duration::from_secs(8),
        );
    assert!(ingest.subscribed().await, "ingest may subscribe (shared)");
    let streaming = device(&token).publish_slowly(mqtt_reading("raspi-05"), 50);
    assert!(ingest.received(1).await, "raspi-05 publishing");
    let (status, _, body) = api
        .call(Method::DELETE, "/v1/devices/raspi-05", Some(&admin), None)
        .await;
    assert_eq!(status, 204, "{body}");
    let acked = streaming.await.unwrap();
    assert!(
        acked < 50,
        "the live connection was closed at the revocation ({acked} acknowledged)"
    );
    assert_eq!(
        device(&token)
            .publish_all(vec![mqtt_reading("raspi-05")], Duration::ZERO, wait)
            .await,
        0,
        "a reconnection is refused"
    );
    let (status, _, _) = api
        .call(Method::DELETE, "/v1/devices/raspi-05", Some(&admin), None)
        .await;
    assert_eq!(status, 404, "nothing left to revoke");

    // the plugin's own admin is "admin": no API call can replace or remove it
    let (status, _, body) = api.add_device(&admin, "admin").await;
    assert_eq!((status, body["error"].as_str()), (409, Some("conflict")));
    let (status, _, _) = api
        .call(Method::DELETE, "/v1/devices/admin", Some(&admin), None)
        .await;
    assert_eq!(status, 404);
    let (status, _, body) = api.add_device(&admin, "raspi-06").await;
    assert_eq!(status, 201, "the broker's admin still works: {body}");
}

#[tokio::test]
async fn while_the_broker_is_unreachable_nothing_is_added_and_a_revoke_says_mqtt_is_still_open() {
    let nothing_there = testkit::mqtt::free_port();
    let (api, admin) = with_mqtt(format!("mqtt://admin:pw@127.0.0.1:{nothing_there}")).await;

    let (status, headers, body) = api.add_device(&admin, "raspi-07").await;
    assert_eq!(status, 503, "{body}");
    assert!(headers.contains_key("retry-after"));
    assert!(
        body["message"].as_str().unwrap().contains("not registered"),
        "{body}"
    );
    let mut conn = store::connect(&api.db.url).unwrap();
    assert!(
        store::credentials::list_credentials(&mut conn)
            .unwrap()
            .iter()
            .all(|c| c.revoked_at.is_some()),
        "no active registration was left behind"
    );

    api.keys.register_device(&api.db.url, "raspi-08");
    let (status, _, body) = api
        .call(Method::DELETE, "/v1/devices/raspi-08", Some(&admin), None)
        .await;
    assert_eq!(status, 503, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("revoked for HTTP") && message.contains("MQTT"),
        "{message}"
    );
    let (status, _, body) = api
        .call(Method::DELETE, "/v1/devices/bad%20id", Some(&admin), None)
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("not_found")),
        "an id no device can have names no device"
    );
}
