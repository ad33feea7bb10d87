//! sensorctl: what an operator does by hand. Results go to standard output (a token alone on its
//! line, so scripts can capture it); explanations go to standard error.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use auth::{Claims, Role, TokenSigner};
use clap::{Parser, Subcommand};

mod rollups;

/// Sensorhub's operator tool: migrations, keys, devices, tokens and retention.
#[derive(Parser)]
#[command(version)]
pub struct Cli {
    /// PostgreSQL to work on.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/sensorhub",
        global = true
    )]
    pub database_url: String,
    /// Where the key pair lives (`signing-key.pem` is needed to issue tokens).
    #[arg(
        long,
        env = "SENSORHUB_KEYS_DIR",
        default_value = "keys",
        global = true
    )]
    pub keys_dir: PathBuf,
    /// Mosquitto's dynamic security admin, `mqtt://admin:password@host:1883`: when set, `device add`
    /// and `device revoke` also create and remove the device's MQTT account. Leave it unset in MQTT
    /// broker mode `rabbitmq`: there RabbitMQ asks ingest-http, which reads the device registry,
    /// so `device add` and `device revoke` are the MQTT accounts.
    #[arg(long, env = "SENSORHUB_MQTT_ADMIN_URL", global = true)]
    pub mqtt_admin_url: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Apply every pending database migration (safe to run again: applies nothing then).
    Migrate,
    /// List migrations not applied yet; exits 1 if there are any.
    Pending,
    /// The signing key pair.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Devices allowed to write.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Tokens for apps.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Mosquitto's accounts (through its dynamic security plugin; needs --mqtt-admin-url).
    #[command(subcommand)]
    Mqtt(MqttCommand),
    /// Readings sent again with a stored id and other content: the first write stays, these are
    /// kept for `CONFLICTS_KEPT_DAYS` (the persister's setting).
    #[command(subcommand)]
    Conflicts(ConflictsCommand),
    /// The minute, hour and day summaries of the readings, which the persister keeps.
    #[command(subcommand)]
    Rollups(rollups::RollupsCommand),
    /// How long raw readings and the rollups (1m, 1h, 1d) are kept: a global default per table,
    /// overridden per device, per metric or per device and metric (the most specific wins). The
    /// persisters apply it every RETENTION_INTERVAL_SECS; `apply` does it now.
    #[command(subcommand)]
    Retention(RetentionCommand),
}

#[derive(Subcommand)]
pub enum RetentionCommand {
    /// Every rule: table, scope, keep, and the cutoff it gives now (what is older goes).
    Show,
    /// Set how long a table keeps what it holds, globally or for a device, a metric, or both.
    /// Raw readings cannot be kept per metric (a reading holds all its metrics in one row).
    #[command(after_help = "Examples:\n  sensorctl retention set raw 30d\n  \
        sensorctl retention set raw 90d --device raspi-01\n  \
        sensorctl retention set 1m 7d --metric co2\n  sensorctl retention set 1d forever")]
    Set {
        /// raw, 1m, 1h or 1d.
        table: String,
        /// Whole days or hours (30d, 12h), or forever.
        keep: String,
        /// Only this device's.
        #[arg(long)]
        device: Option<String>,
        /// Only this metric's (not for raw).
        #[arg(long)]
        metric: Option<String>,
    },
    /// Remove an override (the global default of a table can only be set, e.g. to forever).
    Unset {
        /// raw, 1m, 1h or 1d.
        table: String,
        #[arg(long)]
        device: Option<String>,
        #[arg(long)]
        metric: Option<String>,
    },
    /// Apply the policy now, printing what it removes as it goes (one applier at a time: a
    /// persister applying it meanwhile makes this wait for nothing and say so).
    Apply,
}

