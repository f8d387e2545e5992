//! Adapters as a whole: loading, uploading and deleting what the registry serves, and describing
//! each with what the tuning store knows of the ones tuned online.

use std::path::PathBuf;
use std::sync::Arc;

use tessera_adapters::peft::{BaseShape, PeftAdapter, CONFIG_FILE, WEIGHTS_FILE};
use tessera_adapters::AdapterKind;

use super::{archive, blocking, ServiceError};
use crate::access::Scope;
use crate::adapter_files::{self, AdapterFormat};
use crate::registry::{AdapterGeneration, Registry, RegistryError};
use crate::train::job::Tuner;
/// One adapter, as the registry and the tuning store know it.
#[derive(Debug, Clone)]
pub struct AdapterDescription {
    pub name: String,
    pub path: PathBuf,
    /// The generation in memory, when it is loaded.
    pub generation: Option<u64>,
    pub rank: Option<usize>,
    pub alpha: Option<f32>,
    /// LoRA, DoRA or IA³, as its files say.
    pub kind: Option<AdapterKind>,
    pub size_bytes: Option<usize>,
    /// For adapters tuned online.
    pub tuning: Option<TuningState>,
}

/// What the tuning store knows of a tuned adapter.
#[derive(Debug, Clone)]
pub struct TuningState {
    /// The served version (0 until a first promotion).
    pub version: u32,
    /// Whether a job is queued or running for it.
    pub training: Option<bool>,
    pub pairs: Option<usize>,
    /// The served version's metrics.
    pub metrics: Option<serde_json::Value>,
    /// The versions on disk, oldest first.
    pub versions: Vec<crate::store::VersionRow>,
    pub rank: usize,
    pub alpha: f32,
    pub created_by: Scope,
    pub open_to_tuning: bool,
}

/// An adapter upload: its name, and either both PEFT files, one zip or tar archive of them, or
/// one GGUF-LoRA file.
#[derive(Debug, Default)]
pub struct AdapterFiles {
    pub name: String,
    pub config: Option<Vec<u8>>,
    pub weights: Option<Vec<u8>>,
    pub archive: Option<Vec<u8>>,
    pub gguf: Option<Vec<u8>>,
}

/// An adapter written out for download.
pub struct Export {
    pub filename: String,
    pub content_type: &'static str,
    pub bytes: Vec<u8>,
}

/// The adapters service.
pub struct Adapters {
    registry: Arc<Registry>,
    tuner: Option<Arc<Tuner>>,
    /// Scanned at startup; where uploads are stored and what delete may remove.
    dir: Option<PathBuf>,
    base: BaseShape,
    /// The base model's id, which exported PEFT configs name.
    base_model: String,
    /// The most bytes an uploaded archive may unpack to.
    max_upload_bytes: usize,
}

/// A registry error on a load or unload, named by the field that caused it.
fn registry_error(e: RegistryError) -> ServiceError {
    match e {
        RegistryError::InvalidName(_) | RegistryError::ReservedName(_) => ServiceError::invalid("lora_name", e.to_string()),
        RegistryError::NotFound(_) => ServiceError::NotFound(e.to_string()),
        RegistryError::OutsideRoots { .. } | RegistryError::Io { .. } | RegistryError::Unservable { .. } => ServiceError::invalid("lora_path", e.to_string()),
    }
}

fn missing(name: &str) -> ServiceError {
    ServiceError::NotFound(format!("the adapter `{name}` does not exist"))
}

