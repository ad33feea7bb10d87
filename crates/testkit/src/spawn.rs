//! The services started inside a test, on free ports, written once: every crate's tests start
//! ingest-http, ingest-mqtt, the persister and query-api here, so a change to how a service is
//! built or stopped is made in one place. Each service is behind the testkit feature of its name,
//! so a crate's tests compile only the services they run.
//!
//! `*_settings` give a service's settings for a test (its database, queue names and keys; port 0;
//! small pools and quick refreshes); a test changes what it is about, then starts the service.
//! Started services are ready (`/readyz` answers 200).

use std::time::Duration;

#[cfg(any(
    feature = "ingest-http",
    feature = "ingest-mqtt",
    feature = "persister",
    feature = "query-api"
))]
use service_kit::config::ServiceSettings;

/// How long a service may take to become ready in a test.
const READY: Duration = Duration::from_secs(60);

/// A service running in the test's runtime, built and run as its `main` does (`build`, then
/// `run_until` a shutdown signal). `stop` shuts it down gracefully and waits for it; dropped, it
/// is told to stop and left to finish.
pub struct Running {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    port: u16,
    client: reqwest::Client,
    /// Sending, or dropping it, is the shutdown signal.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Spawns `run` (a service's `run_until`, given the shutdown signal) on the test's runtime.
    #[cfg(any(
        feature = "ingest-http",
        feature = "ingest-mqtt",
        feature = "persister",
        feature = "query-api"
    ))]
    fn spawn<Run, Fut>(port: u16, run: Run) -> Self
    where
        Run: FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run(Box::pin(async move {
            let _ = stopped.await;
        })));
        Self {
            url: format!("http://127.0.0.1:{port}"),
            port,
            client: reqwest::Client::new(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Its HTTP listener: the API of ingest-http and query-api, the ops endpoints of ingest-mqtt
    /// and the persister.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its `/metrics` page.
    pub async fn metrics(&self) -> String {
        crate::get_text(&self.client, &format!("{}/metrics", self.url)).await
    }

    /// A sample of its `/metrics` (see [`crate::metric`]).
    pub async fn metric(&self, name: &str) -> f64 {
        crate::metric(&self.metrics().await, name)
    }

    /// Waits until the sample `name` of its `/metrics` reaches `at_least`, and answers that page.
    pub async fn metrics_reaching(&self, name: &str, at_least: f64, timeout: Duration) -> String {
        crate::eventually(timeout, &format!("{name} at {at_least}"), || async {
            let text = self.metrics().await;
            (crate::metric(&text, name) >= at_least).then_some(text)
        })
        .await
    }

    /// The status of `/readyz`, 0 when it does not answer.
    pub async fn readyz(&self) -> u16 {
        self.client
            .get(format!("{}/readyz", self.url))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        crate::eventually(
            READY,
            &format!("the service on {} ready", self.url),
            || async { (self.readyz().await == 200).then_some(()) },
        )
        .await;
    }

    /// Stops it as a SIGTERM would, and waits until it has (a service that panicked or failed
    /// fails the test here).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("the service ran to its end");
        }
    }
}

#[cfg(feature = "persister")]
pub fn persister_settings(database_url: &str, amqp_prefix: &str) -> persister::Settings {
    let mut s = persister::Settings::defaults();
    s.http_addr = "127.0.0.1:0".into();
    s.database.database_url = database_url.to_owned();
    s.bus.amqp_url = crate::amqp_url();
    s.bus.amqp_prefix = amqp_prefix.to_owned();
    s.batch_linger_ms = 5;
    s.retry_max_backoff_ms = 500;
    s
}

/// The persister, started and ready.
#[cfg(feature = "persister")]
pub async fn persister(settings: &persister::Settings) -> Running {
    let persister = persister::Persister::build(settings)
        .await
        .expect("the persister starts");
    let running = Running::spawn(persister.ops_port(), |stop| persister.run_until(stop));
    running.wait_ready().await;
    running
}

#[cfg(feature = "ingest-mqtt")]
pub fn ingest_mqtt_settings(
    mqtt_port: u16,
    client_id: &str,
    amqp_prefix: &str,
) -> ingest_mqtt::Settings {
    let mut s = ingest_mqtt::Settings::defaults();
    s.http_addr = "127.0.0.1:0".into();
    s.mqtt_url = format!("mqtt://127.0.0.1:{mqtt_port}");
    s.mqtt_client_id = client_id.to_owned();
    s.bus.amqp_url = crate::amqp_url();
    s.bus.amqp_prefix = amqp_prefix.to_owned();
    s.retry_max_backoff_ms = 500;
    s
}

