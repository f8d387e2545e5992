//! Runtime adapter management (vLLM's routes and the adapters resource), for the admin. Each
//! handler parses, calls the adapters service once, and shapes its answer.

use std::sync::Arc;

use axum::extract::multipart::MultipartError;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use super::auth::Principal;
use super::types::{AdapterInfo, AdapterList, AdapterStatus, AdapterUpload, DownloadFormat, DownloadParams, LoadAdapterRequest, UnloadAdapterRequest};
use super::{ApiJson, ApiMultipart, ApiQuery, App, AppError};
use crate::adapter_files::AdapterFormat;
use crate::services::adapters::AdapterFiles;

/// Loads an adapter (a PEFT folder or a GGUF-LoRA file) from the server's disk as `lora_name`. Replacing a name makes a new
/// generation: requests already running finish on the one they started with.
#[utoipa::path(post, path = "/v1/load_lora_adapter", tag = "Adapters", request_body = LoadAdapterRequest,
    responses((status = 200, body = AdapterStatus), (status = 400, body = super::error::ErrorResponse),
              (status = 401, body = super::error::ErrorResponse), (status = 403, body = super::error::ErrorResponse)))]
pub async fn load_lora_adapter(
    State(app): State<Arc<App>>,
    ApiJson(req): ApiJson<LoadAdapterRequest>,
) -> Result<Json<AdapterStatus>, AppError> {
    let generation = app.adapters.load(req.lora_name.clone(), req.lora_path.into()).await?;
    Ok(Json(AdapterStatus {
        name: req.lora_name,
        generation: Some(generation.generation),
        status: "loaded",
    }))
}

/// Unloads `lora_name`: new requests are refused at once; memory is freed when the last request
/// using it ends.
#[utoipa::path(post, path = "/v1/unload_lora_adapter", tag = "Adapters", request_body = UnloadAdapterRequest,
    responses((status = 200, body = AdapterStatus), (status = 404, body = super::error::ErrorResponse),
              (status = 401, body = super::error::ErrorResponse), (status = 403, body = super::error::ErrorResponse)))]
pub async fn unload_lora_adapter(
    State(app): State<Arc<App>>,
    ApiJson(req): ApiJson<UnloadAdapterRequest>,
) -> Result<Json<AdapterStatus>, AppError> {
    app.adapters.unload(&req.lora_name)?;
    Ok(Json(AdapterStatus {
        name: req.lora_name,
        generation: None,
        status: "unloaded",
    }))
}

/// Every registered adapter, loaded or not.
#[utoipa::path(get, path = "/v1/adapters", tag = "Adapters",
    responses((status = 200, body = AdapterList), (status = 401, body = super::error::ErrorResponse)))]
pub async fn list_adapters(State(app): State<Arc<App>>) -> Result<Json<AdapterList>, AppError> {
    let adapters = app.adapters.list().await?;
    Ok(Json(AdapterList { object: "list", data: adapters.into_iter().map(AdapterInfo::from).collect() }))
}

/// One adapter.
#[utoipa::path(get, path = "/v1/adapters/{name}", tag = "Adapters",
    params(("name" = String, Path, description = "An adapter name")),
    responses((status = 200, body = AdapterInfo), (status = 404, body = super::error::ErrorResponse)))]
pub async fn get_adapter(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
) -> Result<Json<AdapterInfo>, AppError> {
    Ok(Json(app.adapters.get(name).await?.into()))
}

/// Unloads an adapter and, when its files live in the adapters directory, deletes them.
#[utoipa::path(delete, path = "/v1/adapters/{name}", tag = "Adapters",
    params(("name" = String, Path, description = "An adapter name")),
    responses((status = 200, body = AdapterStatus), (status = 404, body = super::error::ErrorResponse)))]
pub async fn delete_adapter(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
) -> Result<Json<AdapterStatus>, AppError> {
    app.adapters.delete(name.clone()).await?;
    Ok(Json(AdapterStatus {
        name,
        generation: None,
        status: "deleted",
    }))
}

