//! A Sensorhub service run from its own binary: where the binaries are, the environment a service
//! gets (and none it would inherit by accident), and waiting until it serves.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::Process;

/// What a deployment runs, long-lived.
pub const SERVICES: [&str; 4] = ["ingest-http", "ingest-mqtt", "persister", "query-api"];

/// Settings read from the environment that would send a service elsewhere than the caller means:
/// removed from every service's environment, so only what the caller sets counts.
const REDIRECTING: [&str; 21] = [
    "SENSORHUB_CONFIG",
    "DATABASE_URL",
    "AMQP_URL",
    "AMQP_PREFIX",
    "MQTT_URL",
    "MQTT_USERNAME",
    "MQTT_PASSWORD",
    "MQTT_CLIENT_ID",
    "MQTT_SHARED_GROUP",
    "LOG_FORMAT",
    "AUTH_PUBLIC_KEY_FILE",
    "AUTH_SIGNING_KEY_FILE",
    "AUTH_ALLOW_ANONYMOUS",
    "AUTH_REFRESH_MS",
    "TRUSTED_PROXIES",
    "RATE_LIMIT_PER_SECOND",
    "RATE_LIMIT_BURST",
    "REFUSAL_LIMIT_PER_SECOND",
    "REFUSAL_LIMIT_BURST",
    "AUDIT_ACCEPTED",
    "CORS_ALLOWED_ORIGINS",
];

/// Where the services' binaries are.
#[derive(Debug, Clone)]
pub struct Binaries(BTreeMap<String, PathBuf>);

impl Binaries {
    /// Prebuilt binaries in `dir` (`target/debug`, a release build, ...): each of `names` must be
    /// there.
    pub fn in_dir(dir: &Path, names: &[&str]) -> anyhow::Result<Self> {
        let mut found = BTreeMap::new();
        for name in names {
            let path = dir.join(name);
            if !path.is_file() {
                bail!(
                    "{} not found: build the services first (cargo build --bins)",
                    path.display()
                );
            }
            found.insert((*name).to_owned(), path);
        }
        Ok(Self(found))
    }

    /// Built by cargo, in the workspace at `root`: `cargo test --workspace --no-run`, whose JSON
    /// messages say where each executable is. `CARGO_BIN_EXE_*` only names a package's own
    /// binaries; guessing `target/debug/<name>` could run a stale one, and misses
    /// `CARGO_TARGET_DIR` and `--release`. Under `cargo test --workspace` this is a no-op: the same
    /// build, features and all (a plain `cargo build -p <service>` resolves features without the
    /// dev-dependencies, and would compile a second copy of much of the dependency tree).
    pub fn from_cargo(root: &Path, release: bool) -> anyhow::Result<Self> {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut command = Command::new(cargo);
        command.current_dir(root).args([
            "test",
            "--workspace",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ]);
        if release {
            command.arg("--release");
        }
        let out = command.output().context("cannot run cargo")?;
        if !out.status.success() {
            bail!(
                "cargo test --workspace --no-run failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut found = BTreeMap::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let is_bin = message["target"]["kind"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|k| k == "bin"));
            let is_test = message["profile"]["test"].as_bool().unwrap_or(true);
            if let (true, false, Some(name), Some(exe)) = (
                is_bin,
                is_test,
                message["target"]["name"].as_str(),
                message["executable"].as_str(),
            ) {
                found.insert(name.to_owned(), PathBuf::from(exe));
            }
        }
        for service in SERVICES {
            if !found.contains_key(service) {
                bail!("cargo built no {service}");
            }
        }
        Ok(Self(found))
    }

    pub fn get(&self, name: &str) -> anyhow::Result<&Path> {
        self.0
            .get(name)
            .map(PathBuf::as_path)
            .with_context(|| format!("no binary named {name}"))
    }
}

/// The command that runs `binary` with its HTTP (or ops) listener on 127.0.0.1:`port`, `env`
/// and nothing else of Sensorhub's settings from this process's environment.
pub fn command(binary: &Path, port: u16, env: &[(&str, String)]) -> Command {
    let mut command = Command::new(binary);
    for var in REDIRECTING {
        command.env_remove(var);
    }
    command
        .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "info")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    command
}

/// A port free now (bound, then let go: see [`Process::lost_its_port`]).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free local port: {e}"))
}

/// Whether `url` answers 2xx.
pub async fn answers(client: &reqwest::Client, url: &str) -> bool {
    client
        .get(url)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// Whether something listens on 127.0.0.1:`port`.
pub async fn port_open(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

/// Polls `ready` until it says yes, failing when `process` exits first or `deadline` passes.
pub async fn wait_until<F, Fut>(
    process: &mut Process,
    deadline: Instant,
    mut ready: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    loop {
        if let Some(status) = process.exited() {
            bail!(
                "{} exited ({status}); see {}",
                process.label(),
                process.log().display()
            );
        }
        if ready().await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not become ready; see {}:\n{}",
                process.label(),
                process.log().display(),
                process.tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A service's `/readyz` at `base` (`http://127.0.0.1:<port>`) answers 2xx.
pub async fn wait_ready(
    process: &mut Process,
    base: &str,
    deadline: Instant,
) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let url = format!("{base}/readyz");
    wait_until(process, deadline, || answers(&client, &url)).await
}

/// Waits until ingest-http at `base` lets `token` in: it re-reads the device registry every
/// `AUTH_REFRESH_MS`, so a device registered a moment ago is refused (401) until then. Asked with
/// a body that is no reading, so nothing is stored: 400 means the token passed.
pub async fn wait_token_accepted(base: &str, token: &str, timeout: Duration) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let url = format!("{base}/v1/readings");
    let deadline = Instant::now() + timeout;
    loop {
        let status = client
            .post(&url)
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .map(|r| r.status());
        if status
            .as_ref()
            .is_ok_and(|s| *s == reqwest::StatusCode::BAD_REQUEST)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{base} still refuses a registered device's token after {timeout:?} ({status:?})"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
