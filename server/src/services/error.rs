//! The services' one error type. It says what went wrong in terms any protocol can answer; the
//! HTTP layer maps it to statuses in one place (`api/error.rs`).

use crate::engine::SubmitError;
use crate::plugins::PluginError;
use crate::store::StoreError;
use crate::train::job::TuneError;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A client's value is out of range or names nothing usable; `param` names it.
    #[error("{message}")]
    Invalid { param: Option<String>, message: String, code: Option<&'static str> },
    #[error("The model `{0}` does not exist")]
    ModelNotFound(String),
    #[error("{0}")]
    NotFound(String),
    /// The resource is held by something else (an adapter's active job).
    #[error("{0}")]
    Conflict(String),
    /// The resource belongs to another scope.
    #[error("{0}")]
    NotOwner(String),
    /// A plugin misbehaved (panicked, returned garbage) or is marked failed.
    #[error("{0}")]
    PluginFailed(String),
    #[error(
        "This model's maximum context length is {limit} tokens. However, you requested {requested} tokens ({prompt} in the prompt, {completion} for the completion). Please reduce the prompt or the completion length."
    )]
    ContextLength { limit: usize, requested: usize, prompt: usize, completion: usize, param: &'static str },
    /// The engine did not take the request (queue full, shutting down, never fits the cache).
    #[error(transparent)]
    Submit(#[from] SubmitError),
    /// An input over a size limit (a batch file with too many lines).
    #[error("{0}")]
    TooLarge(String),
    #[error("Online tuning is off on this server (start it with a tuning directory).")]
    TuningDisabled,
    #[error("Internal error: {0}")]
    Internal(String),
}

impl ServiceError {
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::Invalid { param: Some(param.to_string()), message: message.into(), code: None }
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::Internal(e.to_string())
    }
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        Self::Internal(e.to_string())
    }
}

impl From<TuneError> for ServiceError {
    fn from(e: TuneError) -> Self {
        match e {
            busy @ TuneError::Busy { .. } => Self::Conflict(busy.to_string()),
            TuneError::NotOwner(message) => Self::NotOwner(message),
            TuneError::Invalid(message) => Self::Invalid { param: None, message, code: None },
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<PluginError> for ServiceError {
    fn from(e: PluginError) -> Self {
        match e {
            PluginError::NotFound(_) => Self::NotFound(e.to_string()),
            PluginError::Refused(message) => Self::Invalid { param: None, message, code: Some("plugin_refused") },
            PluginError::Panicked { .. } | PluginError::Garbage { .. } | PluginError::Failed { .. } => Self::PluginFailed(e.to_string()),
            // Everything else is about the library a load named.
            other => Self::Invalid { param: Some("path".into()), message: other.to_string(), code: Some("plugin_load_failed") },
        }
    }
}
