//! The retention policy over HTTP: any app token reads it, only an admin changes it, bad input
//! changes nothing.

use auth::{Claims, Role};
use reqwest::Method;
use serde_json::{Value, json};

use crate::start_empty;

fn rule<'a>(
    policy: &'a Value,
    table: &str,
    device: Option<&str>,
    metric: Option<&str>,
) -> &'a Value {
    policy["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| {
            r["table"] == table && r["device"].as_str() == device && r["metric"].as_str() == metric
        })
        .unwrap_or_else(|| panic!("no {table} rule for {device:?} {metric:?} in {policy}"))
}

/// The policy's rules as set (the cutoffs move with the clock).
fn without_cutoffs(mut policy: Value) -> Value {
    for rule in policy["rules"].as_array_mut().unwrap() {
        rule.as_object_mut().unwrap().remove("cutoff");
    }
    policy
}

#[tokio::test]
async fn admins_set_and_remove_retention_readers_only_read_it() {
    let api = start_empty(|_| {}).await;
    let admin = api.keys.app_token(Role::Admin);
    let device = api
        .keys
        .sign(&Claims::device("pi-1", chrono::Utc::now().timestamp()));
    let get = |token: String| {
        let api = &api;
        async move {
            api.call(Method::GET, "/v1/retention", Some(&token), None)
                .await
        }
    };

    // shipped: every table kept forever; any app token reads it, a device token does not
    let (status, _, shipped) = get(api.reader.clone()).await;
    assert_eq!(status, 200, "{shipped}");
    assert_eq!(shipped["rules"].as_array().unwrap().len(), 4);
    for table in ["raw", "1m", "1h", "1d"] {
        let r = rule(&shipped, table, None, None);
        assert_eq!((&r["keep"], &r["cutoff"]), (&Value::Null, &Value::Null));
    }
    assert_eq!(get(device.clone()).await.0, 403);

    // only an admin changes it
    let raw_30d = json!({"table": "raw", "keep": "30d"});
    for token in [&api.reader, &device] {
        let (status, _, body) = api
            .call(
                Method::PUT,
                "/v1/retention",
                Some(token),
                Some(raw_30d.clone()),
            )
            .await;
        assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));
    }
    let (status, _, set) = api
        .call(Method::PUT, "/v1/retention", Some(&admin), Some(raw_30d))
        .await;
    assert_eq!(status, 200, "{set}");
    assert_eq!(rule(&set, "raw", None, None)["keep"], "30d");
    assert!(rule(&set, "raw", None, None)["cutoff"].is_string());
    let (status, _, set) = api
        .call(
            Method::PUT,
            "/v1/retention",
            Some(&admin),
            Some(json!({"table": "1h", "keep": "12h", "device": "pi-1", "metric": "t"})),
        )
        .await;
    assert_eq!(status, 200, "{set}");
    assert_eq!(rule(&set, "1h", Some("pi-1"), Some("t"))["keep"], "12h");

    // bad input: 400 naming the field, and nothing changes
    let (_, _, before) = get(api.reader.clone()).await;
    for (body, field) in [
        (json!({"table": "raw", "keep": "30x"}), Some("keep")),
        (json!({"table": "raw", "keep": "0d"}), Some("keep")),
        (json!({"table": "raw", "keep": "forever"}), Some("keep")),
        (json!({"table": "2h", "keep": "1d"}), Some("table")),
        (
            json!({"table": "raw", "keep": "1d", "metric": "t"}),
            Some("metric"),
        ),
        (
            json!({"table": "1h", "keep": "1d", "device": "no spaces"}),
            Some("device"),
        ),
        (json!({"table": "raw"}), None),
    ] {
        let (status, _, answer) = api
            .call(
                Method::PUT,
                "/v1/retention",
                Some(&admin),
                Some(body.clone()),
            )
            .await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["field"].as_str(), field, "{body}: {answer}");
    }
    assert_eq!(
        without_cutoffs(get(api.reader.clone()).await.2),
        without_cutoffs(before)
    );

    // removing an override: admin only, once; the global rule cannot be removed
    let path = "/v1/retention?table=1h&device=pi-1&metric=t";
    assert_eq!(
        api.call(Method::DELETE, path, Some(&api.reader), None)
            .await
            .0,
        403
    );
    assert_eq!(
        api.call(Method::DELETE, path, Some(&admin), None).await.0,
        204
    );
    assert_eq!(
        api.call(Method::DELETE, path, Some(&admin), None).await.0,
        404
    );
    let (status, _, body) = api
        .call(
            Method::DELETE,
            "/v1/retention?table=raw",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("device")),
        "{body}"
    );
    assert_eq!(
        api.call(Method::DELETE, "/v1/retention", Some(&admin), None)
            .await
            .0,
        400
    );
    let (_, _, after) = get(api.reader.clone()).await;
    assert_eq!(after["rules"].as_array().unwrap().len(), 4, "{after}");
}
