//! Whole-or-nothing file writes: write beside the target, fsync, rename over it, fsync the
//! folder. A crash leaves either the old file or the new one, never a torn mix.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::train::TrainError;

fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

fn publish(temporary: &Path, path: &Path) -> Result<(), TrainError> {
    std::fs::File::open(temporary)
        .and_then(|f| f.sync_all())
        .map_err(|e| TrainError::io(temporary, e))?;
    std::fs::rename(temporary, path).map_err(|e| TrainError::io(path, e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Makes a folder's entries (new names, renames) durable.
pub fn sync_dir(dir: &Path) -> Result<(), TrainError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| TrainError::io(dir, e))
}

pub fn write(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let temporary = temporary_path(path);
    std::fs::File::create(&temporary)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| TrainError::io(&temporary, e))?;
    publish(&temporary, path)
}

pub fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<(), TrainError> {
    let temporary = temporary_path(path);
    candle_core::safetensors::save(tensors, &temporary)?;
    publish(&temporary, path)
}
