//! The one place where errors become HTTP responses, in OpenAI's shape:
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::engine::SubmitError;
use crate::services::ServiceError;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{message}")]
    InvalidParameter {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    #[error("The model `{0}` does not exist")]
    ModelNotFound(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// A plugin misbehaved (panicked, returned garbage) or is marked failed.
    #[error("{0}")]
    PluginFailed(String),
    #[error(
        "This model's maximum context length is {limit} tokens. However, you requested {requested} tokens ({prompt} in the prompt, {completion} for the completion). Please reduce the prompt or the completion length."
    )]
    ContextLength {
        limit: usize,
        requested: usize,
        prompt: usize,
        completion: usize,
        param: &'static str,
    },
    #[error("Incorrect or missing API key. Send it as `Authorization: Bearer <key>`.")]
    Unauthorized,
    #[error("This route needs a key of the `{0}` scope.")]
    InsufficientScope(&'static str),
    #[error("{0}")]
    NotOwner(String),
    #[error("The server is at capacity ({waiting} requests waiting); retry shortly.")]
    Overloaded { waiting: usize },
    #[error("{message}")]
    BadBody { status: StatusCode, message: String },
    #[error("The request took longer than {0} seconds.")]
    Timeout(u64),
    #[error("The server is shutting down.")]
    Unavailable,
    #[error("Internal error: {0}")]
    Internal(String),
}

impl AppError {
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::InvalidParameter {
            message: message.into(),
            param: Some(param.to_string()),
            code: None,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::InvalidParameter { .. } | Self::ContextLength { .. } => StatusCode::BAD_REQUEST,
            Self::ModelNotFound(_) | Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PluginFailed(_) => StatusCode::BAD_GATEWAY,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::InsufficientScope(_) | Self::NotOwner(_) => StatusCode::FORBIDDEN,
            Self::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::BadBody { status, .. } => *status,
            Self::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn body(&self) -> ErrorResponse {
        let (kind, param, code) = match self {
            Self::InvalidParameter { param, code, .. } => {
                ("invalid_request_error", param.clone(), code.map(str::to_string))
            }
            Self::ModelNotFound(_) => (
                "invalid_request_error",
                Some("model".into()),
                Some("model_not_found".into()),
            ),
            Self::NotFound(_) => ("invalid_request_error", None, Some("not_found".into())),
            Self::Conflict(_) => ("invalid_request_error", None, Some("conflict".into())),
            Self::PluginFailed(_) => ("server_error", None, Some("plugin_failed".into())),
            Self::ContextLength { param, .. } => (
                "invalid_request_error",
                Some(param.to_string()),
                Some("context_length_exceeded".into()),
            ),
            Self::Unauthorized => ("invalid_request_error", None, Some("invalid_api_key".into())),
            Self::InsufficientScope(scope) => ("invalid_request_error", None, Some(format!("{scope}_key_required"))),
            Self::NotOwner(_) => ("invalid_request_error", None, Some("not_owner".into())),
            Self::Overloaded { .. } => ("rate_limit_exceeded", None, Some("queue_full".into())),
            Self::BadBody { .. } => ("invalid_request_error", None, None),
            Self::Timeout(_) => ("timeout", None, Some("request_timeout".into())),
            Self::Unavailable => ("server_error", None, Some("shutting_down".into())),
            Self::Internal(_) => ("server_error", None, None),
        };
        ErrorResponse {
            error: ErrorBody {
                message: self.to_string(),
                r#type: kind.to_string(),
                param,
                code,
            },
        }
    }
}

impl From<SubmitError> for AppError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull(waiting) => Self::Overloaded { waiting },
            SubmitError::Stopped => Self::Unavailable,
            SubmitError::ExceedsKvCache { requested, limit, prompt } => Self::ContextLength {
                limit,
                requested,
                prompt,
                completion: requested - prompt,
                param: "max_tokens",
            },
        }
    }
}

impl From<ServiceError> for AppError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Invalid { param, message, code } => Self::InvalidParameter { message, param, code },
            ServiceError::ModelNotFound(model) => Self::ModelNotFound(model),
            ServiceError::NotFound(message) => Self::NotFound(message),
            ServiceError::Conflict(message) => Self::Conflict(message),
            ServiceError::NotOwner(message) => Self::NotOwner(message),
            ServiceError::PluginFailed(message) => Self::PluginFailed(message),
            ServiceError::ContextLength { limit, requested, prompt, completion, param } => {
                Self::ContextLength { limit, requested, prompt, completion, param }
            }
            ServiceError::Submit(e) => e.into(),
            ServiceError::TooLarge(message) => Self::BadBody { status: StatusCode::PAYLOAD_TOO_LARGE, message },
            disabled @ ServiceError::TuningDisabled => Self::InvalidParameter {
                message: disabled.to_string(),
                param: None,
                code: Some("tuning_disabled"),
            },
            ServiceError::Internal(message) => Self::Internal(message),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        if matches!(self, Self::Internal(_)) {
            tracing::error!(error = %self, "internal error");
        }
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        if let Self::Overloaded { .. } = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// OpenAI's error envelope.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub message: String,
    pub r#type: String,
    pub param: Option<String>,
    pub code: Option<String>,
}
