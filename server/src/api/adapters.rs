//! Runtime adapter management (vLLM's routes), behind the admin key when one is set.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;

use super::types::{AdapterStatus, LoadAdapterRequest, UnloadAdapterRequest};
use super::{ApiJson, App, AppError};
use crate::registry::RegistryError;

fn registry_error(e: RegistryError) -> AppError {
    match e {
        RegistryError::InvalidName(_) | RegistryError::ReservedName(_) => AppError::invalid("lora_name", e.to_string()),
        RegistryError::NotFound(_) => AppError::NotFound(e.to_string()),
        RegistryError::OutsideRoots { .. } | RegistryError::Io { .. } | RegistryError::Peft(_) => {
            AppError::invalid("lora_path", e.to_string())
        }
    }
}

/// Loads a PEFT adapter from the server's disk as `lora_name`. Replacing a name makes a new
/// generation: requests already running finish on the one they started with.
#[utoipa::path(post, path = "/v1/load_lora_adapter", tag = "Adapters", request_body = LoadAdapterRequest,
    responses((status = 200, body = AdapterStatus), (status = 400, body = super::error::ErrorResponse),
              (status = 401, body = super::error::ErrorResponse), (status = 403, body = super::error::ErrorResponse)))]
pub async fn load_lora_adapter(
    State(app): State<Arc<App>>,
    ApiJson(req): ApiJson<LoadAdapterRequest>,
) -> Result<Json<AdapterStatus>, AppError> {
    let path = std::path::PathBuf::from(&req.lora_path);
    let name = req.lora_name.clone();
    let registry_app = app.clone();
    let generation = tokio::task::spawn_blocking(move || registry_app.registry.load(&name, &path))
        .await
        .map_err(|e| AppError::Internal(e.to_string()))?
        .map_err(registry_error)?;
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
    app.registry.unload(&req.lora_name).map_err(registry_error)?;
    Ok(Json(AdapterStatus {
        name: req.lora_name,
        generation: None,
        status: "unloaded",
    }))
}
