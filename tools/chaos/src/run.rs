//! One step: devices send, a fault is injected and repaired, the devices stop making new readings
//! and send again what was not acknowledged, then the run waits until every acknowledged reading is
//! stored and says how long that took.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::Context;
use diesel::sql_types::BigInt;
use diesel::{QueryableByName, RunQueryDsl};
use serde::Serialize;
use system::cluster::Cluster;
use system::cluster::rabbitmq::node_label;
use system::devices::{FleetPlan, Kind, MqttLogin, RunningFleet, Targets};
use system::prometheus;
use system::stack::{AMQP_PREFIX, Broker, Component, Stack};
use tokio::time::Instant;

use crate::commands::{CommandOutcome, CommandPlan, Reach, StepCommands};
use crate::plan::{Fault, NodePick, Step};
use crate::recovery::{Recovery, Watch};
use crate::verify::Stored;

#[derive(Debug, Clone)]
pub struct Timing {
    /// Load before the fault.
    pub before: Duration,
    /// Load after everything is back.
    pub after: Duration,
    /// How long devices keep sending a reading not yet acknowledged, after the load stopped.
    pub retry_for: Duration,
    /// How long to wait for every acknowledged reading to be stored.
    pub drain_timeout: Duration,
    /// How long a restarted component may take to be ready.
    pub ready_timeout: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepOutcome {
    pub name: String,
    pub tag: String,
    pub fault: Fault,
    pub known_gap: Option<&'static str>,
    pub sent: u64,
    pub acknowledged: u64,
    /// Of which published over MQTT (PUBACKed by the broker).
    pub acknowledged_mqtt: u64,
    pub stored: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// The step's devices' rollups (minute, hour and day) that differ from what their raw readings
    /// give: a reading counted twice, or not at all.
    pub rollups_differing: u64,
    /// Readings the devices gave up on (never acknowledged): not lost, but a system that did not
    /// recover.
    pub unacknowledged: u64,
    pub retries: u64,
    pub refusals: BTreeMap<String, u64>,
    /// From the end of the load until every acknowledged reading was stored; None: never.
    pub catch_up_secs: Option<f64>,
    /// What was observed while the fault lasted.
    pub notes: Vec<String>,
    /// The step's commands (when the run issues any).
    pub commands: Option<CommandOutcome>,
    /// Cluster mode: how long after the fault the HTTP devices were acknowledged again (their
    /// answer waits for RabbitMQ's confirm; Mosquitto's PUBACK does not).
    pub acks_recovery: Option<Recovery>,
    /// Cluster mode: how long after the fault the step's readings were being stored again.
    pub stores_recovery: Option<Recovery>,
    #[serde(skip)]
    pub acknowledged_ids: Vec<(String, String)>,
}

impl StepOutcome {
    pub fn clean(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.rollups_differing == 0
            && self.unacknowledged == 0
            && self.catch_up_secs.is_some()
            && self.acknowledged > 0
            && self.commands.as_ref().is_none_or(|c| c.unfinished == 0)
    }
}

pub struct Runner<'a> {
    pub stack: &'a mut Stack,
    /// Cluster mode: the RabbitMQ cluster and the PostgreSQL formation the stack's services use.
    pub cluster: Option<&'a mut Cluster>,
    /// RabbitMQ nodes an earlier step has killed (so each is killed once).
    pub nodes_hit: std::collections::BTreeSet<usize>,
    pub fleet: FleetPlan,
    pub tokens: HashMap<String, String>,
    pub timing: Timing,
    pub commands: CommandPlan,
}

