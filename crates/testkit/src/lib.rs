//! Test fixtures: every integration test gets its own migrated database and its own queue names, so
//! tests run in parallel, twice in a row, and leave nothing behind when they pass.
//!
//! The servers come from the environment, defaulting to the local ones `scripts/test` starts:
//! `TEST_DATABASE_URL` (an admin connection, default `postgres://postgres@127.0.0.1:5432/postgres`),
//! `TEST_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`), `TEST_MQTT_HOST`/`TEST_MQTT_PORT`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support: a test stops at the first thing that is not as it must be, with its message"
)]

pub mod mqtt;
pub mod rabbitmq;
pub mod spawn;

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Text};

pub fn admin_database_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

pub fn mqtt_host() -> String {
    std::env::var("TEST_MQTT_HOST").unwrap_or_else(|_| "127.0.0.1".to_owned())
}

pub fn mqtt_port() -> u16 {
    std::env::var("TEST_MQTT_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(1883)
}

/// A short unique name for this test's queues, exchanges, databases and client ids.
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// A database of its own, migrated, dropped when this value is (connections and all).
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub fn migrated() -> Self {
        let template = migrated_template();
        Self::create(Some(&template))
    }

    /// An empty database, for tests of what happens before `sensorctl migrate`.
    pub fn unmigrated() -> Self {
        Self::create(None)
    }

    fn create(template: Option<&str>) -> Self {
        let name = unique_name("sh_test").replace('-', "_");
        let mut admin = admin_connection();
        let template_clause = template
            .map(|t| format!(" TEMPLATE \"{t}\""))
            .unwrap_or_default();
        retry(|| admin.batch_execute(&format!("CREATE DATABASE \"{name}\"{template_clause}")));
        let url = database_url_for(&name);
        Self { name, url }
    }

    pub fn connect(&self) -> PgConnection {
        PgConnection::establish(&self.url).expect("connect to the test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut admin) = PgConnection::establish(&admin_database_url()) {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ));
        }
    }
}

fn admin_connection() -> PgConnection {
    PgConnection::establish(&admin_database_url())
        .expect("connect to PostgreSQL (is it running? scripts/test starts it)")
}

fn database_url_for(name: &str) -> String {
    let admin = admin_database_url();
    let base = admin
        .rsplit_once('/')
        .map(|(base, _)| base)
        .unwrap_or(&admin);
    format!("{base}/{name}")
}

/// CREATE DATABASE fails while another session copies the same template; that passes quickly.
fn retry(mut attempt: impl FnMut() -> QueryResult<()>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match attempt() {
            Ok(()) => return,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("creating a test database: {e}"),
        }
    }
}

#[derive(QueryableByName)]
struct Exists {
    #[diesel(sql_type = Bool)]
    exists: bool,
}

/// A database migrated once per version of `migrations/` and copied for each test: copying is far
/// quicker than migrating. Its name carries a hash of the migrations, so a change makes a new one.
fn migrated_template() -> String {
    let name = format!("sh_template_{:016x}", migrations_hash());
    let mut admin = admin_connection();
    diesel::sql_query("SELECT pg_advisory_lock($1)")
        .bind::<BigInt, _>(0x5e45_0123_i64)
        .execute(&mut admin)
        .expect("take the template lock");
    let exists =
        diesel::sql_query("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1) AS exists")
            .bind::<Text, _>(&name)
            .get_result::<Exists>(&mut admin)
            .expect("look for the template")
            .exists;
    if !exists {
        // Built under another name and renamed when complete: a run killed halfway leaves no
        // half-migrated template behind.
        let building = format!("{name}_building");
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{building}\" WITH (FORCE)"
            ))
            .expect("drop a half-built template");
        admin
            .batch_execute(&format!("CREATE DATABASE \"{building}\""))
            .expect("create the template database");
        {
            let mut conn =
                PgConnection::establish(&database_url_for(&building)).expect("connect to template");
            store::run_migrations(&mut conn).expect("migrate the template");
        }
        admin
            .batch_execute(&format!(
                "ALTER DATABASE \"{building}\" RENAME TO \"{name}\""
            ))
            .expect("publish the template");
    }
    let _ = diesel::sql_query("SELECT pg_advisory_unlock($1)")
        .bind::<BigInt, _>(0x5e45_0123_i64)
        .execute(&mut admin);
    name
}

