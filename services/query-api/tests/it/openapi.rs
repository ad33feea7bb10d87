//! `/openapi.json` says what the running server does: who may call what, what each route can
//! answer, and the bounds the parameter parsers enforce. Each claim of the description is checked
//! against the service itself.

use auth::Role;
use reqwest::Method;
use serde_json::{Value, json};
use service_kit::openapi::NAME_PATTERN;

use crate::{Api, api_with_data};

/// What the token check, the rate limit and the database add to every `/v1` operation.
const PROTECTED_ANSWERS: [&str; 4] = ["401", "403", "429", "503"];
const OPS_PATHS: [&str; 4] = ["/healthz", "/readyz", "/metrics", "/openapi.json"];

impl Api {
    async fn send_as(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<(&str, String)>,
    ) -> (u16, Value) {
        let mut request = self.client.request(method, format!("{}{path}", self.url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some((content_type, body)) = body {
            request = request.header("content-type", content_type).body(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn description(&self) -> Value {
        // public: no token
        let (status, doc) = self.send_as(Method::GET, "/openapi.json", None, None).await;
        assert_eq!(status, 200, "{doc}");
        doc
    }
}

/// Every operation: (path, method, operation).
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut found = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            found.push((path.clone(), method.clone(), operation.clone()));
        }
    }
    found
}

/// A response, with a `$ref` to `components.responses` followed.
fn resolved<'a>(doc: &'a Value, response: &'a Value) -> &'a Value {
    match response["$ref"].as_str() {
        Some(reference) => {
            let name = reference.rsplit('/').next().unwrap();
            &doc["components"]["responses"][name]
        }
        None => response,
    }
}

fn parameter<'a>(operation: &'a Value, name: &str) -> &'a Value {
    operation["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no parameter {name} in {operation}"))
}

/// A path as a request can take it: `{id}` a stored device, required parameters given.
fn concrete(path: &str) -> String {
    let path = path.replace("{id}", "pi-1");
    if path.ends_with("/series") {
        path + "?metric=t"
    } else {
        path
    }
}

#[tokio::test]
async fn every_protected_operation_says_it_needs_a_token_and_what_that_can_answer() {
    let api = api_with_data().await;
    let doc = api.description().await;
    assert_eq!(doc["openapi"], "3.1.0");
    let scheme = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(
        (&scheme["type"], &scheme["scheme"]),
        (&json!("http"), &json!("bearer"))
    );
    assert_eq!(doc["security"], json!([{"bearer": []}]));
    let device_token = api.keys.register_device(&api.db.url, "pi-9");
    let admin = api.keys.app_token(Role::Admin);

    for (path, method, operation) in operations(&doc) {
        for (status, response) in operation["responses"].as_object().unwrap() {
            let description = resolved(&doc, response)["description"].as_str();
            assert!(
                description.is_some_and(|d| !d.is_empty()),
                "{method} {path}: the {status} answer has no description"
            );
        }
        let verb = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        if OPS_PATHS.contains(&path.as_str()) {
            assert_eq!(operation["security"], json!([]), "{path} needs no token");
            let (status, body) = api.send_as(verb, &path, None, None).await;
            assert_eq!(status, 200, "{path} without a token: {body}");
            continue;
        }
        assert!(path.starts_with("/v1/"), "{path}");
        assert!(operation.get("security").is_none(), "{path}: the default");
        for status in PROTECTED_ANSWERS {
            assert!(
                operation["responses"][status].is_object(),
                "{method} {path} does not list {status}"
            );
        }
        // and the server does answer them so: without a token 401, with a device's token 403
        let (status, body) = api
            .send_as(verb.clone(), &concrete(&path), None, None)
            .await;
        assert_eq!(status, 401, "{method} {path} without a token: {body}");
        let (status, body) = api
            .send_as(verb.clone(), &concrete(&path), Some(&device_token), None)
            .await;
        assert_eq!(status, 403, "{method} {path} with a device's token: {body}");
        if verb != Method::GET {
            let (status, body) = api
                .send_as(verb, &concrete(&path), Some(&api.reader), None)
                .await;
            assert_eq!(status, 403, "{method} {path} with a reader token: {body}");
        }
    }
    // the admin token is what the description's writes need
    let (status, body) = api
        .send_as(
            Method::POST,
            "/v1/devices",
            Some(&admin),
            Some((
                "application/json",
                json!({"device_id": "pi-new"}).to_string(),
            )),
        )
        .await;
    assert_eq!(status, 501, "no signing key in these tests: {body}");
}

