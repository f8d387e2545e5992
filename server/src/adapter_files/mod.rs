//! Adapter files in the two formats Tessera reads and writes: Hugging Face PEFT folders
//! (`adapter_config.json` + `adapter_model.safetensors`) and llama.cpp's GGUF-LoRA files. Both
//! hold, per (layer, module), the factors A `[r, in]` and B `[out, r]` and a scale on the
//! product B·A; [`AdapterFactors`] is that content as stored, so a conversion keeps every bit
//! that the other format can say.

mod gguf;
mod peft;

use std::path::Path;

use tessera_adapters::peft::{BaseShape, BaseWeights, PeftAdapter, PeftError};
use tessera_adapters::{AdapterKind, TargetModule};

pub use gguf::GgufLoraError;

#[derive(Debug, thiserror::Error)]
pub enum AdapterFileError {
    #[error(transparent)]
    Peft(#[from] PeftError),
    #[error(transparent)]
    Gguf(#[from] GgufLoraError),
    #[error("{kind} adapters have no GGUF-LoRA form: {why}")]
    NoGgufForm { kind: AdapterKind, why: &'static str },
}

impl AdapterFileError {
    /// What is wrong, naming files by their names alone (never where they lie on the server).
    pub fn reason(&self) -> String {
        match self {
            AdapterFileError::Peft(e) => e.reason(),
            AdapterFileError::Gguf(e) => e.reason(),
            AdapterFileError::NoGgufForm { .. } => self.to_string(),
        }
    }
}

/// The two formats. On disk a PEFT adapter is a folder and a GGUF-LoRA adapter one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterFormat {
    Peft,
    Gguf,
}

impl AdapterFormat {
    pub fn of(path: &Path) -> Self {
        if path.is_file() {
            Self::Gguf
        } else {
            Self::Peft
        }
    }
}

/// How a factor's numbers are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatType {
    F32,
    F16,
    BF16,
}

impl FloatType {
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }
}

/// One factor as its file stores it: row-major `dims` (outermost first) and little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Factor {
    pub dtype: FloatType,
    pub dims: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl Factor {
    /// The values widened to f32 (exact for all three types).
    pub fn values(&self) -> Vec<f32> {
        match self.dtype {
            FloatType::F32 => self.bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            FloatType::F16 => self.bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            FloatType::BF16 => self.bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        }
    }

    /// Every value multiplied by `scale`, stored as f32.
    fn scaled(&self, scale: f32) -> Self {
        let bytes = self.values().iter().flat_map(|v| (v * scale).to_le_bytes()).collect();
        Self { dtype: FloatType::F32, dims: self.dims.clone(), bytes }
    }
}

/// One (layer, module)'s low-rank pair and the scale on B·A (α/r, or α/√r with rsLoRA).
#[derive(Debug, Clone, PartialEq)]
pub struct FactorPair {
    pub layer: usize,
    pub module: TargetModule,
    /// `[rank, in_features]`.
    pub a: Factor,
    /// `[out_features, rank]`.
    pub b: Factor,
    pub scale: f32,
}

impl FactorPair {
    pub fn rank(&self) -> usize {
        self.a.dims.first().copied().unwrap_or(0)
    }

    /// This pair as a format that multiplies its B·A by `scale` must hold it: unchanged when
    /// that is its own scale, else with the difference folded into B (the same product up to
    /// f32 rounding).
    fn with_scale(&self, scale: f32) -> Self {
        if scale == self.scale {
            return self.clone();
        }
        Self { b: self.b.scaled(self.scale / scale), scale, ..self.clone() }
    }
}

/// An adapter's content, whatever its format: its pairs in (layer, module) order.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterFactors {
    pub pairs: Vec<FactorPair>,
}

/// Loads the adapter at `path` (a PEFT folder or a GGUF-LoRA file), checked against `base`; a
/// DoRA adapter measures its row norms against the base's `weights`.
pub fn load(path: &Path, base: &BaseShape, weights: Option<&dyn BaseWeights>) -> Result<PeftAdapter, AdapterFileError> {
    match AdapterFormat::of(path) {
        AdapterFormat::Peft => Ok(PeftAdapter::load(path, base, weights)?),
        AdapterFormat::Gguf => Ok(gguf::load(path, base)?),
    }
}

/// Checks the adapter at `path` against `base` as [`load`] does, without measuring a DoRA
/// adapter's row norms (its first use does, once); returns its kind.
pub fn check(path: &Path, base: &BaseShape) -> Result<AdapterKind, AdapterFileError> {
    match AdapterFormat::of(path) {
        AdapterFormat::Peft => Ok(PeftAdapter::check(path, base)?),
        AdapterFormat::Gguf => Ok(gguf::load(path, base)?.kind()),
    }
}

/// The kind of the adapter at `path` as its files say (a GGUF-LoRA file is LoRA), where they
/// say one.
pub fn kind_of(path: &Path) -> Option<AdapterKind> {
    match AdapterFormat::of(path) {
        AdapterFormat::Gguf => Some(AdapterKind::Lora),
        AdapterFormat::Peft => tessera_adapters::peft::config_kind(&std::fs::read_to_string(path.join(tessera_adapters::peft::CONFIG_FILE)).ok()?),
    }
}

/// The factors of the LoRA adapter at `path`, checked against `base`. DoRA and IA³ adapters
/// have no such form in the other format: llama.cpp loads neither.
pub fn read(path: &Path, base: &BaseShape) -> Result<AdapterFactors, AdapterFileError> {
    match AdapterFormat::of(path) {
        AdapterFormat::Peft => peft::read(path, base),
        AdapterFormat::Gguf => Ok(gguf::read(path, base)?),
    }
}

/// The adapter as a GGUF-LoRA file for a base of `base.architecture`, as llama.cpp's `--lora`
/// loads it.
pub fn to_gguf(factors: &AdapterFactors, base: &BaseShape) -> Vec<u8> {
    gguf::write(factors, &base.architecture)
}

/// The adapter as PEFT's two files: `adapter_config.json` and `adapter_model.safetensors`.
pub fn to_peft(factors: &AdapterFactors, base_model: &str) -> Result<(Vec<u8>, Vec<u8>), AdapterFileError> {
    Ok(peft::write(factors, base_model)?)
}
