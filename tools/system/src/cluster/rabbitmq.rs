//! Three RabbitMQ nodes on this machine, clustered: each its own process, ports, data and log
//! directory, `cluster_partition_handling = pause_minority`. A node can be killed (SIGKILL, with
//! everything it started) and started again on its data, where it rejoins the cluster by itself;
//! all three can be killed and started together; and one can be cut off from the other two.
//!
//! The cut: every node runs as the `rabbitmq` user but with a group of its own, so iptables'
//! `owner` match can tell its packets from the others' on loopback. Dropping what the cut node
//! sends to the others' distribution ports, and what anything else sends to its distribution port,
//! breaks every Erlang distribution connection between it and the rest (whichever side opened
//! it) while leaving AMQP alone. With `net_ticktime` at 10 s the nodes notice within about 10 s,
//! and pause_minority then pauses the lone node (it closes its AMQP listener) until the cut heals.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::Process;
use crate::stack::{as_user, chown_tree, user_ids};

/// How many nodes: the smallest cluster where a majority survives one node's loss.
pub const NODES: usize = 3;

/// The iptables chain holding the cut, jumped to from OUTPUT while the cluster exists.
const CHAIN: &str = "SENSORHUB_CHAOS_CUT";

/// Detects a lost peer in about 10 s instead of 60 s, so a cut is noticed within a chaos step.
const ADVANCED_CONFIG: &str = "[{kernel, [{net_ticktime, 10}]}].\n";

#[derive(Debug, Clone, Copy)]
pub struct NodePorts {
    pub amqp: u16,
    pub dist: u16,
}

pub struct RabbitCluster {
    dir: PathBuf,
    ports: [NodePorts; NODES],
    /// Each node's group, for iptables' owner match; the user is `rabbitmq` when run as root.
    groups: [u32; NODES],
    user: Option<(u32, u32)>,
    running: [Option<Process>; NODES],
    cut_installed: bool,
}

impl RabbitCluster {
    /// Fresh data directories and configuration under `dir` for nodes on `ports`; `group_base`
    /// and the next numbers become the nodes' groups.
    pub fn prepare(dir: &Path, ports: [NodePorts; NODES], group_base: u32) -> anyhow::Result<Self> {
        let user = if crate::procs::is_root() {
            Some(user_ids("rabbitmq")?)
        } else {
            None
        };
        for (index, node_ports) in ports.iter().enumerate() {
            let node_dir = dir.join(node_label(index));
            fs::create_dir_all(node_dir.join("mnesia"))?;
            fs::create_dir_all(node_dir.join("log"))?;
            fs::write(
                node_dir.join("rabbitmq.conf"),
                format!(
                    "listeners.tcp.local = 127.0.0.1:{}\nloopback_users.guest = true\n\
                     cluster_partition_handling = pause_minority\n",
                    node_ports.amqp
                ),
            )?;
            fs::write(node_dir.join("advanced.config"), ADVANCED_CONFIG)?;
            // no plugins: the machine's node may have the management plugin on its fixed port
            fs::write(node_dir.join("enabled_plugins"), "[].\n")?;
            chown_tree(&node_dir, user)?;
        }
        let groups = std::array::from_fn(|i| group_base + i as u32);
        Ok(Self {
            dir: dir.to_owned(),
            ports,
            groups,
            user,
            running: Default::default(),
            cut_installed: false,
        })
    }

    /// The node's Erlang name, as rabbitmqctl and the queue's leader/members say it.
    pub fn node_name(index: usize) -> String {
        format!("sensorhub-chaos-{}@localhost", node_label(index))
    }

    /// Which node a name (as rabbitmqctl prints it) is.
    pub fn node_index(name: &str) -> Option<usize> {
        (0..NODES).find(|&i| Self::node_name(i) == name.trim())
    }

