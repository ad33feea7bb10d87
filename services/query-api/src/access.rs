//! Deny by default: every request needs a bearer token (`reader`, `operator` or `admin` to read,
//! `operator` or `admin` to command devices, `admin` to change anything else) unless the route it
//! reaches is public (the ops endpoints, the API description). The token's claims, once admitted,
//! go with the request (`web::ReqData<Claims>`) for the handlers that record who asked.
//! Checked here, once, before routing, on the route the router will actually match (see
//! `service_kit::access`), so no handler can forget it and no spelling of a path can skip it.

use std::net::IpAddr;

use actix_web::HttpMessage;
use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::middleware::Next;
use actix_web::web;
use auth::{CachedVerifier, Claims, Role};
use service_kit::access::{
    BearerError, PublicRoutes, RefusalLimit, allowed_methods, bearer_token, matched_route,
    method_label,
};
use service_kit::net::{KeyedLimit, TrustedProxies};

use crate::error::QueryError;

/// The routes whose writes (issuing and cancelling commands) an operator may make too.
const COMMAND_ROUTES: [&str; 2] = ["/v1/devices/{id}/commands", "/v1/commands/{id}"];

pub struct Access {
    pub verifier: CachedVerifier,
    pub app_tokens: std::sync::Arc<auth::AppTokenRegistry>,
    /// Per token.
    pub rate_limit: KeyedLimit,
    /// Per client address, counting refused requests only.
    pub refusals: RefusalLimit,
    pub trusted_proxies: TrustedProxies,
    pub public: PublicRoutes,
}

pub async fn require_token(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let route = matched_route(req.request());
    let Some(access) = req.app_data::<web::Data<Access>>().cloned() else {
        let error = QueryError::NotConfigured("access control is not set up");
        return Ok(req.error_response(error).map_into_right_body());
    };
    if access.public.contains(route.as_deref()) {
        return next
            .call(req)
            .await
            .map(ServiceResponse::map_into_left_body);
    }
    let client = access.trusted_proxies.client_addr(req.request());
    match access.admit(&req, route.as_deref(), client).await {
        Ok(claims) => {
            req.extensions_mut().insert(claims);
            next.call(req)
                .await
                .map(ServiceResponse::map_into_left_body)
        }
        Err(error) => {
            audit_refusal(&req, route.as_deref(), client, &error);
            if error.is_refusal() {
                access.refusals.record(client);
            }
            Ok(req.error_response(error).map_into_right_body())
        }
    }
}

impl Access {
    /// In order: a client over its refusal budget (429), who (401: a valid signature, then a
    /// recorded, unrevoked app token within the lifetime cap, one issued a moment ago looked up
    /// promptly; a device token is a 403), what for (403, or 405 for a method the route does not
    /// take), how often (429).
    async fn admit(
        &self,
        req: &ServiceRequest,
        route: Option<&str>,
        client: Option<IpAddr>,
    ) -> Result<Claims, QueryError> {
        self.refusals
            .check(client)
            .map_err(QueryError::RateLimited)?;
        let claims = self.authenticate(req)?;
        if !claims.role.can_read() {
            return Err(QueryError::Forbidden(format!(
                "a {} token cannot use the query API",
                claims.role.as_str()
            )));
        }
        self.app_tokens.check_promptly(&claims).await?;
        let writes = req.method() != Method::GET && req.method() != Method::HEAD;
        let commands = route.is_some_and(|route| COMMAND_ROUTES.contains(&route));
        let allowed = if commands {
            claims.role.can_command()
        } else {
            claims.role == Role::Admin
        };
        if writes && !allowed {
            // Refused either way; a method the route does not take is named as such.
            if let Some(route) = route {
                let allowed = allowed_methods(req.request(), route);
                if !allowed.contains(&method_label(req.method())) {
                    return Err(QueryError::MethodNotAllowed {
                        route: route.to_owned(),
                        allowed,
                    });
                }
            }
            return Err(QueryError::Forbidden(if commands {
                "commanding devices needs an operator or admin token".into()
            } else {
                "changing anything needs an admin token".into()
            }));
        }
        self.rate_limit
            .check(&claims.jti)
            .map_err(QueryError::RateLimited)?;
        if writes {
            tracing::info!(target: "audit", outcome = "admin_request",
                method = method_label(req.method()), route = route.unwrap_or("unmatched"),
                path = ?req.path(), token.id = %claims.jti, token.sub = ?claims.sub,
                client.addr = %client.map(|a| a.to_string()).unwrap_or_default());
        }
        Ok(claims)
    }

    fn authenticate(&self, req: &ServiceRequest) -> Result<Claims, QueryError> {
        let invalid = |reason: String| QueryError::Unauthorized {
            reason,
            token_sent: true,
        };
        let token = bearer_token(req.headers()).map_err(|e| match e {
            BearerError::Missing => QueryError::Unauthorized {
                reason: "an Authorization: Bearer <token> header is required".into(),
                token_sent: false,
            },
            BearerError::NotBearer => invalid(BearerError::NOT_BEARER.into()),
        })?;
        self.verifier
            .verify(token)
            .map_err(|e| invalid(e.to_string()))
    }
}

/// Every refusal is a line of its own. What the client sent (the path, a token's complaint) is
/// written escaped (`?`), so no request can forge a line of the trail.
fn audit_refusal(
    req: &ServiceRequest,
    route: Option<&str>,
    client: Option<IpAddr>,
    error: &QueryError,
) {
    tracing::info!(target: "audit", outcome = "refused", method = method_label(req.method()),
        route = route.unwrap_or("unmatched"), path = ?req.path(), reason = error.kind(),
        detail = ?error.to_string(),
        client.addr = %client.map(|a| a.to_string()).unwrap_or_default());
}
