//! Every way into the read API that must fail, fails; and the admin operations work for admins only.

use std::time::Duration;

use auth::{Claims, Role};
use reqwest::Method;
use serde_json::{Value, json};

use crate::{api_with_data, start};

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
    let db = testkit::TestDb::migrated();
    let api = start(db, |_| {}).await;
    let admin = api.keys.app_token(Role::Admin);
    let reader = api.reader.clone();

    // without a signing key, query-api cannot mint device tokens and says where to get them
    let (status, _, body) = api
        .call(
            Method::POST,
            "/v1/devices",
            Some(&admin),
            Some(json!({"device_id": "pi-9"})),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (501, Some("not_configured"))
    );

    let (status, _, _) = api
        .call(
            Method::POST,
            "/v1/devices",
            Some(&reader),
            Some(json!({"device_id": "pi-9"})),
        )
        .await;
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
    let (status, _, body) = api
        .call(
            Method::POST,
            "/v1/devices",
            Some(&admin),
            Some(json!({"device_id": "pi-7"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let token = body["token"].as_str().unwrap();
    let verifier =
        auth::TokenVerifier::from_file(std::path::Path::new(&keys.verifying_key_file())).unwrap();
    let claims = verifier.verify(token).unwrap();
    assert_eq!((claims.sub.as_str(), claims.role), ("pi-7", Role::Device));
    assert_eq!(body["token_id"], claims.jti);
    let (status, _, _) = api
        .call(
            Method::POST,
            "/v1/devices",
            Some(&admin),
            Some(json!({"device_id": "pi-7"})),
        )
        .await;
    assert_eq!(status, 409);
    let (status, _, body) = api
        .call(
            Method::POST,
            "/v1/devices",
            Some(&admin),
            Some(json!({"device_id": "bad id"})),
        )
        .await;
    assert_eq!((status, body["field"].as_str()), (400, Some("device_id")));
}

#[tokio::test]
async fn a_token_flooding_the_api_gets_429() {
    let db = testkit::TestDb::migrated();
    let api = start(db, |s| {
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
    assert_eq!(
        api.call(Method::GET, "/v1/devices", Some(&other), None)
            .await
            .0,
        200
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        api.call(Method::GET, "/v1/devices", Some(&api.reader), None)
            .await
            .0,
        200,
        "the budget refills"
    );
}

#[tokio::test]
async fn browsers_from_allowed_origins_only() {
    let db = testkit::TestDb::migrated();
    let api = start(db, |s| {
        s.cors_allowed_origins = "https://dashboard.example.com".into()
    })
    .await;
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
