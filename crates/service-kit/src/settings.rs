//! The settings sections several services share, flattened (`#[serde(flatten)]`) into each service's
//! own settings, so one key (and environment variable) means the same thing everywhere. The values
//! come from each service's `defaults.toml`, never from here.

use std::net::TcpListener;
use std::time::Duration;

use serde::Deserialize;

/// An HTTP API: where it listens, how many workers serve it, how long a slow client may take.
#[derive(Debug, Clone, Deserialize)]
pub struct HttpSettings {
    /// `host:port`; port 0 picks a free port (tests).
    pub http_addr: String,
    /// 0: one worker per CPU core.
    pub http_workers: usize,
    /// The request's headers must arrive within this...
    pub http_header_timeout_ms: u64,
    /// ...and its body within this after them.
    pub http_body_timeout_ms: u64,
    pub http_keep_alive_secs: u64,
}

impl HttpSettings {
    /// Binds `http_addr` here, so the caller learns the port before serving.
    pub fn bind(&self) -> std::io::Result<(TcpListener, u16)> {
        let listener = TcpListener::bind(&self.http_addr).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot listen on {}: {e}", self.http_addr),
            )
        })?;
        let port = listener.local_addr()?.port();
        Ok((listener, port))
    }

    pub fn workers(&self) -> usize {
        match self.http_workers {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        }
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.http_header_timeout_ms)
    }

    pub fn body_timeout(&self) -> Duration {
        Duration::from_millis(self.http_body_timeout_ms)
    }

    pub fn keep_alive(&self) -> Duration {
        Duration::from_secs(self.http_keep_alive_secs)
    }
}

/// PostgreSQL and the connection pool of a service that keeps one.
#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseSettings {
    pub database_url: String,
    pub db_max_connections: u32,
    /// How long a caller waits for a pooled connection.
    pub db_acquire_timeout_ms: u64,
    /// PostgreSQL's `statement_timeout`; 0: none.
    pub db_statement_timeout_ms: u64,
    /// At start-up, how long to wait for PostgreSQL to accept connections.
    pub startup_wait_ms: u64,
}

impl DatabaseSettings {
    pub fn startup_wait(&self) -> Duration {
        Duration::from_millis(self.startup_wait_ms)
    }

    /// The pool these settings describe, its connections named `application_name` in PostgreSQL.
    pub fn pool(&self, application_name: &str) -> store::PoolSettings {
        store::PoolSettings {
            max_connections: self.db_max_connections,
            acquire_timeout_ms: self.db_acquire_timeout_ms,
            statement_timeout_ms: self.db_statement_timeout_ms,
            application_name: application_name.into(),
        }
    }
}

/// README's configuration table and the services' `defaults.toml` files say the same: every setting
/// a service has is a row naming that service with the same default, and every row is a setting.
#[cfg(test)]
mod readme_table {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::{Path, PathBuf};

    use config::{Config, File, FileFormat};

    fn workspace() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    /// Service name → its defaults as text (`true`, `365`, `""` ...).
    fn defaults_files() -> BTreeMap<String, BTreeMap<String, String>> {
        let services = workspace().join("services");
        let mut found = BTreeMap::new();
        for entry in std::fs::read_dir(&services).unwrap() {
            let dir = entry.unwrap().path();
            let Ok(text) = std::fs::read_to_string(dir.join("src/defaults.toml")) else {
                continue;
            };
            let values: BTreeMap<String, config::Value> = Config::builder()
                .add_source(File::from_str(&text, FileFormat::Toml))
                .build()
                .unwrap()
                .try_deserialize()
                .unwrap();
            let values = values
                .into_iter()
                .map(|(k, v)| (k, v.into_string().unwrap()))
                .collect();
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            found.insert(name, values);
        }
        assert!(found.len() >= 4, "found only {:?}", found.keys());
        found
    }

    /// The backticked values of a cell; each either alone or after the service it belongs to.
    fn values(cell: &str) -> Vec<(Option<String>, String)> {
        let mut out = Vec::new();
        let mut parts = cell.split('`');
        while let (Some(before), Some(value)) = (parts.next(), parts.next()) {
            let service = before
                .trim_end()
                .rsplit([' ', ','])
                .next()
                .filter(|w| !w.is_empty())
                .map(str::to_owned);
            out.push((service, value.to_owned()));
        }
        out
    }

    /// (setting in lower case, service) → default, as README's table states it.
    fn readme_table(services: &BTreeSet<String>) -> BTreeMap<(String, String), String> {
        let readme = std::fs::read_to_string(workspace().join("README.md")).unwrap();
        let section = readme
            .split("\n## Configuration\n")
            .nth(1)
            .expect("README has a Configuration section");
        let section = section.split("\n## ").next().unwrap();
        let mut table = BTreeMap::new();
        for row in section.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = row.trim_matches('|').split(" | ").map(str::trim).collect();
            let setting = cells[0].trim_matches('`').to_lowercase();
            assert!(
                !setting.contains('`'),
                "one setting a row, please: {}",
                cells[0]
            );
            let listed: Vec<String> = if cells[1] == "all" {
                services.iter().cloned().collect()
            } else {
                cells[1]
                    .split(',')
                    .map(|s| s.split('(').next().unwrap().trim().to_owned())
                    .filter(|s| services.contains(s))
                    .collect()
            };
            let stated = values(cells[2]);
            for service in listed {
                let default = match stated.as_slice() {
                    [] => String::new(),
                    [(_, value)] => value.clone(),
                    many => many
                        .iter()
                        .find(|(s, _)| s.as_deref() == Some(service.as_str()))
                        .map(|(_, v)| v.clone())
                        .unwrap_or_else(|| {
                            panic!("{setting}: README states no default for {service}")
                        }),
                };
                let previous = table.insert((setting.clone(), service), default);
                assert!(previous.is_none(), "{setting} has two rows");
            }
        }
        table
    }

    #[test]
    fn readme_lists_every_setting_with_its_default() {
        let files = defaults_files();
        let services = files.keys().cloned().collect();
        let readme = readme_table(&services);
        let from_files: BTreeMap<(String, String), String> = files
            .iter()
            .flat_map(|(service, values)| {
                values
                    .iter()
                    .map(|(k, v)| ((k.clone(), service.clone()), v.clone()))
            })
            .collect();
        let mut problems = Vec::new();
        for ((setting, service), default) in &from_files {
            match readme.get(&(setting.clone(), service.clone())) {
                None => problems.push(format!(
                    "{service}'s {setting} is not in README's table (or the row does not name {service})"
                )),
                Some(stated) if stated != default => problems.push(format!(
                    "{service}'s {setting}: defaults.toml says {default:?}, README {stated:?}"
                )),
                Some(_) => {}
            }
        }
        for (setting, service) in readme.keys() {
            if !from_files.contains_key(&(setting.clone(), service.clone())) {
                problems.push(format!(
                    "README lists {setting} for {service}, whose defaults.toml does not have it"
                ));
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
}
