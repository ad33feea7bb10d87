//! Who is writing: a device with its current token, or (development only) anyone. Deny by
//! default: every request needs a device token unless the route it reaches is public (the ops
//! endpoints, the API description), decided on the route the router will actually match (see
//! `service_kit::access`); the handlers get the admitted [`Writer`] from the request.

use std::sync::Arc;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{HttpMessage, HttpRequest, web};
use auth::{Access, CachedVerifier, DeviceRegistry, Role};
use service_kit::ApiError;
use service_kit::access::{BearerError, bearer_token, matched_route};

use crate::api::{IngestState, endpoint_label};
use crate::error::IngestError;

/// Middleware (`actix_web::middleware::from_fn`): admits a writer or answers the refusal.
pub async fn require_device(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let Some(state) = req.app_data::<web::Data<IngestState>>().cloned() else {
        // the server was put together without the device check: its fault, not the client's
        let error = ApiError::internal(&"access control is not set up");
        return Ok(req.error_response(error).map_into_right_body());
    };
    let route = matched_route(req.request());
    // Public, or the WebSocket: its handler authenticates the device itself (with the header, as
    // here, or with a token a browser can send: the subprotocol, the first frame) before it does
    // anything else.
    if state.public.contains(route.as_deref()) || route.as_deref() == Some(crate::ws::ROUTE) {
        return next
            .call(req)
            .await
            .map(ServiceResponse::map_into_left_body);
    }
    let client = state.trusted_proxies.client_addr(req.request());
    let admitted = match state.refusals.check(client) {
        Ok(()) => state.authenticator.authenticate(req.request()).await,
        Err(wait) => Err(IngestError::RateLimited(wait)),
    };
    match admitted {
        Ok(writer) => {
            req.extensions_mut().insert(writer);
            next.call(req)
                .await
                .map(ServiceResponse::map_into_left_body)
        }
        Err(error) => {
            if error.is_refusal() {
                state.refusals.record(client);
            }
            let endpoint = endpoint_label(route.as_deref());
            state.record_refusal(endpoint, None, client, &error);
            Ok(req.error_response(error).map_into_right_body())
        }
    }
}

/// The writer of a request, for the device check and the audit trail.
#[derive(Debug, Clone)]
pub enum Writer {
    Device {
        id: String,
        token_id: String,
    },
    /// `auth_allow_anonymous`: local development only.
    Anonymous,
}

impl Writer {
    pub fn device_id(&self) -> Option<&str> {
        match self {
            Writer::Device { id, .. } => Some(id),
            Writer::Anonymous => None,
        }
    }

    pub fn token_id(&self) -> Option<&str> {
        match self {
            Writer::Device { token_id, .. } => Some(token_id),
            Writer::Anonymous => None,
        }
    }
}

pub struct Authenticator {
    /// None only when anonymous ingest is allowed and no key is configured.
    pub verifier: Option<CachedVerifier>,
    pub registry: Arc<DeviceRegistry>,
    pub allow_anonymous: bool,
}

impl Authenticator {
    pub async fn authenticate(&self, req: &HttpRequest) -> Result<Writer, IngestError> {
        let invalid = |reason: String| IngestError::Unauthorized {
            reason,
            token_sent: true,
        };
        let token = match bearer_token(req.headers()) {
            Ok(token) => token,
            Err(BearerError::Missing) if self.allow_anonymous => return Ok(Writer::Anonymous),
            Err(BearerError::Missing) => {
                return Err(IngestError::Unauthorized {
                    reason: "an Authorization: Bearer <device token> header is required".into(),
                    token_sent: false,
                });
            }
            Err(BearerError::NotBearer) => return Err(invalid(BearerError::NOT_BEARER.into())),
        };
        self.admit_token(token).await
    }

    /// The device a token lets write: a valid device token, not revoked or replaced. The one
    /// check for HTTP (the Bearer header) and MQTT (the password, see `rabbitmq_auth`).
    pub async fn admit_token(&self, token: &str) -> Result<Writer, IngestError> {
        let invalid = |reason: String| IngestError::Unauthorized {
            reason,
            token_sent: true,
        };
        let Some(verifier) = &self.verifier else {
            return Err(invalid(
                "tokens cannot be checked: no key is configured".into(),
            ));
        };
        let claims = verifier.verify(token).map_err(|e| invalid(e.to_string()))?;
        if claims.role != Role::Device {
            return Err(IngestError::Forbidden(format!(
                "a {} token cannot write readings; use the device's token",
                claims.role.as_str()
            )));
        }
        match self.registry.check_promptly(&claims.sub, &claims.jti).await {
            Access::Allowed => Ok(Writer::Device {
                id: claims.sub,
                token_id: claims.jti,
            }),
            Access::Refused => Err(invalid(
                "the device is not registered, or this token was revoked or replaced".into(),
            )),
            Access::NotLoaded => Err(IngestError::RegistryUnavailable),
        }
    }
}

#[cfg(test)]
mod tests {
    use actix_web::middleware::from_fn;
    use actix_web::{App, HttpResponse, test};

    use super::*;

    #[actix_web::test]
    async fn a_server_without_the_device_check_answers_500() {
        let app = test::init_service(
            App::new()
                .wrap(from_fn(require_device))
                .route("/data", web::post().to(HttpResponse::Ok)),
        )
        .await;
        let response =
            test::call_service(&app, test::TestRequest::post().uri("/data").to_request()).await;
        assert_eq!(response.status(), 500);
        let body: serde_json::Value = test::read_body_json(response).await;
        assert_eq!(body["error"], "internal", "{body}");
    }
}
