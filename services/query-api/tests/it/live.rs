//! `GET /v1/live`: readings a real persister committed reach every query-api replica's streams;
//! repeats it did not store never do; a client that reconnects gets what it missed, or is told to
//! resync; a revoked token loses its stream.

use std::time::Duration;

use auth::Role;
use chrono::{SubsecRound, Utc};
use models::Reading;
use serde_json::Value;
use testkit::{AmqpPrefix, spawn};

use crate::{Api, reading, start};

/// How long an event may take from publish to stream, generously (it takes milliseconds).
const WITHIN: Duration = Duration::from_secs(10);

/// query-api and a persister sharing a database and RabbitMQ names, and a publisher that feeds the
/// persister as ingest does.
struct LiveStack {
    api: Api,
    prefix: AmqpPrefix,
    _persister: spawn::Running,
    publisher: bus::Publisher,
}

async fn live_stack(adjust: impl FnOnce(&mut query_api::Settings)) -> LiveStack {
    let prefix = AmqpPrefix::new("live");
    let name = prefix.to_string();
    let api = start(testkit::TestDb::migrated(), |s| {
        s.bus.amqp_prefix = name;
        adjust(s);
    })
    .await;
    wait_feed(&api.url).await;
    let persister = spawn::persister(&spawn::persister_settings(&api.db.url, &prefix)).await;
    let publisher = testkit::connected_publisher(
        &bus::Topology::with_prefix(&prefix),
        testkit::publisher_settings(),
        "live-test",
    )
    .await;
    LiveStack {
        api,
        prefix,
        _persister: persister,
        publisher,
    }
}

/// Until the replica's live feed is connected: announcements before that are not its to relay.
async fn wait_feed(url: &str) {
    let client = reqwest::Client::new();
    testkit::eventually(WITHIN, "the live feed connected", || async {
        let text = testkit::get_text(&client, &format!("{url}/metrics")).await;
        (testkit::metric(&text, "sensorhub_live_feed_connected") == 1.0).then_some(())
    })
    .await;
}

fn now_reading(device: &str, id: &str, value: f64) -> Reading {
    reading(device, id, Utc::now().trunc_subsecs(6), &[("t", value)])
}

#[derive(Debug)]
struct Event {
    id: String,
    kind: String,
    data: Value,
}

/// A `GET /v1/live` stream, read event by event (comments skipped).
struct Stream {
    response: reqwest::Response,
    buffer: String,
}

impl Stream {
    async fn open(url: &str, token: &str, last_event_id: Option<&str>) -> Self {
        let mut request = reqwest::Client::new()
            .get(format!("{url}/v1/live"))
            .bearer_auth(token);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event, `None` when none comes within `timeout` or the stream ended.
    async fn next_within(&mut self, timeout: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                if let Some(event) = parse(&block) {
                    return Some(event);
                }
                continue;
            }
            match tokio::time::timeout_at(deadline, self.response.chunk()).await {
                Ok(Ok(Some(bytes))) => self.buffer.push_str(&String::from_utf8_lossy(&bytes)),
                _ => return None,
            }
        }
    }

    async fn next(&mut self) -> Event {
        self.next_within(WITHIN).await.expect("an event")
    }

    /// Whether the server ended the stream within `timeout` (keep-alives are read past).
    async fn ends_within(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.response.chunk()).await {
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) | Ok(Err(_)) => return true,
                Err(_) => return false,
            }
        }
    }
}

fn parse(block: &str) -> Option<Event> {
    let (mut id, mut kind, mut data) = (String::new(), String::new(), String::new());
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("id: ") {
            id = v.to_owned();
        } else if let Some(v) = line.strip_prefix("event: ") {
            kind = v.to_owned();
        } else if let Some(v) = line.strip_prefix("data: ") {
            data = v.to_owned();
        }
    }
    (!kind.is_empty()).then(|| Event {
        id,
        kind,
        data: serde_json::from_str(&data).unwrap(),
    })
}

fn reading_ids(event: &Event) -> Vec<String> {
    crate::ids(&event.data)
}

