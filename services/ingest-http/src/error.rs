use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use bus::PublishError;
use models::ValidationError;
use service_kit::ApiError;

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
}

impl IngestError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            IngestError::Invalid(_) => "invalid",
            IngestError::TooLarge { .. } => "too_large",
            IngestError::UnsupportedMediaType(_) => "unsupported_media_type",
            IngestError::Body(_) => "bad_body",
            IngestError::Publish(_) => "unavailable",
        }
    }
}

impl ResponseError for IngestError {
    fn status_code(&self) -> StatusCode {
        match self {
            IngestError::Invalid(_) | IngestError::Body(_) => StatusCode::BAD_REQUEST,
            IngestError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IngestError::Publish(_) => StatusCode::SERVICE_UNAVAILABLE,
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
                ApiError::unavailable(format!("readings not accepted, retry later: {e}"), 1)
            }
        };
        error.error_response()
    }
}
