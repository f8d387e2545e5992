//! Online tuning over HTTP: feedback pairs on an adapter (which train it in the background),
//! version rollback, and OpenAI's files and fine-tuning jobs. Each handler parses, calls the
//! tuning service once, and shapes its answer.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde_json::Value;

use super::auth::Principal;
use super::types::tuning::*;
use super::types::AdapterInfo;
use super::{ApiJson, ApiMultipart, ApiQuery, App, AppError};
use crate::services::tuning::{default_learning_rate, HyperparameterChoice, JobRequest, LoraChoice, MethodChoice};
use crate::store::{CheckpointRow, EventRow, FileRow, JobRow};
use crate::train::job::{Hyperparameters, JobData, JobSpec, Method};

/// Stores feedback for an adapter: one JSON record, a JSON list or JSON Lines. Each record is an
/// instruction pair in the Alpaca, Dolly, ShareGPT or OpenAI `messages` format, or a preference
/// between two answers, as OpenAI's DPO line (`input.messages`, `preferred_output`,
/// `non_preferred_output`) or TRL's (`prompt` or `messages`, `chosen`, `rejected`), whose
/// conversation ends with the user. All or nothing: an invalid record rejects the upload with its
/// index. Duplicates are skipped. A missing adapter is created as a fresh LoRA. Acknowledged once
/// committed; enough new records start a training job (DPO on the preferences).
#[utoipa::path(post, path = "/v1/adapters/{name}/feedback", tag = "Tuning",
    params(("name" = String, Path, description = "The adapter"), FeedbackParams),
    request_body(content = String, content_type = "application/json", description = "Records: JSON, a JSON list, or JSON Lines"),
    responses((status = 200, body = FeedbackReceipt), (status = 400, body = super::error::ErrorResponse)))]
pub async fn upload_feedback(
    State(app): State<Arc<App>>,
    Extension(Principal(scope)): Extension<Principal>,
    Path(name): Path<String>,
    ApiQuery(params): ApiQuery<FeedbackParams>,
    body: Bytes,
) -> Result<Json<FeedbackReceipt>, AppError> {
    let lora = LoraChoice { method: params.method, rank: params.rank, alpha: params.alpha, targets: params.targets };
    let outcome = app.tuning.upload_feedback(name, body.to_vec(), lora, scope).await?;
    Ok(Json(FeedbackReceipt {
        adapter: outcome.adapter,
        stored: outcome.stored,
        duplicates: outcome.duplicates,
        total_pairs: outcome.total_pairs,
        total_preferences: outcome.total_preferences,
        pairs_since_training: outcome.pairs_since_training,
        job: outcome.job,
    }))
}

/// The adapter's stored pairs, oldest first, a page at a time.
#[utoipa::path(get, path = "/v1/adapters/{name}/feedback", tag = "Tuning",
    params(("name" = String, Path, description = "The adapter"), PageParams),
    responses((status = 200, body = PairList), (status = 404, body = super::error::ErrorResponse)))]
pub async fn list_feedback(
    State(app): State<Arc<App>>,
    Extension(Principal(scope)): Extension<Principal>,
    Path(name): Path<String>,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<Json<PairList>, AppError> {
    let limit = page.limit.unwrap_or(100).clamp(1, 1000);
    let pairs = app.tuning.list_feedback(name, scope, page.after.unwrap_or(0), limit).await?;
    Ok(Json(PairList {
        object: "list",
        has_more: pairs.has_more,
        last_id: pairs.items.last().map(|p| p.id),
        data: pairs
            .items
            .into_iter()
            .map(|p| StoredPairView { id: p.id, hash: p.hash, messages: p.conversation.messages, created_at: p.created_at })
            .collect(),
    }))
}

/// Deletes some (`ids`) or all of an adapter's pairs. Versions already trained stay.
#[utoipa::path(delete, path = "/v1/adapters/{name}/feedback", tag = "Tuning",
    params(("name" = String, Path, description = "The adapter"), DeleteParams),
    responses((status = 200, body = Deleted), (status = 400, body = super::error::ErrorResponse)))]
pub async fn delete_feedback(
    State(app): State<Arc<App>>,
    Extension(Principal(scope)): Extension<Principal>,
    Path(name): Path<String>,
    ApiQuery(params): ApiQuery<DeleteParams>,
) -> Result<Json<Deleted>, AppError> {
    let ids = record_ids(params, "pair")?;
    Ok(Json(Deleted { deleted: app.tuning.delete_feedback(name, scope, ids).await? }))
}

