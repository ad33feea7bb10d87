use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use service_kit::ApiError;
use store::StoreError;

/// Everything a query-api request can fail with; mapped to HTTP in one place, below.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{field}: {reason}")]
    InvalidParameter { field: &'static str, reason: String },
    #[error("no device {0:?}")]
    UnknownDevice(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the database call was cancelled: {0}")]
    Blocking(#[from] actix_web::error::BlockingError),
    #[error("{reason}")]
    Unauthorized { reason: String, token_sent: bool },
    #[error("{0}")]
    Forbidden(String),
    #[error("rate limited")]
    RateLimited(std::time::Duration),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotConfigured(&'static str),
    #[error("no app token {0:?}, or it was revoked already")]
    UnknownToken(String),
    #[error(transparent)]
    AppToken(#[from] auth::AppTokenRefusal),
}

impl QueryError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidParameter {
            field,
            reason: reason.into(),
        }
    }

    fn to_api_error(&self) -> ApiError {
        match self {
            QueryError::InvalidParameter { field, reason } => {
                ApiError::invalid_field(*field, reason)
            }
            QueryError::UnknownDevice(id) => ApiError::not_found(format!("no device {id:?}")),
            QueryError::Store(e) if e.is_transient() => {
                tracing::warn!(error = %e, "database unavailable");
                ApiError::unavailable("the database is unavailable; try again shortly", 2)
            }
            QueryError::Unauthorized { reason, token_sent } => {
                ApiError::unauthorized(reason.clone(), *token_sent)
            }
            QueryError::Forbidden(reason) => ApiError::forbidden(reason.clone()),
            QueryError::RateLimited(wait) => ApiError::too_many_requests(*wait),
            QueryError::Conflict(reason) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", reason.clone())
            }
            QueryError::NotConfigured(reason) => {
                ApiError::new(StatusCode::NOT_IMPLEMENTED, "not_configured", *reason)
            }
            QueryError::UnknownToken(_) => ApiError::not_found(self.to_string()),
            QueryError::AppToken(auth::AppTokenRefusal::NotLoaded) => {
                ApiError::unavailable(self.to_string(), 1)
            }
            QueryError::AppToken(refusal) => ApiError::unauthorized(refusal.to_string(), true),
            other => ApiError::internal(other),
        }
    }
}

impl ResponseError for QueryError {
    fn status_code(&self) -> StatusCode {
        match self {
            QueryError::InvalidParameter { .. } => StatusCode::BAD_REQUEST,
            QueryError::UnknownDevice(_) => StatusCode::NOT_FOUND,
            QueryError::Store(e) if e.is_transient() => StatusCode::SERVICE_UNAVAILABLE,
            QueryError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            QueryError::Forbidden(_) => StatusCode::FORBIDDEN,
            QueryError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            QueryError::Conflict(_) => StatusCode::CONFLICT,
            QueryError::NotConfigured(_) => StatusCode::NOT_IMPLEMENTED,
            QueryError::UnknownToken(_) => StatusCode::NOT_FOUND,
            QueryError::AppToken(auth::AppTokenRefusal::NotLoaded) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            QueryError::AppToken(_) => StatusCode::UNAUTHORIZED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        self.to_api_error().error_response()
    }
}
