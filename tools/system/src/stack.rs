//! The system under test, as processes this run owns: its own PostgreSQL, RabbitMQ node and MQTT
//! broker (Mosquitto, or the RabbitMQ node's own MQTT plugin; on their own ports and data
//! directories, so the machine's services and whatever else uses them are not disturbed), and the
//! Sensorhub services on the write path. Each can be killed
//! with SIGKILL (the process and every process it started, as a crashed container), stopped with
//! SIGTERM, and started again on the same data. Dropped, it kills whatever still runs.

use std::collections::HashMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::service::{self, Binaries};
use crate::{Process, procs};

/// A process of the system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Component {
    Postgres,
    Rabbitmq,
    Mosquitto,
    Persister,
    IngestHttp,
    IngestMqtt,
}

impl Component {
    /// In the order they are started.
    pub const ALL: [Component; 6] = [
        Component::Postgres,
        Component::Rabbitmq,
        Component::Mosquitto,
        Component::Persister,
        Component::IngestHttp,
        Component::IngestMqtt,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Component::Postgres => "postgres",
            Component::Rabbitmq => "rabbitmq",
            Component::Mosquitto => "mosquitto",
            Component::Persister => "persister",
            Component::IngestHttp => "ingest-http",
            Component::IngestMqtt => "ingest-mqtt",
        }
    }
}

/// Which broker the devices publish MQTT to (the services' `MQTT_BROKER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Broker {
    /// Mosquitto, anonymous; ingest-mqtt subscribes to it.
    Mosquitto,
    /// The RabbitMQ node's MQTT plugin (no Mosquitto): devices log in with their id and token,
    /// which RabbitMQ's HTTP auth backend asks ingest-http about; the plugin routes into the
    /// quorum queue ingest-mqtt consumes over AMQP.
    Rabbitmq,
}

impl Broker {
    pub fn name(self) -> &'static str {
        match self {
            Broker::Mosquitto => "mosquitto",
            Broker::Rabbitmq => "rabbitmq",
        }
    }

    /// The components this mode runs, in the order they are started.
    pub fn components(self) -> Vec<Component> {
        Component::ALL
            .into_iter()
            .filter(|c| self == Broker::Mosquitto || *c != Component::Mosquitto)
            .collect()
    }
}

/// Where everything listens: consecutive ports from a base.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub postgres: u16,
    pub amqp: u16,
    pub amqp_dist: u16,
    pub mqtt: u16,
    pub ingest_http: u16,
    pub persister: u16,
    pub ingest_mqtt: u16,
}

impl Ports {
    pub fn from_base(base: u16) -> Self {
        Self {
            postgres: base,
            amqp: base + 1,
            amqp_dist: base + 2,
            mqtt: base + 3,
            ingest_http: base + 4,
            persister: base + 5,
            ingest_mqtt: base + 6,
        }
    }

    fn all(&self) -> [u16; 7] {
        [
            self.postgres,
            self.amqp,
            self.amqp_dist,
            self.mqtt,
            self.ingest_http,
            self.persister,
            self.ingest_mqtt,
        ]
    }
}

pub const AMQP_PREFIX: &str = "sensorhub-chaos";

/// PostgreSQL and RabbitMQ that run elsewhere (the cluster of [`crate::cluster`]): the stack then
/// runs only the MQTT broker and the services, and gives them these addresses.
#[derive(Debug, Clone)]
pub struct Backends {
    /// A libpq URL, several hosts allowed (`target_session_attrs=read-write` finds the primary).
    pub database_url: String,
    /// AMQP URLs separated by commas: the services try them in turn.
    pub amqp_url: String,
}
const DATABASE: &str = "sensorhub";
const RABBITMQ_NODE: &str = "sensorhub-chaos@localhost";

pub struct Stack {
    pub ports: Ports,
    pub broker: Broker,
    /// Data directories and logs.
    dir: PathBuf,
    /// The Sensorhub binaries.
    binaries: Binaries,
    pg_bin: PathBuf,
    /// Who PostgreSQL and RabbitMQ run as when this runs as root (they refuse root, or own their files).
    postgres_user: Option<(u32, u32)>,
    rabbitmq_user: Option<(u32, u32)>,
    running: HashMap<Component, Process>,
    /// Where PostgreSQL and RabbitMQ are when this stack does not run its own.
    backends: Option<Backends>,
}

