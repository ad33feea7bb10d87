//! What the services that keep PostgreSQL connections do with it the same way: connect and refuse
//! an unmigrated database at start-up, check it for `/readyz`, and follow a registry's change
//! notifications.

use std::ops::ControlFlow;
use std::sync::Arc;

use anyhow::Context;
use auth::Follower;
use store::PgPool;
use store::listen::ListenEvent;

use crate::DatabaseSettings;

/// Connects the pool, waits for PostgreSQL (up to `startup_wait_ms`) and refuses an unmigrated
/// database.
pub async fn connect_migrated(
    database: &DatabaseSettings,
    pool: &store::PoolSettings,
) -> anyhow::Result<PgPool> {
    let pool = store::connect_pool(&database.database_url, pool)?;
    let wait = database.startup_wait();
    let check_pool = pool.clone();
    tokio::task::spawn_blocking(move || store::wait_for_migrated_database(&check_pool, wait))
        .await
        .context("start-up check")??;
    Ok(pool)
}

/// The `/readyz` check of the database: one query, off the async threads.
pub async fn ping(pool: PgPool) -> Result<(), String> {
    tokio::task::spawn_blocking(move || store::ping(&pool).map_err(|e| e.to_string()))
        .await
        .map_err(|e| e.to_string())?
}

/// Wakes `follower` whenever PostgreSQL notifies a change on `channel`, from a thread (connecting
/// as `application_name`) that ends once the follower is gone or the returned listener is dropped
/// (keep it as long as the service runs).
pub fn follow_notifications(
    database_url: &str,
    channel: &'static str,
    application_name: &str,
    follower: &Arc<Follower>,
) -> std::io::Result<store::listen::Listener> {
    let follower = Arc::downgrade(follower);
    store::listen::spawn_listener(
        database_url.to_owned(),
        channel,
        application_name,
        move |event| {
            let Some(follower) = follower.upgrade() else {
                return ControlFlow::Break(());
            };
            match event {
                ListenEvent::Listening => follower.listening_again(),
                ListenEvent::Changed => follower.changed(),
                ListenEvent::Quiet => {}
                ListenEvent::Lost(error) => follower.listener_lost(&error),
            }
            ControlFlow::Continue(())
        },
    )
}
