//! `sensorhub-agent check`: is this Pi ready? The configuration, the token, the outbox's place,
//! each source read once (its values shown), each command's handler, and the server: reachable,
//! and taking this device's token. Nothing is sent or stored.

use std::path::Path;
use std::time::Duration;

use crate::config::{Config, Transport};
use crate::mqtt::Probe;
use crate::outbox::Outbox;
use crate::sources;

/// Runs every check, printing one line each; whether all passed.
pub async fn check(path: &Path) -> bool {
    let config = match Config::load(path) {
        Ok(config) => {
            println!(
                "ok    configuration {} ({} sources, {} command handlers)",
                path.display(),
                config.sources.len(),
                config.commands.len()
            );
            config
        }
        Err(e) => {
            println!("FAIL  {e}");
            return false;
        }
    };
    let mut ok = true;
    let mut report = |passed: bool, line: String| {
        println!("{}  {line}", if passed { "ok  " } else { "FAIL" });
        ok &= passed;
    };
    let token = config.token();
    match &token {
        Ok(_) => report(true, format!("token {}", config.token_file.display())),
        Err(e) => report(false, e.to_string()),
    }
    report_outbox(&config, &mut report);
    for (i, source) in config.sources.iter().enumerate() {
        let what = sources::describe(&source.kind);
        match sources::read(&source.kind).await {
            Ok(metrics) => report(
                true,
                format!(
                    "source {} ({what}, every {}): {}",
                    i + 1,
                    humantime::format_duration(source.every),
                    serde_json::Value::Object(metrics)
                ),
            ),
            Err(e) => report(false, format!("source {} ({what}): {e}", i + 1)),
        }
    }
    for (name, handler) in &config.commands {
        let program = handler.run.first().map(String::as_str).unwrap_or_default();
        match find_program(program) {
            Some(found) => report(true, format!("command {name}: {}", found.display())),
            None => report(
                false,
                format!("command {name}: {program:?} is not an executable file"),
            ),
        }
    }
    if token.is_ok() {
        let (passed, line) = server(&config).await;
        report(passed, line);
    }
    ok
}

fn report_outbox(config: &Config, report: &mut impl FnMut(bool, String)) {
    let path = &config.outbox.path;
    if path.exists() {
        match Outbox::open_read_only(path).and_then(|o| o.status()) {
            Ok(status) => report(
                true,
                format!(
                    "outbox {} ({} readings waiting)",
                    path.display(),
                    status.depth
                ),
            ),
            Err(e) => report(false, e.to_string()),
        }
        return;
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // the agent creates the folder itself if it may (systemd's StateDirectory makes it)
    let ancestor = dir.ancestors().find(|d| d.exists());
    match ancestor {
        Some(a) if a.metadata().is_ok_and(|m| !m.permissions().readonly()) => report(
            true,
            format!("outbox {} (made at the first run)", path.display()),
        ),
        _ => report(
            false,
            format!(
                "outbox {}: {} cannot be written",
                path.display(),
                dir.display()
            ),
        ),
    }
}

/// A program by path, or found on `PATH`, that is an executable file.
fn find_program(program: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let path = Path::new(program).to_path_buf();
        return executable(&path).then_some(path);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| executable(p))
    })
}

/// The server is reachable, and takes the token: over HTTP, an empty batch with the token is
/// refused for being empty (400) by a server that let the token in, and for the token (401, 403)
/// otherwise; over MQTT, the broker accepts the device's login (CONNACK) or refuses it.
async fn server(config: &Config) -> (bool, String) {
    if config.server.transport == Transport::Mqtt {
        return broker(config).await;
    }
    let base = config.base_url();
    let client = match crate::http::Server::new(config) {
        Ok(server) => server,
        Err(e) => return (false, e.to_string()),
    };
    match client.probe(Duration::from_secs(10)).await {
        Ok(400) => (
            true,
            format!("server {base}: reachable, the token is accepted"),
        ),
        Ok(status @ (401 | 403)) => (
            false,
            format!(
                "server {base}: reachable, but it refuses the token ({status}): is it this device's, and not revoked?"
            ),
        ),
        Ok(status) => (
            false,
            format!("server {base}: answered {status} (is server.url ingest's address?)"),
        ),
        Err(e) => (false, format!("server {base}: {e}")),
    }
}

/// Connects to the MQTT broker as the device, sees the CONNACK, and disconnects.
async fn broker(config: &Config) -> (bool, String) {
    let url = config.server_address();
    match crate::mqtt::probe(config, Duration::from_secs(10)).await {
        Probe::Accepted => (
            true,
            format!("broker {url}: reachable, the token is accepted"),
        ),
        Probe::Refused(why) => (
            false,
            format!(
                "broker {url}: reachable, but it refuses the token ({why}): is it this device's, and not revoked?"
            ),
        ),
        Probe::Failed(why) => (false, format!("broker {url}: {why}")),
    }
}
