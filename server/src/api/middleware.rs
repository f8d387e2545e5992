//! Tower middleware: request metrics, timeouts and panics (keys: `auth`).

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{App, AppError};

/// Counts every response by route and status.
pub async fn record_metrics(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    app.metrics
        .requests
        .with_label_values(&[route.as_str(), response.status().as_str()])
        .inc();
    response
}

/// Bounds the time until a response starts. A streamed response's body is not bounded (its
/// length is, by `max_tokens`); dropping a timed-out handler cancels its generation.
pub async fn timeout(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let limit = app.settings.request_timeout;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => AppError::Timeout(limit.as_secs()).into_response(),
    }
}

/// A panicking handler becomes a 500 in OpenAI's shape; the server keeps serving.
pub fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into());
    AppError::Internal(format!("the request handler panicked: {message}")).into_response()
}
