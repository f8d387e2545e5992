//! Online tuning over HTTP: feedback pairs on an adapter (which train it in the background),
//! version rollback, and OpenAI's files and fine-tuning jobs.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use serde_json::Value;

use super::auth::Principal;
use super::types::tuning::*;
use super::types::AdapterInfo;
use super::{blocking, ApiJson, ApiMultipart, App, AppError};
use crate::dataset::parse_upload;
use crate::services::feedback::{self, FeedbackError};
use crate::store::{unix_time, CheckpointRow, EventRow, FileRow, JobRow, StoreError};
use crate::train::job::{new_id, Hyperparameters, JobData, JobSpec, TuneError, Tuner};

fn tuner(app: &App) -> Result<&Arc<Tuner>, AppError> {
    app.tuner.as_ref().ok_or_else(|| AppError::InvalidParameter {
        message: "Online tuning is off on this server (start it with a tuning directory).".into(),
        param: None,
        code: Some("tuning_disabled"),
    })
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        AppError::Internal(e.to_string())
    }
}

impl From<TuneError> for AppError {
    fn from(e: TuneError) -> Self {
        match e {
            busy @ TuneError::Busy { .. } => AppError::Conflict(busy.to_string()),
            TuneError::NotOwner(message) => AppError::NotOwner(message),
            TuneError::Invalid(message) => AppError::InvalidParameter {
                message,
                param: None,
                code: None,
            },
            other => AppError::Internal(other.to_string()),
        }
    }
}

/// Stores instruction pairs for an adapter: one JSON record, a JSON list or JSON Lines, each in
/// the Alpaca, Dolly, ShareGPT or OpenAI `messages` format. All or nothing: an invalid record
/// rejects the upload with its index. Duplicates are skipped. A missing adapter is created as a
/// fresh LoRA. Acknowledged once committed; enough new pairs start a training job.
#[utoipa::path(post, path = "/v1/adapters/{name}/feedback", tag = "Tuning",
    params(("name" = String, Path, description = "The adapter"), FeedbackParams),
    request_body(content = String, content_type = "application/json", description = "Records: JSON, a JSON list, or JSON Lines"),
    responses((status = 200, body = FeedbackReceipt), (status = 400, body = super::error::ErrorResponse)))]
pub async fn upload_feedback(
    State(app): State<Arc<App>>,
    Extension(Principal(scope)): Extension<Principal>,
    Path(name): Path<String>,
    Query(params): Query<FeedbackParams>,
    body: Bytes,
) -> Result<Json<FeedbackReceipt>, AppError> {
    let tuner = tuner(&app)?.clone();
    let spec = feedback::lora_spec(params.rank, params.alpha, params.targets.as_deref())?;
    // Parsing a large upload and the plugin's converter are blocking work, as is the store.
    let outcome = blocking(move || Ok(feedback::upload(&tuner, &app.plugins, name, &body, spec, scope)?)).await?;
    Ok(Json(FeedbackReceipt {
        adapter: outcome.adapter,
        stored: outcome.stored,
        duplicates: outcome.duplicates,
        total_pairs: outcome.total_pairs,
        pairs_since_training: outcome.pairs_since_training,
        job: outcome.job,
    }))
}

impl From<FeedbackError> for AppError {
    fn from(e: FeedbackError) -> Self {
        match e {
            FeedbackError::Invalid { param, message, code } => AppError::InvalidParameter { message, param: Some(param), code },
            FeedbackError::Tune(e) => e.into(),
            FeedbackError::Plugin(e) => e.into(),
        }
    }
}

/// The adapter's stored pairs, oldest first, a page at a time.
#[utoipa::path(get, path = "/v1/adapters/{name}/feedback", tag = "Tuning",
    params(("name" = String, Path, description = "The adapter"), PageParams),
    responses((status = 200, body = PairList), (status = 404, body = super::error::ErrorResponse)))]
