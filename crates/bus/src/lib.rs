//! Sensorhub's RabbitMQ side.
//!
//! - [`Topology`]: the exchanges and queues, declared by every service that uses them (idempotently),
//!   so no one has to set RabbitMQ up by hand.
//! - [`Publisher`]: publishes readings with publisher confirms, packing concurrent requests into one
//!   message, and answers each caller only once the broker has confirmed the message carrying it.
//! - [`connect`], [`open_consumer`], [`publish_dead_letter`]: what the persister builds on.

mod connection;
mod metrics;
mod publisher;
mod topology;

pub use connection::{BusSettings, DeadLetterError, connect, open_consumer, publish_dead_letter};
pub use metrics::PublisherMetrics;
pub use publisher::{PublishError, Publisher, PublisherSettings};
pub use topology::{
    INVALID_ROUTING_KEY, READINGS_ROUTING_KEY, Topology, declare_topology, delete_topology,
};

pub use lapin;
