//! What every Sensorhub service sets up the same way, once: layered configuration, telemetry, the JSON
//! error shape, the `/healthz` `/readyz` `/metrics` endpoints, the shutdown signal, how a service
//! runs, and its PostgreSQL start-up and change notifications.

pub mod access;
pub mod cli;
pub mod config;
pub mod connections;
pub mod error;
pub mod net;
pub mod openapi;
pub mod ops;
pub mod postgres;
pub mod service;
pub mod settings;
pub mod shutdown;
pub mod telemetry;

pub use error::{ApiError, ErrorBody};
pub use ops::{Ops, Readiness, metrics_registry};
pub use settings::{DatabaseSettings, HttpSettings};
