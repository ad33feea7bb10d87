//! What the services lean on, replicated, on this machine: a three-node RabbitMQ cluster
//! ([`rabbitmq`]) and PostgreSQL with a synchronous standby and automatic failover
//! ([`postgres`]), each node a process of this run on its own ports and data, to be killed, cut
//! off and started again. [`crate::stack::Stack`] then runs the MQTT broker and the services
//! against them ([`Cluster::backends`]).

pub mod postgres;
pub mod rabbitmq;

use std::path::Path;
use std::time::Duration;

use crate::stack::Backends;
use postgres::{FormationPorts, PgFormation};
use rabbitmq::{NodePorts, RabbitCluster};

/// Where the cluster listens, from a base port: RabbitMQ's AMQP on base+10.., its distribution on
/// base+20.., the pg_auto_failover monitor on base+30 and the PostgreSQL nodes on base+31...
/// (`Stack` keeps base..base+6 for the MQTT broker and the services.)
#[derive(Debug, Clone, Copy)]
pub struct ClusterPorts {
    pub rabbitmq: [NodePorts; rabbitmq::NODES],
    pub postgres: FormationPorts,
}

impl ClusterPorts {
    pub fn from_base(base: u16) -> Self {
        Self {
            rabbitmq: std::array::from_fn(|i| NodePorts {
                amqp: base + 10 + i as u16,
                dist: base + 20 + i as u16,
            }),
            postgres: FormationPorts {
                monitor: base + 30,
                nodes: std::array::from_fn(|i| base + 31 + i as u16),
            },
        }
    }

    pub fn all(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .rabbitmq
            .iter()
            .flat_map(|p| [p.amqp, p.dist])
            .collect();
        ports.push(self.postgres.monitor);
        ports.extend(self.postgres.nodes);
        ports
    }
}

pub struct Cluster {
    pub rabbitmq: RabbitCluster,
    pub postgres: PgFormation,
    pub ports: ClusterPorts,
}

impl Cluster {
    /// Fresh directories under `dir` (which `Stack::prepare` has just emptied).
    pub fn prepare(dir: &Path, port_base: u16) -> anyhow::Result<Self> {
        let ports = ClusterPorts::from_base(port_base);
        for port in ports.all() {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                anyhow::bail!(
                    "port {port} is taken (another chaos run? choose other ports with --port-base)"
                );
            }
        }
        Ok(Self {
            // each node's own group, for the cut's iptables rules: numbers no account uses
            rabbitmq: RabbitCluster::prepare(
                &dir.join("rabbitmq"),
                ports.rabbitmq,
                60_000 + u32::from(port_base % 5_000),
            )?,
            postgres: PgFormation::prepare(&dir.join("postgres"), ports.postgres)?,
            ports,
        })
    }

    /// Both formed: the RabbitMQ nodes boot (half a minute on two cores) while the PostgreSQL
    /// formation comes together, then they are joined into one cluster.
    pub async fn form(&mut self, timeout: Duration) -> anyhow::Result<()> {
        self.rabbitmq.start_nodes()?;
        self.postgres.form(timeout).await?;
        self.rabbitmq.join(timeout).await
    }

    /// What the services are given: every RabbitMQ node's URL, and the formation's multi-host URL.
    pub fn backends(&self) -> anyhow::Result<Backends> {
        Ok(Backends {
            database_url: self.postgres.database_url()?,
            amqp_url: self.rabbitmq.amqp_url(),
        })
    }

    /// Processes of the cluster that died by themselves.
    pub fn exited(&mut self) -> Vec<(String, String)> {
        let mut dead = self.rabbitmq.exited();
        dead.extend(self.postgres.exited());
        dead
    }

    pub async fn shutdown(&mut self) {
        self.rabbitmq.shutdown().await;
        self.postgres.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ports_overlap_neither_each_other_nor_the_stacks() {
        let base = 28500;
        let mut ports = ClusterPorts::from_base(base).all();
        ports.extend(base..=base + 6);
        let count = ports.len();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), count);
    }
}
