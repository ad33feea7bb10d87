//! App tokens: only tokens recorded as issued, not revoked, and no longer-lived than the cap get
//! in; admins list and revoke them; a revoked token is refused at once; `/readyz` says when the
//! list cannot be followed.

use std::time::Duration;

use auth::{Claims, Role};
use reqwest::Method;
use serde_json::Value;

use crate::{start, start_empty};

/// How soon a revoked token must be refused, well within the scheduled re-read.
const REFUSED_WITHIN: Duration = Duration::from_secs(1);

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[tokio::test]
async fn a_revoked_app_token_is_refused_at_once() {
    // scheduled re-reads a minute apart: only the change notification can make this pass
    let api = start_empty(|s| s.auth_refresh_ms = 60_000).await;
    let admin = api.keys.app_token(Role::Admin);
    let reader_id = api.token_id(&api.reader);
    assert_eq!(api.get("/v1/devices").await.0, 200);

    let (status, _, _) = api.revoke_token(&admin, &reader_id).await;
    assert_eq!(status, 204);
    let body = testkit::eventually(REFUSED_WITHIN, "the revoked token refused", || async {
        let (status, body) = api.get("/v1/devices").await;
        if status != 401 {
            assert_eq!(status, 200);
        }
        (status == 401).then_some(body)
    })
    .await;
    assert!(
        body["message"].as_str().unwrap().contains("revoked"),
        "{body}"
    );

    // as `sensorctl token revoke` does it: straight in the database
    let other = api.keys.app_token(Role::Reader);
    let other_id = api.token_id(&other);
    let status = api.get_status("/v1/devices", &other).await;
    assert_eq!(status, 200, "a token issued a moment ago is let in");
    let mut conn = store::connect(&api.db.url).unwrap();
    assert!(store::app_tokens::revoke_app_token(&mut conn, &other_id).unwrap());
    testkit::eventually(
        REFUSED_WITHIN,
        "the token revoked in the database refused",
        || async { (api.get_status("/v1/devices", &other).await == 401).then_some(()) },
    )
    .await;

    // revoked already, unknown, not an id
    let (status, _, _) = api.revoke_token(&admin, &reader_id).await;
    assert_eq!(status, 404);
    let (status, _, _) = api.revoke_token(&admin, "nope").await;
    assert_eq!(status, 404);
    let long = "x".repeat(65);
    for bad in [long.as_str(), "a%20b", "a.b"] {
        let (status, _, body) = api.revoke_token(&admin, bad).await;
        assert_eq!((status, body["field"].as_str()), (400, Some("id")), "{bad}");
    }
    // the admin's own token is untouched
    assert_eq!(api.get_status("/v1/devices", &admin).await, 200);
}

