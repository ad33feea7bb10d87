use diesel::PgConnection;
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use crate::StoreError;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations");

/// Applies every pending migration; returns the names of those applied.
pub fn run_migrations(conn: &mut PgConnection) -> Result<Vec<String>, StoreError> {
    conn.run_pending_migrations(MIGRATIONS)
        .map(|applied| applied.iter().map(ToString::to_string).collect())
        .map_err(|e| StoreError::Migration(e.to_string()))
}

pub fn pending_migrations(conn: &mut PgConnection) -> Result<Vec<String>, StoreError> {
    conn.pending_migrations(MIGRATIONS)
        .map(|pending| pending.iter().map(|m| m.name().to_string()).collect())
        .map_err(|e| StoreError::Migration(e.to_string()))
}

/// Services call this at start-up and refuse to run on a database older than their code.
pub fn check_migrated(conn: &mut PgConnection) -> Result<(), StoreError> {
    let pending = pending_migrations(conn)?;
    if pending.is_empty() {
        Ok(())
    } else {
        Err(StoreError::Unmigrated { pending })
    }
}

/// At start-up: waits up to `timeout` for PostgreSQL to accept connections (it may be starting
/// beside us), then refuses at once if the schema is behind the code.
pub fn wait_for_migrated_database(
    pool: &crate::PgPool,
    timeout: std::time::Duration,
) -> Result<(), StoreError> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let attempt = pool
            .get()
            .map_err(StoreError::from)
            .and_then(|mut conn| check_migrated(&mut conn));
        match attempt {
            Err(e) if e.is_transient() && std::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "waiting for PostgreSQL");
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
            other => return other,
        }
    }
}