#[derive(Subcommand)]
pub enum ConflictsCommand {
    /// The newest conflicts, one per line: when, device, reading id, reason, the stored reading's
    /// time, the conflicting reading's time and metrics.
    List {
        /// Only this device's.
        #[arg(long)]
        device: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
}

#[derive(Subcommand)]
pub enum MqttCommand {
    /// Deny everything no role allows, and create (or bring up to date) one account per
    /// ingest-mqtt replica, `ingest-mqtt:1` to `ingest-mqtt:N`, each bound to that client id; bind
    /// the MQTT accounts of registered devices to their device ids. Safe to run again.
    Init {
        #[arg(long, env = "MQTT_INGEST_PASSWORD")]
        ingest_password: String,
        /// How many ingest-mqtt replicas get an account: at least as many as you run.
        #[arg(long, env = "MQTT_INGEST_REPLICAS", default_value_t = 1)]
        ingest_replicas: u32,
        /// Let ingest-mqtt read the seed's topic too (empty: no).
        #[arg(long, default_value = "sensor/data")]
        legacy_topic: String,
    },
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create the key pair in --keys-dir: give the services `verifying-key.pem`, keep
    /// `signing-key.pem` to yourself.
    Init {
        /// Replace an existing key pair (every token issued with it stops working).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
pub enum DeviceCommand {
    /// Register a device and print its token (a new one if the device was revoked). With
    /// --mqtt-admin-url it also gets an MQTT account: user name its id, password its token.
    Add {
        device_id: String,
        /// Also let it publish the seed's `sensor/data` topic. ingest-mqtt cannot tell who
        /// published there, so any device so allowed can write as any other: avoid.
        #[arg(long)]
        allow_legacy_topic: bool,
    },
    /// List registered devices.
    List,
    /// Revoke a device's token: refused by ingest within seconds, without restarts.
    Revoke { device_id: String },
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Issue a token for an app: `--role reader` reads the API, `--role operator` also commands
    /// devices, `--role admin` also manages devices and tokens. It is recorded (by id) in the database: query-api accepts only recorded tokens.
    Issue {
        #[arg(long)]
        role: String,
        /// How long it is valid: 90s, 30m, 12h, 30d; at most --max-ttl-secs.
        #[arg(long, default_value = "30d")]
        ttl: String,
        /// Who it is for (shown in logs with the token's id).
        #[arg(long, default_value = "app")]
        name: String,
        /// The longest --ttl allowed, in seconds: query-api refuses tokens valid for longer than
        /// its own `app_token_max_ttl_secs` (same variable, same default: 365 days).
        #[arg(long, env = "APP_TOKEN_MAX_TTL_SECS", default_value_t = DEFAULT_MAX_TTL_SECS)]
        max_ttl_secs: u64,
    },
    /// List app tokens: id, name, role, state, issue and expiry.
    List,
    /// Revoke an app token by id: query-api refuses it from then on.
    Revoke { id: String },
}

/// query-api's default `app_token_max_ttl_secs`: 365 days.
pub const DEFAULT_MAX_TTL_SECS: u64 = 365 * 86_400;

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Migrate => {
            let applied = store::run_migrations(&mut connect(&cli.database_url)?)?;
            if applied.is_empty() {
                eprintln!("database is up to date");
            }
            for name in applied {
                println!("applied {name}");
            }
        }
        Command::Pending => {
            let pending = store::pending_migrations(&mut connect(&cli.database_url)?)?;
            for name in &pending {
                println!("pending {name}");
            }
            if !pending.is_empty() {
                std::process::exit(1);
            }
            eprintln!("database is up to date");
        }
        Command::Keys(KeysCommand::Init { force }) => {
            let (signing, verifying) = auth::generate_key_pair(&cli.keys_dir, force)?;
            eprintln!(
                "created {} (keep it secret: it mints tokens) and {} (give it to the services)",
                signing.display(),
                verifying.display()
            );
        }
        Command::Device(DeviceCommand::Add {
            device_id,
            allow_legacy_topic,
        }) => {
            let device = models::DeviceId::parse(device_id.as_str())
                .map_err(|reason| anyhow::anyhow!("device id {device_id:?} {reason}"))?;
            let broker = broker(cli.mqtt_admin_url.as_deref())?;
            let signer = signer(&cli.keys_dir)?;
            let claims = Claims::device(device.as_str(), now());
            let token = signer.sign(&claims)?;
            let mut conn = connect(&cli.database_url)?;
            match store::credentials::register_device(&mut conn, device.as_str(), &claims.jti)? {
                store::credentials::Registration::Registered => {
                    if let Some(broker) = &broker {
                        let legacy = allow_legacy_topic.then_some("sensor/data");
                        if let Err(e) = block_on(broker.add_device(&device, &token, legacy))? {
                            // all or nothing: a device half set up is worse than none
                            store::credentials::revoke_device(&mut conn, device.as_str())?;
                            bail!(
                                "{device} not registered: its MQTT account could not be made: {e}"
                            );
                        }
                        eprintln!(
                            "MQTT account: user name and client id {device}, password its token"
                        );
                    }
                    eprintln!("registered {device} (token id {}); its token:", claims.jti);
                    println!("{token}");
                }
                store::credentials::Registration::AlreadyActive => {
                    bail!("{device} is already registered; revoke it first to issue a new token")
                }
            }
        }
        Command::Device(DeviceCommand::List) => {
            let mut conn = connect(&cli.database_url)?;
            println!("{:<32} {:<10} {:<25} token id", "device", "state", "since");
            for c in store::credentials::list_credentials(&mut conn)? {
                let (state, since) = match c.revoked_at {
                    Some(at) => ("revoked", at),
                    None => ("active", c.created_at),
                };
                println!(
                    "{:<32} {:<10} {:<25} {}",
                    c.device_id,
                    state,
                    since.format("%Y-%m-%dT%H:%M:%SZ"),
                    c.token_id
                );
            }
        }
        Command::Device(DeviceCommand::Revoke { device_id }) => {
            let device = models::DeviceId::parse(device_id.as_str())
                .map_err(|reason| anyhow::anyhow!("device id {device_id:?} {reason}"))?;
            let broker = broker(cli.mqtt_admin_url.as_deref())?;
            // The registry first: HTTP ingest refuses the token even while Mosquitto is away.
            let revoked =
                store::credentials::revoke_device(&mut connect(&cli.database_url)?, &device_id)?;
            let mut removed = false;
            if let Some(broker) = &broker {
                removed = block_on(broker.remove_device(&device))?.with_context(|| {
                    format!(
                        "{device} is revoked for HTTP, but its MQTT account could not be removed: \
                         run this again"
                    )
                })?;
                if removed {
                    eprintln!("removed {device}'s MQTT account (disconnected now)");
                }
            }
            if !revoked && !removed {
                bail!("{device} is not an active registered device");
            }
            eprintln!("revoked {device}: ingest refuses its token within seconds");
        }
        Command::Token(TokenCommand::Issue {
            role,
            ttl,
            name,
            max_ttl_secs,
        }) => {
            let role = Role::parse(&role)
                .filter(|r| *r != Role::Device)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "--role must be reader, operator or admin (device tokens come from `device add`)"
                    )
                })?;
            let ttl_secs = parse_ttl(&ttl)?;
            if ttl_secs > max_ttl_secs {
                bail!(
                    "--ttl {ttl} ({ttl_secs}s) is longer than the {max_ttl_secs}s allowed \
                     (--max-ttl-secs / APP_TOKEN_MAX_TTL_SECS; query-api refuses longer-lived \
                     tokens by its app_token_max_ttl_secs): issue a shorter one and renew it"
                );
            }
            let claims = Claims::app(&name, role, ttl_secs, now());
            let token = signer(&cli.keys_dir)?.sign(&claims)?;
            let at = |secs: i64| {
                chrono::DateTime::from_timestamp(secs, 0)
                    .ok_or_else(|| anyhow::anyhow!("--ttl {ttl}: the expiry is out of range"))
            };
            let expires_at = at(claims.exp.unwrap_or(claims.iat))?;
            // recorded before it is shown: a token query-api has no record of is refused
            store::app_tokens::record_app_token(
                &mut connect(&cli.database_url)?,
                &claims.jti,
                &claims.sub,
                role.as_str(),
                at(claims.iat)?,
                expires_at,
            )?;
            eprintln!(
                "{} token for {name:?}, id {}, valid for {ttl_secs}s (until {}); revoke it with \
                 `sensorctl token revoke {}`",
                role.as_str(),
                claims.jti,
                expires_at.format("%Y-%m-%dT%H:%M:%SZ"),
                claims.jti
            );
            println!("{token}");
        }
        Command::Rollups(command) => rollups::run(&cli.database_url, command)?,
        Command::Conflicts(ConflictsCommand::List { device, limit }) => {
            let mut conn = connect(&cli.database_url)?;
            let conflicts =
                store::conflicts::recent_conflicts(&mut conn, device.as_deref(), limit.max(0))?;
            println!(
                "{:<20} {:<20} {:<24} {:<44} {:<27} {:<27} metrics",
                "received", "device", "reading id", "reason", "stored ts", "ts"
            );
            let time = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%dT%H:%M:%S%.6fZ");
            for c in &conflicts {
                let ts = if c.ts_assigned {
                    "(none: server time)".to_owned()
                } else {
                    time(c.ts).to_string()
                };
                println!(
                    "{:<20} {:<20} {:<24} {:<44} {:<27} {:<27} {}",
                    c.received_at.format("%Y-%m-%dT%H:%M:%SZ"),
                    c.device_id,
                    c.reading_id,
                    c.reason,
                    time(c.stored_ts),
                    ts,
                    c.metrics
                );
            }
            eprintln!("{} conflict(s) shown", conflicts.len());
        }
        Command::Retention(command) => retention(&cli.database_url, command)?,
        Command::Token(TokenCommand::List) => {
            let mut conn = connect(&cli.database_url)?;
            println!(
                "{:<32} {:<20} {:<6} {:<8} {:<20} expires",
                "token id", "name", "role", "state", "issued"
            );
            let now = chrono::Utc::now();
            let mut after: Option<String> = None;
            loop {
                let page = store::app_tokens::list_app_tokens(&mut conn, after.as_deref(), 1_000)?;
                for t in &page {
                    let state = match t.revoked_at {
                        Some(_) => "revoked",
                        None if t.expires_at <= now => "expired",
                        None => "active",
                    };
                    println!(
                        "{:<32} {:<20} {:<6} {:<8} {:<20} {}",
                        t.id,
                        t.name,
                        t.role,
                        state,
                        t.issued_at.format("%Y-%m-%dT%H:%M:%SZ"),
                        t.expires_at.format("%Y-%m-%dT%H:%M:%SZ")
                    );
                }
                match page.last() {
                    Some(last) if page.len() == 1_000 => after = Some(last.id.clone()),
                    _ => break,
                }
            }
        }
        Command::Token(TokenCommand::Revoke { id }) => {
            let mut conn = connect(&cli.database_url)?;
            if !store::app_tokens::revoke_app_token(&mut conn, &id)? {
                bail!("{id} is not an active app token (see `sensorctl token list`)");
            }
            eprintln!("revoked app token {id}: query-api refuses it from now on");
        }
        Command::Mqtt(MqttCommand::Init {
            ingest_password,
            ingest_replicas,
            legacy_topic,
        }) => {
            let broker = broker(cli.mqtt_admin_url.as_deref())?.ok_or_else(|| {
                anyhow::anyhow!("--mqtt-admin-url (SENSORHUB_MQTT_ADMIN_URL) is required")
            })?;
            let devices: Vec<models::DeviceId> =
                store::credentials::list_credentials(&mut connect(&cli.database_url)?)?
                    .into_iter()
                    .filter(|c| c.revoked_at.is_none())
                    .filter_map(|c| models::DeviceId::parse(c.device_id).ok())
                    .collect();
            let ingest = mqtt_admin::IngestAccounts {
                password: &ingest_password,
                replicas: ingest_replicas,
                legacy_topic: (!legacy_topic.is_empty()).then_some(legacy_topic.as_str()),
            };
            let report = block_on(broker.init(&ingest, &devices))??;
            eprintln!(
                "MQTT: nothing allowed that a role does not allow; ingest-mqtt accounts (user name \
                 and client id) {}",
                report.ingest_accounts.join(", ")
            );
            if report.legacy_ingest_removed {
                eprintln!("removed the old shared account sensorhub-ingest");
            }
            if report.devices_bound > 0 {
                eprintln!(
                    "bound {} device accounts to their device ids as client ids",
                    report.devices_bound
                );
            }
        }
    }
    Ok(())
}

