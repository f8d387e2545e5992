//! Runtime adapter management (vLLM's routes), behind the admin key when one is set.

use std::sync::Arc;

use axum::extract::multipart::MultipartError;
use axum::extract::{Path, State};
use axum::Json;
use tessera_adapters::peft::{PeftAdapter, CONFIG_FILE, WEIGHTS_FILE};

use super::types::{
    AdapterInfo, AdapterList, AdapterStatus, AdapterUpload, LoadAdapterRequest, UnloadAdapterRequest,
};
use super::{blocking, ApiJson, ApiMultipart, App, AppError};
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
    let generation = blocking(move || registry_app.registry.load(&name, &path).map_err(registry_error)).await?;
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

/// What the registry (and, for tuned adapters, the tuning store) knows of `name`.
pub fn describe(app: &App, name: &str) -> Option<AdapterInfo> {
    crate::services::adapters::describe(&app.registry, app.tuner.as_deref(), name).map(AdapterInfo::from)
}

/// Every registered adapter, loaded or not.
#[utoipa::path(get, path = "/v1/adapters", tag = "Adapters",
    responses((status = 200, body = AdapterList), (status = 401, body = super::error::ErrorResponse)))]
pub async fn list_adapters(State(app): State<Arc<App>>) -> Result<Json<AdapterList>, AppError> {
    // The tuning state of each comes from the store: blocking work.
    blocking(move || {
        Ok(Json(AdapterList {
            object: "list",
            data: crate::services::adapters::describe_all(&app.registry, app.tuner.as_deref())
                .into_iter()
                .map(AdapterInfo::from)
                .collect(),
        }))
    })
    .await
}

/// One adapter.
#[utoipa::path(get, path = "/v1/adapters/{name}", tag = "Adapters",
    params(("name" = String, Path, description = "An adapter name")),
    responses((status = 200, body = AdapterInfo), (status = 404, body = super::error::ErrorResponse)))]
pub async fn get_adapter(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
) -> Result<Json<AdapterInfo>, AppError> {
    blocking(move || {
        describe(&app, &name)
            .map(Json)
            .ok_or_else(|| AppError::NotFound(format!("the adapter `{name}` does not exist")))
    })
    .await
}

/// Unloads an adapter and, when its files live in the adapters directory, deletes them.
#[utoipa::path(delete, path = "/v1/adapters/{name}", tag = "Adapters",
    params(("name" = String, Path, description = "An adapter name")),
    responses((status = 200, body = AdapterStatus), (status = 404, body = super::error::ErrorResponse)))]
pub async fn delete_adapter(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
) -> Result<Json<AdapterStatus>, AppError> {
    let (path, _) = app
        .registry
        .describe(&name)
        .ok_or_else(|| AppError::NotFound(format!("the adapter `{name}` does not exist")))?;
    app.registry.unload(&name).map_err(registry_error)?;
    let owned = match (&app.settings.adapters_dir, path.canonicalize()) {
        (Some(dir), Ok(path)) => dir.canonicalize().is_ok_and(|dir| path.starts_with(dir)),
        _ => false,
    };
    if owned {
        blocking(move || {
            std::fs::remove_dir_all(&path).map_err(|e| AppError::Internal(format!("unloaded, but deleting its files failed: {e}")))
        })
        .await?;
    }
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
            other => {
                return Err(AppError::invalid(
                    other,
                    format!("unknown form field `{other}` (expected name, adapter_config.json, adapter_model.safetensors or archive)"),
                ))
            }
        }
    }
    app.registry
        .check_new_name(&upload.name)
        .map_err(|e| AppError::invalid("name", e.to_string()))?;
    let dir = app.settings.adapters_dir.clone().ok_or_else(|| {
        AppError::invalid("name", "this server has no adapters directory to store uploads in")
    })?;
    let upload_name = upload.name.clone();
    let installer_app = app.clone();
    blocking(move || {
        let name = upload.name.clone();
        let (config, weights) = unpack_upload(&installer_app, upload)?;
        install(&dir, &name, config.as_bytes(), &weights)
            .map_err(|e| AppError::Internal(format!("storing the adapter failed: {e}")))?;
        installer_app
            .registry
            .load(&name, &dir.join(&name))
            .map(|_| ())
            .map_err(registry_error)
    })
    .await?;
    blocking(move || {
        describe(&app, &upload_name)
            .map(Json)
            .ok_or_else(|| AppError::Internal("the adapter vanished while loading".into()))
    })
    .await
}

/// The upload's config text and weights, from its two files or its archive, checked against
/// the base model (on a blocking thread: archives and safetensors are parsed here).
fn unpack_upload(app: &App, upload: AdapterUpload) -> Result<(String, Vec<u8>), AppError> {
    let max_bytes = app.settings.max_body_bytes;
    let (config, weights) = match (upload.adapter_config, upload.adapter_model, upload.archive) {
        (Some(config), Some(weights), None) => (config, weights),
        (None, None, Some(archive)) if archive.starts_with(b"PK\x03\x04") => from_zip(&archive, max_bytes)?,
        (None, None, Some(archive)) => from_tar(&archive, max_bytes)?,
        _ => {
            return Err(AppError::invalid(
                "archive",
                "send both adapter_config.json and adapter_model.safetensors, or one zip or tar archive",
            ))
        }
    };
    let config = String::from_utf8(config)
        .map_err(|_| AppError::invalid("adapter_config.json", "the config is not UTF-8"))?;
    let shape = app.model.model.config().adapter_shape();
    PeftAdapter::from_parts(&config, &weights, std::path::Path::new(&upload.name), &shape)
        .map_err(|e| AppError::invalid("adapter_model.safetensors", e.to_string()))?;
    Ok((config, weights))
}

