//! Sensorhub's RabbitMQ side.
//!
//! - [`Topology`]: the exchanges and queues, declared by every service that uses them (idempotently),
//!   so no one has to set RabbitMQ up by hand.
//! - [`Publisher`]: publishes readings with publisher confirms, packing concurrent requests into one
//!   message, and answers each caller only once the broker has confirmed the message carrying it.
//! - [`MqttTopology`]: where RabbitMQ's MQTT plugin routes what devices publish (broker mode
//!   `rabbitmq`), and [`open_queue_consumer`] for ingest-mqtt to consume it.
//! - [`connect`], [`open_consumer`], [`publish_dead_letter`]: what the persister builds on.

mod connection;
mod metrics;
mod publisher;
mod topology;

pub use connection::{
    BusSettings, DeadLetterError, connect, open_consumer, open_queue_consumer, publish_dead_letter,
};
pub use metrics::PublisherMetrics;
pub use publisher::{PublishError, Publisher, PublisherSettings};
pub use topology::{
    INVALID_ROUTING_KEY, MQTT_READINGS_BINDING, MqttTopology, READINGS_ROUTING_KEY, Topology,
    declare_mqtt_topology, declare_topology, delete_mqtt_topology, delete_topology, mqtt_topic_of,
    routing_key_of,
};

pub use lapin;
