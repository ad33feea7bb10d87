//! Every `/v1` request carries a bearer token: `reader` or `admin` to read, `admin` to change
//! anything. Checked here, once, for every route, so no handler can forget it.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{Method, header};
use actix_web::middleware::Next;
use actix_web::web;
use auth::{CachedVerifier, Role};
use service_kit::net::{KeyedLimit, TrustedProxies};

use crate::error::QueryError;

pub struct Access {
    pub verifier: CachedVerifier,
    pub app_tokens: std::sync::Arc<auth::AppTokenRegistry>,
    pub rate_limit: KeyedLimit,
    pub trusted_proxies: TrustedProxies,
}

pub async fn require_token(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    if req.path().starts_with("/v1/") || req.path() == "/v1" {
        check(&req)?;
    }
    next.call(req).await
}

fn check(req: &ServiceRequest) -> Result<(), QueryError> {
    let Some(access) = req.app_data::<web::Data<Access>>() else {
        return Err(QueryError::NotConfigured("access control is not set up"));
    };
    let header =
        req.headers()
            .get(header::AUTHORIZATION)
            .ok_or_else(|| QueryError::Unauthorized {
                reason: "an Authorization: Bearer <token> header is required".into(),
                token_sent: false,
            })?;
    let invalid = |reason: String| QueryError::Unauthorized {
        reason,
        token_sent: true,
    };
    let token = header
        .to_str()
        .ok()
        .and_then(auth::bearer_token)
        .ok_or_else(|| invalid("the Authorization header is not `Bearer <token>`".into()))?;
    let claims = access
        .verifier
        .verify(token)
        .map_err(|e| invalid(e.to_string()))?;
    let writes = req.method() != Method::GET && req.method() != Method::HEAD;
    if !claims.role.can_read() {
        return Err(QueryError::Forbidden(format!(
            "a {} token cannot use the query API",
            claims.role.as_str()
        )));
    }
    if writes && claims.role != Role::Admin {
        return Err(QueryError::Forbidden(
            "managing devices needs an admin token".into(),
        ));
    }
    access.app_tokens.check(&claims)?; // recorded, not revoked, lifetime within the cap
    access
        .rate_limit
        .check(&claims.jti)
        .map_err(QueryError::RateLimited)?;
    if writes {
        let client = access.trusted_proxies.client_addr(req.request());
        tracing::info!(target: "audit", method = %req.method(), path = req.path(),
            token.id = %claims.jti, token.sub = %claims.sub,
            client.addr = %client.map(|a| a.to_string()).unwrap_or_default(), "admin request");
    }
    Ok(())
}
