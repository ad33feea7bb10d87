//! The one JSON error shape of every Sensorhub endpoint, and its mapping to HTTP:
//! `{"error": "<code>", "message": "<for people>", "field": "<where, for bad input>"}`.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde::{Deserialize, Serialize};

/// How long a client is told to wait (`Retry-After`, in seconds) before asking again, by what it
/// waits for. Short enough that a Pi's reading is not held long, long enough that a fleet retrying
/// at once does not keep a recovering dependency down.
pub mod retry_after {
    /// RabbitMQ did not confirm: the publisher reconnects within about a second.
    pub const BROKER_SECS: u64 = 1;
    /// The device registry or the app token list is not loaded yet (start-up, or a re-read).
    pub const REGISTRY_SECS: u64 = 2;
    /// PostgreSQL cannot serve now; the pool reconnects on the next request.
    pub const DATABASE_SECS: u64 = 2;
    /// The MQTT broker's account admin cannot be reached.
    pub const MQTT_ADMIN_SECS: u64 = 5;
    /// `/readyz` failed: a load balancer asks again after this.
    pub const NOT_READY_SECS: u64 = 5;
    /// Every live stream a replica allows is open: another may close, or another replica serve.
    pub const BUSY_SECS: u64 = 10;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Stable and machine-readable: clients branch on this, never on `message`.
    #[schema(example = "invalid_input")]
    pub error: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// An error as it is answered: services map their own error enums into this, in one place each.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status}: {}", body.message)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
    /// Seconds; set on 503 and 429 so well-behaved clients back off.
    pub retry_after: Option<u64>,
    /// Set on 401: how to authenticate.
    pub www_authenticate: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                error: code.to_owned(),
                message: message.into(),
                field: None,
            },
            retry_after: None,
            www_authenticate: None,
        }
    }

    /// 400 naming the field and why it is refused.
    pub fn invalid_field(field: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        let field = field.into();
        let mut e = Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_input",
            format!("{field}: {reason}"),
        );
        e.body.field = Some(field);
        e
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 503 with `Retry-After`: a dependency (broker, database) cannot take the request now.
    pub fn unavailable(message: impl Into<String>, retry_after_secs: u64) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message);
        e.retry_after = Some(retry_after_secs);
        e
    }

    /// 401 with the `WWW-Authenticate` challenge (RFC 6750): `invalid_token` when one was sent.
    pub fn unauthorized(message: impl Into<String>, token_sent: bool) -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message);
        e.www_authenticate = Some(if token_sent {
            "Bearer realm=\"sensorhub\", error=\"invalid_token\""
        } else {
            "Bearer realm=\"sensorhub\""
        });
        e
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 429 with `Retry-After` (whole seconds, at least 1).
    pub fn too_many_requests(retry_after: std::time::Duration) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many requests; slow down",
        );
        e.retry_after = Some(retry_after.as_secs_f64().ceil().max(1.0) as u64);
        e
    }

    /// 500 whose body reveals nothing; the cause is logged here, once.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; it has been logged",
        )
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if let Some(secs) = self.retry_after {
            response.insert_header((header::RETRY_AFTER, HeaderValue::from(secs)));
        }
        if let Some(challenge) = self.www_authenticate {
            response.insert_header((header::WWW_AUTHENTICATE, challenge));
        }
        response.json(&self.body)
    }
}

/// actix's own extractor failures (bad query string, bad path) in our shape.
pub fn query_error(err: actix_web::error::QueryPayloadError) -> actix_web::Error {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", err.to_string()).into()
}

pub fn path_error(err: actix_web::error::PathError) -> actix_web::Error {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", err.to_string()).into()
}

/// The default service: a known path asked with a method it does not take answers 405 with
/// `Allow`; an unknown path 404; both in our shape, not actix's empty body.
pub async fn unknown_route(req: actix_web::HttpRequest) -> HttpResponse {
    let Some(route) = crate::access::route_of(&req) else {
        return ApiError::not_found(format!("no route for {:?}", req.path())).error_response();
    };
    let allowed = crate::access::allowed_methods(&req, &route).join(", ");
    let mut response = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{route} takes {allowed}"),
    )
    .error_response();
    if let Ok(value) = HeaderValue::from_str(&allowed) {
        response.headers_mut().insert(header::ALLOW, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use actix_web::body::to_bytes;

    use super::*;

    #[actix_web::test]
    async fn the_error_shape_is_pinned() {
        let e = ApiError::invalid_field("temperature", "must be a number");
        let response = e.error_response();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let body = to_bytes(response.into_body()).await.unwrap();
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"error":"invalid_input","message":"temperature: must be a number","field":"temperature"}"#
        );
    }

    #[actix_web::test]
    async fn unavailable_carries_retry_after_and_no_field() {
        let response = ApiError::unavailable("broker down", 2).error_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers().get("retry-after").unwrap(), "2");
        let body = to_bytes(response.into_body()).await.unwrap();
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"error":"unavailable","message":"broker down"}"#
        );
    }
}
