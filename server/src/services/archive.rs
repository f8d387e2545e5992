//! Uploaded adapter archives (zip or tar) and where their files go. What an archive unpacks to is
//! bounded while it is read: at most the request body limit in all and [`MAX_ARCHIVE_ENTRIES`]
//! members, so a small archive that inflates to gigabytes is refused before it is held.

use std::io::Read;
use std::path::{Path, PathBuf};

use tessera_adapters::peft::{CONFIG_FILE, WEIGHTS_FILE};

use super::ServiceError;

/// The most members an uploaded archive may have (folders included).
pub const MAX_ARCHIVE_ENTRIES: usize = 64;

/// The two PEFT files of an archive: its config text's bytes and its weights.
pub type PeftPair = (Vec<u8>, Vec<u8>);

/// The PEFT files among an archive's members, found by file name wherever they sit.
struct PeftFiles {
    config: Option<Vec<u8>>,
    weights: Option<Vec<u8>>,
    entries: usize,
    bytes_left: u64,
}

impl PeftFiles {
    fn new(max_bytes: usize) -> Self {
        Self { config: None, weights: None, entries: 0, bytes_left: max_bytes as u64 }
    }

    fn offer(&mut self, file_name: &str, member: &mut impl Read) -> Result<(), String> {
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
        let read = member.by_ref().take(self.bytes_left + 1).read_to_end(&mut data).map_err(|e| e.to_string())? as u64;
        if read > self.bytes_left {
            return Err("it unpacks to more bytes than the request body limit".into());
        }
        self.bytes_left -= read;
        *slot = Some(data);
        Ok(())
    }

    fn both(self, kind: &str) -> Result<PeftPair, ServiceError> {
        match (self.config, self.weights) {
            (Some(config), Some(weights)) => Ok((config, weights)),
            _ => Err(bad_archive(kind, format!("it must hold {CONFIG_FILE} and {WEIGHTS_FILE}"))),
        }
    }
}

fn bad_archive(kind: &str, problem: impl std::fmt::Display) -> ServiceError {
    ServiceError::invalid("archive", format!("not a usable {kind} archive: {problem}"))
}

/// The PEFT files of a zip (by its magic) or tar archive, unpacking at most `max_bytes`.
pub fn peft_files(archive: &[u8], max_bytes: usize) -> Result<PeftPair, ServiceError> {
    if archive.starts_with(b"PK\x03\x04") {
        from_zip(archive, max_bytes)
    } else {
        from_tar(archive, max_bytes)
    }
}

fn from_tar(archive: &[u8], max_bytes: usize) -> Result<PeftPair, ServiceError> {
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

fn from_zip(archive: &[u8], max_bytes: usize) -> Result<PeftPair, ServiceError> {
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
/// (replacing any earlier adapter of that name, folder or GGUF file). Returns the folder.
pub fn install(dir: &Path, name: &str, config: &[u8], weights: &[u8]) -> std::io::Result<PathBuf> {
    let staging = dir.join(format!(".upload-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&staging)?;
    for (file, data) in [(CONFIG_FILE, config), (WEIGHTS_FILE, weights)] {
        write_durably(&staging.join(file), data)?;
    }
    std::fs::File::open(&staging)?.sync_all()?;
    let target = dir.join(name);
    replace_with(dir, &staging, &target)?;
    remove_if_present(&dir.join(format!("{name}.gguf")))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(target)
}

/// Writes `bytes` durably to a fresh hidden file in `dir`, to be checked before it is published.
pub fn stage_file(dir: &Path, bytes: &[u8]) -> std::io::Result<PathBuf> {
    let staged = dir.join(format!(".upload-{:016x}.gguf", rand::random::<u64>()));
    write_durably(&staged, bytes)?;
    Ok(staged)
}

/// Moves a staged GGUF file to `dir/name.gguf`, replacing any earlier adapter of that name.
pub fn publish_file(staged: &Path, dir: &Path, name: &str) -> std::io::Result<PathBuf> {
    let target = dir.join(format!("{name}.gguf"));
    std::fs::rename(staged, &target)?;
    remove_if_present(&dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(target)
}

/// A zip of a PEFT adapter's two files in a folder `folder`.
pub fn zip_peft(folder: &str, config: &[u8], weights: &[u8]) -> zip::result::ZipResult<Vec<u8>> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (file, data) in [(CONFIG_FILE, config), (WEIGHTS_FILE, weights)] {
        zip.start_file(format!("{folder}/{file}"), options)?;
        std::io::Write::write_all(&mut zip, data)?;
    }
    Ok(zip.finish()?.into_inner())
}

fn write_durably(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// Renames `staging` to `target`, moving an earlier `target` aside first and deleting it after.
fn replace_with(dir: &Path, staging: &Path, target: &Path) -> std::io::Result<()> {
    if !target.exists() {
        return std::fs::rename(staging, target);
    }
    let old = dir.join(format!(".replaced-{:016x}", rand::random::<u64>()));
    std::fs::rename(target, &old)?;
    std::fs::rename(staging, target)?;
    remove_if_present(&old)
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    let removed = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
    match removed {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
