//! The decoder and its parts, one file per concern: the per-family configuration read from the
//! GGUF metadata, attention, RoPE, the quantized linear layers with their LoRA seam, the kernels
//! and the paged KV cache with its prefix cache.

pub mod attention;
pub mod config;
pub mod decoder;
pub mod gelu;
pub mod kv;
pub mod linear;
pub mod quant;
pub mod rope;
pub mod synthetic;

pub use config::Config;
pub use decoder::Decoder;
pub use kv::{KvCache, KvPool};
pub use linear::Kernels;

use crate::gguf::GgufError;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("model computation failed: {0}")]
    Compute(#[from] candle_core::Error),
    #[error(
        "context length exceeded: {needed} tokens are needed but this sequence's context holds {limit}"
    )]
    ContextLength { needed: usize, limit: usize },
    #[error("token id {id} is outside the vocabulary ({vocab} tokens)")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("empty input: a sequence in the batch has no tokens")]
    EmptyInput,
    #[error("the KV cache pool is full: all {capacity_blocks} blocks are in use")]
    KvPoolExhausted { capacity_blocks: usize },
    #[error("internal error: no KV block for layer {layer} at position {position}")]
    KvBlockUnwritable { layer: usize, position: usize },
}

impl ModelError {
    /// A missing or misshapen tensor, said as what this file's architecture lacks.
    pub(crate) fn for_architecture(self, gguf: &crate::gguf::GgufFile) -> Self {
        let arch = gguf.get_str("general.architecture").unwrap_or("unknown").to_string();
        let reason = match &self {
            ModelError::Gguf(GgufError::MissingTensor { tensor, .. }) => format!("tensor `{tensor}` is missing"),
            ModelError::Gguf(GgufError::ShapeMismatch { tensor, found, expected, .. }) => {
                format!("tensor `{tensor}` has shape {found:?}, expected {expected:?} from the metadata")
            }
            _ => return self,
        };
        ModelError::Gguf(GgufError::UnsupportedShape {
            path: gguf.path().to_path_buf(),
            arch,
            reason,
        })
    }
}

/// Which positions of a chunk need logits. Computing them costs a 262k-wide matmul per row, so
/// prefill asks only for the last position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    None,
    Last,
    All,
}

/// Calls `f` with a tensor's values in row-major order, read in place when it is contiguous.
pub(crate) fn with_values<R>(t: &candle_core::Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R, ModelError> {
    if t.is_contiguous() {
        let (storage, layout) = t.storage_and_layout();
        if let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(values)) = &*storage {
            let start = layout.start_offset();
            return Ok(f(&values[start..start + t.elem_count()]));
        }
    }
    let values = t.flatten_all()?.to_vec1::<f32>()?;
    Ok(f(&values))
}