/// The most members an uploaded archive may have (folders included).
const MAX_ARCHIVE_ENTRIES: usize = 64;

/// The two PEFT files among an archive's members, found by file name wherever they sit. What
/// the archive unpacks to is bounded: at most `max_bytes` in all and [`MAX_ARCHIVE_ENTRIES`]
/// members, checked while reading, so a small archive that inflates to gigabytes is refused
/// before it is held.
struct PeftFiles {
    config: Option<Vec<u8>>,
    weights: Option<Vec<u8>>,
    entries: usize,
    bytes_left: u64,
}

impl PeftFiles {
    fn new(max_bytes: usize) -> Self {
        Self {
            config: None,
            weights: None,
            entries: 0,
            bytes_left: max_bytes as u64,
        }
    }

    fn offer(&mut self, file_name: &str, member: &mut impl std::io::Read) -> Result<(), String> {
        use std::io::Read;
        self.entries += 1;
        if self.entries > MAX_ARCHIVE_ENTRIES {
            return Err(format!("it has more than {MAX_ARCHIVE_ENTRIES} members"));
        }
        let slot = match file_name {
            CONFIG_FILE => &mut self.config,
            WEIGHTS_FILE => &mut self.weights,
            _ => return Ok(()),
        };
        let mut data = Vec::new();
        let read = member
            .by_ref()
            .take(self.bytes_left + 1)
            .read_to_end(&mut data)
            .map_err(|e| e.to_string())? as u64;
        if read > self.bytes_left {
            return Err("it unpacks to more bytes than the request body limit".into());
        }
        self.bytes_left -= read;
        *slot = Some(data);
        Ok(())
    }

    fn both(self, kind: &str) -> Result<(Vec<u8>, Vec<u8>), AppError> {
        match (self.config, self.weights) {
            (Some(config), Some(weights)) => Ok((config, weights)),
            _ => Err(bad_archive(kind, format!("it must hold {CONFIG_FILE} and {WEIGHTS_FILE}"))),
        }
    }
}

fn bad_archive(kind: &str, problem: impl std::fmt::Display) -> AppError {
    AppError::invalid("archive", format!("not a usable {kind} archive: {problem}"))
}

fn from_tar(archive: &[u8], max_bytes: usize) -> Result<(Vec<u8>, Vec<u8>), AppError> {
    let bad = |e: std::io::Error| bad_archive("zip or tar", e);
    let mut files = PeftFiles::new(max_bytes);
    for entry in tar::Archive::new(archive).entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let name = entry.path().map_err(bad)?.file_name().and_then(|n| n.to_str()).map(str::to_string);
        let name = name.filter(|_| entry.header().entry_type().is_file()).unwrap_or_default();
        files.offer(&name, &mut entry).map_err(|e| bad_archive("tar", e))?;
    }
    files.both("tar")
}

fn from_zip(archive: &[u8], max_bytes: usize) -> Result<(Vec<u8>, Vec<u8>), AppError> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(archive)).map_err(|e| bad_archive("zip", e))?;
    if zip.len() > MAX_ARCHIVE_ENTRIES {
        return Err(bad_archive("zip", format!("it has {} members, more than {MAX_ARCHIVE_ENTRIES}", zip.len())));
    }
    let mut files = PeftFiles::new(max_bytes);
    for i in 0..zip.len() {
        let mut member = zip.by_index(i).map_err(|e| bad_archive("zip", e))?;
        let name = if member.is_file() { member.name().rsplit('/').next().unwrap_or_default().to_string() } else { String::new() };
        files.offer(&name, &mut member).map_err(|e| bad_archive("zip", e))?;
    }
    files.both("zip")
}

/// Writes the files into a staging folder, makes them durable, then renames it to `dir/name`
/// (replacing any earlier folder of that name).
fn install(dir: &std::path::Path, name: &str, config: &[u8], weights: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let staging = dir.join(format!(".upload-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&staging)?;
    for (file, data) in [(CONFIG_FILE, config), (WEIGHTS_FILE, weights)] {
        let mut f = std::fs::File::create(staging.join(file))?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::File::open(&staging)?.sync_all()?;
    let target = dir.join(name);
    if target.exists() {
        let old = dir.join(format!(".replaced-{:016x}", rand::random::<u64>()));
        std::fs::rename(&target, &old)?;
        std::fs::rename(&staging, &target)?;
        std::fs::remove_dir_all(&old)?;
    } else {
        std::fs::rename(&staging, &target)?;
    }
    std::fs::File::open(dir)?.sync_all()
}
