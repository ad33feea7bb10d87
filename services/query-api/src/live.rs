//! `GET /v1/live`: what the persisters store, relayed to browsers as server-sent events.
//!
//! Every replica gets every announcement (`bus::LiveFeed`: a queue of its own on the fanout
//! exchange), splits it into one `readings` event per device (per 200 readings of a device), keeps
//! the last `REPLAY_EVENTS` (16 MiB at most) for clients that reconnect, and hands each event to
//! every open stream. Nothing here reads the
//! database: a thousand open dashboards cost PostgreSQL nothing.
//!
//! Catching up: a client that reconnects sends the id of the last event it got (`Last-Event-ID`);
//! the stream replays what followed when this replica still holds it, and otherwise starts with a
//! `resync` event, which tells the client to reload what it shows over the REST API. A replica
//! whose feed reconnected, or a stream that fell behind, says `resync` too: what it missed is
//! stored, not lost.
//!
//! Every app token may watch every device (as it may read every device). A stream re-checks its
//! token at every keep-alive (`LIVE_KEEPALIVE_SECS`): one revoked or expired while streaming is
//! closed.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, get, web};
use auth::Claims;
use futures_util::stream;
use models::{StoredAnnouncement, StoredDevice};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{broadcast, mpsc};

use crate::access::Access;
use crate::error::QueryError;

/// Events a replica keeps for clients that reconnect, at most...
const REPLAY_EVENTS: usize = 4096;
/// ...and at most this many bytes of them.
const REPLAY_BYTES: usize = 16 << 20;
/// Readings in one event at most: a device's backfill of thousands in one commit becomes several
/// events, so no event (and no replay or backlog of them) grows with a batch.
const READINGS_PER_EVENT: usize = 200;
/// Events waiting for a slow stream; past this it is told to resync.
const STREAM_BACKLOG: usize = 1024;
/// What a browser waits before reconnecting, told at the start of each stream.
const RETRY_MS: u64 = 2000;

/// One server-sent event, formatted once for every stream.
#[derive(Debug)]
struct LiveEvent {
    /// This replica's order of events: what a stream has sent already.
    seq: u64,
    /// Empty for `resync` (which has no place to resume from).
    id: String,
    text: Bytes,
}

struct Recent {
    events: VecDeque<Arc<LiveEvent>>,
    /// The size of `events`' texts.
    bytes: usize,
    next_seq: u64,
}

impl Recent {
    fn keep(&mut self, event: Arc<LiveEvent>) {
        self.bytes += event.text.len();
        self.events.push_back(event);
        while self.events.len() > REPLAY_EVENTS || self.bytes > REPLAY_BYTES {
            let Some(oldest) = self.events.pop_front() else {
                break;
            };
            self.bytes -= oldest.text.len();
        }
    }
}

/// A replica's live relay: the feed from RabbitMQ, the recent events, and the open streams.
pub struct LiveHub {
    recent: Mutex<Recent>,
    events: broadcast::Sender<Arc<LiveEvent>>,
    /// The open streams: what `max_streams` bounds, and `sensorhub_live_streams` shows.
    open_streams: Gauge,
    max_streams: usize,
    /// A comment this often keeps proxies from closing an idle stream, and re-checks its token.
    keepalive: Duration,
    feed: bus::LiveFeed,
}

impl LiveHub {
    /// Starts the feed and the task that turns announcements into events; registers its gauges.
    pub fn start(
        bus: &bus::BusSettings,
        max_streams: usize,
        keepalive: Duration,
        registry: &mut Registry,
    ) -> Arc<Self> {
        let connected = Gauge::default();
        let open_streams = Gauge::default();
        registry.register(
            "live_feed_connected",
            "1 while the live feed (GET /v1/live) receives the persisters' announcements from RabbitMQ",
            connected.clone(),
        );
        registry.register(
            "live_streams",
            "Open GET /v1/live streams",
            open_streams.clone(),
        );
        let (announcements, received) = mpsc::channel(256);
        let feed = bus::LiveFeed::start(
            bus.amqp_url.clone(),
            bus.topology(),
            "query-api-live".to_owned(),
            announcements,
            connected,
        );
        let hub = Arc::new(Self {
            recent: Mutex::new(Recent {
                events: VecDeque::with_capacity(REPLAY_EVENTS),
                bytes: 0,
                next_seq: 1,
            }),
            events: broadcast::channel(STREAM_BACKLOG).0,
            open_streams,
            max_streams,
            keepalive,
            feed,
        });
        tokio::spawn(relay(Arc::downgrade(&hub), received));
        hub
    }

    pub async fn close(&self) {
        self.feed.close().await;
    }

