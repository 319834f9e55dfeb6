//! The API's error type and its JSON rendering.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use flotilla_store::{CommandResult, StoreError};
use flotilla_types::api::ApiErrorBody;
use flotilla_types::FieldError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    Invalid {
        message: String,
        fields: Vec<FieldError>,
    },
    /// The request is larger than a limit; the message names it.
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unauthorized(String),
    /// Authenticated, but this identity may not do that.
    #[error("{0}")]
    Forbidden(String),
    /// No leader, lost quorum, or this manager is not the leader.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, fields: Vec<FieldError>) -> Self {
        ApiError::Invalid {
            message: message.into(),
            fields,
        }
    }

    fn code(&self) -> (&'static str, StatusCode) {
        match self {
            ApiError::Invalid { .. } => ("invalid", StatusCode::BAD_REQUEST),
            ApiError::TooLarge(_) => ("too_large", StatusCode::PAYLOAD_TOO_LARGE),
            ApiError::NotFound(_) => ("not_found", StatusCode::NOT_FOUND),
            ApiError::Conflict(_) => ("conflict", StatusCode::CONFLICT),
            ApiError::Unauthorized(_) => ("unauthorized", StatusCode::UNAUTHORIZED),
            ApiError::Forbidden(_) => ("forbidden", StatusCode::FORBIDDEN),
            ApiError::Unavailable(_) => ("unavailable", StatusCode::SERVICE_UNAVAILABLE),
            ApiError::Internal(_) => ("internal", StatusCode::INTERNAL_SERVER_ERROR),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotLeader { .. } | StoreError::Unavailable(_) => {
                ApiError::Unavailable(e.to_string())
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// Turns a non-applied command result into the matching error.
pub fn check_applied(result: CommandResult) -> Result<u64, ApiError> {
    match result {
        CommandResult::Applied { revision } => Ok(revision),
        CommandResult::Conflict { reason, .. } => Err(ApiError::Conflict(reason)),
        CommandResult::NotFound { reason, .. } => Err(ApiError::NotFound(reason)),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, status) = self.code();
        let fields = match &self {
            ApiError::Invalid { fields, .. } => fields.clone(),
            _ => Vec::new(),
        };
        // A full disk is logged by the store, at most once a minute, not once per request.
        let disk_full = matches!(&self, ApiError::Unavailable(m) if m.contains(flotilla_store::disk::DISK_FULL));
        if status.is_server_error() && !disk_full {
            tracing::warn!(error = %self, "request failed");
        }
        let body = ApiErrorBody {
            code: code.to_string(),
            message: self.to_string(),
            fields,
        };
        (status, axum::Json(body)).into_response()
    }
}
