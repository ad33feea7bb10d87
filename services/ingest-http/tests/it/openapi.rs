//! `/openapi.json` says what the running server does: who may write, what each route can answer,
//! and the bodies it takes. Each claim of the description is checked against the service itself.

use serde_json::{Value, json};
use service_kit::openapi::NAME_PATTERN;

use crate::Stack;

/// What a write can be answered besides its success, all documented on every write.
const WRITE_ANSWERS: [&str; 8] = ["400", "401", "403", "408", "413", "415", "429", "503"];
/// What a device's read (its next command, its WebSocket) can be answered besides its success.
const READ_ANSWERS: [&str; 5] = ["400", "401", "403", "429", "503"];

/// A response or schema, with a `$ref` to `components` followed.
fn resolved<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    match value["$ref"].as_str() {
        Some(reference) => {
            let mut parts = reference.rsplit('/');
            let name = parts.next().unwrap();
            &doc["components"][parts.next().unwrap()][name]
        }
        None => value,
    }
}

#[tokio::test]
async fn the_description_says_who_may_write_and_every_answer_a_write_can_get() {
    let stack = Stack::new();
    let ingest = stack.ingest().await;
    // public: no token
    let response = stack
        .client
        .get(format!("{}/openapi.json", ingest.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let doc: Value = response.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert_eq!(doc["security"], json!([{"bearer": []}]));

    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            for (status, response) in operation["responses"].as_object().unwrap() {
                let description = resolved(&doc, response)["description"].as_str();
                assert!(
                    description.is_some_and(|d| !d.is_empty()),
                    "{method} {path}: the {status} answer has no description"
                );
            }
            if path.starts_with("/v1/") || path == "/data" {
                let answers = if method == "post" {
                    &WRITE_ANSWERS[..]
                } else {
                    &READ_ANSWERS[..]
                };
                for status in answers {
                    assert!(
                        operation["responses"][status].is_object(),
                        "{method} {path} does not list {status}"
                    );
                }
            } else {
                assert_eq!(operation["security"], json!([]), "{path} needs no token");
                let answer = stack
                    .client
                    .get(format!("{}{path}", ingest.url))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(answer.status(), 200, "{path} without a token");
            }
        }
    }

    // the documented 401 carries the documented challenge
    let unauthorized = &doc["components"]["responses"]["Unauthorized"];
    assert!(unauthorized["headers"]["WWW-Authenticate"].is_object());
    let response = stack
        .client
        .post(format!("{}/v1/readings", ingest.url))
        .json(&json!({"device_id": "raspi-01", "metrics": {"t": 1.0}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert!(response.headers().contains_key("www-authenticate"));
    // ...and the 415 is what a form post gets
    let form = "application/x-www-form-urlencoded";
    let data = format!("{}/data", ingest.url);
    assert_eq!(
        stack
            .post_raw(&data, "raspi-01", form, "device_id=raspi-01&t=1")
            .await,
        415
    );

    ingest.stop().await;
}

#[tokio::test]
async fn v1_readings_is_described_and_served_as_one_reading_or_an_array_of_them() {
    let stack = Stack::new();
    let ingest = stack.ingest().await;
    let doc = stack.get(format!("{}/openapi.json", ingest.url)).await;
    let body = &doc["paths"]["/v1/readings"]["post"]["requestBody"];
    assert_eq!(body["required"], true);
    let one_of = resolved(&doc, &body["content"]["application/json"]["schema"])["oneOf"]
        .as_array()
        .unwrap_or_else(|| panic!("not oneOf: {body}"));
    assert_eq!(one_of[0]["$ref"], "#/components/schemas/ReadingIn");
    assert_eq!(one_of[1]["type"], "array");
    assert_eq!(one_of[1]["items"]["$ref"], "#/components/schemas/ReadingIn");
    assert_eq!(
        (&one_of[1]["minItems"], &one_of[1]["maxItems"]),
        (&json!(1), &json!(1000))
    );
    let reading = &doc["components"]["schemas"]["ReadingIn"];
    assert_eq!(reading["required"], json!(["device_id", "metrics"]));
    assert_eq!(reading["additionalProperties"], false);
    assert_eq!(reading["properties"]["device_id"]["pattern"], NAME_PATTERN);
    let metrics = &reading["properties"]["metrics"];
    assert_eq!(metrics["propertyNames"]["pattern"], NAME_PATTERN);
    assert_eq!(metrics["additionalProperties"]["type"], "number");
    assert_eq!(
        (&metrics["minProperties"], &metrics["maxProperties"]),
        (&json!(1), &json!(64))
    );
    let seed = &doc["components"]["schemas"]["SeedReading"];
    assert_eq!(seed["properties"]["device_id"]["pattern"], NAME_PATTERN);

    let url = format!("{}/v1/readings", ingest.url);
    let one = json!({"device_id": "raspi-01", "metrics": {"temperature": 25.5}});
    for (body, expected) in [
        (one.clone(), (202, json!({"accepted": 1}))),
        (json!([one, one]), (202, json!({"accepted": 2}))),
    ] {
        assert_eq!(
            stack.post(url.clone(), body.clone()).await,
            expected,
            "{body}"
        );
    }
    let (status, answer) = stack.post(url.clone(), json!([])).await;
    assert_eq!(status, 400, "minItems 1: {answer}");

    ingest.stop().await;
}

/// Every reading id in an example a user may copy: README's and the deployment guide's, and the
/// OpenAPI description's.
fn example_reading_ids(text: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("\"id\": \"") {
        rest = &rest[at + "\"id\": \"".len()..];
        if let Some(end) = rest.find('"') {
            ids.push(rest[..end].to_owned());
        }
    }
    ids
}

#[tokio::test]
async fn every_example_in_the_docs_has_its_own_reading_id() {
    // Two examples sharing an id with different metrics: a user who tries both has the second kept
    // as a conflict, not stored.
    let stack = Stack::new();
    let ingest = stack.ingest().await;
    let openapi = testkit::get_text(&stack.client, &format!("{}/openapi.json", ingest.url)).await;
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let mut ids = Vec::new();
    for doc in ["README.md", "deploy/README.md"] {
        ids.extend(example_reading_ids(
            &std::fs::read_to_string(format!("{root}/{doc}")).unwrap(),
        ));
    }
    ids.extend(example_reading_ids(&openapi.replace("\":\"", "\": \"")));
    assert!(ids.len() >= 5, "the examples were found: {ids:?}");
    let mut seen = std::collections::HashSet::new();
    let repeated: Vec<&String> = ids.iter().filter(|id| !seen.insert(*id)).collect();
    assert!(
        repeated.is_empty(),
        "ids used by two examples: {repeated:?}"
    );
    ingest.stop().await;
}