pub async fn list_feedback(
    State(app): State<Arc<App>>,
    Extension(Principal(scope)): Extension<Principal>,
    Path(name): Path<String>,
    Query(page): Query<PageParams>,
) -> Result<Json<PairList>, AppError> {
    let tuner = tuner(&app)?.clone();
    blocking(move || {
        tuner
            .tunable_adapter(&name, scope)?
            .ok_or_else(|| AppError::NotFound(format!("the adapter `{name}` has no feedback")))?;
        let limit = page.limit.unwrap_or(100).clamp(1, 1000);
        let mut pairs = tuner.store.pairs(&name, page.after.unwrap_or(0), limit + 1)?;
        let has_more = pairs.len() > limit;
        pairs.truncate(limit);
        Ok(Json(PairList {
            object: "list",
            has_more,
            last_id: pairs.last().map(|p| p.id),
            data: pairs
                .into_iter()
                .map(|p| StoredPairView {
                    id: p.id,
                    hash: p.hash,
                    messages: p.conversation.messages,
                    created_at: p.created_at,
                })
                .collect(),
        }))
    })
    .await
}

/// Deletes some (`ids`) or all of an adapter's pairs. Versions already trained stay.
#[utoipa::path(delete, path = "/v1/adapters/{name}/feedback", tag = "Tuning",
    params(("name" = String, Path, description = "The adapter"), DeleteParams),
    responses((status = 200, body = Deleted), (status = 400, body = super::error::ErrorResponse)))]
pub async fn delete_feedback(
    State(app): State<Arc<App>>,
    Extension(Principal(scope)): Extension<Principal>,
    Path(name): Path<String>,
    Query(params): Query<DeleteParams>,
) -> Result<Json<Deleted>, AppError> {
    let tuner = tuner(&app)?.clone();
    let ids = params
        .ids
        .map(|ids| {
            ids.split(',')
                .map(|id| id.trim().parse::<i64>().map_err(|_| AppError::invalid("ids", format!("`{id}` is not a pair id"))))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    blocking(move || {
        tuner.tunable_adapter(&name, scope)?;
        Ok(Json(Deleted { deleted: tuner.store.delete_pairs(&name, ids.as_deref())? }))
    })
    .await
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
    let tuner = tuner(&app)?.clone();
    let request: TrainRequest = if body.is_empty() {
        TrainRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| AppError::invalid("body", e.to_string()))?
    };
    let hyperparameters = request
        .hyperparameters
        .map(|h| h.resolve(tuner.settings.defaults))
        .transpose()?;
    blocking(move || {
        let job = tuner.start_feedback_job(&name, hyperparameters, scope)?;
        Ok(Json(job_view(&job)))
    })
    .await
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
    let tuner = tuner(&app)?.clone();
    let described = app.clone();
    blocking(move || {
        tuner.set_open_to_tuning(&name, request.open)?;
        crate::services::adapters::describe(&described.registry, described.tuner.as_deref(), &name)
            .map(AdapterInfo::from)
            .map(Json)
            .ok_or_else(|| AppError::NotFound(format!("the adapter `{name}` does not exist")))
    })
    .await
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
    let tuner = tuner(&app)?.clone();
    blocking(move || {
        tuner.rollback(&name, request.version)?;
        crate::services::adapters::describe(&app.registry, app.tuner.as_deref(), &name)
            .map(AdapterInfo::from)
            .map(Json)
            .ok_or_else(|| AppError::NotFound(format!("the adapter `{name}` does not exist")))
    })
    .await
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

/// Uploads a training file. Every record is checked first; the file is stored (durably) only if
/// all are valid.
#[utoipa::path(post, path = "/v1/files", tag = "Files",
    request_body(content = FileUpload, content_type = "multipart/form-data"),
    responses((status = 200, body = FileObject), (status = 400, body = super::error::ErrorResponse)))]
