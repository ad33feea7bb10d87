//! Sensorhub's RabbitMQ side.
//!
//! - [`Topology`]: the exchanges and queues, declared by every service that uses them (idempotently),
//!   so no one has to set RabbitMQ up by hand.
//! - [`Publisher`]: publishes readings with publisher confirms, packing concurrent requests into one
//!   message, and answers each caller only once the broker has confirmed the message carrying it;
//!   commands and command reports too, each in a message of its own.
//! - [`QueueConsumer`]: takes messages off one of the queues (readings, command reports, commands
//!   for MQTT), with an acknowledgement handle per delivery, dead-lettering and the queue's depth;
//!   what the persister and ingest-mqtt's command forwarding build on.
//! - [`DeviceCommands`]: an ingest-http replica's command router: its own queue, bound to the
//!   commands exchange for each device it holds a long-poll or WebSocket of, handing each command
//!   to the local waiters.
//! - [`LiveFeed`]: a query-api replica's feed of what the persisters stored (each commit's
//!   announcement, published by [`Publisher::announce_stored`]), for its live views.
//! - [`Backoff`]: the one retry shape (exponential, jittered, capped) for every retrying loop.
//! - `wire` (private): the queue's wire shape, in one place.
//! - [`MqttTopology`]: where RabbitMQ's MQTT plugin routes what devices publish (broker mode
//!   `rabbitmq`), and [`MqttQueueConsumer`] for ingest-mqtt to consume it.

mod backoff;
mod connection;
mod consumer;
mod live;
mod metrics;
mod publisher;
mod router;
mod topology;
mod wire;

pub use backoff::Backoff;
pub use connection::{
    BusSettings, SETUP_TIMEOUT, amqp_addresses, bounded_setup, connect, open_queue_consumer,
};
pub use consumer::{
    Ack, ChannelState, ConsumeError, ConsumedQueue, Delivery, LIVENESS_CHECK, MqttDelivery,
    MqttQueueConsumer, QueueConsumer, QueueDepth,
};
pub use live::{FeedEvent, LiveFeed};
pub use metrics::{OUTCOMES as PUBLISH_OUTCOMES, PublisherMetrics};
pub use publisher::{PublishError, Publisher, PublisherSettings};
pub use router::{DeviceCommands, RouterError, Subscription};
pub use topology::{
    ALL_DEVICES_BINDING, INVALID_ROUTING_KEY, MQTT_ANSWERS_BINDING, MQTT_COMMANDS_BINDING,
    MQTT_READINGS_BINDING, MqttTopology, READINGS_ROUTING_KEY, REPORTS_ROUTING_KEY, Topology,
    declare_mqtt_topology, declare_topology, delete_mqtt_topology, delete_topology, mqtt_topic_of,
    routing_key_of,
};

pub use wire::{ORIGINAL_MESSAGE_ID_HEADER, REASON_HEADER};

/// For tests and tools that inspect RabbitMQ directly; services go through the types above.
pub use lapin;
