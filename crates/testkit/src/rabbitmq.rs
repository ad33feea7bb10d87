//! A private RabbitMQ node with the MQTT plugin, per test: enabling a plugin on the machine's own
//! RabbitMQ would change it for everyone on the machine, and a test that kills its broker must not
//! kill anyone else's.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::mqtt::free_port;

/// Debian's RabbitMQ; `/usr/sbin/rabbitmq-server` would switch users and, with the node's
/// directories elsewhere, fail without a word.
const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
/// A node boots in about 12 s on an idle machine; much longer on a busy one.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// How the MQTT plugin lets devices in.
pub enum MqttAuth {
    /// Anyone, as `guest` (from localhost).
    Anonymous,
    /// RabbitMQ's HTTP auth backend asking `base_url` (`<base>/user`, `/vhost`, `/resource`,
    /// `/topic`); AMQP users (`guest`) are RabbitMQ's own.
    Http { base_url: String },
}

/// A RabbitMQ node of its own (AMQP and MQTT on free ports, the MQTT plugin publishing to
/// `<prefix>.mqtt`), stopped with SIGKILL when dropped.
pub struct RabbitMqtt {
    pub amqp_port: u16,
    pub mqtt_port: u16,
    dist_port: u16,
    pub dir: PathBuf,
    node: String,
    child: Option<Child>,
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
        == 0
}

impl RabbitMqtt {
    pub fn start(prefix: &str, auth: MqttAuth) -> Self {
        let (amqp_port, mqtt_port, dist_port) = (free_port(), free_port(), free_port());
        let dir = std::env::temp_dir().join(crate::unique_name("rabbitmq"));
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub)).expect("rabbitmq dir");
        }
        std::fs::write(
            dir.join("enabled_plugins"),
            "[rabbitmq_mqtt,rabbitmq_auth_backend_http].\n",
        )
        .expect("enabled_plugins");
        let mut config = format!(
            "listeners.tcp.local = 127.0.0.1:{amqp_port}\nloopback_users.guest = true\n\
             mqtt.listeners.tcp.default = 127.0.0.1:{mqtt_port}\nmqtt.exchange = {prefix}.mqtt\n"
        );
        match auth {
            MqttAuth::Anonymous => config.push_str(
                "mqtt.allow_anonymous = true\nmqtt.default_user = guest\nmqtt.default_pass = guest\n",
            ),
            MqttAuth::Http { base_url } => config.push_str(&format!(
                "mqtt.allow_anonymous = false\nauth_backends.1 = internal\nauth_backends.2 = http\n\
                 auth_http.http_method = post\nauth_http.user_path = {base_url}/user\n\
                 auth_http.vhost_path = {base_url}/vhost\nauth_http.resource_path = {base_url}/resource\n\
                 auth_http.topic_path = {base_url}/topic\n"
            )),
        }
        std::fs::write(dir.join("rabbitmq.conf"), config).expect("rabbitmq.conf");
        if running_as_root() {
            let status = Command::new("chown")
                .args(["-R", "rabbitmq:rabbitmq"])
                .arg(&dir)
                .status()
                .expect("chown");
            assert!(status.success(), "chown {}", dir.display());
        }
        let mut node = Self {
            amqp_port,
            mqtt_port,
            dist_port,
            node: format!("{}@localhost", crate::unique_name("sh-test")),
            dir,
            child: None,
        };
        node.restart();
        node
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    /// Starts the node again (after [`RabbitMqtt::kill`]): same ports, same data.
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .expect("rabbitmq log");
        let mut cmd = if running_as_root() {
            let mut cmd = Command::new("setpriv");
            cmd.args([
                "--reuid",
                "rabbitmq",
                "--regid",
                "rabbitmq",
                "--init-groups",
            ])
            .arg(SERVER);
            cmd
        } else {
            Command::new(SERVER)
        };
        cmd.current_dir("/")
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env("RABBITMQ_PID_FILE", self.dir.join("pid"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("rabbitmq log"))
            .stderr(log)
            // its own process group, so that kill takes the Erlang VM and its helpers with it
            .process_group(0);
        if running_as_root() {
            // the Erlang cookie rabbitmqctl and the machine's node use
            cmd.env("HOME", "/var/lib/rabbitmq");
        }
        self.child = Some(cmd.spawn().expect("start rabbitmq-server"));
        let deadline = Instant::now() + BOOT_TIMEOUT;
        while [self.amqp_port, self.mqtt_port]
            .iter()
            .any(|port| std::net::TcpStream::connect(("127.0.0.1", *port)).is_err())
        {
            assert!(
                Instant::now() < deadline,
                "RabbitMQ node {} did not start (see {})",
                self.node,
                self.dir.join("log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL to the node and everything it started: what a power cut does to a broker.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.amqp_port)).is_ok()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RabbitMqtt {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