impl Stack {
    /// Makes fresh data directories under `dir` (removing an earlier run's): a PostgreSQL cluster,
    /// a RabbitMQ node's, Mosquitto's and a key pair for device tokens.
    pub fn prepare(
        dir: &Path,
        bin_dir: &Path,
        ports: Ports,
        broker: Broker,
    ) -> anyhow::Result<Self> {
        Self::prepare_with(dir, bin_dir, ports, broker, None)
    }

    /// As [`Self::prepare`], but with `backends` for PostgreSQL and RabbitMQ instead of its own
    /// (their data directories are not made; [`Self::components`] leaves them out).
    pub fn prepare_on(
        dir: &Path,
        bin_dir: &Path,
        ports: Ports,
        broker: Broker,
        backends: Backends,
    ) -> anyhow::Result<Self> {
        if broker != Broker::Mosquitto {
            bail!("with PostgreSQL and RabbitMQ elsewhere the MQTT broker is Mosquitto");
        }
        Self::prepare_with(dir, bin_dir, ports, broker, Some(backends))
    }

    fn prepare_with(
        dir: &Path,
        bin_dir: &Path,
        ports: Ports,
        broker: Broker,
        backends: Option<Backends>,
    ) -> anyhow::Result<Self> {
        for port in ports.all() {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                bail!(
                    "port {port} is taken (another chaos run? choose other ports with --port-base)"
                );
            }
        }
        let binaries = Binaries::in_dir(bin_dir, &["ingest-http", "ingest-mqtt", "persister"])?;
        if dir.exists() {
            fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        }
        fs::create_dir_all(dir.join("logs"))?;
        let root = procs::is_root();
        let stack = Self {
            ports,
            broker,
            dir: dir.to_owned(),
            binaries,
            pg_bin: postgres_bin_dir()?,
            postgres_user: if root {
                Some(user_ids("postgres")?)
            } else {
                None
            },
            rabbitmq_user: if root {
                Some(user_ids("rabbitmq")?)
            } else {
                None
            },
            running: HashMap::new(),
            backends,
        };
        if stack.backends.is_none() {
            stack.prepare_postgres()?;
            stack.prepare_rabbitmq()?;
        }
        if broker == Broker::Mosquitto {
            stack.prepare_mosquitto(root)?;
        }
        auth::generate_key_pair(&stack.keys_dir(), true)?;
        Ok(stack)
    }

    /// The components this stack runs, in the order they are started: the broker mode's, less
    /// PostgreSQL and RabbitMQ when they run elsewhere.
    pub fn components(&self) -> Vec<Component> {
        self.broker
            .components()
            .into_iter()
            .filter(|c| {
                self.backends.is_none() || !matches!(c, Component::Postgres | Component::Rabbitmq)
            })
            .collect()
    }

    pub fn keys_dir(&self) -> PathBuf {
        self.dir.join("keys")
    }

    pub fn database_url(&self) -> String {
        if let Some(backends) = &self.backends {
            return backends.database_url.clone();
        }
        format!(
            "postgres://postgres@127.0.0.1:{}/{DATABASE}",
            self.ports.postgres
        )
    }

    fn admin_database_url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            self.ports.postgres
        )
    }

    pub fn amqp_url(&self) -> String {
        if let Some(backends) = &self.backends {
            return backends.amqp_url.clone();
        }
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.ports.amqp)
    }

    pub fn ingest_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.ingest_http)
    }

    pub fn mqtt_port(&self) -> u16 {
        self.ports.mqtt
    }

    pub fn ops_url(&self, component: Component) -> Option<String> {
        let port = match component {
            Component::IngestHttp => self.ports.ingest_http,
            Component::Persister => self.ports.persister,
            Component::IngestMqtt => self.ports.ingest_mqtt,
            _ => return None,
        };
        Some(format!("http://127.0.0.1:{port}"))
    }

    fn pg_dir(&self) -> PathBuf {
        self.dir.join("postgres")
    }

    fn rabbitmq_dir(&self) -> PathBuf {
        self.dir.join("rabbitmq")
    }

    fn mosquitto_dir(&self) -> PathBuf {
        self.dir.join("mosquitto")
    }

    fn prepare_postgres(&self) -> anyhow::Result<()> {
        let dir = self.pg_dir();
        fs::create_dir_all(&dir)?;
        chown(&dir, self.postgres_user)?;
        let mut initdb = Command::new(self.pg_bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync"]);
        as_user(&mut initdb, self.postgres_user);
        run_quietly(&mut initdb)
    }

    fn prepare_rabbitmq(&self) -> anyhow::Result<()> {
        let dir = self.rabbitmq_dir();
        fs::create_dir_all(dir.join("mnesia"))?;
        fs::create_dir_all(dir.join("log"))?;
        let mut conf = format!(
            "listeners.tcp.local = 127.0.0.1:{}\nloopback_users.guest = true\n",
            self.ports.amqp
        );
        match self.broker {
            // no plugins: the machine's node may have the management plugin on its fixed port
            Broker::Mosquitto => fs::write(dir.join("enabled_plugins"), "[].\n")?,
            // as scripts/lib.sh's start_rabbitmq_mqtt: devices log in as ingest-http says
            Broker::Rabbitmq => {
                fs::write(
                    dir.join("enabled_plugins"),
                    "[rabbitmq_mqtt,rabbitmq_auth_backend_http].\n",
                )?;
                let auth = format!("{}/internal/rabbitmq", self.ingest_url());
                conf.push_str(&format!(
                    "mqtt.listeners.tcp.default = 127.0.0.1:{}\nmqtt.exchange = {AMQP_PREFIX}.mqtt\n\
                     mqtt.allow_anonymous = false\nauth_backends.1 = internal\n\
                     auth_backends.2 = http\nauth_http.http_method = post\n\
                     auth_http.user_path = {auth}/user\nauth_http.vhost_path = {auth}/vhost\n\
                     auth_http.resource_path = {auth}/resource\n\
                     auth_http.topic_path = {auth}/topic\n",
                    self.ports.mqtt
                ));
            }
        }
        fs::write(dir.join("rabbitmq.conf"), conf)?;
        chown_tree(&dir, self.rabbitmq_user)
    }

    /// deploy/mosquitto/mosquitto.conf's persistence and queue settings, anonymous (device
    /// accounts are not what this run is about).
    fn prepare_mosquitto(&self, as_root: bool) -> anyhow::Result<()> {
        let dir = self.mosquitto_dir();
        fs::create_dir_all(&dir)?;
        let mut conf = format!(
            "listener {} 127.0.0.1\nallow_anonymous true\npersistence true\n\
             persistence_location {}/\nautosave_interval 30\npersistent_client_expiration 7d\n\
             max_queued_messages 0\nmax_queued_bytes 1073741824\nmax_inflight_messages 1000\n\
             max_packet_size 1048576\nlog_dest stderr\nlog_type error\nlog_type warning\n",
            self.ports.mqtt,
            dir.display()
        );
        if as_root {
            conf.push_str("user root\n");
        }
        fs::write(dir.join("mosquitto.conf"), conf)?;
        Ok(())
    }

    pub fn log_path(&self, component: Component) -> PathBuf {
        self.dir
            .join("logs")
            .join(format!("{}.log", component.name()))
    }

    fn command(&self, component: Component) -> Command {
        let service = |name: &str, port: u16, extra: Vec<(&str, String)>| {
            // checked in `prepare`; a missing one fails the start with this path
            let binary = self
                .binaries
                .get(name)
                .map_or_else(|_| PathBuf::from(name), Path::to_owned);
            let mut env = vec![
                ("AMQP_URL", self.amqp_url()),
                ("AMQP_PREFIX", AMQP_PREFIX.to_owned()),
                ("DATABASE_URL", self.database_url()),
                ("LOG_FORMAT", "text".to_owned()),
            ];
            env.extend(extra);
            service::command(&binary, port, &env)
        };
        match component {
            Component::Postgres => {
                let mut cmd = Command::new(self.pg_bin.join("postgres"));
                cmd.arg("-D")
                    .arg(self.pg_dir().join("data"))
                    .arg("-k")
                    .arg(self.pg_dir())
                    .args(["-p", &self.ports.postgres.to_string()])
                    .args(["-c", "listen_addresses=127.0.0.1"])
                    // durability as in production: a commit is on disk before it returns
                    .args(["-c", "fsync=on", "-c", "synchronous_commit=on"])
                    .args(["-c", "shared_buffers=64MB", "-c", "max_connections=50"]);
                as_user(&mut cmd, self.postgres_user);
                cmd
            }
            Component::Rabbitmq => {
                let dir = self.rabbitmq_dir();
                let mut cmd = Command::new("/usr/lib/rabbitmq/bin/rabbitmq-server");
                cmd.current_dir("/")
                    .env("HOME", "/var/lib/rabbitmq") // the Erlang cookie rabbitmqctl uses too
                    .env("RABBITMQ_NODENAME", RABBITMQ_NODE)
                    .env("RABBITMQ_NODE_PORT", self.ports.amqp.to_string())
                    .env("RABBITMQ_DIST_PORT", self.ports.amqp_dist.to_string())
                    .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
                    .env("RABBITMQ_LOG_BASE", dir.join("log"))
                    .env("RABBITMQ_PID_FILE", dir.join("pid"))
                    .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
                    .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
                    .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"));
                as_user(&mut cmd, self.rabbitmq_user);
                cmd
            }
            Component::Mosquitto => {
                let mut cmd = Command::new("mosquitto");
                cmd.arg("-c")
                    .arg(self.mosquitto_dir().join("mosquitto.conf"));
                cmd
            }
            Component::Persister => service(
                "persister",
                self.ports.persister,
                // unanswered commands go out again every 2 s, so a step's commands finish soon
                // after the devices are reachable again
                vec![("COMMAND_RESEND_SECS", "2".to_owned())],
            ),
            Component::IngestHttp => service(
                "ingest-http",
                self.ports.ingest_http,
                vec![
                    (
                        "AUTH_PUBLIC_KEY_FILE",
                        self.keys_dir()
                            .join(auth::VERIFYING_KEY_FILE)
                            .display()
                            .to_string(),
                    ),
                    // simulated Pis send far more often than real ones
                    ("RATE_LIMIT_PER_SECOND", "0".to_owned()),
                    (
                        "RABBITMQ_MQTT_AUTH",
                        (self.broker == Broker::Rabbitmq).to_string(),
                    ),
                ],
            ),
            Component::IngestMqtt => service(
                "ingest-mqtt",
                self.ports.ingest_mqtt,
                vec![
                    ("MQTT_URL", format!("mqtt://127.0.0.1:{}", self.ports.mqtt)),
                    ("MQTT_CLIENT_ID", "sensorhub-chaos-ingest-mqtt".to_owned()),
                    ("MQTT_BROKER", self.broker.name().to_owned()),
                ],
            ),
        }
    }

    /// Starts a component (not waiting for it to be ready).
    pub fn start(&mut self, component: Component) -> anyhow::Result<()> {
        if self.running.contains_key(&component) {
            bail!("{} is already running", component.name());
        }
        let process = Process::start(
            component.name(),
            self.command(component),
            &self.log_path(component),
        )?;
        self.running.insert(component, process);
        Ok(())
    }

    /// Starts a component and waits until it serves.
    pub async fn start_ready(
        &mut self,
        component: Component,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.start(component)?;
            match self.wait_ready(component, deadline).await {
                Ok(()) => return Ok(()),
                // PostgreSQL refuses to start while backends of its killed predecessor still hold
                // its shared memory: they leave within moments, so try again
                Err(e) if component == Component::Postgres && Instant::now() < deadline => {
                    note(&format!("postgres did not start yet ({e}); again"));
                    if self.is_running(component) {
                        self.kill(component)?;
                    }
                    self.running.remove(&component);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(e) => {
                    self.running.remove(&component);
                    return Err(e);
                }
            }
        }
    }

    async fn wait_ready(&mut self, component: Component, deadline: Instant) -> anyhow::Result<()> {
        let admin_url = self.admin_database_url();
        let ops_url = self.ops_url(component);
        let (amqp, mqtt) = (self.ports.amqp, self.ports.mqtt);
        let mqtt_plugin = self.broker == Broker::Rabbitmq;
        let process = self
            .running
            .get_mut(&component)
            .with_context(|| format!("{} is not running", component.name()))?;
        match component {
            Component::Postgres => {
                service::wait_until(process, deadline, || {
                    let url = admin_url.clone();
                    async move {
                        tokio::task::spawn_blocking(move || store::connect(&url).is_ok())
                            .await
                            .unwrap_or(false)
                    }
                })
                .await
            }
            Component::Rabbitmq => {
                // with the MQTT plugin, its listener opens after AMQP's
                service::wait_until(process, deadline, || async move {
                    service::port_open(amqp).await
                        && (!mqtt_plugin || service::port_open(mqtt).await)
                })
                .await
            }
            Component::Mosquitto => {
                service::wait_until(process, deadline, || service::port_open(mqtt)).await
            }
            _ => service::wait_ready(process, &ops_url.unwrap_or_default(), deadline).await,
        }
    }

    /// Creates the database (elsewhere it exists already) and migrates it.
    pub fn create_database(&self) -> anyhow::Result<()> {
        use diesel::RunQueryDsl;
        if self.backends.is_none() {
            let mut admin = store::connect(&self.admin_database_url())?;
            diesel::sql_query(format!("CREATE DATABASE {DATABASE}")).execute(&mut admin)?;
        }
        let mut conn = store::connect(&self.database_url())?;
        store::run_migrations(&mut conn)?;
        Ok(())
    }

    pub fn is_running(&self, component: Component) -> bool {
        self.running.contains_key(&component)
    }

    pub fn pid(&self, component: Component) -> Option<u32> {
        self.running.get(&component).and_then(Process::pid)
    }

    /// SIGKILL to the component and every process it started, at once, as when its container or
    /// machine dies.
    pub fn kill(&mut self, component: Component) -> anyhow::Result<()> {
        let Some(mut process) = self.running.remove(&component) else {
            bail!("{} is not running", component.name());
        };
        process.kill();
        Ok(())
    }

    /// SIGTERM, then waits for the component to exit by itself (SIGKILL after `grace`).
    /// Returns how long it took, or None when it had to be killed.
    pub async fn terminate(
        &mut self,
        component: Component,
        grace: Duration,
    ) -> anyhow::Result<Option<Duration>> {
        let Some(mut process) = self.running.remove(&component) else {
            bail!("{} is not running", component.name());
        };
        Ok(process.terminate(grace).await)
    }

    /// Whether a component died by itself (it should never).
    pub fn exited(&mut self) -> Vec<(Component, String)> {
        let mut dead = Vec::new();
        for (component, process) in &mut self.running {
            if let Some(status) = process.exited() {
                dead.push((*component, status.to_string()));
            }
        }
        for (component, _) in &dead {
            self.running.remove(component);
        }
        dead
    }

    /// `rabbitmqctl` against this run's node.
    pub fn rabbitmqctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new("/usr/lib/rabbitmq/bin/rabbitmqctl");
        cmd.current_dir("/")
            .env("HOME", "/var/lib/rabbitmq")
            .args(["-q", "-n", RABBITMQ_NODE])
            .args(args);
        as_user(&mut cmd, self.rabbitmq_user);
        let out = cmd.output().context("cannot run rabbitmqctl")?;
        if !out.status.success() {
            bail!(
                "rabbitmqctl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Messages in a queue of this run's prefix (ready and unacknowledged).
    pub fn queue_messages(&self, queue_suffix: &str) -> anyhow::Result<u64> {
        let name = format!("{AMQP_PREFIX}.{queue_suffix}");
        let listing = self.rabbitmqctl(&["list_queues", "name", "messages"])?;
        listing
            .lines()
            .find_map(|line| {
                let (queue, messages) = line.split_once('\t')?;
                (queue == name).then(|| messages.trim().parse().ok())?
            })
            .with_context(|| format!("no queue {name} in {listing:?}"))
    }

    /// Stops everything: the services gracefully, then the brokers and the database.
    pub async fn shutdown(&mut self) {
        for component in Component::ALL.iter().rev() {
            if self.is_running(*component) {
                let _ = self.terminate(*component, Duration::from_secs(15)).await;
            }
        }
    }
}

fn note(message: &str) {
    eprintln!("   {message}");
}

/// (uid, gid) from /etc/passwd.
pub(crate) fn user_ids(name: &str) -> anyhow::Result<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&name) && fields.len() > 3)
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                .flatten()
        })
        .with_context(|| format!("no user {name}: is the Debian package installed?"))
}

