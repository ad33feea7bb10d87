//! query-api: the read side of Sensorhub. Apps list devices, page through a device's readings (or
//! download a range of them as CSV, streamed), ask for the latest values, and get time buckets
//! aggregated in PostgreSQL; operators and admins send devices commands and follow them. Browsers
//! watch what is stored as it is stored (`GET /v1/live`, relayed from the persisters' announcements
//! on RabbitMQ). It also serves the web dashboard and the API docs viewer (`dashboard`).

mod access;
mod api;
mod body_deadline;
mod commands;
mod csv;
mod dashboard;
mod error;
mod live;
mod params;
mod retention;
pub mod settings;
pub mod startup;
mod tokens;

pub use api::ApiDoc;
pub use settings::Settings;
pub use startup::Application;