fn migrations_hash() -> u64 {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations");
    let mut files = Vec::new();
    collect_files(&dir, &mut files);
    files.sort();
    let mut hasher = std::hash::DefaultHasher::new();
    for file in files {
        file.strip_prefix(&dir).unwrap_or(&file).hash(&mut hasher);
        std::fs::read(&file).unwrap_or_default().hash(&mut hasher);
    }
    hasher.finish()
}

fn collect_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Counts a table's rows in a test database (a blocking call, fine in tests).
pub fn count_rows(url: &str, table: &str) -> i64 {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let mut conn = PgConnection::establish(url).expect("connect");
    diesel::sql_query(format!("SELECT count(*) AS n FROM {table}"))
        .get_result::<Count>(&mut conn)
        .expect("count rows")
        .n
}

/// The body of `GET url` as text; a failed request or an error status fails the test.
pub async fn get_text(client: &reqwest::Client, url: &str) -> String {
    text_of(client.get(url), &format!("GET {url}")).await
}

/// The JSON body of `GET url` with `token` as bearer, whatever the status.
pub async fn get_json(client: &reqwest::Client, url: &str, token: &str) -> serde_json::Value {
    client
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
}

/// Sends `request` and answers its body as text; a failed request or an error status fails the
/// test, naming `what`.
pub async fn text_of(request: reqwest::RequestBuilder, what: &str) -> String {
    request
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .unwrap_or_else(|e| panic!("{what}: {e}"))
        .text()
        .await
        .unwrap_or_else(|e| panic!("{what}: the body: {e}"))
}

/// The newest `limit` readings of `device` stored in the database at `url`, newest first, as the
/// read API pages them (a blocking call, fine in tests).
pub fn stored_readings(url: &str, device: &str, limit: i64) -> Vec<store::read::StoredReading> {
    let mut conn = PgConnection::establish(url).expect("connect");
    store::read::readings_page(
        &mut conn,
        &store::read::ReadingsQuery {
            device_id: device.into(),
            limit,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("the readings of {device}: {e}"))
}

/// Sends `head` (request line and headers, without the blank line that ends them) and `body`
/// byte for byte as written, with `Connection: close`, and answers the status code and the
/// whole response. HTTP clients normalise paths (dot segments, case of escapes); an attacker's
/// requests are not normalised, so tests of how a service reads paths speak HTTP by hand.
pub async fn raw_http(addr: &str, head: &str, body: &str) -> (u16, String) {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let request = format!(
        "{head}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let what = format!("the answer to {head:?}");
    let text = read_until_closed(&mut stream, Duration::from_secs(10), &what).await;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer to {head:?}: {text:?}"));
    (status, text)
}

/// What arrives on `stream` until the other side closes it, as text; the test fails, naming
/// `what`, unless it is closed within `within`.
pub async fn read_until_closed(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    within: Duration,
    what: &str,
) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    tokio::time::timeout(within, stream.read_to_end(&mut answer))
        .await
        .unwrap_or_else(|_| panic!("{what}: not closed within {within:?}"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    String::from_utf8_lossy(&answer).into_owned()
}

/// Request targets that spell `path` as a router may read it, or nearly: percent-encoded letters and digits
/// (upper and lower case), doubled slashes, dot segments, other case, trailing slashes, encoded
/// slashes and dots, and the absolute form.
pub fn path_spellings(path: &str, authority: &str) -> Vec<String> {
    let (path, query) = match path.split_once('?') {
        Some((p, q)) => (p, format!("?{q}")),
        None => (path, String::new()),
    };
    let encode_nth = |n: usize, lower: bool| -> String {
        let mut out = String::new();
        for (i, c) in path.chars().enumerate() {
            if i == n && c.is_ascii_alphanumeric() {
                let hex = format!("%{:02X}", c as u32);
                out.push_str(&if lower { hex.to_lowercase() } else { hex });
            } else {
                out.push(c);
            }
        }
        out
    };
    let mut all = vec![path.to_owned()];
    for n in 1..path.len() {
        all.push(encode_nth(n, false));
    }
    all.push(encode_nth(1, true));
    let everything_encoded: String = path
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                format!("%{:02x}", c as u32)
            } else {
                c.to_string()
            }
        })
        .collect();
    all.push(everything_encoded);
    let rest = path.trim_start_matches('/');
    all.extend([
        format!("//{rest}"),
        path.replacen('/', "//", 2).replacen("//", "/", 1),
        format!("/./{rest}"),
        format!("/x/../{rest}"),
        format!("/%2e/{rest}"),
        format!("/%2E%2E/{rest}"),
        path.to_uppercase(),
        format!("{path}/"),
        format!("/{}", rest.replace('/', "%2F")),
        path.replacen("/v1/", "/v1%2f", 1),
        format!("{path};x"),
    ]);
    let mut targets: Vec<String> = all.into_iter().map(|p| format!("{p}{query}")).collect();
    targets.push(format!("http://{authority}{path}{query}"));
    targets.push(format!("http://{authority}{}{query}", encode_nth(1, false)));
    targets.sort();
    targets.dedup();
    targets
}

