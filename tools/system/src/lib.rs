//! Sensorhub run as processes, written once for every tool that measures or proves it: the chaos
//! run, the benchmark and the deployment tests.
//!
//! - [`process`]: one child process with its log, stopped gracefully or killed with everything it
//!   started, and killed when dropped.
//! - [`service`]: a Sensorhub service's binary on a port (where the binaries are, the environment
//!   they get, waiting for `/readyz`).
//! - [`stack`]: a private PostgreSQL, RabbitMQ node and Mosquitto and the services of the write
//!   path, on their own ports and data directories.
//! - [`cluster`]: a three-node RabbitMQ cluster and PostgreSQL with a synchronous standby and
//!   automatic failover (pg_auto_failover), for the stack to run the services against.
//! - [`procs`]: CPU time and peak memory from `/proc`, and the processes below a process.
//! - [`prometheus`]: reading figures out of a `/metrics` page.
//! - [`mqtt`]: an MQTT client's clean goodbye.
//! - [`numbers`]: numbers as the reports print them.
//! - [`devices`]: simulated Pis that send over HTTP and MQTT as careful ones do, with a ledger of
//!   what was acknowledged.
//! - [`commanded`]: simulated Pis that take commands (MQTT, long-poll) and answer them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a measuring tool stops, with the message, where the system it drives is not as it must be; it serves no one"
)]

pub mod cluster;
pub mod commanded;
pub mod devices;
pub mod mqtt;
pub mod numbers;
pub mod process;
pub mod procs;
pub mod prometheus;
pub mod service;
pub mod stack;

pub use process::Process;