fn retention(database_url: &str, command: RetentionCommand) -> anyhow::Result<()> {
    use store::retention::{self, Keep, Progress, Table, Target};
    match command {
        RetentionCommand::Show => {
            let mut conn = connect(database_url)?;
            let now = chrono::Utc::now();
            println!("{:<6} {:<40} {:<8} cutoff", "table", "scope", "keep");
            for rule in retention::show(&mut conn)? {
                let cutoff = rule.cutoff(now).map_or_else(
                    || "-".to_owned(),
                    |c| c.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                );
                println!(
                    "{:<6} {:<40} {:<8} {cutoff}",
                    rule.table.as_str(),
                    rule.scope(),
                    rule.keep.to_string()
                );
            }
        }
        RetentionCommand::Set {
            table,
            keep,
            device,
            metric,
        } => {
            let target = Target::new(Table::parse(&table)?, device.as_deref(), metric.as_deref())?;
            let keep = Keep::parse(&keep)?;
            retention::set(&mut connect(database_url)?, &target, keep)?;
            eprintln!(
                "{} keeps {keep} ({}); the persisters apply it within RETENTION_INTERVAL_SECS, \
                 or run `sensorctl retention apply`",
                target.table,
                scope(&target)
            );
        }
        RetentionCommand::Unset {
            table,
            device,
            metric,
        } => {
            let target =
                Target::override_of(Table::parse(&table)?, device.as_deref(), metric.as_deref())?;
            if !retention::unset(&mut connect(database_url)?, &target)? {
                bail!("{} has no override for {}", target.table, scope(&target));
            }
            eprintln!(
                "removed the override of {} for {}",
                target.table,
                scope(&target)
            );
        }
        RetentionCommand::Apply => {
            let mut conn = connect(database_url)?;
            let report =
                retention::apply_exclusively(&mut conn, chrono::Utc::now(), |step| match step {
                    Progress::Dropped { partition } => println!("dropped partition {partition}"),
                    Progress::Skipped { partition } => println!(
                        "skipped partition {partition} (its lock was not had in time; try again)"
                    ),
                    Progress::Deleted {
                        table,
                        scope,
                        cutoff,
                        rows,
                    } => println!(
                        "deleted {rows} row(s) of {table} ({scope}) older than {}",
                        cutoff.format("%Y-%m-%dT%H:%M:%SZ")
                    ),
                })?;
            let Some(report) = report else {
                bail!("another applier (a persister) is applying the policy now: try again later");
            };
            let rows = report.rows_deleted;
            println!(
                "removed: {} partition(s); rows raw {}, 1m {}, 1h {}, 1d {}; skipped {} partition(s)",
                report.partitions_dropped.len(),
                rows.raw,
                rows.m1,
                rows.h1,
                rows.d1,
                report.partitions_skipped.len()
            );
        }
    }
    Ok(())
}

