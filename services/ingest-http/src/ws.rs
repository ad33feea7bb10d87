//! The WebSocket of a device (`GET /v1/ws`).

/// The route, as a metric and audit label.
pub const ROUTE: &str = "/v1/ws";