    /// Every node's AMQP URL, comma-separated: the services' `AMQP_URL`.
    pub fn amqp_url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("amqp://guest:guest@127.0.0.1:{}/%2f", p.amqp))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn node_names(&self) -> Vec<String> {
        (0..NODES).map(Self::node_name).collect()
    }

    pub fn is_running(&self, index: usize) -> bool {
        self.running[index].is_some()
    }

    fn log_path(&self, index: usize) -> PathBuf {
        self.dir
            .join(format!("{}.log", Self::node_name(index).replace('@', "-")))
    }

    fn command(&self, index: usize) -> Command {
        let dir = self.dir.join(node_label(index));
        let ports = self.ports[index];
        let mut cmd = Command::new("/usr/lib/rabbitmq/bin/rabbitmq-server");
        cmd.current_dir("/")
            .env("HOME", "/var/lib/rabbitmq") // the Erlang cookie the nodes and rabbitmqctl share
            .env("RABBITMQ_NODENAME", Self::node_name(index))
            .env("RABBITMQ_NODE_PORT", ports.amqp.to_string())
            .env("RABBITMQ_DIST_PORT", ports.dist.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"));
        // the node's own group: what the cut's iptables rules match on
        as_user(
            &mut cmd,
            self.user.map(|(uid, _)| (uid, self.groups[index])),
        );
        cmd
    }

    /// Starts a node (not waiting for it).
    pub fn start(&mut self, index: usize) -> anyhow::Result<()> {
        if self.running[index].is_some() {
            bail!("{} is already running", Self::node_name(index));
        }
        let process = Process::start(
            &Self::node_name(index),
            self.command(index),
            &self.log_path(index),
        )?;
        self.running[index] = Some(process);
        Ok(())
    }

    /// Waits until the node takes AMQP connections: a restarted node opens its listener only once
    /// it is back in the cluster with its queues.
    pub async fn wait_ready(&mut self, index: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let amqp = self.ports[index].amqp;
        let process = self.running[index]
            .as_mut()
            .with_context(|| format!("{} is not running", Self::node_name(index)))?;
        crate::service::wait_until(process, deadline, || crate::service::port_open(amqp)).await
    }

    /// Starts the three fresh nodes (not waiting for them): then [`Self::join`].
    pub fn start_nodes(&mut self) -> anyhow::Result<()> {
        self.install_cut_chain()?;
        for index in 0..NODES {
            self.start(index)?;
        }
        Ok(())
    }

    /// Clusters the started nodes: the second and third join the first, as the RabbitMQ
    /// clustering guide does it by hand.
    pub async fn join(&mut self, timeout: Duration) -> anyhow::Result<()> {
        for index in 0..NODES {
            self.wait_ready(index, timeout).await?;
            // the listener opens a moment before the node answers the CLI
            self.ctl_retrying(index, &["await_startup"], timeout)?;
        }
        let first = Self::node_name(0);
        for index in 1..NODES {
            self.ctl(index, &["stop_app"])?;
            self.ctl(index, &["join_cluster", &first])?;
            self.ctl(index, &["start_app"])?;
        }
        let status = self.ctl(0, &["cluster_status", "--formatter", "json"])?;
        let running = serde_json::from_str::<serde_json::Value>(&status)
            .ok()
            .and_then(|v| v["running_nodes"].as_array().map(Vec::len))
            .unwrap_or(0);
        if running != NODES {
            bail!("the cluster has {running} running nodes, not {NODES}: {status}");
        }
        Ok(())
    }

    /// SIGKILL to the node and everything it started.
    pub fn kill(&mut self, index: usize) -> anyhow::Result<()> {
        let mut process = self.running[index]
            .take()
            .with_context(|| format!("{} is not running", Self::node_name(index)))?;
        process.kill();
        Ok(())
    }

    /// Nodes that died by themselves (they should never).
    pub fn exited(&mut self) -> Vec<(String, String)> {
        let mut dead = Vec::new();
        for (index, slot) in self.running.iter_mut().enumerate() {
            if let Some(status) = slot.as_mut().and_then(Process::exited) {
                dead.push((Self::node_name(index), status.to_string()));
                *slot = None;
            }
        }
        dead
    }

    /// `rabbitmqctl` against one node. The CLI boots an Erlang VM each time (seconds on two
    /// cores): call it sparingly while load runs.
    pub fn ctl(&self, index: usize, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new("timeout");
        cmd.arg("60")
            .arg("/usr/lib/rabbitmq/bin/rabbitmqctl")
            .current_dir("/")
            .env("HOME", "/var/lib/rabbitmq")
            .args(["-q", "-n", &Self::node_name(index)])
            .args(args);
        as_user(&mut cmd, self.user);
        let out = cmd.output().context("cannot run rabbitmqctl")?;
        if !out.status.success() {
            bail!(
                "rabbitmqctl -n {} {}: {}",
                Self::node_name(index),
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ctl`, again until it works or `timeout` passes (a node that just opened its port may not
    /// answer the CLI yet).
    fn ctl_retrying(
        &self,
        index: usize,
        args: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.ctl(index, args) {
                Ok(out) => return Ok(out),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }

    /// `ctl` on the first running node that answers (not `except`, a node cut off).
    pub fn ctl_any(&self, args: &[&str], except: Option<usize>) -> anyhow::Result<String> {
        let mut last = None;
        for index in (0..NODES).filter(|i| Some(*i) != except && self.is_running(*i)) {
            match self.ctl(index, args) {
                Ok(out) => return Ok(out),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no RabbitMQ node is running")))
    }

    /// The quorum queue's leader and members (node indexes), as the cluster reports them.
    pub fn quorum_queue(&self, queue: &str, except: Option<usize>) -> anyhow::Result<QueueNodes> {
        let listing = self.ctl_any(
            &[
                "list_queues",
                "name",
                "type",
                "leader",
                "members",
                "--formatter",
                "json",
            ],
            except,
        )?;
        let rows: Vec<serde_json::Value> = serde_json::from_str(&listing)
            .with_context(|| format!("list_queues said {listing:?}"))?;
        let row = rows
            .iter()
            .find(|r| r["name"] == queue)
            .with_context(|| format!("no queue {queue}"))?;
        if row["type"] != "quorum" {
            bail!("{queue} is a {} queue, not a quorum queue", row["type"]);
        }
        let leader = row["leader"].as_str().and_then(Self::node_index);
        let members = row["members"]
            .as_array()
            .map(|m| {
                m.iter()
                    .filter_map(|n| n.as_str().and_then(Self::node_index))
                    .collect()
            })
            .unwrap_or_default();
        Ok(QueueNodes { leader, members })
    }

    /// Messages (ready and unacknowledged) in a queue.
    pub fn queue_messages(&self, queue: &str) -> anyhow::Result<u64> {
        let listing = self.ctl_any(&["list_queues", "name", "messages"], None)?;
        listing
            .lines()
            .find_map(|line| {
                let (name, messages) = line.split_once('\t')?;
                (name == queue).then(|| messages.trim().parse().ok())?
            })
            .with_context(|| format!("no queue {queue} in {listing:?}"))
    }

    /// Our own iptables chain, jumped to from OUTPUT: a cut is rules in it, healing empties it.
    fn install_cut_chain(&mut self) -> anyhow::Result<()> {
        // an earlier run interrupted before it cleaned up leaves the chain behind
        self.remove_cut_chain();
        iptables(&["-N", CHAIN])?;
        iptables(&["-I", "OUTPUT", "-o", "lo", "-j", CHAIN])?;
        self.cut_installed = true;
        Ok(())
    }

    fn remove_cut_chain(&mut self) {
        let _ = iptables(&["-D", "OUTPUT", "-o", "lo", "-j", CHAIN]);
        let _ = iptables(&["-F", CHAIN]);
        let _ = iptables(&["-X", CHAIN]);
        self.cut_installed = false;
    }

    /// Cuts the node off from the other two (Erlang distribution only; AMQP still reaches it).
    pub fn cut_off(&self, index: usize) -> anyhow::Result<()> {
        let group = self.groups[index].to_string();
        let own = self.ports[index].dist.to_string();
        let others: Vec<String> = (0..NODES)
            .filter(|i| *i != index)
            .map(|i| self.ports[i].dist.to_string())
            .collect();
        // what it sends to the others' distribution ports: the connections it opened to them
        // (dropping one direction of a TCP connection is enough to break it)
        iptables(&[
            "-A",
            CHAIN,
            "-p",
            "tcp",
            "-m",
            "owner",
            "--gid-owner",
            &group,
            "-m",
            "multiport",
            "--dports",
            &others.join(","),
            "-j",
            "DROP",
        ])?;
        // what anything else sends to its distribution port: the connections they opened to it
        // (rabbitmqctl cannot reach it either while it is cut off)
        iptables(&[
            "-A",
            CHAIN,
            "-p",
            "tcp",
            "--dport",
            &own,
            "-m",
            "owner",
            "!",
            "--gid-owner",
            &group,
            "-j",
            "DROP",
        ])
    }

    /// Heals every cut.
    pub fn heal(&self) -> anyhow::Result<()> {
        iptables(&["-F", CHAIN])
    }

    /// Waits until every node is running and sees the other two (after a cut healed, a paused
    /// node resumes by itself once it sees the majority again).
    pub fn wait_all_clustered(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            let status = self
                .ctl_any(&["cluster_status", "--formatter", "json"], None)
                .ok();
            let running = status
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .and_then(|v| v["running_nodes"].as_array().map(Vec::len))
                .unwrap_or(0);
            let listening = (0..NODES)
                .all(|i| std::net::TcpStream::connect(("127.0.0.1", self.ports[i].amqp)).is_ok());
            if running == NODES && listening {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                bail!("the cluster did not come together again within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Whether the node takes AMQP connections now (a paused node does not).
    pub fn listening(&self, index: usize) -> bool {
        std::net::TcpStream::connect(("127.0.0.1", self.ports[index].amqp)).is_ok()
    }

    /// Stops every node gracefully (`rabbitmqctl stop` would need the CLI; SIGTERM is the same
    /// orderly shutdown).
    pub async fn shutdown(&mut self) {
        for slot in &mut self.running {
            if let Some(mut process) = slot.take() {
                let _ = process.terminate(Duration::from_secs(30)).await;
            }
        }
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        if self.cut_installed {
            self.remove_cut_chain();
        }
        // the processes are killed by their own Drop
    }
}

/// A quorum queue's leader and members, as node indexes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueNodes {
    pub leader: Option<usize>,
    pub members: Vec<usize>,
}

/// `c1`, `c2`, `c3`: as the report names them.
pub fn node_label(index: usize) -> String {
    format!("c{}", index + 1)
}

fn iptables(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("iptables")
        .args(["-w", "5"])
        .args(args)
        .output()
        .context("cannot run iptables (Debian package iptables; run as root)")?;
    if !out.status.success() {
        bail!(
            "iptables {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_map_back_to_their_index() {
        for index in 0..NODES {
            assert_eq!(
                RabbitCluster::node_index(&RabbitCluster::node_name(index)),
                Some(index)
            );
        }
        assert_eq!(RabbitCluster::node_index("rabbit@localhost"), None);
    }
}