fn scope(target: &store::retention::Target) -> String {
    match (&target.device, &target.metric) {
        (None, None) => "global".to_owned(),
        (Some(d), None) => format!("device {d}"),
        (None, Some(m)) => format!("metric {m}"),
        (Some(d), Some(m)) => format!("device {d}, metric {m}"),
    }
}

fn broker(url: Option<&str>) -> anyhow::Result<Option<mqtt_admin::Broker>> {
    Ok(url
        .filter(|u| !u.is_empty())
        .map(mqtt_admin::Broker::from_url)
        .transpose()?)
}

fn block_on<T>(future: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(future))
}

fn connect(url: &str) -> anyhow::Result<store::PgConnection> {
    store::connect(url).with_context(|| format!("cannot connect to {}", store::redacted(url)))
}

fn signer(keys_dir: &Path) -> anyhow::Result<TokenSigner> {
    let path = keys_dir.join(auth::SIGNING_KEY_FILE);
    TokenSigner::from_file(&path).with_context(|| {
        format!(
            "cannot read the signing key {} (create it with `sensorctl keys init`, or pass --keys-dir)",
            path.display()
        )
    })
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// `90s`, `30m`, `12h`, `30d` → seconds.
pub fn parse_ttl(text: &str) -> anyhow::Result<u64> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (count, unit) = text.split_at(split);
    let count: u64 = count
        .parse()
        .with_context(|| format!("--ttl {text:?}: expected e.g. 30d"))?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("--ttl {text:?}: the unit must be s, m, h or d"),
    };
    if count == 0 {
        bail!("--ttl must be more than zero");
    }
    Ok(count.saturating_mul(unit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_parse() {
        assert_eq!(parse_ttl("30d").unwrap(), 30 * 86_400);
        assert_eq!(parse_ttl("90s").unwrap(), 90);
        assert!(parse_ttl("0d").is_err());
        assert!(parse_ttl("30").is_err());
        assert!(parse_ttl("d").is_err());
        assert!(parse_ttl("1y").is_err());
    }
}
