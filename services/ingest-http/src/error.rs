use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use bus::PublishError;
use models::ValidationError;
use service_kit::ApiError;
use service_kit::error::retry_after;
use store::commands::Refusal;

/// Everything an ingest request can fail with; mapped to HTTP in one place, below.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("the body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("content type {0:?} is not JSON")]
    UnsupportedMediaType(String),
    #[error("cannot read the request body: {0}")]
    Body(String),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("{reason}")]
    Unauthorized { reason: String, token_sent: bool },
    #[error("{0}")]
    Forbidden(String),
    #[error("rate limited")]
    RateLimited(std::time::Duration),
    #[error("the device registry is not loaded yet; devices cannot be checked")]
    RegistryUnavailable,
    #[error("the request body took too long to arrive")]
    Timeout,
    #[error("PostgreSQL cannot be read now: {0}")]
    Database(String),
    #[error(transparent)]
    Router(#[from] bus::RouterError),
    /// An answer refused: no such command, another device's, or finished or expired.
    #[error("{0}")]
    Command(store::commands::Refusal),
}

impl IngestError {
    /// Every value [`IngestError::kind`] can take (the metrics create each at start-up).
    pub const KINDS: [&'static str; 13] = [
        "invalid",
        "too_large",
        "unsupported_media_type",
        "bad_body",
        "unavailable",
        "unauthorized",
        "forbidden",
        "rate_limited",
        "timeout",
        "no_such_command",
        "not_the_devices",
        "expired",
        "finished",
    ];

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            IngestError::Invalid(_) => "invalid",
            IngestError::TooLarge { .. } => "too_large",
            IngestError::UnsupportedMediaType(_) => "unsupported_media_type",
            IngestError::Body(_) => "bad_body",
            IngestError::Publish(_) | IngestError::RegistryUnavailable => "unavailable",
            IngestError::Unauthorized { .. } => "unauthorized",
            IngestError::Forbidden(_) => "forbidden",
            IngestError::RateLimited(_) => "rate_limited",
            IngestError::Timeout => "timeout",
            IngestError::Database(_) | IngestError::Router(_) => "unavailable",
            IngestError::Command(refusal) => refusal.reason(),
        }
    }
}

impl IngestError {
    /// Refused for its credentials: what a client's refusal budget counts.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            IngestError::Unauthorized { .. } | IngestError::Forbidden(_)
        )
    }
}

impl ResponseError for IngestError {
    fn status_code(&self) -> StatusCode {
        match self {
            IngestError::Invalid(_) | IngestError::Body(_) => StatusCode::BAD_REQUEST,
            IngestError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IngestError::Publish(_)
            | IngestError::RegistryUnavailable
            | IngestError::Database(_)
            | IngestError::Router(_) => StatusCode::SERVICE_UNAVAILABLE,
            IngestError::Command(Refusal::NoSuchCommand) => StatusCode::NOT_FOUND,
            IngestError::Command(Refusal::NotTheDevices) => StatusCode::FORBIDDEN,
            IngestError::Command(Refusal::Finished(_)) => StatusCode::CONFLICT,
            IngestError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            IngestError::Forbidden(_) => StatusCode::FORBIDDEN,
            IngestError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            IngestError::Timeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let error = match self {
            IngestError::Invalid(e) => ApiError::invalid_field(&e.field, &e.reason),
            IngestError::TooLarge { .. } => {
                ApiError::new(status, "payload_too_large", self.to_string())
            }
            IngestError::UnsupportedMediaType(_) => ApiError::new(
                status,
                "unsupported_media_type",
                format!("{self}; send Content-Type: application/json"),
            ),
            IngestError::Body(_) => ApiError::new(status, "invalid_input", self.to_string()),
            IngestError::Publish(e) => {
                // Not stored, or not known to be: the device keeps the reading and retries.
                ApiError::unavailable(
                    format!("readings not accepted, retry later: {e}"),
                    retry_after::BROKER_SECS,
                )
            }
            IngestError::RegistryUnavailable => {
                ApiError::unavailable(self.to_string(), retry_after::REGISTRY_SECS)
            }
            IngestError::Unauthorized { reason, token_sent } => {
                ApiError::unauthorized(reason.clone(), *token_sent)
            }
            IngestError::Forbidden(reason) => ApiError::forbidden(reason.clone()),
            IngestError::RateLimited(wait) => ApiError::too_many_requests(*wait),
            IngestError::Timeout => ApiError::new(status, "timeout", self.to_string()),
            IngestError::Database(_) => {
                ApiError::unavailable(self.to_string(), retry_after::DATABASE_SECS)
            }
            IngestError::Router(_) => {
                ApiError::unavailable(self.to_string(), retry_after::BROKER_SECS)
            }
            IngestError::Command(Refusal::NoSuchCommand) => ApiError::not_found(self.to_string()),
            IngestError::Command(Refusal::NotTheDevices) => ApiError::forbidden(self.to_string()),
            IngestError::Command(refusal @ Refusal::Finished(_)) => {
                ApiError::new(status, refusal.reason(), self.to_string())
            }
        };
        error.error_response()
    }
}

#[cfg(test)]
mod tests {
    use store::commands::{CommandStatus, Refusal};

    use super::IngestError;

    #[test]
    fn every_kind_is_listed_in_kinds() {
        let one_of_each = [
            IngestError::Invalid(models::ValidationError::new("ts", "too old")),
            IngestError::TooLarge { limit: 1 },
            IngestError::UnsupportedMediaType("text/plain".into()),
            IngestError::Body("cut".into()),
            IngestError::Publish(bus::PublishError::Timeout),
            IngestError::Unauthorized {
                reason: "no token".into(),
                token_sent: false,
            },
            IngestError::Forbidden("another device".into()),
            IngestError::RateLimited(std::time::Duration::from_secs(1)),
            IngestError::RegistryUnavailable,
            IngestError::Timeout,
            IngestError::Database("down".into()),
            IngestError::Router(bus::RouterError::Stopped),
            IngestError::Command(Refusal::NoSuchCommand),
            IngestError::Command(Refusal::NotTheDevices),
            IngestError::Command(Refusal::Finished(CommandStatus::Expired)),
            IngestError::Command(Refusal::Finished(CommandStatus::Succeeded)),
        ];
        for error in &one_of_each {
            assert!(
                IngestError::KINDS.contains(&error.kind()),
                "{:?} is not in KINDS",
                error.kind()
            );
        }
    }
}