/// The status a new `GET /v1/live` with `token` gets (the stream, if any, is dropped).
async fn live_status(url: &str, token: Option<&str>) -> (u16, reqwest::header::HeaderMap) {
    let mut request = reqwest::Client::new().get(format!("{url}/v1/live"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.headers().clone())
}

#[tokio::test]
async fn what_the_persister_stores_reaches_every_replica_and_what_it_does_not_never_does() {
    let stack = live_stack(|_| {}).await;
    // a second replica on the same database and RabbitMQ
    let mut settings =
        spawn::query_api_settings(&stack.api.db.url, &stack.api.keys.verifying_key_file());
    settings.bus.amqp_prefix = stack.prefix.to_string();
    let second = spawn::query_api(&settings).await;
    wait_feed(&second.url).await;

    let mut one = Stream::open(&stack.api.url, &stack.api.reader, None).await;
    let mut two = Stream::open(&second.url, &stack.api.reader, None).await;

    let first = now_reading("pi-live", "r1", 21.5);
    stack.publisher.publish(vec![first.clone()]).await.unwrap();
    for stream in [&mut one, &mut two] {
        let event = stream.next().await;
        assert_eq!(event.kind, "readings");
        assert!(!event.id.is_empty(), "an id to resume from");
        assert_eq!(event.data["device_id"], "pi-live");
        assert_eq!(reading_ids(&event), ["r1"]);
        assert_eq!(event.data["readings"][0]["metrics"]["t"], 21.5);
        let ts: chrono::DateTime<Utc> = event.data["readings"][0]["ts"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(ts, first.ts);
    }
    // stored before it was announced
    assert_eq!(testkit::count_rows(&stack.api.db.url, "readings"), 1);

    // a redelivery (stored already) and a conflict (same id, other content) store nothing and
    // announce nothing: the next event is the marker's
    let conflicting = now_reading("pi-live", "r1", 99.0);
    stack
        .publisher
        .publish(vec![first.clone(), conflicting])
        .await
        .unwrap();
    testkit::wait_for_rows(&stack.api.db.url, "reading_conflicts", 1, WITHIN).await;
    stack
        .publisher
        .publish(vec![now_reading("pi-other", "marker", 1.0)])
        .await
        .unwrap();
    for stream in [&mut one, &mut two] {
        let event = stream.next().await;
        assert_eq!(event.data["device_id"], "pi-other", "{event:?}");
        assert_eq!(reading_ids(&event), ["marker"]);
    }

    // one commit of two devices: an event per device
    stack
        .publisher
        .publish(vec![
            now_reading("pi-a", "a1", 1.0),
            now_reading("pi-b", "b1", 2.0),
            now_reading("pi-a", "a2", 3.0),
        ])
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let event = one.next().await;
        seen.push((
            event.data["device_id"].as_str().unwrap().to_owned(),
            reading_ids(&event),
        ));
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            ("pi-a".to_owned(), vec!["a1".to_owned(), "a2".to_owned()]),
            ("pi-b".to_owned(), vec!["b1".to_owned()])
        ]
    );
    second.stop().await;
}

#[tokio::test]
async fn a_client_that_reconnects_gets_what_it_missed_or_is_told_to_resync() {
    let stack = live_stack(|_| {}).await;
    let mut stream = Stream::open(&stack.api.url, &stack.api.reader, None).await;
    stack
        .publisher
        .publish(vec![now_reading("pi-1", "before", 1.0)])
        .await
        .unwrap();
    let last = stream.next().await;
    drop(stream);

    // stored while the client was away
    stack
        .publisher
        .publish(vec![now_reading("pi-1", "away-1", 2.0)])
        .await
        .unwrap();
    stack
        .publisher
        .publish(vec![now_reading("pi-2", "away-2", 3.0)])
        .await
        .unwrap();
    testkit::wait_for_rows(&stack.api.db.url, "readings", 3, WITHIN).await;
    // the persister announces after its commit: give the announcement its moment to arrive
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut resumed = Stream::open(&stack.api.url, &stack.api.reader, Some(&last.id)).await;
    let mut missed = Vec::new();
    while missed.len() < 2 {
        missed.extend(reading_ids(&resumed.next().await));
    }
    assert_eq!(
        missed,
        ["away-1", "away-2"],
        "replayed in order, nothing twice"
    );
    // and live again after the replay
    stack
        .publisher
        .publish(vec![now_reading("pi-1", "after", 4.0)])
        .await
        .unwrap();
    assert_eq!(reading_ids(&resumed.next().await), ["after"]);

    // an id this replica does not hold (another's, or too old): resync, then live
    let mut lost = Stream::open(&stack.api.url, &stack.api.reader, Some("not-an-event")).await;
    let event = lost.next().await;
    assert_eq!(event.kind, "resync");
    assert!(event.id.is_empty());
    stack
        .publisher
        .publish(vec![now_reading("pi-1", "later", 5.0)])
        .await
        .unwrap();
    assert_eq!(reading_ids(&lost.next().await), ["later"]);
}

#[tokio::test]
async fn a_revoked_token_loses_its_stream_and_streams_are_bounded() {
    let stack = live_stack(|s| {
        s.live_keepalive_secs = 1;
        s.live_max_streams = 1;
    })
    .await;
    let api = &stack.api;
    let admin = api.keys.app_token(Role::Admin);
    let mut stream = Stream::open(&api.url, &api.reader, None).await;

    // the one stream this replica allows is open
    let (status, headers) = live_status(&api.url, Some(&admin)).await;
    assert_eq!(status, 503);
    assert!(headers.contains_key("retry-after"));
    // no token: refused before any stream
    assert_eq!(live_status(&api.url, None).await.0, 401);

    assert!(
        !stream.ends_within(Duration::from_millis(2500)).await,
        "keep-alives hold an idle stream open"
    );
    let reader_id = api.token_id(&api.reader);
    let mut conn = store::connect(&api.db.url).unwrap();
    assert!(store::app_tokens::revoke_app_token(&mut conn, &reader_id).unwrap());
    assert!(
        stream.ends_within(Duration::from_secs(5)).await,
        "a revoked token's stream is closed at the next keep-alive"
    );
    // its slot is free again
    testkit::eventually(WITHIN, "the stream's slot freed", || async {
        (live_status(&api.url, Some(&admin)).await.0 == 200).then_some(())
    })
    .await;
}