/// The comma-separated ids of `params`, if given.
fn record_ids(params: DeleteParams, kind: &str) -> Result<Option<Vec<i64>>, AppError> {
    params
        .ids
        .map(|ids| {
            ids.split(',')
                .map(|id| id.trim().parse::<i64>().map_err(|_| AppError::invalid("ids", format!("`{id}` is not a {kind} id"))))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()
}

/// The adapter's stored preferences, oldest first, a page at a time.
#[utoipa::path(get, path = "/v1/adapters/{name}/preferences", tag = "Tuning",
    params(("name" = String, Path, description = "The adapter"), PageParams),
    responses((status = 200, body = PreferenceList), (status = 404, body = super::error::ErrorResponse)))]
pub async fn list_preferences(
    State(app): State<Arc<App>>,
    Extension(Principal(scope)): Extension<Principal>,
    Path(name): Path<String>,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<Json<PreferenceList>, AppError> {
    let limit = page.limit.unwrap_or(100).clamp(1, 1000);
    let preferences = app.tuning.list_preferences(name, scope, page.after.unwrap_or(0), limit).await?;
    Ok(Json(PreferenceList {
        object: "list",
        has_more: preferences.has_more,
        last_id: preferences.items.last().map(|p| p.id),
        data: preferences
            .items
            .into_iter()
            .map(|p| StoredPreferenceView { id: p.id, hash: p.hash, preference: p.preference, created_at: p.created_at })
            .collect(),
    }))
}

/// Deletes some (`ids`) or all of an adapter's preferences. Versions already trained stay.
#[utoipa::path(delete, path = "/v1/adapters/{name}/preferences", tag = "Tuning",
    params(("name" = String, Path, description = "The adapter"), DeleteParams),
    responses((status = 200, body = Deleted), (status = 400, body = super::error::ErrorResponse)))]
pub async fn delete_preferences(
    State(app): State<Arc<App>>,
    Extension(Principal(scope)): Extension<Principal>,
    Path(name): Path<String>,
    ApiQuery(params): ApiQuery<DeleteParams>,
) -> Result<Json<Deleted>, AppError> {
    let ids = record_ids(params, "preference")?;
    Ok(Json(Deleted { deleted: app.tuning.delete_preferences(name, scope, ids).await? }))
}

/// Starts a job on the adapter's pairs now (continuing from its current version).
#[utoipa::path(post, path = "/v1/adapters/{name}/train", tag = "Tuning",
    params(("name" = String, Path, description = "The adapter")),
    request_body(content = Option<TrainRequest>, content_type = "application/json"),
    responses((status = 200, body = FineTuningJob), (status = 409, body = super::error::ErrorResponse)))]
pub async fn train_adapter(
    State(app): State<Arc<App>>,
    Extension(Principal(scope)): Extension<Principal>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<FineTuningJob>, AppError> {
    let request: TrainRequest = if body.is_empty() {
        TrainRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| AppError::invalid("body", e.to_string()))?
    };
    let hyperparameters = request.hyperparameters.as_ref().map(HyperparametersRequest::choice).transpose()?;
    Ok(Json(job_view(&app.tuning.train(name, hyperparameters, scope).await?)))
}

/// Opens an adapter to tuning by every scope, or closes it again. An adapter the admin
/// installed becomes a tuned adapter at version 0 first.
#[utoipa::path(put, path = "/v1/adapters/{name}/tuning", tag = "Tuning",
    params(("name" = String, Path, description = "The adapter")),
    request_body = TuningAccess,
    responses((status = 200, body = AdapterInfo), (status = 400, body = super::error::ErrorResponse)))]
pub async fn set_tuning_access(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    ApiJson(request): ApiJson<TuningAccess>,
) -> Result<Json<AdapterInfo>, AppError> {
    Ok(Json(app.tuning.set_open_to_tuning(name, request.open).await?.into()))
}

/// Serves an earlier version of the adapter again.
#[utoipa::path(post, path = "/v1/adapters/{name}/rollback", tag = "Tuning",
    params(("name" = String, Path, description = "The adapter")),
    request_body = RollbackRequest,
    responses((status = 200, body = AdapterInfo), (status = 400, body = super::error::ErrorResponse)))]
pub async fn rollback_adapter(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    ApiJson(request): ApiJson<RollbackRequest>,
) -> Result<Json<AdapterInfo>, AppError> {
    Ok(Json(app.tuning.rollback(name, request.version).await?.into()))
}

// OpenAI files.