/// A TCP relay in front of a real server (RabbitMQ, PostgreSQL, Mosquitto) that a test can cut and
/// restore, to see what services do when their broker or database goes away, without stopping the
/// shared server other tests use.
pub struct TcpProxy {
    pub port: u16,
    state: std::sync::Arc<ProxyState>,
}

struct ProxyState {
    open: std::sync::atomic::AtomicBool,
    /// Bumped on every cut: relays of an older generation close.
    generation: tokio::sync::watch::Sender<u64>,
}

impl TcpProxy {
    /// Relays a free local port to `target` (`host:port`).
    pub async fn start(target: &str) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let (generation, _) = tokio::sync::watch::channel(0);
        let state = std::sync::Arc::new(ProxyState {
            open: std::sync::atomic::AtomicBool::new(true),
            generation,
        });
        let target = target.to_owned();
        let accept_state = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !accept_state.open.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let mut cut = accept_state.generation.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self { port, state }
    }

    /// Drops every relayed connection and refuses new ones, as a dead server would.
    pub fn cut(&self) {
        self.state
            .open
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.state.generation.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.state
            .open
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// An AMQP URL through this proxy (with a short heartbeat, so a cut is noticed quickly).
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f?heartbeat=2", self.port)
    }
}

/// Runs SQL on a connection, panicking with the statement on failure (tests only).
pub fn execute(conn: &mut PgConnection, sql: &str) {
    conn.batch_execute(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// A key pair of its own, and tokens signed with it, as `sensorctl` makes them.
pub struct TestKeys {
    pub dir: std::path::PathBuf,
    signer: auth::TokenSigner,
    /// Where [`TestKeys::app_token`] records the app tokens it makes, as `sensorctl token issue`
    /// does: query-api accepts only recorded tokens.
    app_tokens_database: std::sync::Mutex<Option<String>>,
}

impl TestKeys {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(unique_name("keys"));
        let (signing, _) = auth::generate_key_pair(&dir, false).expect("generate keys");
        let signer = auth::TokenSigner::from_file(&signing).expect("read signing key");
        Self {
            dir,
            signer,
            app_tokens_database: std::sync::Mutex::new(None),
        }
    }

    /// From now on, record the app tokens made here in the database at `database_url` (the one
    /// the query-api under test follows). Without it, they are made but not recorded: good only for
    /// tests of services that must refuse them anyway.
    pub fn record_app_tokens_in(&self, database_url: &str) {
        *self
            .app_tokens_database
            .lock()
            .expect("app token database lock") = Some(database_url.to_owned());
    }

    pub fn verifying_key_file(&self) -> String {
        self.dir
            .join(auth::VERIFYING_KEY_FILE)
            .display()
            .to_string()
    }

    pub fn signing_key_file(&self) -> String {
        self.dir.join(auth::SIGNING_KEY_FILE).display().to_string()
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }

    pub fn sign(&self, claims: &auth::Claims) -> String {
        self.signer.sign(claims).expect("sign")
    }

    /// An app token valid for an hour, recorded (see [`TestKeys::record_app_tokens_in`]).
    pub fn app_token(&self, role: auth::Role) -> String {
        let claims = auth::Claims::app("test-app", role, 3600, Self::now());
        let database = self
            .app_tokens_database
            .lock()
            .expect("app token database lock")
            .clone();
        if let Some(database_url) = database {
            self.record_app_token(&database_url, &claims);
        }
        self.sign(&claims)
    }

    /// Records `claims` (an app token's) in the database at `database_url`, as `sensorctl token
    /// issue` does.
    pub fn record_app_token(&self, database_url: &str, claims: &auth::Claims) {
        let at =
            |secs: i64| chrono::DateTime::from_timestamp(secs, 0).expect("a representable time");
        let mut conn = PgConnection::establish(database_url).expect("connect");
        store::app_tokens::record_app_token(
            &mut conn,
            &claims.jti,
            &claims.sub,
            claims.role.as_str(),
            at(claims.iat),
            at(claims.exp.expect("app tokens expire")),
        )
        .expect("record the app token");
    }

    /// Registers `device` in the database at `database_url` and returns its token.
    pub fn register_device(&self, database_url: &str, device: &str) -> String {
        let claims = auth::Claims::device(device, Self::now());
        let mut conn = PgConnection::establish(database_url).expect("connect");
        store::credentials::register_device(&mut conn, device, &claims.jti).expect("register");
        self.sign(&claims)
    }
}

impl Default for TestKeys {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestKeys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until `table` holds at least `at_least` rows.
pub async fn wait_for_rows(url: &str, table: &str, at_least: i64, timeout: Duration) {
    eventually(timeout, &format!("{at_least} rows in {table}"), || async {
        (count_rows(url, table) >= at_least).then_some(())
    })
    .await;
}

/// How long [`wait_for_exactly`] waits, once the count is reached, for a row stored twice to show
/// up too: no event marks "nothing more will come", so proving it takes a wait, longer than the
/// test persister's batch linger and a message's way through RabbitMQ.
pub const SETTLE: Duration = Duration::from_millis(300);

/// Waits until `table` holds `expected` rows, then [`SETTLE`] more, and asserts that no more came:
/// "all of them, and only once".
pub async fn wait_for_exactly(url: &str, table: &str, expected: i64, timeout: Duration) {
    wait_for_rows(url, table, expected, timeout).await;
    tokio::time::sleep(SETTLE).await;
    assert_eq!(count_rows(url, table), expected, "rows in {table}");
}

// The Prometheus text reader the tools use, so a figure is read one way in tests and in the tools.
pub use system::prometheus::{
    exported_names, metric, metric_sum, not_at_zero, sample, sample_names,
};

/// A service's `/metrics` right after its start, as operators rely on it: each of `watched` is
/// there at 0 (so an alert fires at its first increase), the service reports itself ready, and
/// every sample's name carries the `sensorhub_` prefix.
pub fn assert_fresh_metrics(text: &str, watched: &[String]) {
    let watched: Vec<&str> = watched.iter().map(String::as_str).collect();
    assert_eq!(not_at_zero(text, &watched), [], "{text}");
    assert_eq!(sample(text, "sensorhub_ready"), Some(1.0), "{text}");
    let unprefixed: Vec<String> = sample_names(text)
        .into_iter()
        .filter(|name| !name.starts_with("sensorhub_"))
        .collect();
    assert_eq!(unprefixed, Vec::<String>::new());
}

/// The publisher's series, one per outcome, of a service that publishes to RabbitMQ.
pub fn publish_outcome_series() -> Vec<String> {
    bus::PUBLISH_OUTCOMES
        .iter()
        .map(|outcome| format!("sensorhub_amqp_publish_messages_total{{outcome=\"{outcome}\"}}"))
        .collect()
}

/// A test's own AMQP names: a unique prefix for its exchanges and queues, which are deleted when
/// this is dropped, so a test that fails (panics) half-way leaves nothing behind either.
pub struct AmqpPrefix(String);

impl AmqpPrefix {
    pub fn new(label: &str) -> Self {
        Self(unique_name(label))
    }
}

impl std::ops::Deref for AmqpPrefix {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for AmqpPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Drop for AmqpPrefix {
    fn drop(&mut self) {
        // Dropped inside the test's runtime, which cannot wait for async work in place: the
        // deletion runs on a thread of its own, and the drop waits for it.
        let prefix = self.0.clone();
        let deleted = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(delete_amqp_topology(&prefix))
        })
        .join();
        match deleted {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("cannot delete the test's AMQP topology {}: {e}", self.0),
            Err(_) => eprintln!("deleting the test's AMQP topology {} panicked", self.0),
        }
    }
}

/// Deletes the exchanges and queues a test made under `prefix`.
async fn delete_amqp_topology(prefix: &str) -> Result<(), String> {
    let conn = bus::connect(&amqp_url(), "test-cleanup")
        .await
        .map_err(|e| format!("RabbitMQ for the clean-up: {e}"))?;
    let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
    let deleted = bus::delete_topology(&channel, &bus::Topology::with_prefix(prefix))
        .await
        .map_err(|e| e.to_string());
    let _ = conn.close(200, "test cleaned up".into()).await;
    deleted
}

/// What tests publish with unless they say otherwise (the services take theirs from their
/// `defaults.toml`): batches sent a millisecond after their first reading, reconnects within 5 s.
pub fn publisher_settings() -> bus::PublisherSettings {
    bus::PublisherSettings {
        publish_linger_ms: 1,
        publish_max_batch_readings: 2000,
        publish_max_in_flight: 16,
        publish_queue_capacity: 8192,
        publish_confirm_timeout_ms: 10_000,
        reconnect_max_backoff_ms: 5_000,
    }
}

/// A publisher to `topology` on the test RabbitMQ, as connection `name`, connected.
pub async fn connected_publisher(
    topology: &bus::Topology,
    settings: bus::PublisherSettings,
    name: &str,
) -> bus::Publisher {
    let publisher = bus::Publisher::start(
        amqp_url(),
        topology.clone(),
        settings,
        bus::PublisherMetrics::unregistered(),
        name.to_owned(),
    );
    assert!(
        publisher.wait_connected(Duration::from_secs(10)).await,
        "RabbitMQ is running"
    );
    publisher
}

/// Messages ready in the readings queue of `prefix` (declared first if need be; a message a
/// consumer holds unacknowledged is not counted, and returns to ready when its connection closes).
pub async fn queued_messages(prefix: &str) -> u32 {
    let conn = bus::connect(&amqp_url(), "test-queue-depth")
        .await
        .expect("RabbitMQ");
    let channel = conn.create_channel().await.expect("a channel");
    let topology = bus::Topology::with_prefix(prefix);
    bus::declare_topology(&channel, &topology)
        .await
        .expect("declare the test's topology");
    let queue = channel
        .queue_declare(
            topology.readings_queue.as_str().into(),
            bus::lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .expect("the readings queue");
    let _ = conn.close(200, "counted".into()).await;
    queue.message_count()
}
