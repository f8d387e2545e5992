//! OpenAI's batches: `POST /v1/batches`, `GET /v1/batches`, `GET /v1/batches/{batch_id}`,
//! `POST /v1/batches/{batch_id}/cancel`. Each handler parses, calls the batches service and maps
//! its error. The lines themselves run through the same handlers a client reaches
//! ([`RouterLines`]), so a line's answer is the one the request gets interactively.

use std::sync::{Arc, Weak};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, Request};
use axum::routing::post;
use axum::{Extension, Json, Router};
use futures::future::BoxFuture;
use tower::ServiceExt;

use super::auth::Principal;
use super::types::batches::*;
use super::{chat, completions, embeddings, ApiJson, ApiQuery, App, AppError};
use crate::services::batches::{BatchRequest, BatchView, LineRequest, LineResponse, LineRunner, WINDOW_SECS};

fn batch_view(view: BatchView) -> Batch {
    let (completed, failed) = (view.completed, view.failed);
    let b = view.batch;
    let times = b.times.clone();
    Batch {
        object: "batch",
        errors: b.errors.map(|e| BatchErrors { object: "list", data: e.get("data").cloned().unwrap_or(e) }),
        status: b.status.as_str(),
        expires_at: b.created_at + WINDOW_SECS,
        in_progress_at: times.in_progress_at,
        finalizing_at: times.finalizing_at,
        completed_at: times.completed_at,
        failed_at: times.failed_at,
        expired_at: None,
        cancelling_at: times.cancelling_at,
        cancelled_at: times.cancelled_at,
        request_counts: RequestCounts { total: b.total, completed, failed },
        id: b.id,
        endpoint: b.endpoint,
        input_file_id: b.input_file_id,
        completion_window: b.completion_window,
        output_file_id: b.output_file_id,
        error_file_id: b.error_file_id,
        created_at: b.created_at,
        metadata: b.metadata,
    }
}

/// Creates a batch over an uploaded `batch` file. Its lines run in the background, below
/// interactive requests; each line's `body` names its own model (base, adapter or composition).
#[utoipa::path(post, path = "/v1/batches", tag = "Batches", request_body = CreateBatchRequest,
    responses(
        (status = 200, body = Batch),
        (status = 400, description = "Unknown endpoint or window, bad metadata, a file of another purpose, or a repeated custom_id", body = super::error::ErrorResponse),
        (status = 404, description = "No such input file", body = super::error::ErrorResponse),
        (status = 413, description = "More lines than a batch may hold", body = super::error::ErrorResponse),
    ))]
pub async fn create_batch(
    State(app): State<Arc<App>>,
    Extension(Principal(scope)): Extension<Principal>,
    ApiJson(request): ApiJson<CreateBatchRequest>,
) -> Result<Json<Batch>, AppError> {
    let request = BatchRequest {
        input_file_id: request.input_file_id,
        endpoint: request.endpoint,
        completion_window: request.completion_window,
        metadata: request.metadata,
    };
    Ok(Json(batch_view(app.batches.create(request, scope).await?)))
}

/// Batches, newest first, paged by `after` and `limit`.
#[utoipa::path(get, path = "/v1/batches", tag = "Batches", params(BatchListParams), responses((status = 200, body = BatchList)))]
pub async fn list_batches(State(app): State<Arc<App>>, ApiQuery(params): ApiQuery<BatchListParams>) -> Result<Json<BatchList>, AppError> {
    let limit = params.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(AppError::invalid("limit", "`limit` must be from 1 to 100"));
    }
    let page = app.batches.list(params.after, limit).await?;
    let data: Vec<Batch> = page.items.into_iter().map(batch_view).collect();
    Ok(Json(BatchList {
        object: "list",
        first_id: data.first().map(|b| b.id.clone()),
        last_id: data.last().map(|b| b.id.clone()),
        data,
        has_more: page.has_more,
    }))
}

#[utoipa::path(get, path = "/v1/batches/{batch_id}", tag = "Batches",
    params(("batch_id" = String, Path, description = "A batch id")),
    responses((status = 200, body = Batch), (status = 404, body = super::error::ErrorResponse)))]
pub async fn get_batch(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<Batch>, AppError> {
    Ok(Json(batch_view(app.batches.get(id).await?)))
}

/// Cancels a batch that has not ended: lines in flight stop, and it ends `cancelled` with the
/// output and error files of the lines already finished.
#[utoipa::path(post, path = "/v1/batches/{batch_id}/cancel", tag = "Batches",
    params(("batch_id" = String, Path, description = "A batch id")),
    responses(
        (status = 200, body = Batch),
        (status = 400, description = "The batch has already ended", body = super::error::ErrorResponse),
        (status = 404, body = super::error::ErrorResponse),
    ))]
pub async fn cancel_batch(
    State(app): State<Arc<App>>,
    Extension(Principal(scope)): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Batch>, AppError> {
    Ok(Json(batch_view(app.batches.cancel(id, scope).await?)))
}

/// Runs batch lines through the endpoints' own handlers, on a copy of the app whose engine
/// submissions are background work. It holds the app weakly: a server shutting down is not
/// kept alive by its batches, which resume at the next start.
pub struct RouterLines {
    pub app: Weak<App>,
}

impl RouterLines {
    fn background_router(app: &App) -> Router {
        let inference = Arc::new(app.inference.background());
        let background = Arc::new(App {
            created: app.created,
            settings: app.settings.clone(),
            metrics: app.metrics.clone(),
            responses: Arc::new(app.responses.through(inference.clone())),
            inference,
            adapters: app.adapters.clone(),
            tuning: app.tuning.clone(),
            plugins: app.plugins.clone(),
            batches: app.batches.clone(),
        });
        Router::new()
            .route("/v1/chat/completions", post(chat::chat_completions))
            .route("/v1/completions", post(completions::completions))
            .route("/v1/embeddings", post(embeddings::embeddings))
            .route("/v1/responses", post(super::responses::create_response))
            .with_state(background)
    }
}

impl LineRunner for RouterLines {
    fn run(&self, line: LineRequest) -> BoxFuture<'static, Option<LineResponse>> {
        let app = self.app.upgrade();
        Box::pin(async move {
            let router = Self::background_router(app?.as_ref());
            let request = Request::post(line.url).header(header::CONTENT_TYPE, "application/json").body(Body::from(line.body.to_string())).ok()?;
            let response = router.oneshot(request).await.ok()?;
            let status_code = response.status().as_u16();
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.ok()?;
            let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned()));
            Some(LineResponse { status_code, body })
        })
    }

    fn is_alive(&self) -> bool {
        self.app.strong_count() > 0
    }
}