fn file_view(f: &FileRow) -> FileObject {
    FileObject {
        id: f.id.clone(),
        object: "file",
        bytes: f.bytes,
        created_at: f.created_at,
        filename: f.filename.clone(),
        purpose: f.purpose.clone(),
        status: "processed",
    }
}

/// Uploads a file: `fine-tune` (every record is checked first; the file is stored, durably, only
/// if all are valid) or `batch` (at most 50,000 requests, each `custom_id` once).
#[utoipa::path(post, path = "/v1/files", tag = "Files",
    request_body(content = FileUpload, content_type = "multipart/form-data"),
    responses((status = 200, body = FileObject), (status = 400, body = super::error::ErrorResponse),
        (status = 413, description = "A batch file of more lines than a batch may hold", body = super::error::ErrorResponse)))]
pub async fn upload_file(State(app): State<Arc<App>>, ApiMultipart(mut form): ApiMultipart) -> Result<Json<FileObject>, AppError> {
    let (mut purpose, mut file) = (None, None);
    while let Some(field) = form
        .next_field()
        .await
        .map_err(multipart_error)?
    {
        match field.name() {
            Some("purpose") => purpose = Some(field.text().await.map_err(|e| AppError::invalid("purpose", e.to_string()))?),
            Some("file") => {
                let filename = field.file_name().unwrap_or("upload.jsonl").to_string();
                let bytes = field.bytes().await.map_err(multipart_error)?;
                file = Some((filename, bytes));
            }
            _ => {}
        }
    }
    let purpose = purpose.ok_or_else(|| AppError::invalid("purpose", "`purpose` is required"))?;
    let (filename, bytes) = file.ok_or_else(|| AppError::invalid("file", "`file` is required"))?;
    Ok(Json(file_view(&app.tuning.upload_file(filename, purpose, bytes.to_vec()).await?)))
}

/// A form that could not be read: 413 past the body limit, 400 when malformed.
fn multipart_error(e: axum::extract::multipart::MultipartError) -> AppError {
    AppError::BadBody { status: e.status(), message: format!("bad multipart body: {}", e.body_text()) }
}

/// Uploaded files, newest first.
#[utoipa::path(get, path = "/v1/files", tag = "Files", responses((status = 200, body = FileList)))]
pub async fn list_files(State(app): State<Arc<App>>) -> Result<Json<FileList>, AppError> {
    let files = app.tuning.list_files().await?;
    Ok(Json(FileList { object: "list", data: files.iter().map(file_view).collect(), has_more: false }))
}

#[utoipa::path(get, path = "/v1/files/{file_id}", tag = "Files",
    params(("file_id" = String, Path, description = "A file id")),
    responses((status = 200, body = FileObject), (status = 404, body = super::error::ErrorResponse)))]
pub async fn get_file(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<FileObject>, AppError> {
    Ok(Json(file_view(&app.tuning.get_file(id).await?)))
}

/// A file's content: as uploaded, or a batch's output or error lines (JSON lines).
#[utoipa::path(get, path = "/v1/files/{file_id}/content", tag = "Files",
    params(("file_id" = String, Path, description = "A file id")),
    responses((status = 200, description = "The file's bytes", body = String, content_type = "application/octet-stream"),
        (status = 404, body = super::error::ErrorResponse)))]
pub async fn get_file_content(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<impl IntoResponse, AppError> {
    let content = app.tuning.file_content(id).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], content))
}

// OpenAI fine-tuning jobs.

fn number(value: &Option<Value>, param: &str) -> Result<Option<f64>, AppError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "auto" => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(other) => Err(AppError::invalid(param, format!("expected a number or \"auto\", got {other}"))),
    }
}

impl HyperparametersRequest {
    /// Each field as a number, or `None` for "auto" or absent.
    fn choice(&self) -> Result<HyperparameterChoice, AppError> {
        Ok(HyperparameterChoice {
            n_epochs: number(&self.n_epochs, "hyperparameters.n_epochs")?,
            batch_size: number(&self.batch_size, "hyperparameters.batch_size")?,
            learning_rate_multiplier: number(&self.learning_rate_multiplier, "hyperparameters.learning_rate_multiplier")?,
            adapter: self.adapter.clone(),
            optimizer: self.optimizer.clone(),
        })
    }
}

impl DpoHyperparametersRequest {
    /// β, and the hyperparameters every method shares.
    fn choice(&self) -> Result<(Option<f64>, HyperparameterChoice), AppError> {
        let param = |name: &str| format!("method.dpo.hyperparameters.{name}");
        Ok((
            number(&self.beta, &param("beta"))?,
            HyperparameterChoice {
                n_epochs: number(&self.n_epochs, &param("n_epochs"))?,
                batch_size: number(&self.batch_size, &param("batch_size"))?,
                learning_rate_multiplier: number(&self.learning_rate_multiplier, &param("learning_rate_multiplier"))?,
                adapter: None,
                optimizer: None,
            },
        ))
    }
}

