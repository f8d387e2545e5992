//! Models, health, metrics and the OpenAPI document.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;

use super::types::{Health, Model, ModelList};
use super::{App, AppError};

fn base_model(app: &App) -> Model {
    Model {
        id: app.inference.model_id().to_string(),
        object: "model",
        created: app.created,
        owned_by: "tessera".into(),
        parent: None,
        max_model_len: app.inference.ctx_len(),
    }
}

fn adapter_model(app: &App, name: &str) -> Model {
    Model {
        id: name.to_string(),
        parent: Some(app.inference.model_id().to_string()),
        ..base_model(app)
    }
}

/// Lists the models that can be used as `model`: the base, then every adapter (with `parent`
/// set to the base).
#[utoipa::path(get, path = "/v1/models", tag = "OpenAI",
    responses((status = 200, body = ModelList), (status = 401, body = super::error::ErrorResponse)))]
pub async fn list_models(State(app): State<Arc<App>>) -> Json<ModelList> {
    let adapters = app.adapters.registry().names().into_iter().map(|name| adapter_model(&app, &name));
    Json(ModelList {
        object: "list",
        data: std::iter::once(base_model(&app)).chain(adapters).collect(),
    })
}

/// Describes one model.
#[utoipa::path(get, path = "/v1/models/{model}", tag = "OpenAI",
    params(("model" = String, Path, description = "A model id from /v1/models")),
    responses((status = 200, body = Model), (status = 404, body = super::error::ErrorResponse)))]
pub async fn get_model(
    State(app): State<Arc<App>>,
    Path(model): Path<String>,
) -> Result<Json<Model>, AppError> {
    app.inference.check_model(&model)?;
    if model == app.inference.model_id() {
        Ok(Json(base_model(&app)))
    } else {
        Ok(Json(adapter_model(&app, &model)))
    }
}

/// Liveness: the engine is up and accepting work.
#[utoipa::path(get, path = "/health", tag = "Operations", responses((status = 200, body = Health)))]
pub async fn health(State(app): State<Arc<App>>) -> Json<Health> {
    Json(Health {
        status: "ok",
        model: app.inference.model_id().to_string(),
        queue_depth: app.inference.queue_depth(),
    })
}

/// Prometheus metrics: requests by status, tokens in and out, queue depth, running batch size,
/// time to first token and inter-token latency. Needs the admin key when one is set.
#[utoipa::path(get, path = "/metrics", tag = "Operations",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"),
              (status = 401, body = super::error::ErrorResponse)))]
pub async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}

/// This API's OpenAPI document.
#[utoipa::path(get, path = "/openapi.json", tag = "Operations",
    responses((status = 200, description = "OpenAPI 3.1 document", body = Object)))]
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(super::openapi())
}
