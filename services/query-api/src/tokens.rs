//! App tokens: query-api follows the list of issued tokens in PostgreSQL (so a revoked one is refused
//! at once), and admins list and revoke them through `GET /v1/tokens` and `DELETE /v1/tokens/{id}`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, delete, get, web};
use anyhow::Context;
use auth::{AppTokenChange, AppTokenRegistry, CachedVerifier, Follower, Role};
use chrono::{DateTime, Utc};
use serde::Serialize;
use service_kit::Readiness;
use store::PgPool;
use utoipa::ToSchema;

use crate::api::{PageParams, id_page, with_conn};
use crate::error::QueryError;
use crate::settings::Settings;

/// Reads of the list (notified, or asked for by a token issued a moment ago) are spaced at least
/// this much, however many ask.
const MIN_READ_SPACING: Duration = Duration::from_millis(50);
/// A token id still unknown after a prompt read does not cause another for this long.
const UNKNOWN_FOR: Duration = Duration::from_secs(5);

/// The list of app tokens, followed from PostgreSQL: read now, at each change PostgreSQL notifies,
/// and every `auth_refresh_ms` in any case; `/readyz` fails (check `app_tokens`) once it could not
/// be read for `auth_registry_max_age_secs`. Returns once the first read is done (or a few seconds
/// passed), so that the service does not start by refusing every token.
pub async fn follow_app_tokens(
    settings: &Settings,
    pool: &PgPool,
    readiness: Readiness,
) -> anyhow::Result<(Arc<AppTokenRegistry>, Readiness, store::listen::Listener)> {
    let follower = Follower::new(MIN_READ_SPACING);
    let registry = Arc::new(AppTokenRegistry::with_prompt_reads(
        Duration::from_secs(settings.app_token_max_ttl_secs),
        follower.clone(),
        UNKNOWN_FOR,
    ));
    let notifications = service_kit::postgres::follow_notifications(
        &settings.database.database_url,
        store::listen::APP_TOKENS_CHANNEL,
        "query-api app token listener",
        &follower,
    )
    .context("starting the app token listener")?;
    let interval = Duration::from_millis(settings.auth_refresh_ms.max(100));
    let pool = pool.clone();
    tokio::spawn(auth::keep_fresh(
        registry.clone(),
        follower.clone(),
        interval,
        move |since, _cause| {
            let pool = pool.clone();
            async move {
                tokio::task::spawn_blocking(move || load_changes(&pool, since))
                    .await
                    .map_err(|e| e.to_string())?
            }
        },
    ));
    // Never less than a few refreshes, so one slow read does not take the service out of rotation.
    let max_age = Duration::from_secs(settings.auth_registry_max_age_secs)
        .max(interval * 5 + Duration::from_secs(5));
    let ready_registry = registry.clone();
    let readiness = readiness.with_check("app_tokens", move || {
        let health = ready_registry.health(max_age);
        async move { health }
    });
    follower.read_now().await;
    Ok((registry, readiness, notifications))
}

fn load_changes(
    pool: &PgPool,
    since: Option<DateTime<Utc>>,
) -> Result<Vec<AppTokenChange>, String> {
    let mut conn = pool.get().map_err(|e| e.to_string())?;
    let rows =
        store::app_tokens::app_token_changes_since(&mut conn, since).map_err(|e| e.to_string())?;
    Ok(rows
        .into_iter()
        .map(|t| AppTokenChange {
            revoked: t.revoked_at.is_some(),
            id: t.id,
            expires_at: t.expires_at,
            updated_at: t.updated_at,
        })
        .collect())
}

/// The token routes' own view of the caller's token (the access check admitted any app token).
pub struct AppTokens {
    verifier: CachedVerifier,
}