impl Runner<'_> {
    pub async fn run_step(&mut self, index: usize, step: &Step) -> anyhow::Result<StepOutcome> {
        let tag = step_tag(index);
        let devices: Vec<(String, Kind, String)> = self
            .fleet
            .devices(&tag)
            .into_iter()
            .map(|(id, kind)| {
                let token = self.tokens.get(&id).cloned().unwrap_or_default();
                (id, kind, token)
            })
            .collect();
        let targets = Targets {
            ingest_url: self.stack.ingest_url(),
            mqtt_port: self.stack.mqtt_port(),
            mqtt_login: match self.stack.broker {
                Broker::Mosquitto => MqttLogin::Anonymous,
                Broker::Rabbitmq => MqttLogin::DeviceToken,
            },
        };
        let mut commands = self.start_commands(&tag, &targets)?;
        let fleet = RunningFleet::start(&self.fleet, devices, targets)?;
        tokio::time::sleep(self.timing.before).await;
        let mut notes = Vec::new();
        if fleet.acknowledged_so_far() == 0 {
            notes.push("nothing was acknowledged before the fault".to_owned());
        }
        // commands issued just before the fault, and again once it is repaired
        if let Some(commands) = commands.as_mut() {
            commands.issue().await?;
        }
        let watches = self
            .cluster
            .is_some()
            .then(|| self.watch_progress(&tag, &fleet));
        let fault_at = self.inject(&step.fault, &mut notes).await?;
        if let Some(commands) = commands.as_mut() {
            commands.issue().await?;
        }
        tokio::time::sleep(self.timing.after).await;

        let load_stopped = Instant::now();
        let (acks_recovery, stores_recovery) = match watches {
            Some((acks, stores)) => (
                Some(acks.finish(fault_at.into_std())),
                Some(stores.finish(fault_at.into_std())),
            ),
            None => (None, None),
        };
        let ledger = fleet.finish(load_stopped + self.timing.retry_for).await;
        let acknowledged = ledger.acknowledged();
        let mqtt_devices: std::collections::HashSet<String> = self
            .fleet
            .devices(&tag)
            .into_iter()
            .filter(|(_, kind)| *kind == Kind::Mqtt)
            .map(|(id, _)| id)
            .collect();
        let acknowledged_mqtt = acknowledged
            .iter()
            .filter(|(device, _)| mqtt_devices.contains(device))
            .count() as u64;
        let (catch_up, stored) = self.wait_stored(&tag, &acknowledged, load_stopped).await;
        let rollups_differing = self.rollups_differing(&tag).await?;
        let commands = match commands {
            Some(commands) => Some(
                commands
                    .finish(load_stopped, self.timing.drain_timeout)
                    .await,
            ),
            None => None,
        };
        for (component, status) in self.stack.exited() {
            notes.push(format!("{} exited by itself ({status})", component.name()));
        }
        if let Some(cluster) = self.cluster.as_deref_mut() {
            for (name, status) in cluster.exited() {
                notes.push(format!("{name} exited by itself ({status})"));
            }
        }
        let refusals = ledger.refusals();
        Ok(StepOutcome {
            name: step.name.clone(),
            tag,
            fault: step.fault.clone(),
            known_gap: step.known_gap,
            sent: ledger.sent.load(std::sync::atomic::Ordering::Relaxed),
            acknowledged: acknowledged.len() as u64,
            acknowledged_mqtt,
            stored: stored.distinct(),
            lost: stored.missing(&acknowledged),
            duplicated: stored.duplicated(),
            rollups_differing,
            unacknowledged: ledger
                .unacknowledged
                .load(std::sync::atomic::Ordering::Relaxed),
            retries: ledger.retries.load(std::sync::atomic::Ordering::Relaxed),
            refusals,
            catch_up_secs: catch_up.map(|d| d.as_secs_f64()),
            notes,
            commands,
            acks_recovery,
            stores_recovery,
            acknowledged_ids: acknowledged,
        })
    }

    /// Samples, while the load runs, how many readings were acknowledged to the step's devices
    /// and how many of theirs are stored.
    fn watch_progress(&self, tag: &str, fleet: &RunningFleet) -> (Watch, Watch) {
        // HTTP devices only: Mosquitto PUBACKs on its own, whether RabbitMQ is there or not, so
        // only an HTTP answer says that the RabbitMQ cluster confirmed
        let ledger = fleet.ledger();
        let http_devices: std::collections::HashSet<String> = self
            .fleet
            .devices(tag)
            .into_iter()
            .filter(|(_, kind)| *kind != Kind::Mqtt)
            .map(|(id, _)| id)
            .collect();
        let (mut seen, mut http_acks) = (0, 0u64);
        let acks = Watch::start(Duration::from_millis(50), move || {
            seen = ledger.acknowledged_from(seen, |device| {
                if http_devices.contains(device) {
                    http_acks += 1;
                }
            });
            Some(http_acks)
        });
        let (url, pattern) = (self.stack.database_url(), format!("{tag}-%"));
        let mut conn: Option<diesel::PgConnection> = None;
        let stores = Watch::start(Duration::from_millis(200), move || {
            #[derive(QueryableByName)]
            struct Count {
                #[diesel(sql_type = BigInt)]
                n: i64,
            }
            if conn.is_none() {
                conn = store::connect(&url).ok();
            }
            let counted: Result<Vec<Count>, _> =
                diesel::sql_query("SELECT count(*) AS n FROM readings WHERE device_id LIKE $1")
                    .bind::<diesel::sql_types::Text, _>(&pattern)
                    .load(conn.as_mut()?);
            match counted {
                Ok(rows) => rows.first().map(|c| c.n as u64),
                // a connection to a primary that is gone: a new one next time
                Err(_) => {
                    conn = None;
                    None
                }
            }
        });
        (acks, stores)
    }

    /// The step's commanded devices, started, when the run issues commands.
    fn start_commands(&self, tag: &str, targets: &Targets) -> anyhow::Result<Option<StepCommands>> {
        if !self.commands.enabled() {
            return Ok(None);
        }
        let reach = Reach {
            database_url: self.stack.database_url(),
            ingest_url: targets.ingest_url.clone(),
            mqtt_port: targets.mqtt_port,
            mqtt_login: targets.mqtt_login,
        };
        StepCommands::start(&self.commands, tag, &self.tokens, reach).map(Some)
    }

    /// Injects the fault and repairs it; returns the moment it hit.
    async fn inject(&mut self, fault: &Fault, notes: &mut Vec<String>) -> anyhow::Result<Instant> {
        let mut fault_at = Instant::now();
        match fault {
            Fault::Kill { components, down } => {
                if components.contains(&Component::Persister) {
                    notes.push(if self.wait_for_write_in_progress().await {
                        "killed while a batch was being written".to_owned()
                    } else {
                        "no write in progress was seen before the kill".to_owned()
                    });
                }
                fault_at = Instant::now();
                for component in components {
                    self.stack.kill(*component)?;
                }
                let down_since = Instant::now();
                self.watch_outage(*down, notes).await;
                let mut order = components.clone();
                order.sort(); // databases and brokers before the services that use them
                for component in order {
                    self.stack
                        .start_ready(component, self.timing.ready_timeout)
                        .await?;
                }
                notes.push(format!(
                    "down {:.1} s in all",
                    down_since.elapsed().as_secs_f64()
                ));
            }
            Fault::Terminate { component } => {
                match self
                    .stack
                    .terminate(*component, Duration::from_secs(30))
                    .await?
                {
                    Some(took) => notes.push(format!(
                        "{} stopped by itself in {:.1} s",
                        component.name(),
                        took.as_secs_f64()
                    )),
                    None => notes.push(format!(
                        "{} did not stop within 30 s: killed",
                        component.name()
                    )),
                }
                self.stack
                    .start_ready(*component, self.timing.ready_timeout)
                    .await?;
            }
            Fault::MemoryAlarm { held } => {
                self.stack
                    .rabbitmqctl(&["set_vm_memory_high_watermark", "absolute", "1"])?;
                self.watch_outage(*held, notes).await;
                self.stack
                    .rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"])?;
            }
            Fault::KillRabbitmqNode { .. }
            | Fault::KillPostgresPrimary
            | Fault::CutOffRabbitmqNode { .. }
            | Fault::KillRabbitmqCluster => {
                fault_at = self.inject_into_cluster(fault, notes).await?;
            }
        }
        Ok(fault_at)
    }

    /// A fault of cluster mode; returns the moment it hit.
    async fn inject_into_cluster(
        &mut self,
        fault: &Fault,
        notes: &mut Vec<String>,
    ) -> anyhow::Result<Instant> {
        let ready = self.timing.ready_timeout;
        let cluster = self
            .cluster
            .as_deref_mut()
            .context("a cluster fault needs --cluster")?;
        let fault_at;
        match fault {
            Fault::KillRabbitmqNode { pick, down } => {
                let node = pick_node(cluster, *pick, &self.nodes_hit, notes)?;
                fault_at = Instant::now();
                cluster.rabbitmq.kill(node)?;
                self.nodes_hit.insert(node);
                tokio::time::sleep(*down).await;
                cluster.rabbitmq.start(node)?;
                cluster.rabbitmq.wait_ready(node, ready).await?;
                notes.push(format!(
                    "{} back in the cluster {:.1} s after the kill",
                    node_label(node),
                    fault_at.elapsed().as_secs_f64()
                ));
            }
            Fault::KillPostgresPrimary => {
                let old = cluster
                    .postgres
                    .primary()
                    .context("no PostgreSQL primary before the fault")?;
                fault_at = Instant::now();
                cluster.postgres.kill(old)?;
                let deadline = std::time::Instant::now() + ready;
                let old_port = cluster
                    .postgres
                    .states()?
                    .iter()
                    .find(|(i, _)| *i == old)
                    .map(|(_, s)| s.port);
                let taken_over = cluster
                    .postgres
                    .wait_for(deadline, "the standby to take over", |states| {
                        states
                            .iter()
                            .any(|s| s.writable() && Some(s.port) != old_port)
                    })
                    .await?;
                let new = taken_over
                    .iter()
                    .find(|(_, s)| s.writable())
                    .map_or(1 - old, |(i, _)| *i);
                let took_over_after = fault_at.elapsed();
                // the old primary comes back on its data: pg_autoctl rewinds it into a standby
                cluster.postgres.start_node(old, false)?;
                cluster
                    .postgres
                    .wait_for(deadline, "a primary with a secondary again", |states| {
                        states.iter().any(|s| s.settled("primary"))
                            && states.iter().any(|s| s.settled("secondary"))
                    })
                    .await?;
                let settled_after = fault_at.elapsed();
                let sync = cluster.postgres.sync_settings(new)?;
                notes.push(format!(
                    "{} took over from {} {:.1} s after the kill; {} back as its synchronous \
                     standby after {:.1} s (until then the new primary was in wait_primary, \
                     committing without a standby); now synchronous_commit = {}, \
                     synchronous_standby_names = '{}'",
                    system::cluster::postgres::PgFormation::node_name(new),
                    system::cluster::postgres::PgFormation::node_name(old),
                    took_over_after.as_secs_f64(),
                    system::cluster::postgres::PgFormation::node_name(old),
                    settled_after.as_secs_f64(),
                    sync.synchronous_commit,
                    sync.synchronous_standby_names
                ));
                if !sync.synchronous() {
                    notes.push(
                        "❌ the primary has no synchronous standby after the step".to_owned(),
                    );
                }
            }
            Fault::CutOffRabbitmqNode { pick, held } => {
                let node = pick_node(cluster, *pick, &self.nodes_hit, notes)?;
                fault_at = Instant::now();
                cluster.rabbitmq.cut_off(node)?;
                let until = Instant::now() + *held;
                let mut paused_after = None;
                while Instant::now() < until {
                    if paused_after.is_none() && !cluster.rabbitmq.listening(node) {
                        paused_after = Some(fault_at.elapsed());
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                cluster.rabbitmq.heal()?;
                let healed_at = Instant::now();
                notes.push(match paused_after {
                    Some(after) => format!(
                        "{} cut off for {} s: paused by pause_minority (AMQP closed) {:.1} s \
                         after the cut",
                        node_label(node),
                        held.as_secs(),
                        after.as_secs_f64()
                    ),
                    None => format!(
                        "{} cut off for {} s: it never paused",
                        node_label(node),
                        held.as_secs()
                    ),
                });
                let rabbitmq = &cluster.rabbitmq;
                tokio::task::block_in_place(|| rabbitmq.wait_all_clustered(ready))?;
                notes.push(format!(
                    "all three nodes together again {:.1} s after the heal",
                    healed_at.elapsed().as_secs_f64()
                ));
            }
            Fault::KillRabbitmqCluster => {
                fault_at = Instant::now();
                for node in 0..system::cluster::rabbitmq::NODES {
                    cluster.rabbitmq.kill(node)?;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                // all at once: a node that was not the last to stop waits for its peers' tables
                for node in 0..system::cluster::rabbitmq::NODES {
                    cluster.rabbitmq.start(node)?;
                }
                for node in 0..system::cluster::rabbitmq::NODES {
                    cluster.rabbitmq.wait_ready(node, ready).await?;
                }
                notes.push(format!(
                    "all three nodes taking connections again {:.1} s after the kill",
                    fault_at.elapsed().as_secs_f64()
                ));
            }
            _ => anyhow::bail!("not a cluster fault: {fault:?}"),
        }
        Ok(fault_at)
    }

    /// While a fault lasts: how deep the readings queue grew (persister's /metrics) and what the
    /// services' readiness said.
    async fn watch_outage(&self, duration: Duration, notes: &mut Vec<String>) {
        let until = Instant::now() + duration;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(500))
            .build()
            .ok();
        let mut deepest_queue: Option<i64> = None;
        let mut not_ready: BTreeMap<&'static str, u32> = BTreeMap::new();
        while Instant::now() < until {
            if let Some(client) = &client {
                for component in [
                    Component::IngestHttp,
                    Component::IngestMqtt,
                    Component::Persister,
                ] {
                    let (true, Some(url)) = (
                        self.stack.is_running(component),
                        self.stack.ops_url(component),
                    ) else {
                        continue;
                    };
                    // no answer within the timeout counts as not ready, as for a load balancer
                    let ready = client
                        .get(format!("{url}/readyz"))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    if !ready {
                        *not_ready.entry(component.name()).or_default() += 1;
                    }
                    if component == Component::Persister
                        && let Some(depth) = queue_depth(client, &url).await
                    {
                        deepest_queue = Some(deepest_queue.unwrap_or(0).max(depth));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(500).min(duration)).await;
        }
        if !not_ready.is_empty() {
            let names: Vec<_> = not_ready.keys().copied().collect();
            notes.push(format!("not ready meanwhile: {}", names.join(", ")));
        }
        if let Some(depth) = deepest_queue.filter(|d| *d > 0) {
            notes.push(format!("queue grew to {depth} messages"));
        }
    }

    /// Waits (up to 3 s) until the persister is writing a batch: a COPY or INSERT into readings
    /// active in PostgreSQL.
    async fn wait_for_write_in_progress(&self) -> bool {
        #[derive(QueryableByName)]
        struct Active {
            #[diesel(sql_type = BigInt)]
            writes: i64,
        }
        let url = self.stack.database_url();
        tokio::task::spawn_blocking(move || {
            let Ok(mut conn) = store::connect(&url) else {
                return false;
            };
            let deadline = std::time::Instant::now() + Duration::from_secs(3);
            while std::time::Instant::now() < deadline {
                let active: Result<Vec<Active>, _> = diesel::sql_query(
                    "SELECT count(*) AS writes FROM pg_stat_activity \
                     WHERE state = 'active' AND pid <> pg_backend_pid() \
                     AND (query ILIKE 'copy%readings%' OR query ILIKE 'insert into%readings%')",
                )
                .load(&mut conn);
                if active.is_ok_and(|a| a.first().is_some_and(|a| a.writes > 0)) {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false)
    }

    async fn load_stored(&self, tag: &str) -> anyhow::Result<Stored> {
        let (url, tag) = (self.stack.database_url(), tag.to_owned());
        tokio::task::spawn_blocking(move || Stored::load(&url, &tag)).await?
    }

    /// Polls the database until every acknowledged reading is there; gives up at the drain
    /// timeout, or earlier when nothing more has arrived for `STALLED`. Returns how long it took,
    /// and what was stored when it last looked.
    async fn wait_stored(
        &self,
        tag: &str,
        acknowledged: &[(String, String)],
        since: Instant,
    ) -> (Option<Duration>, Stored) {
        const STALLED: Duration = Duration::from_secs(20);
        let deadline = Instant::now() + self.timing.drain_timeout;
        let mut missing = u64::MAX;
        let mut progress_at = Instant::now();
        let mut last_seen = Stored::default();
        loop {
            if let Ok(stored) = self.load_stored(tag).await {
                let now_missing = stored.missing(acknowledged);
                if now_missing == 0 {
                    return (Some(since.elapsed()), stored);
                }
                if now_missing < missing {
                    missing = now_missing;
                    progress_at = Instant::now();
                }
                last_seen = stored;
            }
            if Instant::now() > deadline || progress_at.elapsed() > STALLED {
                return (None, last_seen);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Messages in a queue of the run's prefix, asked of the cluster in cluster mode.
    pub fn queue_messages(&self, queue_suffix: &str) -> anyhow::Result<u64> {
        match self.cluster.as_deref() {
            Some(cluster) => cluster
                .rabbitmq
                .queue_messages(&format!("{AMQP_PREFIX}.{queue_suffix}")),
            None => self.stack.queue_messages(queue_suffix),
        }
    }

    /// Counts again at the end of the run, when redeliveries have long settled.
    pub async fn recount(&self, outcome: &mut StepOutcome) -> anyhow::Result<()> {
        let stored = self.load_stored(&outcome.tag).await?;
        outcome.stored = stored.distinct();
        outcome.lost = stored.missing(&outcome.acknowledged_ids);
        outcome.duplicated = stored.duplicated();
        outcome.rollups_differing = self.rollups_differing(&outcome.tag).await?;
        Ok(())
    }

    /// How many of the step's devices' rollups differ from their raw readings.
    async fn rollups_differing(&self, tag: &str) -> anyhow::Result<u64> {
        let url = self.stack.database_url();
        let devices: Vec<String> = self
            .fleet
            .devices(tag)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        tokio::task::spawn_blocking(move || crate::verify::rollups_differing(&url, &devices))
            .await?
    }
}

/// The RabbitMQ node a fault is to hit, and a note of the readings queue's leader and members.
fn pick_node(
    cluster: &Cluster,
    pick: NodePick,
    hit: &std::collections::BTreeSet<usize>,
    notes: &mut Vec<String>,
) -> anyhow::Result<usize> {
    let queue = format!("{AMQP_PREFIX}.readings");
    let rabbitmq = &cluster.rabbitmq;
    let nodes = tokio::task::block_in_place(|| rabbitmq.quorum_queue(&queue, None))?;
    let leader = nodes.leader.context("the readings queue has no leader")?;
    let not_hit = |i: &usize| !hit.contains(i);
    let all = 0..system::cluster::rabbitmq::NODES;
    let node = match pick {
        NodePick::Leader => leader,
        NodePick::Follower => all
            .clone()
            .filter(|i| *i != leader)
            .find(not_hit)
            .or_else(|| all.clone().find(|i| *i != leader))
            .context("no follower")?,
        NodePick::NotYetHit => all.clone().find(not_hit).unwrap_or(leader),
    };
    let members: Vec<String> = nodes.members.iter().map(|i| node_label(*i)).collect();
    notes.push(format!(
        "hit {} ({}); the readings queue's leader was {}, its members {}",
        node_label(node),
        if node == leader {
            "the leader"
        } else {
            "a follower"
        },
        node_label(leader),
        members.join(" ")
    ));
    Ok(node)
}

pub fn step_tag(index: usize) -> String {
    format!("s{:02}", index + 1)
}

async fn queue_depth(client: &reqwest::Client, ops_url: &str) -> Option<i64> {
    let text = client
        .get(format!("{ops_url}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    // the persister's gauge, as its /metrics writes it (0 when absent)
    Some(prometheus::metric(&text, QUEUE_GAUGE) as i64)
}

const QUEUE_GAUGE: &str = "sensorhub_queue_messages";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_persisters_queue_gauge() {
        let text = "# HELP sensorhub_queue_messages Messages waiting in the readings queue\n\
                    # TYPE sensorhub_queue_messages gauge\n\
                    sensorhub_queue_messages 1234\n\
                    sensorhub_readings_stored_total 5\n";
        assert_eq!(prometheus::metric(text, QUEUE_GAUGE), 1234.0);
    }

    #[test]
    fn step_tags_sort_in_step_order() {
        assert_eq!(step_tag(0), "s01");
        assert!(step_tag(8) < step_tag(9) && step_tag(9) < step_tag(10));
    }
}