/// The method and hyperparameters a create request asks for: a method's own hyperparameters
/// take precedence over the top-level ones.
fn method_choice(request: &CreateJobRequest) -> Result<(MethodChoice, HyperparameterChoice), AppError> {
    let top = request.hyperparameters.as_ref().map(HyperparametersRequest::choice).transpose()?.unwrap_or_default();
    let Some(method) = &request.method else { return Ok((MethodChoice::default(), top)) };
    let supervised = method.supervised.as_ref().and_then(|s| s.hyperparameters.as_ref());
    let dpo = method.dpo.as_ref().and_then(|d| d.hyperparameters.as_ref());
    // The adapter's kind and the optimizer are top-level hyperparameters only: a method's own
    // do not name them.
    let (kind, optimizer) = (top.adapter.clone(), top.optimizer.clone());
    let (beta, mut hyperparameters) = match (method.kind.as_deref(), supervised, dpo) {
        (Some("dpo"), _, Some(dpo)) => dpo.choice()?,
        (Some("supervised") | None, Some(supervised), _) => (None, supervised.choice()?),
        _ => (None, top),
    };
    hyperparameters.adapter = hyperparameters.adapter.or(kind);
    hyperparameters.optimizer = hyperparameters.optimizer.or(optimizer);
    Ok((MethodChoice { kind: method.kind.clone(), beta }, hyperparameters))
}

fn method_view(method: Method, h: &JobHyperparameters) -> JobMethod {
    match method {
        Method::Supervised => JobMethod { kind: "supervised", supervised: Some(SupervisedMethod { hyperparameters: h.clone() }), dpo: None },
        Method::Dpo { beta } => JobMethod {
            kind: "dpo",
            supervised: None,
            dpo: Some(DpoMethod {
                hyperparameters: DpoHyperparameters {
                    beta,
                    n_epochs: h.n_epochs,
                    batch_size: h.batch_size,
                    learning_rate_multiplier: h.learning_rate_multiplier,
                },
            }),
        },
    }
}

fn job_view(job: &JobRow) -> FineTuningJob {
    let spec: Option<JobSpec> = serde_json::from_value(job.spec.clone()).ok();
    let defaults = Hyperparameters::default();
    let h = spec.as_ref().map_or(defaults, |s| s.hyperparameters);
    let hyperparameters = JobHyperparameters {
        n_epochs: h.n_epochs,
        batch_size: h.batch_size,
        learning_rate_multiplier: h.learning_rate / default_learning_rate(h.optimizer, defaults),
        optimizer: h.optimizer.name().to_string(),
    };
    let (training_file, validation_file) = match spec.as_ref().map(|s| &s.data) {
        Some(JobData::Files {
            training_file,
            validation_file,
        }) => (Some(training_file.clone()), validation_file.clone()),
        _ => (None, None),
    };
    FineTuningJob {
        id: job.id.clone(),
        object: "fine_tuning.job",
        created_at: job.created_at,
        finished_at: job.finished_at,
        model: job.model.clone(),
        fine_tuned_model: job.fine_tuned_model.clone(),
        organization_id: "tessera",
        status: job.status.to_string(),
        training_file,
        validation_file,
        method: method_view(spec.as_ref().map_or(Method::Supervised, |s| s.method), &hyperparameters),
        hyperparameters,
        result_files: Vec::new(),
        trained_tokens: job.trained_tokens,
        error: job.error.as_ref().map(|message| JobError {
            code: "training_failed".into(),
            message: message.clone(),
            param: None,
        }),
        seed: spec.as_ref().map_or(0, |s| s.seed),
        suffix: spec.and_then(|s| s.suffix),
        estimated_finish: None,
        adapter: job.adapter.clone(),
    }
}

/// Creates a fine-tuning job from uploaded files. It trains in the background; its
/// `fine_tuned_model` (a new adapter) serves as soon as it succeeds.
#[utoipa::path(post, path = "/v1/fine_tuning/jobs", tag = "Fine-tuning",
    request_body = CreateJobRequest,
    responses((status = 200, body = FineTuningJob), (status = 400, body = super::error::ErrorResponse),
              (status = 404, description = "Unknown model", body = super::error::ErrorResponse),
              (status = 409, description = "The adapter already has an active job", body = super::error::ErrorResponse)))]
