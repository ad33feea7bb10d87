//! PostgreSQL with a synchronous standby and automatic failover, on this machine: pg_auto_failover
//! (Debian's `postgresql-15-auto-failover` and `pg-auto-failover-cli`) with a monitor and two
//! nodes, each `pg_autoctl` run in the foreground as a process of this run (as the `postgres` user:
//! it refuses root). The services get the formation's multi-host URL (`pg_autoctl show uri`, with
//! `target_session_attrs=read-write`), so libpq finds whichever node is primary.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use diesel::sql_types::{Integer, Text};
use diesel::{QueryableByName, RunQueryDsl};

use crate::Process;
use crate::stack::{as_user, chown, postgres_bin_dir, user_ids};

/// The primary and one synchronous standby.
pub const NODES: usize = 2;

/// The database pg_autoctl creates on the nodes, and the one the URL names.
pub const DATABASE: &str = "sensorhub";

/// The monitor's health checks, quicker than the defaults (every 5 s, unhealthy after 20 s) so a
/// dead primary is noticed within a chaos step. `primary_demote_timeout` (30 s: how long the
/// monitor gives an unreachable primary to step down by itself before promoting the standby) is
/// left as it is: it is what keeps two primaries from accepting writes at once.
const MONITOR_SETTINGS: [(&str, &str); 5] = [
    ("pgautofailover.health_check_period", "1000"),
    ("pgautofailover.health_check_timeout", "2000"),
    ("pgautofailover.health_check_retry_delay", "500"),
    ("pgautofailover.health_check_max_retries", "2"),
    ("pgautofailover.node_considered_unhealthy_timeout", "5000"),
];

/// States in which a node takes writes.
const WRITABLE: [&str; 3] = ["single", "wait_primary", "primary"];

#[derive(Debug, Clone, Copy)]
pub struct FormationPorts {
    pub monitor: u16,
    pub nodes: [u16; NODES],
}

pub struct PgFormation {
    dir: PathBuf,
    ports: FormationPorts,
    pg_bin: PathBuf,
    user: Option<(u32, u32)>,
    monitor: Option<Process>,
    nodes: [Option<Process>; NODES],
}

/// A node as the monitor sees it.
#[derive(Debug, Clone, QueryableByName)]
pub struct NodeState {
    #[diesel(sql_type = Text)]
    pub name: String,
    #[diesel(sql_type = Integer)]
    pub port: i32,
    /// What the node last reported being.
    #[diesel(sql_type = Text)]
    pub reported: String,
    /// What the monitor asks it to become.
    #[diesel(sql_type = Text)]
    pub goal: String,
}

impl NodeState {
    pub fn writable(&self) -> bool {
        WRITABLE.contains(&self.reported.as_str()) && self.reported == self.goal
    }

    pub fn settled(&self, state: &str) -> bool {
        self.reported == state && self.goal == state
    }
}

/// Synchronous replication as the primary has it.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    pub synchronous_commit: String,
    pub synchronous_standby_names: String,
}

impl SyncSettings {
    /// A commit returns only once the standby has it too.
    pub fn synchronous(&self) -> bool {
        self.synchronous_commit == "on" && !self.synchronous_standby_names.trim().is_empty()
    }
}

impl PgFormation {
    pub fn prepare(dir: &Path, ports: FormationPorts) -> anyhow::Result<Self> {
        let user = if crate::procs::is_root() {
            Some(user_ids("postgres")?)
        } else {
            None
        };
        fs::create_dir_all(dir)?;
        chown(dir, user)?;
        Ok(Self {
            dir: dir.to_owned(),
            ports,
            pg_bin: postgres_bin_dir()?,
            user,
            monitor: None,
            nodes: Default::default(),
        })
    }

    /// `n1`, `n2`: as pg_autoctl and the report name them.
    pub fn node_name(index: usize) -> String {
        format!("n{}", index + 1)
    }

    fn node_index_by_port(&self, port: i32) -> Option<usize> {
        self.ports.nodes.iter().position(|p| i32::from(*p) == port)
    }