    fn announce(&self, body: &[u8]) {
        let announcement = match StoredAnnouncement::decode(body) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "an announcement of stored readings could not be read; skipped");
                return;
            }
        };
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        for (i, share) in event_shares(announcement.devices).enumerate() {
            let id = format!("{}.{i}", announcement.id);
            let data = serde_json::to_string(&share).unwrap_or_default();
            let event = self.stamp(&mut recent, id, "readings", &data);
            recent.keep(event.clone());
            let _ = self.events.send(event);
        }
    }

    /// The feed missed announcements: nothing held here can be resumed from any more.
    fn gap(&self) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.events.clear();
        recent.bytes = 0;
        let event = self.stamp(&mut recent, String::new(), "resync", "{}");
        let _ = self.events.send(event);
    }

    fn stamp(&self, recent: &mut Recent, id: String, kind: &str, data: &str) -> Arc<LiveEvent> {
        let seq = recent.next_seq;
        recent.next_seq += 1;
        Arc::new(LiveEvent {
            seq,
            text: sse_event(&id, kind, data),
            id,
        })
    }

    /// Subscribes, and finds where `last_event_id` left off.
    fn join(&self, last_event_id: Option<&str>) -> Joined {
        // Events are stamped and sent under this lock: subscribed under it too, the receiver gets
        // exactly the events after `latest`, and nothing falls between the replay and the stream.
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let receiver = self.events.subscribe();
        let latest = recent.next_seq - 1;
        let replay = match last_event_id {
            None => Some(Vec::new()),
            Some(last) => recent
                .events
                .iter()
                .position(|e| e.id == last)
                .map(|at| recent.events.iter().skip(at + 1).cloned().collect()),
        };
        Joined {
            receiver,
            replay,
            latest,
        }
    }
}

/// A new stream's start.
struct Joined {
    receiver: broadcast::Receiver<Arc<LiveEvent>>,
    /// What followed the client's last event; `None` when this replica cannot resume from there.
    replay: Option<Vec<Arc<LiveEvent>>>,
    /// The last sequence number the replay covers.
    latest: u64,
}

/// What one announcement's events carry: each device's readings, `READINGS_PER_EVENT` at most.
fn event_shares(devices: Vec<StoredDevice>) -> impl Iterator<Item = StoredDevice> {
    devices.into_iter().flat_map(|device| {
        let mut readings = device.readings;
        let mut shares = Vec::new();
        while !readings.is_empty() {
            let rest = readings.split_off(readings.len().min(READINGS_PER_EVENT));
            shares.push(StoredDevice {
                device_id: device.device_id.clone(),
                readings,
            });
            readings = rest;
        }
        shares
    })
}

async fn relay(hub: std::sync::Weak<LiveHub>, mut received: mpsc::Receiver<bus::FeedEvent>) {
    while let Some(event) = received.recv().await {
        let Some(hub) = hub.upgrade() else { return };
        match event {
            bus::FeedEvent::Stored(body) => hub.announce(&body),
            bus::FeedEvent::Gap => hub.gap(),
        }
    }
}

fn sse_event(id: &str, kind: &str, data: &str) -> Bytes {
    let mut text = String::with_capacity(data.len() + id.len() + 32);
    if !id.is_empty() {
        text.push_str("id: ");
        text.push_str(id);
        text.push('\n');
    }
    text.push_str("event: ");
    text.push_str(kind);
    text.push_str("\ndata: ");
    // JSON from serde_json holds no raw newline, so the data is one line
    text.push_str(data);
    text.push_str("\n\n");
    Bytes::from(text)
}

fn resync() -> Bytes {
    sse_event("", "resync", "{}")
}

/// Counts an open stream for as long as it lives.
struct StreamSlot(Arc<LiveHub>);

