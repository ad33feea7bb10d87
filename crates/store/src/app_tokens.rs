//! App tokens (roles reader and admin) by id: recorded when issued, so that they can be listed and
//! revoked. The token itself is never stored.

use chrono::{DateTime, Utc};
use diesel::prelude::*;

use crate::StoreError;
use crate::schema::app_tokens;

#[derive(Debug, Clone, PartialEq, Queryable, Selectable)]
#[diesel(table_name = app_tokens)]
pub struct AppToken {
    /// The JWT's `jti`.
    pub id: String,
    /// Who it was issued for (the JWT's `sub`).
    pub name: String,
    /// `reader` or `admin`.
    pub role: String,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

/// Records a newly issued token (before it is handed out: a token not recorded is refused).
pub fn record_app_token(
    conn: &mut PgConnection,
    id: &str,
    name: &str,
    role: &str,
    issued_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> Result<(), StoreError> {
    use app_tokens::dsl as t;
    diesel::insert_into(t::app_tokens)
        .values((
            t::id.eq(id),
            t::name.eq(name),
            t::role.eq(role),
            t::issued_at.eq(issued_at),
            t::expires_at.eq(expires_at),
            t::updated_at.eq(diesel::dsl::now),
        ))
        .execute(conn)?;
    Ok(())
}

/// Revokes the token `id`; false when there is no such token or it was revoked already.
pub fn revoke_app_token(conn: &mut PgConnection, id: &str) -> Result<bool, StoreError> {
    use app_tokens::dsl as t;
    let changed = diesel::update(
        t::app_tokens
            .filter(t::id.eq(id))
            .filter(t::revoked_at.is_null()),
    )
    .set((
        t::revoked_at.eq(diesel::dsl::now),
        t::updated_at.eq(diesel::dsl::now),
    ))
    .execute(conn)?;
    Ok(changed == 1)
}

/// Tokens by id, after `after` (for paging), at most `limit`.
pub fn list_app_tokens(
    conn: &mut PgConnection,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<AppToken>, StoreError> {
    use app_tokens::dsl as t;
    let mut query = t::app_tokens
        .select(AppToken::as_select())
        .order(t::id)
        .limit(limit)
        .into_boxed();
    if let Some(after) = after {
        query = query.filter(t::id.gt(after.to_owned()));
    }
    Ok(query.load(conn)?)
}

/// Tokens changed at or after `since`, oldest change first. With no `since` (the first read), only
/// tokens not yet expired: expired ones are refused by their `exp` anyway.
pub fn app_token_changes_since(
    conn: &mut PgConnection,
    since: Option<DateTime<Utc>>,
) -> Result<Vec<AppToken>, StoreError> {
    use app_tokens::dsl as t;
    let mut query = t::app_tokens
        .select(AppToken::as_select())
        .order(t::updated_at)
        .into_boxed();
    query = match since {
        Some(since) => query.filter(t::updated_at.ge(since)),
        None => query.filter(t::expires_at.gt(diesel::dsl::now)),
    };
    Ok(query.load(conn)?)
}