impl Adapters {
    pub fn new(registry: Arc<Registry>, tuner: Option<Arc<Tuner>>, dir: Option<PathBuf>, base: BaseShape, base_model: String, max_upload_bytes: usize) -> Self {
        Self { registry, tuner, dir, base, base_model, max_upload_bytes }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Loads the PEFT folder at `path` (under the allowed roots) as `name`; replacing a name
    /// makes a new generation, and requests already running finish on the one they leased.
    pub async fn load(self: &Arc<Self>, name: String, path: PathBuf) -> Result<Arc<AdapterGeneration>, ServiceError> {
        let this = self.clone();
        blocking(move || this.registry.load(&name, &path).map_err(registry_error)).await
    }

    /// Refuses `name` to new requests at once; its memory is freed when the last lease ends.
    pub fn unload(&self, name: &str) -> Result<(), ServiceError> {
        self.registry.unload(name).map_err(registry_error)
    }

    /// Every registered adapter, loaded or not, with its tuning state.
    pub async fn list(self: &Arc<Self>) -> Result<Vec<AdapterDescription>, ServiceError> {
        let this = self.clone();
        blocking(move || Ok(this.registry.names().iter().filter_map(|name| this.describe(name)).collect())).await
    }

    pub async fn get(self: &Arc<Self>, name: String) -> Result<AdapterDescription, ServiceError> {
        let this = self.clone();
        blocking(move || this.describe_existing(&name)).await
    }

    /// Unloads `name` and, when its files live in the adapters directory, deletes them. A tuned
    /// adapter loses its record, versions and pairs too, on every server sharing the store.
    pub async fn delete(self: &Arc<Self>, name: String) -> Result<(), ServiceError> {
        let (path, _) = self.registry.describe(&name).ok_or_else(|| missing(&name))?;
        if let Some(tuner) = self.tuner.clone() {
            let forgotten = name.clone();
            if blocking(move || Ok(tuner.delete_adapter(&forgotten)?)).await? {
                return Ok(());
            }
        }
        self.unload(&name)?;
        let owned = match (&self.dir, path.canonicalize()) {
            (Some(dir), Ok(path)) => dir.canonicalize().is_ok_and(|dir| path.starts_with(dir)),
            _ => false,
        };
        if owned {
            let removed = move || if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            blocking(move || removed().map_err(|e| ServiceError::Internal(format!("unloaded, but deleting its files failed: {e}")))).await?;
        }
        Ok(())
    }

    /// Checks an uploaded adapter against the base model, stores its files durably in the
    /// adapters directory and loads it.
    pub async fn upload(self: &Arc<Self>, upload: AdapterFiles) -> Result<AdapterDescription, ServiceError> {
        self.registry.check_new_name(&upload.name).map_err(|e| ServiceError::invalid("name", e.to_string()))?;
        if let Some(tuner) = self.tuner.clone().filter(|t| t.store.is_shared()) {
            let name = upload.name.clone();
            if blocking(move || Ok(tuner.store.adapter(&name)?)).await?.is_some() {
                return Err(ServiceError::Conflict(format!(
                    "`{}` is a tuned adapter of the store this group shares: delete it first, or train it",
                    upload.name
                )));
            }
        }
        let dir = self
            .dir
            .clone()
            .ok_or_else(|| ServiceError::invalid("name", "this server has no adapters directory to store uploads in"))?;
        let this = self.clone();
        blocking(move || {
            let name = upload.name.clone();
            let installed = match upload.gguf {
                Some(gguf) if upload.config.is_none() && upload.weights.is_none() && upload.archive.is_none() => this.install_gguf(&dir, &name, &gguf)?,
                Some(_) => return Err(ServiceError::invalid("gguf", "send a GGUF-LoRA file alone, without PEFT files or an archive")),
                None => {
                    let (config, weights) = this.unpack(upload)?;
                    archive::install(&dir, &name, config.as_bytes(), &weights).map_err(|e| ServiceError::Internal(format!("storing the adapter failed: {e}")))?
                }
            };
            this.registry.load(&name, &installed).map_err(registry_error)?;
            this.share_upload(&name)?;
            this.describe(&name).ok_or_else(|| ServiceError::Internal("the adapter vanished while loading".into()))
        })
        .await
    }

    /// In a group of servers sharing a PostgreSQL store, an upload becomes the store's version 0
    /// of the adapter (the admin's), so that every server serves it, as they serve trained ones.
    fn share_upload(&self, name: &str) -> Result<(), ServiceError> {
        match &self.tuner {
            Some(tuner) if tuner.store.is_shared() => {
                tuner.store_feedback(name, None, Scope::Admin, crate::store::NewFeedback::default())?;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Checks an uploaded GGUF-LoRA file against the base, then stores it durably as
    /// `dir/name.gguf`.
    fn install_gguf(&self, dir: &std::path::Path, name: &str, gguf: &[u8]) -> Result<PathBuf, ServiceError> {
        let stored = |e: std::io::Error| ServiceError::Internal(format!("storing the adapter failed: {e}"));
        let staged = archive::stage_file(dir, gguf).map_err(stored)?;
        if let Err(e) = adapter_files::load(&staged, &self.base, None) {
            let _ = std::fs::remove_file(&staged);
            return Err(ServiceError::invalid("gguf", e.reason().replace(&staged.file_name().unwrap_or_default().to_string_lossy().into_owned(), "the upload")));
        }
        archive::publish_file(&staged, dir, name).map_err(stored)
    }

    /// `name` (its current version, or `version` of an adapter tuned online) as a PEFT zip or a
    /// GGUF-LoRA file. A file already in the asked format goes out as it is stored; the other
    /// format holds the same factors. A `tune` scope may download the tuned adapters it may
    /// tune; the admin any.
    pub async fn download(self: &Arc<Self>, name: String, format: AdapterFormat, version: Option<u32>, scope: Scope) -> Result<Export, ServiceError> {
        let this = self.clone();
        blocking(move || {
            let source = this.source(&name, version, scope)?;
            let suffix = version.map(|v| format!("-v{v}")).unwrap_or_default();
            // A delete that lands between finding the files and reading them takes them away:
            // the adapter no longer exists, which is not the server's fault.
            this.export(&source, &format!("{name}{suffix}"), format)
                .map_err(|e| if source.exists() { e } else { missing(&name) })
        })
        .await
    }

    /// The adapter stored at `source` in `format`, named `stem`. A file already in that format
    /// goes out as it is stored; the other format holds the same factors.
    fn export(&self, source: &std::path::Path, stem: &str, format: AdapterFormat) -> Result<Export, ServiceError> {
        let unreadable = |e: adapter_files::AdapterFileError| match e {
            adapter_files::AdapterFileError::NoGgufForm { .. } => ServiceError::invalid("format", e.to_string()),
            other => ServiceError::Internal(format!("reading the stored adapter failed: {}", other.reason())),
        };
        let stored = |e: std::io::Error| ServiceError::Internal(format!("reading the stored adapter failed: {e}"));
        match format {
            AdapterFormat::Gguf => {
                let bytes = match AdapterFormat::of(source) {
                    AdapterFormat::Gguf => std::fs::read(source).map_err(stored)?,
                    AdapterFormat::Peft => adapter_files::to_gguf(&adapter_files::read(source, &self.base).map_err(unreadable)?, &self.base),
                };
                Ok(Export { filename: format!("{stem}.gguf"), content_type: "application/octet-stream", bytes })
            }
            AdapterFormat::Peft => {
                let (config, weights) = match AdapterFormat::of(source) {
                    AdapterFormat::Peft => (std::fs::read(source.join(CONFIG_FILE)).map_err(stored)?, std::fs::read(source.join(WEIGHTS_FILE)).map_err(stored)?),
                    AdapterFormat::Gguf => adapter_files::to_peft(&adapter_files::read(source, &self.base).map_err(unreadable)?, &self.base_model).map_err(unreadable)?,
                };
                let bytes = archive::zip_peft(stem, &config, &weights).map_err(ServiceError::internal)?;
                Ok(Export { filename: format!("{stem}.zip"), content_type: "application/zip", bytes })
            }
        }
    }

    /// Where `name`'s current version, or its `version`, is stored, if `scope` may read it.
    fn source(&self, name: &str, version: Option<u32>, scope: Scope) -> Result<PathBuf, ServiceError> {
        let (current, _) = self.registry.describe(name).ok_or_else(|| missing(name))?;
        let tuned = match &self.tuner {
            Some(tuner) => tuner.store.adapter(name)?,
            None => None,
        };
        if scope != Scope::Admin && !tuned.as_ref().is_some_and(|row| row.may_be_tuned_by(scope)) {
            return Err(ServiceError::NotOwner(format!("the adapter `{name}` is not one this key may tune, so it may not download it either")));
        }
        let Some(version) = version else {
            return Ok(current);
        };
        let (Some(tuner), Some(_)) = (&self.tuner, &tuned) else {
            return Err(ServiceError::invalid("version", format!("`{name}` is not tuned online, so it has only its current version")));
        };
        let versions = tuner.store.versions(name)?;
        let listed = versions.iter().map(|v| v.version.to_string()).collect::<Vec<_>>().join(", ");
        let path = versions
            .into_iter()
            .find(|v| v.version == version)
            .map(|v| v.path)
            .ok_or_else(|| ServiceError::invalid("version", format!("`{name}` has no version {version} (it has {listed})")))?;
        Ok(tuner.store.fetch(&path)?)
    }

    /// The upload's config text and weights, from its two files or its archive, checked against
    /// the base model.
    fn unpack(&self, upload: AdapterFiles) -> Result<(String, Vec<u8>), ServiceError> {
        let (config, weights) = match (upload.config, upload.weights, upload.archive) {
            (Some(config), Some(weights), None) => (config, weights),
            (None, None, Some(archive)) => archive::peft_files(&archive, self.max_upload_bytes)?,
            _ => return Err(ServiceError::invalid("archive", "send both adapter_config.json and adapter_model.safetensors, or one zip or tar archive")),
        };
        let config = String::from_utf8(config).map_err(|_| ServiceError::invalid("adapter_config.json", "the config is not UTF-8"))?;
        PeftAdapter::from_parts(&config, &weights, std::path::Path::new(&upload.name), &self.base, self.registry.base_weights())
            .map_err(|e| ServiceError::invalid("adapter_model.safetensors", e.to_string()))?;
        Ok((config, weights))
    }

    /// [`Adapters::describe`], with a missing adapter as an error.
    pub fn describe_existing(&self, name: &str) -> Result<AdapterDescription, ServiceError> {
        self.describe(name).ok_or_else(|| missing(name))
    }

    /// `name` as the registry serves it, with its tuning state where it is tuned online;
    /// `None` when the registry does not hold it. Reads the store: blocking.
    pub fn describe(&self, name: &str) -> Option<AdapterDescription> {
        let (path, generation) = self.registry.describe(name)?;
        Some(AdapterDescription {
            name: name.to_string(),
            path,
            generation: generation.as_ref().map(|g| g.generation),
            rank: generation.as_ref().map(|g| g.rank),
            alpha: generation.as_ref().map(|g| g.alpha),
            kind: self.registry.kind(name),
            size_bytes: generation.as_ref().map(|g| g.weights.size_in_bytes()),
            tuning: self.tuner.as_deref().and_then(|t| tuning_state(t, name)),
        })
    }
}

fn tuning_state(tuner: &Tuner, name: &str) -> Option<TuningState> {
    let row = tuner.store.adapter(name).ok()??;
    let versions = tuner.store.versions(name).unwrap_or_default();
    Some(TuningState {
        version: row.version,
        training: tuner.is_training(name).ok(),
        pairs: tuner.store.count_pairs(name).ok(),
        metrics: versions.iter().find(|v| v.version == row.version).map(|v| v.metrics.clone()),
        versions,
        rank: row.rank,
        alpha: row.alpha,
        created_by: row.created_by,
        open_to_tuning: row.open_to_tuning,
    })
}