impl AppTokens {
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        Ok(Self {
            verifier: CachedVerifier::new(
                auth::TokenVerifier::from_file(Path::new(&settings.auth_public_key_file))
                    .context("loading auth_public_key_file")?,
                10_000,
            ),
        })
    }

    fn claims(&self, headers: &header::HeaderMap) -> Option<auth::Claims> {
        let token = service_kit::access::bearer_token(headers).ok()?;
        self.verifier.verify(token).ok()
    }

    /// The token routes are for admins only, reads included: the list names every app and its
    /// token id. (The access check before them let in any app token.)
    fn require_admin(&self, req: &HttpRequest) -> Result<(), QueryError> {
        let claims = self
            .claims(req.headers())
            .ok_or_else(|| QueryError::Unauthorized {
                reason: "an admin token is required".into(),
                token_sent: req.headers().contains_key(header::AUTHORIZATION),
            })?;
        if claims.role != Role::Admin {
            return Err(QueryError::Forbidden(
                "listing and revoking app tokens needs an admin token".into(),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AppToken {
    /// The token's id (its `jti`): logged in its place, and what revocation names.
    #[schema(example = "0b9f6d2c1e8a4f7d9c3b5a1e2f4d6c8b")]
    pub id: String,
    /// Who it was issued for.
    #[schema(example = "dashboard")]
    pub name: String,
    /// `reader` or `admin`.
    pub role: String,
    /// `active`, `revoked` or `expired`.
    pub state: &'static str,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AppTokenList {
    pub tokens: Vec<AppToken>,
    /// Pass as `cursor` for the next page; null when there is none.
    pub next_cursor: Option<String>,
}

impl From<store::app_tokens::AppToken> for AppToken {
    fn from(t: store::app_tokens::AppToken) -> Self {
        let state = if t.revoked_at.is_some() {
            "revoked"
        } else if t.expires_at <= Utc::now() {
            "expired"
        } else {
            "active"
        };
        Self {
            id: t.id,
            name: t.name,
            role: t.role,
            state,
            issued_at: t.issued_at,
            expires_at: t.expires_at,
            revoked_at: t.revoked_at,
        }
    }
}

/// Every app token issued, by id, with its state (admin).
#[utoipa::path(
    tag = "tokens",
    params(PageParams),
    responses(
        (status = 200, description = "A page of app tokens, newest first", body = AppTokenList),
        (status = 400, description = "A bad `limit` or `cursor`", body = service_kit::ErrorBody),
        (status = 403, description = "Not an admin token", body = service_kit::ErrorBody),
    )
)]
#[get("/v1/tokens")]
pub(crate) async fn list_tokens(
    req: HttpRequest,
    admins: web::Data<AppTokens>,
    pool: web::Data<PgPool>,
    query: web::Query<PageParams>,
) -> Result<web::Json<AppTokenList>, QueryError> {
    admins.require_admin(&req)?;
    let (tokens, next_cursor) =
        id_page(&pool, &query, store::app_tokens::list_app_tokens, |t| &t.id).await?;
    Ok(web::Json(AppTokenList {
        tokens: tokens.into_iter().map(AppToken::from).collect(),
        next_cursor,
    }))
}

/// Revokes an app token (admin): query-api refuses it from then on.
#[utoipa::path(
    tag = "tokens",
    params(("id" = String, Path, description = "Token id (its `jti`): 1–64 letters, digits, `-` or `_`")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 400, description = "Not a token id", body = service_kit::ErrorBody),
        (status = 403, description = "Not an admin token", body = service_kit::ErrorBody),
        (status = 404, description = "No such token, or revoked already", body = service_kit::ErrorBody),
    )
)]
#[delete("/v1/tokens/{id}")]
pub(crate) async fn revoke_token(
    req: HttpRequest,
    admins: web::Data<AppTokens>,
    pool: web::Data<PgPool>,
    id: web::Path<String>,
) -> Result<HttpResponse, QueryError> {
    admins.require_admin(&req)?;
    let id = id.into_inner();
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(QueryError::invalid(
            "id",
            "a token id is 1 to 64 letters, digits, '-' or '_'",
        ));
    }
    let lookup = id.clone();
    if with_conn(&pool, move |conn| {
        store::app_tokens::revoke_app_token(conn, &lookup)
    })
    .await?
    {
        Ok(HttpResponse::NoContent().finish())
    } else {
        Err(QueryError::UnknownToken(id))
    }
}

/// The token a request came with, as query-api sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Me {
    /// The app's name (the token's `sub`).
    #[schema(example = "dashboard")]
    pub name: String,
    /// `reader`, `operator` or `admin`: what the token may do.
    #[schema(value_type = String, example = "operator")]
    pub role: Role,
    /// The token's id (its `jti`): what revocation names.
    pub token_id: String,
    pub expires_at: Option<DateTime<Utc>>,
    /// May send devices commands and cancel them (operator, admin).
    pub can_command: bool,
    /// May register and revoke devices and tokens (admin).
    pub can_manage: bool,
}

/// Who the token is: its name, role and expiry, so that an app (the dashboard) offers only what
/// the role may do.
#[utoipa::path(
    tag = "tokens",
    responses(
        (status = 200, description = "The token's name, role and expiry", body = Me),
    )
)]
#[get("/v1/me")]
pub(crate) async fn me(claims: web::ReqData<auth::Claims>) -> web::Json<Me> {
    let claims = claims.into_inner();
    web::Json(Me {
        can_command: claims.role.can_command(),
        can_manage: claims.role == Role::Admin,
        name: claims.sub,
        role: claims.role,
        token_id: claims.jti,
        expires_at: claims
            .exp
            .and_then(|exp| DateTime::<Utc>::from_timestamp(exp, 0)),
    })
}
