use actix_web::http::{StatusCode, header};
use actix_web::{HttpResponse, ResponseError};
use service_kit::ApiError;
use service_kit::error::retry_after;
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
    #[error("{route} takes {}", allowed.join(", "))]
    MethodNotAllowed {
        route: String,
        allowed: Vec<&'static str>,
    },
    #[error("the request body took too long to arrive")]
    BodyTimeout,
    /// The device's MQTT account could not be made or removed; `done` says what did happen.
    #[error("{done}: {source}")]
    MqttAccount {
        done: String,
        source: mqtt_admin::MqttAdminError,
    },
    /// A JSON body over the extractor's limit.
    #[error("{0}")]
    BodyTooLarge(String),
    #[error("the body must be JSON: send Content-Type: application/json")]
    NotJson,
    #[error("{0}")]
    InvalidBody(String),
    #[error("no app token {0:?}, or it was revoked already")]
    UnknownToken(String),
    #[error("no command {0:?}")]
    UnknownCommand(String),
    #[error("no retention {0}")]
    UnknownRetentionOverride(String),
    #[error("{0}")]
    TooManyOpenCommands(String),
    #[error(transparent)]
    AppToken(#[from] auth::AppTokenRefusal),
    /// A bounded resource is taken (every live stream this replica allows is open).
    #[error("{0}")]
    Busy(String),
}

/// The JSON extractor's failures, with the statuses ingest-http gives the same faults.
impl From<actix_web::error::JsonPayloadError> for QueryError {
    fn from(e: actix_web::error::JsonPayloadError) -> Self {
        use actix_web::error::JsonPayloadError;
        match e {
            JsonPayloadError::OverflowKnownLength { .. } | JsonPayloadError::Overflow { .. } => {
                QueryError::BodyTooLarge(e.to_string())
            }
            JsonPayloadError::ContentType => QueryError::NotJson,
            other => QueryError::InvalidBody(other.to_string()),
        }
    }
}

impl QueryError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidParameter {
            field,
            reason: reason.into(),
        }
    }

    /// A short, fixed label for the audit trail and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            QueryError::InvalidParameter { .. } => "invalid",
            QueryError::UnknownDevice(_) => "not_found",
            QueryError::Store(_) | QueryError::Blocking(_) => "store",
            QueryError::Unauthorized { .. } => "unauthorized",
            QueryError::Forbidden(_) => "forbidden",
            QueryError::RateLimited(_) => "rate_limited",
            QueryError::Conflict(_) => "conflict",
            QueryError::NotConfigured(_) => "not_configured",
            QueryError::MethodNotAllowed { .. } => "method_not_allowed",
            QueryError::BodyTimeout => "timeout",
            QueryError::MqttAccount { .. } => "mqtt_account",
            QueryError::BodyTooLarge(_) => "too_large",
            QueryError::NotJson => "unsupported_media_type",
            QueryError::InvalidBody(_) => "invalid",
            QueryError::UnknownToken(_)
            | QueryError::UnknownCommand(_)
            | QueryError::UnknownRetentionOverride(_) => "not_found",
            QueryError::TooManyOpenCommands(_) => "too_many_commands",
            QueryError::Busy(_) => "busy",
            QueryError::AppToken(auth::AppTokenRefusal::NotLoaded) => "unavailable",
            QueryError::AppToken(_) => "unauthorized",
        }
    }

    /// Refused for its credentials: what a client's refusal budget counts.
    pub fn is_refusal(&self) -> bool {
        match self {
            QueryError::AppToken(refusal) => !matches!(refusal, auth::AppTokenRefusal::NotLoaded),
            QueryError::Unauthorized { .. } | QueryError::Forbidden(_) => true,
            _ => false,
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
                ApiError::unavailable(
                    "the database is unavailable; try again shortly",
                    retry_after::DATABASE_SECS,
                )
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
            QueryError::MethodNotAllowed { .. } => ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                self.to_string(),
            ),
            QueryError::BodyTimeout => {
                ApiError::new(StatusCode::REQUEST_TIMEOUT, "timeout", self.to_string())
            }
            QueryError::MqttAccount { done, source } => {
                tracing::warn!(error = %source, "{done}");
                match source {
                    e if e.is_unavailable() => ApiError::unavailable(
                        format!("{done}: the MQTT broker cannot be reached; try again shortly"),
                        retry_after::MQTT_ADMIN_SECS,
                    ),
                    mqtt_admin::MqttAdminError::NotADeviceAccount(_) => ApiError::new(
                        StatusCode::CONFLICT,
                        "conflict",
                        format!("{done}: {source}"),
                    ),
                    _ => ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        "mqtt_refused",
                        format!("{done}: the MQTT broker refused the change"),
                    ),
                }
            }
            QueryError::BodyTooLarge(reason) => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", reason)
            }
            QueryError::NotJson => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                self.to_string(),
            ),
            QueryError::InvalidBody(reason) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", reason)
            }
            // anything else, a database error that is not an outage included, is a bug or an
            // input the checks missed: logged, and answered without details
            QueryError::UnknownToken(_)
            | QueryError::UnknownCommand(_)
            | QueryError::UnknownRetentionOverride(_) => ApiError::not_found(self.to_string()),
            QueryError::TooManyOpenCommands(reason) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_commands", reason)
            }
            QueryError::AppToken(auth::AppTokenRefusal::NotLoaded) => {
                ApiError::unavailable(self.to_string(), retry_after::REGISTRY_SECS)
            }
            QueryError::AppToken(refusal) => ApiError::unauthorized(refusal.to_string(), true),
            QueryError::Busy(reason) => {
                ApiError::unavailable(reason.clone(), retry_after::BUSY_SECS)
            }
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
            QueryError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            QueryError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            QueryError::MqttAccount { source, .. } => match source {
                e if e.is_unavailable() => StatusCode::SERVICE_UNAVAILABLE,
                mqtt_admin::MqttAdminError::NotADeviceAccount(_) => StatusCode::CONFLICT,
                _ => StatusCode::BAD_GATEWAY,
            },
            QueryError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            QueryError::NotJson => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            QueryError::InvalidBody(_) => StatusCode::BAD_REQUEST,
            QueryError::UnknownToken(_)
            | QueryError::UnknownCommand(_)
            | QueryError::UnknownRetentionOverride(_) => StatusCode::NOT_FOUND,
            QueryError::TooManyOpenCommands(_) => StatusCode::TOO_MANY_REQUESTS,
            QueryError::AppToken(auth::AppTokenRefusal::NotLoaded) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            QueryError::AppToken(_) => StatusCode::UNAUTHORIZED,
            QueryError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = self.to_api_error().error_response();
        if let QueryError::MethodNotAllowed { allowed, .. } = self
            && let Ok(value) = header::HeaderValue::from_str(&allowed.join(", "))
        {
            response.headers_mut().insert(header::ALLOW, value);
        }
        response
    }
}
