//! ingest-mqtt: devices' MQTT messages → RabbitMQ's readings exchange, losing nothing in between.
//!
//! Two sources, one forwarding step (`forward`): each message is parsed and validated with
//! `models`, published with confirms, and only then acknowledged to where it came from.
//! - `mosquitto` (`mosquitto`): a persistent MQTT session with QoS 1 subscriptions, PUBACK after
//!   the confirm.
//! - `rabbitmq` (`queue`): RabbitMQ's MQTT plugin has already put the message in a quorum queue
//!   (and PUBACKed it from there); this consumes that queue and acks after the confirm.
//!
//! A payload that can never be a reading (not JSON, invalid, wrong device) is kept on RabbitMQ's
//! invalid queue with the reason, counted, and acknowledged, so it is not redelivered forever.
//!
//! Commands to devices go the other way (`commands`): taken from RabbitMQ's queue of commands for
//! MQTT, published on `devices/<id>/commands` (through Mosquitto's session, or the MQTT plugin's
//! exchange), and reported sent to the persister. Devices' answers, on
//! `devices/<id>/commands/<command id>/result`, come in with the readings and go to the persister
//! as reports, by the same forwarding step.

mod classify;
mod commands;
mod forward;
mod metrics;
mod mosquitto;
mod queue;
pub mod settings;
mod startup;

pub use classify::{Classified, classify};
pub use metrics::MqttMetrics;
pub use settings::{MqttBroker, Settings};
pub use startup::IngestMqtt;
