//! What every Sensorhub service sets up the same way, once: layered configuration, telemetry, the JSON
//! error shape, the `/healthz` `/readyz` `/metrics` endpoints, and the shutdown signal.

pub mod access;
pub mod cli;
pub mod config;
pub mod error;
pub mod net;
pub mod openapi;
pub mod ops;
pub mod settings;
pub mod shutdown;
pub mod telemetry;

pub use error::{ApiError, ErrorBody};
pub use ops::{Ops, Readiness};
pub use settings::{DatabaseSettings, HttpSettings};