pub async fn upload_file(State(app): State<Arc<App>>, ApiMultipart(mut form): ApiMultipart) -> Result<Json<FileObject>, AppError> {
    let tuner = tuner(&app)?.clone();
    let (mut purpose, mut file) = (None, None);
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| AppError::invalid("file", format!("bad multipart body: {e}")))?
    {
        match field.name() {
            Some("purpose") => purpose = Some(field.text().await.map_err(|e| AppError::invalid("purpose", e.to_string()))?),
            Some("file") => {
                let filename = field.file_name().unwrap_or("upload.jsonl").to_string();
                let bytes = field.bytes().await.map_err(|e| AppError::invalid("file", e.to_string()))?;
                file = Some((filename, bytes));
            }
            _ => {}
        }
    }
    let purpose = purpose.ok_or_else(|| AppError::invalid("purpose", "`purpose` is required"))?;
    if purpose != "fine-tune" {
        return Err(AppError::invalid("purpose", format!("only `fine-tune` files are accepted, not `{purpose}`")));
    }
    let (filename, bytes) = file.ok_or_else(|| AppError::invalid("file", "`file` is required"))?;
    let records = parse_upload(&bytes).map_err(|e| AppError::InvalidParameter {
        message: format!("{filename}: {e}"),
        param: Some("file".into()),
        code: Some("invalid_record"),
    })?;
    blocking(move || {
        let row = FileRow {
            id: new_id("file"),
            filename,
            purpose,
            bytes: bytes.len(),
            records: records.len(),
            created_at: unix_time(),
        };
        tuner.store.insert_file(&row, &bytes)?;
        Ok(Json(file_view(&row)))
    })
    .await
}

/// Uploaded files, newest first.
#[utoipa::path(get, path = "/v1/files", tag = "Files", responses((status = 200, body = FileList)))]
pub async fn list_files(State(app): State<Arc<App>>) -> Result<Json<FileList>, AppError> {
    let tuner = tuner(&app)?.clone();
    blocking(move || {
        Ok(Json(FileList {
            object: "list",
            data: tuner.store.files()?.iter().map(file_view).collect(),
            has_more: false,
        }))
    })
    .await
}

#[utoipa::path(get, path = "/v1/files/{file_id}", tag = "Files",
    params(("file_id" = String, Path, description = "A file id")),
    responses((status = 200, body = FileObject), (status = 404, body = super::error::ErrorResponse)))]