#[tokio::test]
async fn parameters_are_described_with_the_bounds_the_server_enforces() {
    let api = api_with_data().await;
    let doc = api.description().await;
    let get = |path: &str| &doc["paths"][path]["get"];

    // ids and metric names
    for (path, method, operation) in operations(&doc) {
        if path.starts_with("/v1/devices/{id}") {
            let id = parameter(&operation, "id");
            assert_eq!(id["required"], true, "{method} {path}");
            assert_eq!(id["schema"]["pattern"], NAME_PATTERN, "{method} {path}");
        }
    }
    let new_device = &doc["components"]["schemas"]["NewDevice"];
    assert_eq!(
        new_device["properties"]["device_id"]["pattern"],
        NAME_PATTERN
    );
    assert_eq!(new_device["required"], json!(["device_id"]));
    let series = get("/v1/devices/{id}/series");
    let metric = parameter(series, "metric");
    assert_eq!(metric["required"], true);
    assert_eq!(metric["schema"]["pattern"], NAME_PATTERN);
    let (status, body) = api.get("/v1/devices/pi-1/series").await;
    assert_eq!((status, &body["field"]), (400, &json!("metric")), "{body}");

    // limit: 1 to 10,000, on both paged routes
    for path in ["/v1/devices", "/v1/devices/{id}/readings"] {
        let schema = &parameter(get(path), "limit")["schema"];
        assert_eq!(
            (&schema["minimum"], &schema["maximum"], &schema["default"]),
            (&json!(1), &json!(10000), &json!(100)),
            "{path}"
        );
        let served = concrete(path);
        for (limit, expected) in [("1", 200), ("10000", 200), ("0", 400), ("10001", 400)] {
            let (status, body) = api.get(&format!("{served}?limit={limit}")).await;
            assert_eq!(status, expected, "{served}?limit={limit}: {body}");
        }
    }

    // agg: exactly the aggregates the server knows, alone or several (distinct, at most five)
    let agg = &parameter(series, "agg")["schema"];
    let pattern = regex_lite(
        agg["pattern"]
            .as_str()
            .unwrap_or_else(|| panic!("agg has no pattern: {agg}")),
    );
    for (value, served) in [
        ("avg", true),
        ("min", true),
        ("max", true),
        ("sum", true),
        ("count", true),
        ("min,max,avg", true),
        ("avg,min,max,sum,count", true),
        ("median", false),
        ("min,", false),
        ("", false),
    ] {
        assert_eq!(pattern(value), served, "the pattern on {value:?}");
        let path = format!("/v1/devices/pi-1/series?metric=t&agg={value}");
        let expected = if served { 200 } else { 400 };
        assert_eq!(api.get(&path).await.0, expected, "{path}");
    }
    // what the pattern cannot say: each at most once
    assert_eq!(
        api.get("/v1/devices/pi-1/series?metric=t&agg=avg,avg")
            .await
            .0,
        400
    );

    // times: RFC 3339 or epoch milliseconds within the years 0000-9999. Beyond them PostgreSQL
    // cannot hold the time: that was a 503 "database unavailable", and is the parameter's 400.
    let from = &parameter(get("/v1/devices/{id}/readings"), "from")["schema"];
    let millis = from["oneOf"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["type"] == "integer")
        .unwrap();
    let (earliest, latest) = (
        millis["minimum"].as_i64().unwrap(),
        millis["maximum"].as_i64().unwrap(),
    );
    for (value, expected) in [
        (earliest, 200),
        (latest, 200),
        (earliest - 1, 400),
        (latest + 1, 400),
        (-999_999_999_999_999, 400),
    ] {
        for query in [
            format!("/v1/devices/pi-1/readings?from={value}"),
            format!("/v1/devices/pi-1/readings?to={value}"),
        ] {
            let (status, body) = api.get(&query).await;
            assert_eq!(status, expected, "{query}: {body}");
        }
    }
    let (status, body) = api
        .get("/v1/devices/pi-1/series?metric=t&bucket=366d&from=-200000000000000&to=0")
        .await;
    assert_eq!((status, &body["field"]), (400, &json!("from")), "{body}");
}

#[tokio::test]
async fn a_device_registration_that_is_not_json_or_too_large_gets_its_documented_status() {
    let api = api_with_data().await;
    let doc = api.description().await;
    let responses = &doc["paths"]["/v1/devices"]["post"]["responses"];
    let admin = api.keys.app_token(Role::Admin);
    let large = json!({"device_id": "x".repeat(20 * 1024)}).to_string();
    for (content_type, body, expected) in [
        ("text/plain", r#"{"device_id": "pi-7"}"#.to_owned(), 415),
        ("application/json", large, 413),
        ("application/json", "{".to_owned(), 400),
    ] {
        let (status, answer) = api
            .send_as(
                Method::POST,
                "/v1/devices",
                Some(&admin),
                Some((content_type, body)),
            )
            .await;
        assert_eq!(status, expected, "{content_type}: {answer}");
        assert!(
            responses[status.to_string()].is_object(),
            "{status} is not documented"
        );
        assert!(answer["error"].is_string(), "our error shape: {answer}");
    }
}

/// The `agg` pattern `^(avg|min|max|sum|count)(,(avg|min|max|sum|count)){0,4}$`, as a matcher (no
/// regex crate here): checks the description says what the server takes.
fn regex_lite(pattern: &str) -> impl Fn(&str) -> bool {
    assert_eq!(
        pattern,
        "^(avg|min|max|sum|count)(,(avg|min|max|sum|count)){0,4}$"
    );
    |value: &str| {
        let names: Vec<&str> = value.split(',').collect();
        names.len() <= 5
            && names
                .iter()
                .all(|n| ["avg", "min", "max", "sum", "count"].contains(n))
    }
}