pub async fn create_job(
    State(app): State<Arc<App>>,
    Extension(Principal(scope)): Extension<Principal>,
    ApiJson(request): ApiJson<CreateJobRequest>,
) -> Result<Json<FineTuningJob>, AppError> {
    let (method, hyperparameters) = method_choice(&request)?;
    let job = JobRequest {
        method,
        hyperparameters,
        model: request.model,
        training_file: request.training_file,
        validation_file: request.validation_file,
        suffix: request.suffix,
        seed: request.seed,
    };
    Ok(Json(job_view(&app.tuning.create_job(job, scope).await?)))
}

/// Every job (file jobs and feedback jobs), newest first.
#[utoipa::path(get, path = "/v1/fine_tuning/jobs", tag = "Fine-tuning", responses((status = 200, body = JobList)))]
pub async fn list_jobs(State(app): State<Arc<App>>) -> Result<Json<JobList>, AppError> {
    let jobs = app.tuning.list_jobs().await?;
    Ok(Json(JobList { object: "list", data: jobs.iter().map(job_view).collect(), has_more: false }))
}

#[utoipa::path(get, path = "/v1/fine_tuning/jobs/{job_id}", tag = "Fine-tuning",
    params(("job_id" = String, Path, description = "A job id")),
    responses((status = 200, body = FineTuningJob), (status = 404, body = super::error::ErrorResponse)))]
pub async fn get_job(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<FineTuningJob>, AppError> {
    Ok(Json(job_view(&app.tuning.get_job(id).await?)))
}

/// Cancels a job that has not ended; a running one stops before its next step.
#[utoipa::path(post, path = "/v1/fine_tuning/jobs/{job_id}/cancel", tag = "Fine-tuning",
    params(("job_id" = String, Path, description = "A job id")),
    responses((status = 200, body = FineTuningJob), (status = 404, body = super::error::ErrorResponse)))]
pub async fn cancel_job(
    State(app): State<Arc<App>>,
    Extension(Principal(scope)): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<FineTuningJob>, AppError> {
    Ok(Json(job_view(&app.tuning.cancel_job(id, scope).await?)))
}

fn event_view(e: EventRow) -> JobEvent {
    JobEvent {
        id: format!("ftevent-{}", e.id),
        object: "fine_tuning.job.event",
        created_at: e.created_at,
        level: e.level,
        r#type: e.kind.as_str(),
        message: e.message,
        data: e.data,
    }
}

/// A job's events, newest first: per-step loss, checkpoints, evaluation and promotion.
#[utoipa::path(get, path = "/v1/fine_tuning/jobs/{job_id}/events", tag = "Fine-tuning",
    params(("job_id" = String, Path, description = "A job id"), EventParams),
    responses((status = 200, body = EventList), (status = 404, body = super::error::ErrorResponse)))]
pub async fn list_events(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    ApiQuery(params): ApiQuery<EventParams>,
) -> Result<Json<EventList>, AppError> {
    let before = params
        .after
        .map(|a| {
            a.trim_start_matches("ftevent-")
                .parse::<i64>()
                .map_err(|_| AppError::invalid("after", format!("`{a}` is not an event id")))
        })
        .transpose()?;
    let limit = params.limit.unwrap_or(20).clamp(1, 1000);
    let events = app.tuning.events(id, before, limit).await?;
    Ok(Json(EventList { object: "list", data: events.items.into_iter().map(event_view).collect(), has_more: events.has_more }))
}

fn checkpoint_view(c: CheckpointRow) -> JobCheckpoint {
    JobCheckpoint {
        id: format!("ftckpt-{}", c.id),
        object: "fine_tuning.job.checkpoint",
        created_at: c.created_at,
        fine_tuned_model_checkpoint: c.path.display().to_string(),
        fine_tuning_job_id: c.job_id,
        metrics: c.metrics,
        step_number: c.step,
    }
}

/// A job's checkpoints, newest first (what a restarted job resumes from).
#[utoipa::path(get, path = "/v1/fine_tuning/jobs/{job_id}/checkpoints", tag = "Fine-tuning",
    params(("job_id" = String, Path, description = "A job id")),
    responses((status = 200, body = CheckpointList), (status = 404, body = super::error::ErrorResponse)))]
pub async fn list_checkpoints(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<CheckpointList>, AppError> {
    let checkpoints = app.tuning.checkpoints(id).await?;
    Ok(Json(CheckpointList { object: "list", data: checkpoints.into_iter().map(checkpoint_view).collect(), has_more: false }))
}
