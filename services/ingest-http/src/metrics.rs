use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::error::IngestError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectionLabels {
    pub endpoint: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabels {
    pub cause: &'static str,
}

/// The endpoints that take readings (`sensorhub_readings_accepted_total`'s label values).
const READINGS_ENDPOINTS: [&str; 3] = ["/data", "/v1/readings", crate::ws::ROUTE];

#[derive(Clone)]
pub struct IngestMetrics {
    pub readings_accepted: Family<EndpointLabels, Counter>,
    pub requests_rejected: Family<RejectionLabels, Counter>,
    pub registry_reads: Family<CauseLabels, Counter>,
}

impl IngestMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            readings_accepted: Family::default(),
            requests_rejected: Family::default(),
            registry_reads: Family::default(),
        };
        registry.register(
            "readings_accepted",
            "Readings confirmed by RabbitMQ and acknowledged to the device",
            m.readings_accepted.clone(),
        );
        registry.register(
            "requests_rejected",
            "Ingest requests refused, by reason",
            m.requests_rejected.clone(),
        );
        registry.register(
            "device_registry_reads",
            "Reads of the device registry from PostgreSQL, by cause (schedule, notification, unknown_id)",
            m.registry_reads.clone(),
        );
        m.precreate();
        m
    }

    /// Every label set known in advance exists from start-up at 0, so an alert sees the first
    /// increase (a series that appears with its first event has no earlier value to rise from).
    fn precreate(&self) {
        for endpoint in READINGS_ENDPOINTS {
            self.readings_accepted
                .get_or_create_owned(&EndpointLabels { endpoint });
        }
        let endpoints = crate::api::ENDPOINTS
            .into_iter()
            .chain([crate::api::UNMATCHED]);
        for endpoint in endpoints {
            for reason in IngestError::KINDS {
                self.requests_rejected
                    .get_or_create_owned(&RejectionLabels { endpoint, reason });
            }
        }
    }
}

impl IngestMetrics {
    pub fn rejected(&self, endpoint: &'static str, error: &IngestError) {
        self.requests_rejected
            .get_or_create(&RejectionLabels {
                endpoint,
                reason: error.kind(),
            })
            .inc();
    }
}
