//! Commands, the app's side: an operator issues, follows and cancels them; a reader only reads;
//! statuses move forward only, expiry included; bad requests are refused and change nothing.

use std::time::{Duration, Instant};

use auth::Role;
use reqwest::Method;
use serde_json::{Value, json};

use crate::{Api, start};

async fn api_with_devices(adjust: impl FnOnce(&mut query_api::Settings)) -> Api {
    service_kit::telemetry::init_for_tests();
    let api = start(testkit::TestDb::migrated(), adjust).await;
    for device in ["raspi-01", "raspi-02", "gone"] {
        api.keys.register_device(&api.db.url, device);
    }
    let mut conn = api.db.connect();
    store::credentials::revoke_device(&mut conn, "gone").unwrap();
    api
}

impl Api {
    async fn command(&self, token: &str, device: &str, body: Value) -> (u16, Value) {
        let (status, _, body) = self
            .call(
                Method::POST,
                &format!("/v1/devices/{device}/commands"),
                Some(token),
                Some(body),
            )
            .await;
        (status, body)
    }

    async fn issued(&self, token: &str, device: &str, body: Value) -> Value {
        let (status, answer) = self.command(token, device, body).await;
        assert_eq!(status, 201, "{answer}");
        answer
    }
}

fn statuses(command: &Value) -> Vec<&str> {
    command["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|change| change["status"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn an_operator_issues_follows_and_cancels_a_command_and_a_reader_only_reads() {
    let api = api_with_devices(|_| {}).await;
    let operator = api.keys.app_token(Role::Operator);

    let (status, headers, issued) = api
        .call(
            Method::POST,
            "/v1/devices/raspi-01/commands",
            Some(&operator),
            Some(json!({"name": "led", "args": {"on": true}, "ttl_s": 300})),
        )
        .await;
    assert_eq!(status, 201, "{issued}");
    let id = issued["id"].as_str().unwrap().to_owned();
    assert_eq!(headers["location"], format!("/v1/commands/{id}").as_str());
    assert_eq!(issued["status"], "pending");
    assert_eq!(issued["device_id"], "raspi-01");
    assert_eq!(issued["name"], "led");
    assert_eq!(issued["args"], json!({"on": true}));
    assert_eq!(issued["issued_by"], api.token_id(&operator).as_str());
    let created =
        chrono::DateTime::parse_from_rfc3339(issued["created_at"].as_str().unwrap()).unwrap();
    let expires =
        chrono::DateTime::parse_from_rfc3339(issued["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!(expires - created, chrono::Duration::seconds(300));

    // a reader follows it, and may not issue or cancel
    let followed = api.ok(&format!("/v1/commands/{id}")).await;
    assert_eq!(followed["status"], "pending");
    assert_eq!(statuses(&followed), ["pending"]);
    assert!(
        followed["history"][0]["detail"]
            .as_str()
            .unwrap()
            .contains(&api.token_id(&operator)),
        "{followed}"
    );
    let (status, refused) = api
        .command(&api.reader, "raspi-01", json!({"name": "led"}))
        .await;
    assert_eq!(status, 403, "{refused}");
    assert!(refused["message"].as_str().unwrap().contains("operator"));
    let cancel = format!("/v1/commands/{id}");
    let (status, _, _) = api
        .call(Method::DELETE, &cancel, Some(&api.reader), None)
        .await;
    assert_eq!(status, 403);
    // nor may an operator manage devices
    let (status, _, _) = api
        .call(
            Method::DELETE,
            "/v1/devices/raspi-01",
            Some(&operator),
            None,
        )
        .await;
    assert_eq!(status, 403);

    let (status, _, cancelled) = api
        .call(Method::DELETE, &cancel, Some(&operator), None)
        .await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    assert!(cancelled["finished_at"].is_string());
    // once finished, nothing moves it again
    let (status, _, again) = api
        .call(Method::DELETE, &cancel, Some(&operator), None)
        .await;
    assert_eq!(status, 409, "{again}");
    assert!(again["message"].as_str().unwrap().contains("cancelled"));
    let followed = api.ok(&format!("/v1/commands/{id}")).await;
    assert_eq!(followed["status"], "cancelled");
    assert_eq!(statuses(&followed), ["pending", "cancelled"]);

    // an admin may command too; the device's list shows both, newest first, filtered by status
    let admin = api.keys.app_token(Role::Admin);
    let second = api
        .issued(&admin, "raspi-01", json!({"name": "reboot"}))
        .await;
    assert_eq!(second["args"], json!({}), "args default to an empty object");
    let all = api.ok("/v1/devices/raspi-01/commands").await;
    let names: Vec<&str> = all["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["reboot", "led"]);
    assert_eq!(all["next_cursor"], Value::Null);
    let pending = api.ok("/v1/devices/raspi-01/commands?status=pending").await;
    assert_eq!(pending["commands"].as_array().unwrap().len(), 1);
    assert_eq!(pending["commands"][0]["id"], second["id"]);
    let other = api.ok("/v1/devices/raspi-02/commands").await;
    assert_eq!(other["commands"], json!([]));
}

#[tokio::test]
async fn a_device_s_commands_come_in_pages_that_end_exactly() {
    let api = api_with_devices(|_| {}).await;
    let operator = api.keys.app_token(Role::Operator);
    let mut issued = Vec::new();
    for i in 0..5 {
        let command = api
            .issued(&operator, "raspi-02", json!({"name": format!("step-{i}")}))
            .await;
        issued.push(command["id"].as_str().unwrap().to_owned());
    }
    issued.reverse();
    let mut seen = Vec::new();
    let mut path = "/v1/devices/raspi-02/commands?limit=2".to_owned();
    loop {
        let page = api.ok(&path).await;
        seen.extend(
            page["commands"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/devices/raspi-02/commands?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, issued, "every command once, newest first");

    for (query, field) in [
        ("status=done", "status"),
        ("cursor=raspi-01", "cursor"),
        ("limit=0", "limit"),
    ] {
        let (status, body) = api
            .get(&format!("/v1/devices/raspi-02/commands?{query}"))
            .await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["field"], field, "{query}: {body}");
    }
}

#[tokio::test]
async fn bad_commands_are_refused_with_a_clear_reason_and_store_nothing() {
    let api = api_with_devices(|s| {
        s.command_max_open = 2;
        s.command_args_max_bytes = 64;
    })
    .await;
    let operator = api.keys.app_token(Role::Operator);

    for (device, body, expected, says) in [
        ("nobody", json!({"name": "led"}), 404, "nobody"),
        ("gone", json!({"name": "led"}), 409, "revoked"),
        ("raspi-01", json!({"name": "no spaces"}), 400, "name"),
        ("raspi-01", json!({"name": ""}), 400, "name"),
        (
            "raspi-01",
            json!({"name": "led", "args": [1]}),
            400,
            "object",
        ),
        (
            "raspi-01",
            json!({"name": "led", "args": {"a\u{0}": 1}}),
            400,
            "U+0000",
        ),
        (
            "raspi-01",
            json!({"name": "led", "args": {"s": "x\u{0}"}}),
            400,
            "U+0000",
        ),
        (
            "raspi-01",
            json!({"name": "led", "args": {"s": "x".repeat(100)}}),
            413,
            "64",
        ),
        ("raspi-01", json!({"name": "led", "ttl_s": 0}), 400, "ttl_s"),
        (
            "raspi-01",
            json!({"name": "led", "ttl_s": 604_801}),
            400,
            "ttl_s",
        ),
        ("raspi-01", json!({"name": "led", "ttl": 10}), 400, "ttl"),
        ("raspi-01", json!({"args": {}}), 400, "name"),
    ] {
        let (status, body) = api.command(&operator, device, body.clone()).await;
        assert_eq!(status, expected, "{device} {body}");
        assert!(
            body["message"].as_str().unwrap_or_default().contains(says)
                || body["field"].as_str().unwrap_or_default().contains(says),
            "{device}: {body} does not say {says}"
        );
    }
    let (status, _) = api.get("/v1/commands/not-a-command").await;
    assert_eq!(status, 404);
    let (status, _) = api
        .get(&format!("/v1/commands/{}", uuid::Uuid::now_v7()))
        .await;
    assert_eq!(status, 404);
    for device in ["raspi-01", "gone"] {
        let list = api.ok(&format!("/v1/devices/{device}/commands")).await;
        assert_eq!(list["commands"], json!([]), "nothing stored for {device}");
    }

    // at most two unfinished commands a device; a finished one makes room again
    let first = api
        .issued(&operator, "raspi-01", json!({"name": "a"}))
        .await;
    api.issued(&operator, "raspi-01", json!({"name": "b"}))
        .await;
    let (status, body) = api
        .command(&operator, "raspi-01", json!({"name": "c"}))
        .await;
    assert_eq!(status, 429, "{body}");
    assert!(body["message"].as_str().unwrap().contains("2 unfinished"));
    api.issued(&operator, "raspi-02", json!({"name": "c"}))
        .await;
    let (status, _, _) = api
        .call(
            Method::DELETE,
            &format!("/v1/commands/{}", first["id"].as_str().unwrap()),
            Some(&operator),
            None,
        )
        .await;
    assert_eq!(status, 200);
    api.issued(&operator, "raspi-01", json!({"name": "c"}))
        .await;
}

#[tokio::test]
async fn a_command_not_finished_by_its_ttl_is_expired_from_that_second_and_recorded_once() {
    let api = api_with_devices(|_| {}).await;
    let operator = api.keys.app_token(Role::Operator);
    let command = api
        .issued(&operator, "raspi-01", json!({"name": "led", "ttl_s": 1}))
        .await;
    let id = command["id"].as_str().unwrap().to_owned();
    let expires_at = command["expires_at"].as_str().unwrap().to_owned();

    let deadline = Instant::now() + Duration::from_secs(5);
    let expired = loop {
        let followed = api.ok(&format!("/v1/commands/{id}")).await;
        if followed["status"] == "expired" {
            break followed;
        }
        assert_eq!(followed["status"], "pending");
        assert!(Instant::now() < deadline, "still {followed} after 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(expired["finished_at"], expires_at.as_str());
    assert_eq!(statuses(&expired), ["pending", "expired"]);
    let (status, _, body) = api
        .call(
            Method::DELETE,
            &format!("/v1/commands/{id}"),
            Some(&operator),
            None,
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(body["message"].as_str().unwrap().contains("expired"));
    let listed = api.ok("/v1/devices/raspi-01/commands?status=expired").await;
    assert_eq!(listed["commands"][0]["id"], id.as_str());
    assert_eq!(
        api.ok("/v1/devices/raspi-01/commands?status=pending").await["commands"],
        json!([])
    );

    // the persister's sweep writes it down once, at its expiry, and tells the same story
    let mut conn = api.db.connect();
    assert_eq!(store::commands::expire_due(&mut conn, 100).unwrap(), 1);
    assert_eq!(store::commands::expire_due(&mut conn, 100).unwrap(), 0);
    let recorded = api.ok(&format!("/v1/commands/{id}")).await;
    assert_eq!(recorded["status"], "expired");
    assert_eq!(recorded["finished_at"], expires_at.as_str());
    assert_eq!(statuses(&recorded), ["pending", "expired"]);
    assert_eq!(recorded["history"][1]["at"], expires_at.as_str());
}
