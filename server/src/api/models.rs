//! Models, health, metrics and the OpenAPI document.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;

use super::types::embeddings::EmbeddingInfo;
use super::types::{Health, Model, ModelList, ScopeInfo};
use super::{App, AppError};

fn base_model(app: &App) -> Model {
    Model {
        id: app.inference.model_id().to_string(),
        object: "model",
        created: app.created,
        owned_by: "tessera".into(),
        parent: None,
        max_model_len: app.inference.ctx_len(),
        adapter_kind: None,
        embeddings: EmbeddingInfo { pooling: "mean", normalized: true, dimensions: app.inference.embedding_dimensions() },
    }
}

fn adapter_model(app: &App, name: &str) -> Model {
    Model {
        id: name.to_string(),
        parent: Some(app.inference.model_id().to_string()),
        adapter_kind: app.adapters.registry().kind(name).map(|k| k.name()),
        ..base_model(app)
    }
}

/// Lists the models that can be used as `model`: the base, every adapter (with `parent` set to
/// the base), then every plugin that serves (`owned_by: "plugin"`).
#[utoipa::path(get, path = "/v1/models", tag = "OpenAI",
    responses((status = 200, body = ModelList), (status = 401, body = super::error::ErrorResponse)))]
pub async fn list_models(State(app): State<Arc<App>>) -> Json<ModelList> {
    let adapters = app.adapters.registry().names().into_iter().map(|name| adapter_model(&app, &name));
    let plugins = app.plugins.list().into_iter().filter(|(_, state)| state.is_ok()).map(|(name, _)| Model {
        id: name,
        owned_by: "plugin".into(),
        ..base_model(&app)
    });
    Json(ModelList {
        object: "list",
        data: std::iter::once(base_model(&app)).chain(adapters).chain(plugins).collect(),
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
    } else if app.plugins.contains(&model) {
        Ok(Json(Model { id: model, owned_by: "plugin".into(), ..base_model(&app) }))
    } else {
        Ok(Json(adapter_model(&app, &model)))
    }
}

/// The scope the presented key opens (`null`: none, so a key is needed), and whether the server
/// asks for keys at all. Public, so a client can tell what to offer before it calls anything.
#[utoipa::path(get, path = "/v1/scope", tag = "Operations", responses((status = 200, body = ScopeInfo)))]
pub async fn scope(State(app): State<Arc<App>>, headers: axum::http::HeaderMap) -> Json<ScopeInfo> {
    let keys = &app.settings.keys;
    Json(ScopeInfo {
        scope: keys.effective_scope(super::auth::bearer_key(&headers)).map(|s| s.as_str()),
        keys_required: !keys.is_empty(),
    })
}

/// Readiness: the engine is up and accepting work, warm (see `Inference::is_warm`), and the
/// server serves what its tuning store says (it reconciled its adapters with it).
#[utoipa::path(get, path = "/health", tag = "Operations",
    responses((status = 200, body = Health), (status = 503, description = "Not reconciled with the store", body = Health)))]
pub async fn health(State(app): State<Arc<App>>) -> (StatusCode, Json<Health>) {
    let ready = app.inference.is_warm() && app.tuning.is_ready();
    let health = Health {
        status: if ready { "ok" } else { "unavailable" },
        ready,
        model: app.inference.model_id().to_string(),
        queue_depth: app.inference.queue_depth(),
    };
    (if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(health))
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
