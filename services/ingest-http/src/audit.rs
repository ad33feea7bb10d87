//! The audit trail of writes (tracing target `audit`). Every refusal is a line of its own. Accepted
//! writes, by default, are summed per device and token over an interval (requests, readings, the
//! first and last reading time, the client addresses) and written as one line each interval: a
//! line per request would be hundreds of megabytes a minute at full load. `audit_accepted = "each"`
//! writes one line per accepted request instead.
//!
//! What a client sent (a token's complaint, a reason naming its field) is written escaped (`?`),
//! so no request can forge a line of the trail.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::device_auth::Writer;
use crate::error::IngestError;

/// How accepted writes are recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AcceptedWrites {
    /// One line per device and token per `audit_summary_interval_secs`.
    Summary,
    /// One line per accepted request.
    Each,
}

/// A few addresses are listed; the rest only counted, so a line stays short.
const CLIENTS_LISTED: usize = 8;

/// What one request that was accepted carried.
#[derive(Debug, Clone, Copy)]
pub struct AcceptedBatch {
    pub readings: usize,
    pub earliest: DateTime<Utc>,
    pub latest: DateTime<Utc>,
}

#[derive(Debug)]
struct Summary {
    requests: u64,
    readings: u64,
    earliest: DateTime<Utc>,
    latest: DateTime<Utc>,
    clients: BTreeSet<IpAddr>,
    clients_unlisted: u64,
}

pub struct AuditTrail {
    accepted: AcceptedWrites,
    /// (device id, token id) → what they wrote since the last flush. Only authenticated writers
    /// (or, in development, the one anonymous writer) get here: bounded by the registered fleet.
    pending: Mutex<HashMap<(String, String), Summary>>,
}

impl AuditTrail {
    pub fn new(accepted: AcceptedWrites) -> Arc<Self> {
        Arc::new(Self {
            accepted,
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// Writes the summaries every `interval` while the trail lives (and once more at shutdown:
    /// see [`AuditTrail::flush`]).
    pub fn flush_every(self: &Arc<Self>, interval: Duration) {
        if self.accepted != AcceptedWrites::Summary {
            return;
        }
        let trail = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval.max(Duration::from_secs(1)));
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(trail) = trail.upgrade() else { break };
                trail.flush();
            }
        });
    }

    pub fn accepted(
        &self,
        endpoint: &'static str,
        writer: &Writer,
        client: Option<IpAddr>,
        batch: AcceptedBatch,
    ) {
        let device = writer.device_id().unwrap_or("-");
        let token = writer.token_id().unwrap_or("-");
        if self.accepted == AcceptedWrites::Each {
            tracing::info!(target: "audit", outcome = "accepted", endpoint, device.id = device,
                token.id = token, client.addr = %addr_text(client), readings = batch.readings,
                readings.earliest = %batch.earliest.to_rfc3339(),
                readings.latest = %batch.latest.to_rfc3339());
            return;
        }
        let Ok(mut pending) = self.pending.lock() else {
            return;
        };
        let summary = pending
            .entry((device.to_owned(), token.to_owned()))
            .or_insert_with(|| Summary {
                requests: 0,
                readings: 0,
                earliest: batch.earliest,
                latest: batch.latest,
                clients: BTreeSet::new(),
                clients_unlisted: 0,
            });
        summary.requests += 1;
        summary.readings += batch.readings as u64;
        summary.earliest = summary.earliest.min(batch.earliest);
        summary.latest = summary.latest.max(batch.latest);
        if let Some(client) = client
            && !summary.clients.contains(&client)
        {
            if summary.clients.len() < CLIENTS_LISTED {
                summary.clients.insert(client);
            } else {
                summary.clients_unlisted += 1;
            }
        }
    }

    pub fn refused(
        &self,
        endpoint: &'static str,
        writer: Option<&Writer>,
        client: Option<IpAddr>,
        error: &IngestError,
    ) {
        tracing::info!(target: "audit", outcome = "refused", endpoint,
            device.id = writer.and_then(Writer::device_id).unwrap_or("-"),
            token.id = writer.and_then(Writer::token_id).unwrap_or("-"),
            client.addr = %addr_text(client), readings = 0, reason = error.kind(),
            detail = ?error.to_string());
    }

    /// A command handed to its device (`sent`) or answered (`succeeded`, `failed`): a line each.
    pub fn command(
        &self,
        endpoint: &'static str,
        writer: &Writer,
        client: Option<IpAddr>,
        command: &str,
        what: &'static str,
    ) {
        tracing::info!(target: "audit", outcome = "accepted", endpoint,
            device.id = writer.device_id().unwrap_or("-"),
            token.id = writer.token_id().unwrap_or("-"),
            client.addr = %addr_text(client), command.id = ?command, command.event = what);
    }

    /// One line per device and token that wrote since the last flush.
    pub fn flush(&self) {
        let pending = match self.pending.lock() {
            Ok(mut pending) => std::mem::take(&mut *pending),
            Err(_) => return,
        };
        for ((device, token), summary) in pending {
            let clients = summary
                .clients
                .iter()
                .map(IpAddr::to_string)
                .collect::<Vec<_>>()
                .join(",");
            tracing::info!(target: "audit", outcome = "accepted", summary = true,
                device.id = %device, token.id = %token, requests = summary.requests,
                readings = summary.readings, readings.earliest = %summary.earliest.to_rfc3339(),
                readings.latest = %summary.latest.to_rfc3339(), client.addrs = %clients,
                client.addrs_unlisted = summary.clients_unlisted);
        }
    }
}

fn addr_text(client: Option<IpAddr>) -> String {
    client.map(|a| a.to_string()).unwrap_or_default()
}