pub(crate) fn as_user(cmd: &mut Command, user: Option<(u32, u32)>) {
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid).env_remove("LD_PRELOAD");
    }
}

pub(crate) fn chown(path: &Path, user: Option<(u32, u32)>) -> anyhow::Result<()> {
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .with_context(|| format!("cannot chown {}", path.display()))?;
    }
    Ok(())
}

pub(crate) fn chown_tree(path: &Path, user: Option<(u32, u32)>) -> anyhow::Result<()> {
    chown(path, user)?;
    if path.is_dir() {
        for entry in fs::read_dir(path)? {
            chown_tree(&entry?.path(), user)?;
        }
    }
    Ok(())
}

/// The newest installed PostgreSQL's programs (Debian keeps them out of PATH).
pub(crate) fn postgres_bin_dir() -> anyhow::Result<PathBuf> {
    let mut versions: Vec<u32> = fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (/usr/lib/postgresql)")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort_unstable();
    let version = versions
        .last()
        .context("no PostgreSQL in /usr/lib/postgresql")?;
    Ok(PathBuf::from(format!("/usr/lib/postgresql/{version}/bin")))
}

fn run_quietly(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_do_not_overlap() {
        let ports = Ports::from_base(28000).all();
        let mut sorted = ports.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ports.len());
    }
}