    fn monitor_url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/pg_auto_failover",
            self.ports.monitor
        )
    }

    fn node_url(&self, index: usize) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{DATABASE}?sslmode=require",
            self.ports.nodes[index]
        )
    }

    /// `pg_autoctl` with its files under this run's directory (not the postgres user's home).
    fn pg_autoctl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("pg_autoctl");
        let path = std::env::var("PATH").unwrap_or_default();
        cmd.current_dir(&self.dir)
            .env("HOME", &self.dir)
            .env("XDG_CONFIG_HOME", self.dir.join("config"))
            .env("XDG_DATA_HOME", self.dir.join("data"))
            .env("XDG_RUNTIME_DIR", self.dir.join("run"))
            .env("PG_CONFIG", self.pg_bin.join("pg_config"))
            .env("PATH", format!("{}:{path}", self.pg_bin.display()))
            .env_remove("PGDATA")
            .args(args);
        as_user(&mut cmd, self.user);
        cmd
    }

    fn pgdata(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    /// Starts the monitor and both nodes and waits for a primary and a secondary.
    pub async fn form(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let (pgdata, port) = (self.pgdata("monitor"), self.ports.monitor.to_string());
        let monitor = self.pg_autoctl(&[
            "create",
            "monitor",
            "--pgdata",
            &pgdata,
            "--pgport",
            &port,
            "--hostname",
            "127.0.0.1",
            "--auth",
            "trust",
            "--ssl-self-signed",
            "--run",
        ]);
        self.monitor = Some(Process::start(
            "pg_autoctl monitor",
            monitor,
            &self.log_path("monitor"),
        )?);
        let url = self.monitor_url();
        let process = self.monitor.as_mut().context("monitor")?;
        crate::service::wait_until(process, deadline, || {
            let url = url.clone();
            async move {
                tokio::task::spawn_blocking(move || store::connect(&url).is_ok())
                    .await
                    .unwrap_or(false)
            }
        })
        .await?;
        self.tune_monitor()?;

        // one node at a time: the first becomes primary, the second its standby
        self.start_node(0, true)?;
        self.wait_for(deadline, "n1 to be a primary", |states| {
            states.iter().any(NodeState::writable)
        })
        .await?;
        self.start_node(1, true)?;
        loop {
            let states = self.states().unwrap_or_default();
            if states.iter().any(|(_, s)| s.settled("primary"))
                && states.iter().any(|(_, s)| s.settled("secondary"))
            {
                return Ok(());
            }
            // pg_basebackup (how pg_autoctl makes the standby) waits for the primary's next
            // checkpoint, spread over minutes by default: ask for one now
            let _ = self.execute_on(0, "CHECKPOINT");
            if Instant::now() > deadline {
                bail!(
                    "no primary and secondary within {timeout:?}: {states:?}; see {}",
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    fn tune_monitor(&self) -> anyhow::Result<()> {
        let mut conn = store::connect(&self.monitor_url())?;
        for (name, value) in MONITOR_SETTINGS {
            diesel::sql_query(format!("ALTER SYSTEM SET {name} = {value}")).execute(&mut conn)?;
        }
        diesel::sql_query("SELECT pg_reload_conf()").execute(&mut conn)?;
        Ok(())
    }

    /// `create` the first time, `run` on its existing data afterwards.
    pub fn start_node(&mut self, index: usize, create: bool) -> anyhow::Result<()> {
        if self.nodes[index].is_some() {
            bail!("{} is already running", Self::node_name(index));
        }
        let name = Self::node_name(index);
        let pgdata = self.pgdata(&name);
        let port = self.ports.nodes[index].to_string();
        let monitor = format!(
            "postgres://autoctl_node@127.0.0.1:{}/pg_auto_failover?sslmode=require",
            self.ports.monitor
        );
        let cmd = if create {
            self.pg_autoctl(&[
                "create",
                "postgres",
                "--pgdata",
                &pgdata,
                "--pgport",
                &port,
                "--hostname",
                "127.0.0.1",
                "--name",
                &name,
                "--dbname",
                DATABASE,
                "--auth",
                "trust",
                "--ssl-self-signed",
                "--monitor",
                &monitor,
                "--run",
            ])
        } else {
            self.pg_autoctl(&["run", "--pgdata", &pgdata])
        };
        self.nodes[index] = Some(Process::start(
            &format!("pg_autoctl {name}"),
            cmd,
            &self.log_path(&name),
        )?);
        Ok(())
    }

    /// SIGKILL to the node's pg_autoctl and its PostgreSQL, as when its machine dies.
    pub fn kill(&mut self, index: usize) -> anyhow::Result<()> {
        let mut process = self.nodes[index]
            .take()
            .with_context(|| format!("{} is not running", Self::node_name(index)))?;
        process.kill();
        // pg_autoctl's supervisor may have started PostgreSQL again between the listing of its
        // children and the kill: whatever postmaster.pid names now goes too
        let pid_file = self.dir.join(Self::node_name(index)).join("postmaster.pid");
        if let Some(pid) = fs::read_to_string(pid_file)
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse::<u32>().ok())
            && Path::new(&format!("/proc/{pid}")).exists()
        {
            let mut pids = crate::procs::descendants(pid);
            pids.push(pid);
            crate::procs::signal("KILL", &pids);
        }
        Ok(())
    }

    pub fn is_running(&self, index: usize) -> bool {
        self.nodes[index].is_some()
    }

    /// The nodes as the monitor sees them, by node index.
    pub fn states(&self) -> anyhow::Result<Vec<(usize, NodeState)>> {
        let mut conn = store::connect(&self.monitor_url())?;
        let rows: Vec<NodeState> = diesel::sql_query(
            "SELECT nodename AS name, nodeport AS port, reportedstate::text AS reported, \
             goalstate::text AS goal FROM pgautofailover.node ORDER BY nodeid",
        )
        .load(&mut conn)?;
        Ok(rows
            .into_iter()
            .filter_map(|s| Some((self.node_index_by_port(s.port)?, s)))
            .collect())
    }

    /// The node the monitor has taking writes, if any.
    pub fn primary(&self) -> Option<usize> {
        self.states()
            .ok()?
            .into_iter()
            .find(|(_, s)| s.writable())
            .map(|(i, _)| i)
    }

    /// Polls the monitor until `done` holds for the nodes' states.
    pub async fn wait_for(
        &self,
        deadline: Instant,
        what: &str,
        done: impl Fn(&[NodeState]) -> bool,
    ) -> anyhow::Result<Vec<(usize, NodeState)>> {
        loop {
            let states = self.states().unwrap_or_default();
            let plain: Vec<NodeState> = states.iter().map(|(_, s)| s.clone()).collect();
            if done(&plain) {
                return Ok(states);
            }
            if Instant::now() > deadline {
                bail!("waited in vain for {what}: {plain:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn execute_on(&self, index: usize, sql: &str) -> anyhow::Result<()> {
        let mut conn = store::connect(&self.node_url(index))?;
        diesel::sql_query(sql).execute(&mut conn)?;
        Ok(())
    }

    /// `synchronous_commit` and `synchronous_standby_names` on a node.
    pub fn sync_settings(&self, index: usize) -> anyhow::Result<SyncSettings> {
        #[derive(QueryableByName)]
        struct Setting {
            #[diesel(sql_type = Text)]
            setting: String,
        }
        let mut conn = store::connect(&self.node_url(index))?;
        let mut show = |name: &str| -> anyhow::Result<String> {
            let rows: Vec<Setting> =
                diesel::sql_query(format!("SELECT current_setting('{name}') AS setting"))
                    .load(&mut conn)?;
            Ok(rows
                .into_iter()
                .next()
                .map(|r| r.setting)
                .unwrap_or_default())
        };
        Ok(SyncSettings {
            synchronous_commit: show("synchronous_commit")?,
            synchronous_standby_names: show("synchronous_standby_names")?,
        })
    }

    /// The formation's multi-host URL, as `pg_autoctl show uri` gives it, logging in as postgres.
    pub fn database_url(&self) -> anyhow::Result<String> {
        let out = self
            .pg_autoctl(&[
                "show",
                "uri",
                "--formation",
                "default",
                "--pgdata",
                &self.pgdata("monitor"),
            ])
            .output()
            .context("cannot run pg_autoctl show uri")?;
        let uri = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() || !uri.contains("target_session_attrs=read-write") {
            bail!(
                "pg_autoctl show uri gave {uri:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let without_scheme = uri
            .strip_prefix("postgres://")
            .or_else(|| uri.strip_prefix("postgresql://"))
            .with_context(|| format!("{uri:?} is no postgres:// URL"))?;
        Ok(format!("postgres://postgres@{without_scheme}"))
    }

    /// pg_autoctl processes that died by themselves (they should never).
    pub fn exited(&mut self) -> Vec<(String, String)> {
        let mut dead = Vec::new();
        if let Some(status) = self.monitor.as_mut().and_then(Process::exited) {
            dead.push(("pg_autoctl monitor".to_owned(), status.to_string()));
            self.monitor = None;
        }
        for (index, slot) in self.nodes.iter_mut().enumerate() {
            if let Some(status) = slot.as_mut().and_then(Process::exited) {
                dead.push((Self::node_name(index), status.to_string()));
                *slot = None;
            }
        }
        dead
    }

    /// Stops the nodes, then the monitor (SIGTERM: pg_autoctl stops its PostgreSQL with it).
    pub async fn shutdown(&mut self) {
        for slot in &mut self.nodes {
            if let Some(mut process) = slot.take() {
                let _ = process.terminate(Duration::from_secs(30)).await;
            }
        }
        if let Some(mut process) = self.monitor.take() {
            let _ = process.terminate(Duration::from_secs(30)).await;
        }
    }
}

impl Drop for PgFormation {
    fn drop(&mut self) {
        // the pg_autoctl processes die with their handles; a PostgreSQL their supervisor restarted
        // as they went would not
        for index in 0..NODES {
            if self.nodes[index].is_some() {
                let _ = self.kill(index);
            }
        }
    }
}
