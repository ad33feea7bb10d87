//! The device registry: which devices may write, with which token (by id), and which are revoked.

use chrono::{DateTime, Utc};
use diesel::prelude::*;

use crate::StoreError;
use crate::schema::device_credentials;

#[derive(Debug, Clone, PartialEq, Queryable, Selectable)]
#[diesel(table_name = device_credentials)]
pub struct DeviceCredential {
    pub device_id: String,
    pub token_id: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    /// Registered now (or again, after a revocation).
    Registered,
    /// Already registered and active: nothing changed.
    AlreadyActive,
}

/// Registers `device_id` with the token `token_id`; a revoked device is registered again with it.
pub fn register_device(
    conn: &mut PgConnection,
    device_id: &str,
    token_id: &str,
) -> Result<Registration, StoreError> {
    // Insert, or take over a revoked row; an active registration is left alone.
    let changed = diesel::sql_query(
        "INSERT INTO device_credentials AS c (device_id, token_id) VALUES ($1, $2)
         ON CONFLICT (device_id) DO UPDATE
             SET token_id = EXCLUDED.token_id, revoked_at = NULL,
                 created_at = now(), updated_at = now()
             WHERE c.revoked_at IS NOT NULL",
    )
    .bind::<diesel::sql_types::Text, _>(device_id)
    .bind::<diesel::sql_types::Text, _>(token_id)
    .execute(conn)?;
    Ok(if changed == 1 {
        Registration::Registered
    } else {
        Registration::AlreadyActive
    })
}

/// Revokes the device's token; returns false when there was no active registration.
pub fn revoke_device(conn: &mut PgConnection, device_id: &str) -> Result<bool, StoreError> {
    use device_credentials::dsl as d;
    // The database's clock, as for registrations: the services order a device's changes by
    // updated_at, so both must come from one clock.
    let changed = diesel::update(
        d::device_credentials
            .filter(d::device_id.eq(device_id))
            .filter(d::revoked_at.is_null()),
    )
    .set((
        d::revoked_at.eq(diesel::dsl::now),
        d::updated_at.eq(diesel::dsl::now),
    ))
    .execute(conn)?;
    Ok(changed == 1)
}

pub fn list_credentials(conn: &mut PgConnection) -> Result<Vec<DeviceCredential>, StoreError> {
    use device_credentials::dsl as d;
    Ok(d::device_credentials
        .select(DeviceCredential::as_select())
        .order(d::device_id)
        .load(conn)?)
}

/// Registrations changed at or after `since` (all of them when `None`), oldest change first.
pub fn credential_changes_since(
    conn: &mut PgConnection,
    since: Option<DateTime<Utc>>,
) -> Result<Vec<DeviceCredential>, StoreError> {
    use device_credentials::dsl as d;
    let mut query = d::device_credentials
        .select(DeviceCredential::as_select())
        .order(d::updated_at)
        .into_boxed();
    if let Some(since) = since {
        query = query.filter(d::updated_at.ge(since));
    }
    Ok(query.load(conn)?)
}
