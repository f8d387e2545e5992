//! Tower middleware: API keys, request metrics, timeouts and panics.

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::{App, AppError};

/// Routes anyone may call.
const PUBLIC: [&str; 2] = ["/health", "/openapi.json"];
/// Routes that need the admin key (or, without one, the API key).
const ADMIN: [&str; 5] = ["/metrics", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/adapters", "/v1/plugins"];

/// Managing adapters is the admin's; feedback on them is every user's.
fn is_admin(path: &str) -> bool {
    ADMIN.contains(&path)
        || path.starts_with("/v1/plugins/")
        || (path.starts_with("/v1/adapters/") && !path.ends_with("/feedback"))
}

fn key_matches(expected: &Option<String>, given: Option<&str>) -> bool {
    match (expected, given) {
        (Some(expected), Some(given)) => bool::from(expected.as_bytes().ct_eq(given.as_bytes())),
        _ => false,
    }
}

/// Inference routes need the API key (the admin key also works) when one is set; admin routes
/// need the admin key when one is set. Keys are compared in constant time.
pub async fn authenticate(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if PUBLIC.contains(&path) {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let settings = &app.settings;
    let allowed = if is_admin(path) {
        match (&settings.admin_key, &settings.api_key) {
            (Some(_), _) => key_matches(&settings.admin_key, given),
            (None, Some(_)) => key_matches(&settings.api_key, given),
            (None, None) => true,
        }
    } else {
        settings.api_key.is_none()
            || key_matches(&settings.api_key, given)
            || key_matches(&settings.admin_key, given)
    };
    if !allowed {
        return if is_admin(path) && key_matches(&settings.api_key, given) {
            AppError::AdminOnly.into_response()
        } else {
            AppError::Unauthorized.into_response()
        };
    }
    next.run(request).await
}

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