/// ingest-mqtt, started and ready: ready means subscribed (at the SUBACK), so what devices
/// publish from now on reaches it.
#[cfg(feature = "ingest-mqtt")]
pub async fn ingest_mqtt(settings: &ingest_mqtt::Settings) -> Running {
    let ingest = ingest_mqtt::IngestMqtt::build(settings).expect("ingest-mqtt starts");
    let running = Running::spawn(ingest.ops_port(), |stop| ingest.run_until(stop));
    running.wait_ready().await;
    running
}

/// ingest-http's settings: this test's database and queue names; devices' tokens checked with
/// `verifying_key_file`, the registry re-read every 200 ms; no per-device rate limit.
#[cfg(feature = "ingest-http")]
pub fn ingest_http_settings(
    database_url: &str,
    amqp_prefix: &str,
    verifying_key_file: &str,
) -> ingest_http::Settings {
    let mut s = ingest_http::Settings::defaults();
    s.http.http_addr = "127.0.0.1:0".into();
    s.http.http_workers = 2;
    s.database_url = database_url.to_owned();
    s.bus.amqp_url = crate::amqp_url();
    s.bus.amqp_prefix = amqp_prefix.to_owned();
    s.auth_public_key_file = verifying_key_file.to_owned();
    s.auth_refresh_ms = 200;
    s.rate_limit_per_second = 0;
    s
}

/// ingest-http, started and ready.
#[cfg(feature = "ingest-http")]
pub async fn ingest_http(settings: &ingest_http::Settings) -> Running {
    let app = ingest_http::Application::build(settings).expect("ingest-http starts");
    let running = Running::spawn(app.port(), |stop| async move {
        app.run_until(stop).await.expect("ingest-http serves")
    });
    running.wait_ready().await;
    running
}

#[cfg(feature = "query-api")]
pub fn query_api_settings(database_url: &str, verifying_key_file: &str) -> query_api::Settings {
    let mut s = query_api::Settings::defaults();
    s.http.http_addr = "127.0.0.1:0".into();
    s.http.http_workers = 1;
    s.database.database_url = database_url.to_owned();
    s.auth_public_key_file = verifying_key_file.to_owned();
    // the live feed's exchange: one for every test that does not watch a persister of its own
    s.bus.amqp_url = crate::amqp_url();
    s.bus.amqp_prefix = "sensorhub-tests".to_owned();
    s
}

/// query-api, started and ready.
#[cfg(feature = "query-api")]
pub async fn query_api(settings: &query_api::Settings) -> Running {
    let app = query_api::Application::build(settings)
        .await
        .expect("query-api starts");
    let running = Running::spawn(app.port(), |stop| async move {
        app.run_until(stop).await.expect("query-api serves")
    });
    running.wait_ready().await;
    running
}

/// A service's own binary run as a child process (for what only a process can show: SIGKILL,
/// SIGTERM), its ops listener on a free port, logging warnings to the test's output. Killed when
/// dropped, so a failing test leaves no process behind.
pub struct Binary(std::process::Child);

impl Binary {
    /// Starts `path` (a test's `env!("CARGO_BIN_EXE_<name>")`) with `env`, and nothing else of
    /// Sensorhub's settings from the test's environment that would send it elsewhere.
    pub fn start(path: &str, env: &[(&str, String)]) -> Self {
        let mut command = std::process::Command::new(path);
        for var in [
            "SENSORHUB_CONFIG",
            "DATABASE_URL",
            "AMQP_URL",
            "AMQP_PREFIX",
            "MQTT_URL",
        ] {
            command.env_remove(var);
        }
        command
            .env("HTTP_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        Self(
            command
                .spawn()
                .unwrap_or_else(|e| panic!("start {path}: {e}")),
        )
    }

    /// A command the test built itself (its output piped, say), run on the same terms: killed
    /// when dropped.
    pub fn spawn(mut command: std::process::Command) -> Self {
        Self(
            command
                .spawn()
                .unwrap_or_else(|e| panic!("start {command:?}: {e}")),
        )
    }

    /// Its standard output, when the command piped it (once).
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.0.stdout.take()
    }

    /// SIGKILL: no chance to finish a batch or acknowledge anything.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// SIGTERM, and how it exited (it must within `timeout`).
    pub async fn terminate(mut self, timeout: Duration) -> std::process::ExitStatus {
        let term = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .expect("run kill");
        assert!(term.success(), "SIGTERM to {}", self.0.id());
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().expect("the child's status") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no exit within {timeout:?} of SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        self.kill();
    }
}
