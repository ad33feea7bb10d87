//! Sensorhub's RabbitMQ side.
//!
//! - [`Topology`]: the exchanges and queues, declared by every service that uses them (idempotently),
//!   so no one has to set RabbitMQ up by hand.
//! - [`Publisher`]: publishes readings with publisher confirms, packing concurrent requests into one
//!   message, and answers each caller only once the broker has confirmed the message carrying it.
//! - [`ReadingsConsumer`]: takes readings off the queue, with an acknowledgement handle per
//!   delivery, dead-lettering and the queue's depth; what the persister builds on.
//! - [`Backoff`]: the one retry shape (exponential, jittered, capped) for every retrying loop.
//! - `wire` (private): the queue's wire shape, in one place.

mod backoff;
mod connection;
mod consumer;
mod metrics;
mod publisher;
mod topology;
mod wire;

pub use backoff::Backoff;
pub use connection::{BusSettings, connect};
pub use consumer::{Ack, ChannelState, ConsumeError, Delivery, QueueDepth, ReadingsConsumer};
pub use metrics::PublisherMetrics;
pub use publisher::{PublishError, Publisher, PublisherSettings};
pub use topology::{
    INVALID_ROUTING_KEY, READINGS_ROUTING_KEY, Topology, declare_topology, delete_topology,
};

pub use wire::{ORIGINAL_MESSAGE_ID_HEADER, REASON_HEADER};

/// For tests and tools that inspect RabbitMQ directly; services go through the types above.
pub use lapin;