impl StreamSlot {
    /// A slot, unless every stream this replica allows is open.
    fn take(hub: &Arc<LiveHub>) -> Option<Self> {
        // the gauge's increment answers the count before it, atomically: the bound holds under races
        if hub.open_streams.inc() >= i64::try_from(hub.max_streams).unwrap_or(i64::MAX) {
            hub.open_streams.dec();
            return None;
        }
        Some(Self(hub.clone()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.open_streams.dec();
    }
}

/// A stream's state between events.
struct Stream {
    _slot: StreamSlot,
    receiver: broadcast::Receiver<Arc<LiveEvent>>,
    /// What is sent before the live events: the start, a replay or a resync.
    queued: VecDeque<Bytes>,
    /// The last sequence number sent (replayed or live).
    sent_seq: u64,
    claims: Claims,
    access: web::Data<Access>,
    keepalive: tokio::time::Interval,
}

enum Next {
    Send(Bytes),
    End,
}

impl Stream {
    async fn next(&mut self) -> Next {
        if let Some(bytes) = self.queued.pop_front() {
            return Next::Send(bytes);
        }
        loop {
            tokio::select! {
                received = self.receiver.recv() => match received {
                    Ok(event) if event.seq <= self.sent_seq => continue,
                    Ok(event) => {
                        self.sent_seq = event.seq;
                        return Next::Send(event.text.clone());
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => return Next::Send(resync()),
                    Err(broadcast::error::RecvError::Closed) => return Next::End,
                },
                _ = self.keepalive.tick() => {
                    if !self.token_still_valid() {
                        tracing::info!(token.id = %self.claims.jti, "a live stream's token expired or was revoked; closing it");
                        return Next::End;
                    }
                    return Next::Send(Bytes::from_static(b": keepalive\n\n"));
                }
            }
        }
    }

    fn token_still_valid(&self) -> bool {
        let now = chrono::Utc::now().timestamp();
        let expired = self.claims.exp.is_some_and(|exp| exp <= now);
        !expired && self.access.app_tokens.check(&self.claims).is_ok()
    }
}

/// The stored readings of every device as they are committed, as server-sent events.
///
/// `event: readings` (one per device per commit, with an `id`), `data: {"device_id": ..., "readings":
/// [{"id", "ts", "metrics"}]}`; `event: resync` when the stream cannot say what was missed (reload
/// over the REST API); a `: keepalive` comment every `LIVE_KEEPALIVE_SECS` (15 s), when the
/// token is checked again. Send `Last-Event-ID` to resume.
#[utoipa::path(
    tag = "live",
    params(("Last-Event-ID" = Option<String>, Header, description = "The id of the last event received, to resume after it")),
    responses(
        (status = 200, description = "The stream of stored readings", content_type = "text/event-stream", body = String),
        (status = 401, description = "No valid app token", body = service_kit::ErrorBody),
        (status = 503, description = "Every live stream this replica allows is open", body = service_kit::ErrorBody),
    )
)]
#[get("/v1/live")]
pub async fn live(
    req: HttpRequest,
    hub: web::Data<Arc<LiveHub>>,
    access: web::Data<Access>,
    claims: web::ReqData<Claims>,
) -> Result<HttpResponse, QueryError> {
    let hub = hub.get_ref().clone();
    let Some(slot) = StreamSlot::take(&hub) else {
        return Err(QueryError::Busy(format!(
            "every live stream this replica allows ({}) is open",
            hub.max_streams
        )));
    };
    let last_event_id = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty());
    let Joined {
        receiver,
        replay,
        latest,
    } = hub.join(last_event_id);
    let mut queued = VecDeque::new();
    queued.push_back(Bytes::from(format!("retry: {RETRY_MS}\n: live\n\n")));
    let sent_seq = match replay {
        Some(events) => {
            queued.extend(events.iter().map(|e| e.text.clone()));
            latest
        }
        None => {
            queued.push_back(resync());
            latest
        }
    };
    let mut keepalive = tokio::time::interval(hub.keepalive);
    keepalive.reset();
    let stream = Stream {
        _slot: slot,
        receiver,
        queued,
        sent_seq,
        claims: claims.into_inner(),
        access,
        keepalive,
    };
    let body = stream::unfold(stream, |mut stream| async move {
        match stream.next().await {
            Next::Send(bytes) => Some((Ok::<_, actix_web::Error>(bytes), stream)),
            Next::End => None,
        }
    });
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        // tells nginx-like proxies not to buffer the stream
        .insert_header(("x-accel-buffering", "no"))
        .streaming(body))
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    reason = "a test stops at the first thing that is not as it must be"
)]
mod tests {
    use super::*;

    fn device(id: &str, readings: usize) -> StoredDevice {
        StoredDevice {
            device_id: id.to_owned(),
            readings: (0..readings)
                .map(|i| models::StoredReading {
                    id: format!("r{i}"),
                    ts: chrono::Utc::now(),
                    metrics: [("t".to_owned(), 1.0)].into(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_large_commit_becomes_events_of_bounded_size() {
        let shares: Vec<StoredDevice> =
            event_shares(vec![device("a", 450), device("b", 3)]).collect();
        let sizes: Vec<(&str, usize)> = shares
            .iter()
            .map(|s| (s.device_id.as_str(), s.readings.len()))
            .collect();
        assert_eq!(sizes, [("a", 200), ("a", 200), ("a", 50), ("b", 3)]);
        assert_eq!(shares[1].readings[0].id, "r200", "in order, none lost");
    }

    #[test]
    fn the_replay_is_bounded_by_count_and_bytes() {
        let mut recent = Recent {
            events: VecDeque::new(),
            bytes: 0,
            next_seq: 1,
        };
        let event = |seq: u64, size: usize| {
            Arc::new(LiveEvent {
                seq,
                id: seq.to_string(),
                text: Bytes::from(vec![b'x'; size]),
            })
        };
        for seq in 0..(REPLAY_EVENTS as u64 + 10) {
            recent.keep(event(seq, 10));
        }
        assert_eq!(recent.events.len(), REPLAY_EVENTS);
        assert_eq!(recent.events[0].seq, 10, "the oldest go first");
        recent.keep(event(99_999, REPLAY_BYTES));
        assert_eq!(
            recent.events.len(),
            1,
            "one event as large as the budget leaves no room"
        );
        assert_eq!(recent.bytes, REPLAY_BYTES);
    }
}
