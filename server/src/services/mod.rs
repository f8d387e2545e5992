//! Services between the HTTP handlers and the engine, registry, trainer, stores and plugin host,
//! one per resource: what it is and what may be done with it, whatever protocol asks. Handlers
//! parse, call one service function and map its error; services know nothing of HTTP. Every
//! rule about a resource lives in its service (or in the store beneath it), and its blocking work
//! runs through [`blocking`].

pub mod adapters;
mod archive;
pub mod batches;
pub mod error;
pub mod feedback;
pub mod inference;
pub mod plugins;
pub mod responses;
pub mod tuning;

pub use error::ServiceError;

/// Runs blocking work (SQLite, disk, archives, plugin calls, cold adapter loads, tokenizing) on
/// the blocking pool, off the async workers: the one way services do it.
pub(crate) async fn blocking<R: Send + 'static>(f: impl FnOnce() -> Result<R, ServiceError> + Send + 'static) -> Result<R, ServiceError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServiceError::Internal(format!("a blocking task failed: {e}")))?
}