/// Uploads a PEFT adapter (multipart: `name`, then `adapter_config.json` and
/// `adapter_model.safetensors`, or one zip or tar `archive` holding them) into the adapters directory
/// and loads it. The upload is checked before it is installed, and acknowledged once its files
/// are durable; replacing a name makes a new generation.
#[utoipa::path(post, path = "/v1/adapters", tag = "Adapters",
    request_body(content = AdapterUpload, content_type = "multipart/form-data"),
    responses((status = 200, body = AdapterInfo), (status = 400, body = super::error::ErrorResponse),
              (status = 401, body = super::error::ErrorResponse), (status = 403, body = super::error::ErrorResponse)))]
pub async fn upload_adapter(
    State(app): State<Arc<App>>,
    ApiMultipart(mut form): ApiMultipart,
) -> Result<Json<AdapterInfo>, AppError> {
    let bad_form = |e: MultipartError| AppError::BadBody {
        status: e.status(),
        message: e.body_text(),
    };
    let mut upload = AdapterUpload::default();
    while let Some(field) = form.next_field().await.map_err(bad_form)? {
        let field_name = field.name().unwrap_or_default().to_string();
        let data = field.bytes().await.map_err(bad_form)?.to_vec();
        match field_name.as_str() {
            "name" => {
                upload.name = String::from_utf8(data)
                    .map_err(|_| AppError::invalid("name", "`name` is not UTF-8"))?
            }
            "adapter_config.json" | "adapter_config" => upload.adapter_config = Some(data),
            "adapter_model.safetensors" | "adapter_model" => upload.adapter_model = Some(data),
            "archive" => upload.archive = Some(data),
            "gguf" | "adapter.gguf" => upload.gguf = Some(data),
            other => {
                return Err(AppError::invalid(
                    other,
                    format!("unknown form field `{other}` (expected name, adapter_config.json, adapter_model.safetensors, archive or gguf)"),
                ))
            }
        }
    }
    Ok(Json(app.adapters.upload(upload.into()).await?.into()))
}

impl From<AdapterUpload> for AdapterFiles {
    fn from(upload: AdapterUpload) -> Self {
        Self { name: upload.name, config: upload.adapter_config, weights: upload.adapter_model, archive: upload.archive, gguf: upload.gguf }
    }
}

/// Downloads an adapter, any version of one tuned online: a zip of its PEFT files, or one
/// GGUF-LoRA file that llama.cpp's `--lora` loads. Both hold the same factors, so either form,
/// uploaded again, answers exactly as the original. A `tune` key may download the tuned
/// adapters it may tune.
#[utoipa::path(get, path = "/v1/adapters/{name}/download", tag = "Adapters",
    params(("name" = String, Path, description = "An adapter name"), DownloadParams),
    responses((status = 200, description = "The adapter", content(
                  (Vec<u8> = "application/zip"), (Vec<u8> = "application/octet-stream"))),
              (status = 400, body = super::error::ErrorResponse),
              (status = 403, description = "Not an adapter this key may tune", body = super::error::ErrorResponse),
              (status = 404, body = super::error::ErrorResponse)))]
pub async fn download_adapter(
    State(app): State<Arc<App>>,
    Extension(Principal(scope)): Extension<Principal>,
    Path(name): Path<String>,
    ApiQuery(params): ApiQuery<DownloadParams>,
) -> Result<Response, AppError> {
    let format = match params.format.unwrap_or(DownloadFormat::Peft) {
        DownloadFormat::Peft => AdapterFormat::Peft,
        DownloadFormat::Gguf => AdapterFormat::Gguf,
    };
    let export = app.adapters.download(name, format, params.version, scope).await?;
    let disposition = format!("attachment; filename=\"{}\"", export.filename);
    Ok(([(header::CONTENT_TYPE, export.content_type.to_string()), (header::CONTENT_DISPOSITION, disposition)], export.bytes).into_response())
}
