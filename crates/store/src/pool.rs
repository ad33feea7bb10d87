use std::time::Duration;

use diesel::PgConnection;
use diesel::connection::SimpleConnection;
use diesel::r2d2::{ConnectionManager, CustomizeConnection, Pool};
use serde::Deserialize;

use crate::StoreError;

pub type PgPool = Pool<ConnectionManager<PgConnection>>;

/// Pool sizing and timeouts; every service takes them from its configuration.
#[derive(Debug, Clone, Deserialize)]
pub struct PoolSettings {
    pub max_connections: u32,
    /// How long a caller waits for a free connection before giving up (then: 503 / retry).
    pub acquire_timeout_ms: u64,
    /// PostgreSQL's `statement_timeout` for every statement on these connections; 0 = none.
    pub statement_timeout_ms: u64,
    /// Shown in `pg_stat_activity`, so an operator sees which service holds which connection.
    pub application_name: String,
}

#[derive(Debug)]
struct SessionSettings {
    sql: String,
}

impl CustomizeConnection<PgConnection, diesel::r2d2::Error> for SessionSettings {
    fn on_acquire(&self, conn: &mut PgConnection) -> Result<(), diesel::r2d2::Error> {
        conn.batch_execute(&self.sql)
            .map_err(diesel::r2d2::Error::QueryError)
    }
}

/// A pool that connects lazily: a service may start while PostgreSQL is still coming up, and its
/// readiness check reports the database until it is there.
pub fn connect_pool(database_url: &str, settings: &PoolSettings) -> Result<PgPool, StoreError> {
    let app_name = settings.application_name.replace('\'', "");
    let sql = format!(
        "SET application_name = '{app_name}'; SET statement_timeout = {}; SET TIME ZONE 'UTC';",
        settings.statement_timeout_ms
    );
    Ok(Pool::builder()
        .max_size(settings.max_connections.max(1))
        .min_idle(Some(1))
        .connection_timeout(Duration::from_millis(settings.acquire_timeout_ms.max(1)))
        .connection_customizer(Box::new(SessionSettings { sql }))
        .build_unchecked(ConnectionManager::new(database_url)))
}

/// For readiness checks: a connection can be had and answers.
pub fn ping(pool: &PgPool) -> Result<(), StoreError> {
    pool.get()?.batch_execute("SELECT 1")?;
    Ok(())
}

/// The server a pool's connections reach, as `/readyz` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerRole {
    /// A standby (in recovery: it replays the primary's WAL and refuses writes).
    pub standby: bool,
    /// `host:port` as the server sees itself (`inet_server_addr()`), or "a local socket".
    pub address: String,
}

/// Which server one of `pool`'s connections reaches: with a multi-host URL, libpq picks it by
/// `target_session_attrs`, so this is how a service can tell where its reads actually go.
pub fn server_role(pool: &PgPool) -> Result<ServerRole, StoreError> {
    use diesel::RunQueryDsl;
    use diesel::sql_types::{Bool, Text};
    #[derive(diesel::QueryableByName)]
    struct Found {
        #[diesel(sql_type = Bool)]
        standby: bool,
        #[diesel(sql_type = Text)]
        address: String,
    }
    let found: Found = diesel::sql_query(
        "SELECT pg_is_in_recovery() AS standby,
                coalesce(host(inet_server_addr()) || ':' || inet_server_port(), 'a local socket')
                  AS address",
    )
    .get_result(&mut pool.get()?)?;
    Ok(ServerRole {
        standby: found.standby,
        address: found.address,
    })
}
