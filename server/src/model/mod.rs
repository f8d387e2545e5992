//! Model families. One file per architecture; the shared pieces (quantized linear layers with
//! their LoRA seam, the KV cache) sit beside them.

pub mod gelu;
pub mod gemma3;
pub mod int8;
pub mod kv_cache;
pub mod linear;
pub mod packed;
pub mod synthetic;

pub use gemma3::{Config, Gemma3};
pub use kv_cache::KvCache;
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