#[tokio::test]
async fn admins_list_tokens_readers_cannot() {
    let api = start_empty(|_| {}).await;
    let admin = api.keys.app_token(Role::Admin);
    let (status, _, body) = api
        .call(Method::GET, "/v1/tokens", Some(&api.reader), None)
        .await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));
    let (status, _, _) = api.call(Method::GET, "/v1/tokens", None, None).await;
    assert_eq!(status, 401);

    let (status, _, body) = api
        .call(Method::GET, "/v1/tokens", Some(&admin), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let tokens = body["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 2, "{body}");
    let roles: Vec<&str> = tokens.iter().map(|t| t["role"].as_str().unwrap()).collect();
    assert!(
        roles.contains(&"reader") && roles.contains(&"admin"),
        "{body}"
    );
    assert!(
        tokens
            .iter()
            .all(|t| t["state"] == "active" && t["name"] == "test-app")
    );
    assert_eq!(body["next_cursor"], Value::Null);

    // a page at a time
    let (_, _, first) = api
        .call(Method::GET, "/v1/tokens?limit=1", Some(&admin), None)
        .await;
    let cursor = first["next_cursor"].as_str().unwrap();
    let (_, _, second) = api
        .call(
            Method::GET,
            &format!("/v1/tokens?limit=1&cursor={cursor}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(second["tokens"].as_array().unwrap().len(), 1);
    assert_ne!(first["tokens"][0]["id"], second["tokens"][0]["id"]);
    assert_eq!(second["next_cursor"], Value::Null);
    let status = api.get_status("/v1/tokens?limit=0", &admin).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn unrecorded_unexpiring_and_overlong_app_tokens_are_refused() {
    let api = start_empty(|s| s.app_token_max_ttl_secs = 7 * 86_400).await;
    let keys = &api.keys;

    // signed with the right key, but never recorded (not issued by `sensorctl token issue`)
    let unrecorded = keys.sign(&Claims::app("rogue", Role::Admin, 3600, now()));
    // recorded, but valid for longer than the cap
    let long = Claims::app("long", Role::Reader, 8 * 86_400, now());
    keys.record_app_token(&api.db.url, &long);
    let long = keys.sign(&long);
    // recorded with an expiry, but signed without one
    let mut forever = Claims::app("forever", Role::Reader, 3600, now());
    keys.record_app_token(&api.db.url, &forever);
    forever.exp = None;
    let forever = keys.sign(&forever);
    // just within the cap
    let week = Claims::app("week", Role::Reader, 7 * 86_400, now());
    keys.record_app_token(&api.db.url, &week);
    let week = keys.sign(&week);
    // recorded last: once query-api's copy of the list lets it in, it holds the others too
    testkit::eventually(
        Duration::from_secs(30),
        "the recorded tokens followed",
        || async {
            let status = api.get_status("/v1/devices", &week).await;
            (status == 200).then_some(())
        },
    )
    .await;

    for (what, token, says) in [
        ("unrecorded", &unrecorded, "not recorded"),
        ("over the cap", &long, "more than the 604800s allowed"),
        ("no expiry", &forever, "no expiry"),
    ] {
        let (status, headers, body) = api
            .call(Method::GET, "/v1/devices", Some(token), None)
            .await;
        assert_eq!(status, 401, "{what}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains(says),
            "{what}: {body}"
        );
        assert!(
            headers["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("invalid_token")
        );
    }
    assert_eq!(api.get_status("/v1/devices", &week).await, 200);
}

#[tokio::test]
async fn readyz_says_when_the_token_list_cannot_be_followed() {
    let db = testkit::TestDb::migrated();
    let proxy = testkit::TcpProxy::start("127.0.0.1:5432").await;
    let through_proxy = format!("postgres://postgres@127.0.0.1:{}/{}", proxy.port, db.name);
    let api = start(db, |s| {
        s.database.database_url = through_proxy;
        s.auth_refresh_ms = 100;
        s.auth_registry_max_age_secs = 1;
    })
    .await;
    let ready = || async {
        let (status, _, body) = api.call(Method::GET, "/readyz", None, None).await;
        (
            status,
            body["checks"]["app_tokens"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
        )
    };
    assert_eq!(ready().await, (200, "up".to_owned()));
    proxy.cut();
    let check = testkit::eventually(
        Duration::from_secs(20),
        "readyz to report the app token list",
        || async {
            let (status, check) = ready().await;
            (status == 503 && check.starts_with("down")).then_some(check)
        },
    )
    .await;
    assert!(check.contains("app token list"), "{check}");
    proxy.restore();
    testkit::eventually(Duration::from_secs(20), "ready again", || async {
        (ready().await.0 == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn me_tells_a_token_its_name_role_and_what_it_may_do() {
    let api = start_empty(|_| {}).await;
    let (status, reader) = api.get("/v1/me").await;
    assert_eq!(status, 200);
    assert_eq!(reader["role"], "reader");
    assert_eq!(reader["can_command"], false);
    assert_eq!(reader["can_manage"], false);
    assert_eq!(reader["token_id"], api.token_id(&api.reader).as_str());
    assert!(reader["expires_at"].as_str().unwrap().ends_with('Z'));

    let operator = api.keys.app_token(Role::Operator);
    let (status, _, body) = api.call(Method::GET, "/v1/me", Some(&operator), None).await;
    assert_eq!(status, 200);
    assert_eq!(body["role"], "operator");
    assert_eq!(body["can_command"], true);
    assert_eq!(body["can_manage"], false);

    let (status, _, _) = api.call(Method::GET, "/v1/me", None, None).await;
    assert_eq!(status, 401);
}
