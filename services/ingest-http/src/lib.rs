//! ingest-http: the HTTP way in for readings. Validates with `models`, publishes with `bus`, and
//! answers 2xx only after RabbitMQ confirmed the message carrying the request's readings. Also the
//! HTTP way out for commands: a device long-polls for its next one or holds a WebSocket, and its
//! answers are handed to the persister as reports on RabbitMQ (ingest-http never writes
//! PostgreSQL).

mod api;
pub mod audit;
mod commands;
mod device_auth;
mod error;
mod metrics;
pub mod rabbitmq_auth;
pub mod settings;
pub mod startup;
mod ws;

pub use api::ApiDoc;
pub use settings::Settings;
pub use startup::Application;