pub async fn get_file(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<FileObject>, AppError> {
    let tuner = tuner(&app)?.clone();
    blocking(move || {
        tuner
            .store
            .file(&id)?
            .map(|f| Json(file_view(&f)))
            .ok_or_else(|| AppError::NotFound(format!("No such file: {id}")))
    })
    .await
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
    fn resolve(&self, defaults: Hyperparameters) -> Result<Hyperparameters, AppError> {
        let n_epochs = number(&self.n_epochs, "hyperparameters.n_epochs")?;
        let batch_size = number(&self.batch_size, "hyperparameters.batch_size")?;
        let multiplier = number(&self.learning_rate_multiplier, "hyperparameters.learning_rate_multiplier")?;
        let whole = |v: Option<f64>, param: &str, max: f64| match v {
            Some(v) if v.fract() != 0.0 || !(1.0..=max).contains(&v) => {
                Err(AppError::invalid(param, format!("must be a whole number from 1 to {max}")))
            }
            Some(v) => Ok(Some(v as usize)),
            None => Ok(None),
        };
        let n_epochs = whole(n_epochs, "hyperparameters.n_epochs", 50.0)?.unwrap_or(defaults.n_epochs);
        let batch_size = whole(batch_size, "hyperparameters.batch_size", 64.0)?.unwrap_or(defaults.batch_size);
        let multiplier = multiplier.unwrap_or(1.0);
        if !(multiplier > 0.0 && multiplier <= 100.0) {
            return Err(AppError::invalid("hyperparameters.learning_rate_multiplier", "must be in (0, 100]"));
        }
        Ok(Hyperparameters {
            n_epochs,
            batch_size,
            learning_rate: defaults.learning_rate * multiplier,
        })
    }
}

fn job_view(job: &JobRow) -> FineTuningJob {
    let spec: Option<JobSpec> = serde_json::from_value(job.spec.clone()).ok();
    let defaults = Hyperparameters::default();
    let h = spec.as_ref().map_or(defaults, |s| s.hyperparameters);
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
        hyperparameters: JobHyperparameters {
            n_epochs: h.n_epochs,
            batch_size: h.batch_size,
            learning_rate_multiplier: h.learning_rate / defaults.learning_rate,
        },
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
    let tuner = tuner(&app)?.clone();
    app.check_model(&request.model)?;
    let hyperparameters = request
        .hyperparameters
        .clone()
        .unwrap_or_default()
        .resolve(tuner.settings.defaults)?;
    if let Some(suffix) = &request.suffix {
        if suffix.is_empty() || suffix.len() > 40 || !crate::registry::valid_name(suffix) {
            return Err(AppError::invalid("suffix", "the suffix must be 1 to 40 characters of A-Z, a-z, 0-9, '.', '_' or '-'"));
        }
    }
    blocking(move || {
        for (param, file) in [("training_file", Some(&request.training_file)), ("validation_file", request.validation_file.as_ref())] {
            if let Some(file) = file {
                if tuner.store.file(file)?.is_none() {
                    return Err(AppError::InvalidParameter {
                        message: format!("No such file: {file}"),
                        param: Some(param.into()),
                        code: Some("file_not_found"),
                    });
                }
            }
        }
        let spec = JobSpec {
            data: JobData::Files {
                training_file: request.training_file,
                validation_file: request.validation_file,
            },
            hyperparameters,
            seed: request.seed.unwrap_or(42),
            suffix: request.suffix,
            start_version: 0,
        };
        let job = tuner.start_file_job(&request.model, spec, scope)?;
        Ok(Json(job_view(&job)))
    })
    .await
}

/// Every job (file jobs and feedback jobs), newest first.
#[utoipa::path(get, path = "/v1/fine_tuning/jobs", tag = "Fine-tuning", responses((status = 200, body = JobList)))]
pub async fn list_jobs(State(app): State<Arc<App>>) -> Result<Json<JobList>, AppError> {
    let tuner = tuner(&app)?.clone();
    blocking(move || {
        Ok(Json(JobList {
            object: "list",
            data: tuner.store.jobs(None)?.iter().map(job_view).collect(),
            has_more: false,
        }))
    })
    .await
}

fn find_job(tuner: &Tuner, id: &str) -> Result<JobRow, AppError> {
    tuner
        .store
        .job(id)?
        .ok_or_else(|| AppError::NotFound(format!("No such fine-tuning job: {id}")))
}

#[utoipa::path(get, path = "/v1/fine_tuning/jobs/{job_id}", tag = "Fine-tuning",
    params(("job_id" = String, Path, description = "A job id")),
    responses((status = 200, body = FineTuningJob), (status = 404, body = super::error::ErrorResponse)))]
pub async fn get_job(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<FineTuningJob>, AppError> {
    let tuner = tuner(&app)?.clone();
    blocking(move || Ok(Json(job_view(&find_job(&tuner, &id)?)))).await
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
    let tuner = tuner(&app)?.clone();
    blocking(move || {
        let job = find_job(&tuner, &id)?;
        if !tuner.cancel(&id, scope)? {
            return Err(AppError::invalid("job_id", format!("the job has already ended ({})", job.status)));
        }
        Ok(Json(job_view(&find_job(&tuner, &id)?)))
    })
    .await
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
    Query(params): Query<EventParams>,
) -> Result<Json<EventList>, AppError> {
    let tuner = tuner(&app)?.clone();
    let before = params
        .after
        .map(|a| {
            a.trim_start_matches("ftevent-")
                .parse::<i64>()
                .map_err(|_| AppError::invalid("after", format!("`{a}` is not an event id")))
        })
        .transpose()?;
    let limit = params.limit.unwrap_or(20).clamp(1, 1000);
    blocking(move || {
        find_job(&tuner, &id)?;
        let mut events = tuner.store.events(&id, before, limit + 1)?;
        let has_more = events.len() > limit;
        events.truncate(limit);
        Ok(Json(EventList {
            object: "list",
            data: events.into_iter().map(event_view).collect(),
            has_more,
        }))
    })
    .await
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
    let tuner = tuner(&app)?.clone();
    blocking(move || {
        find_job(&tuner, &id)?;
        Ok(Json(CheckpointList {
            object: "list",
            data: tuner.store.checkpoints(&id)?.into_iter().map(checkpoint_view).collect(),
            has_more: false,
        }))
    })
    .await
}
