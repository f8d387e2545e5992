//! The decoder and its parts, one file per concern: the per-family configuration read from the
//! GGUF metadata, attention, RoPE, the quantized linear layers with their LoRA seam, the kernels
//! and the paged KV cache with its prefix cache.

pub mod attention;
pub mod config;
pub mod decoder;
pub mod embedding;
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
    /// No logits: the sum over the chunk's positions of the final hidden states (after the
    /// output norm), which an embedding accumulates into its mean.
    PooledHidden,
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


/// Runs `f(i, row)` on each `width`-value row of `values`, the rows shared out over the serving
/// workers; under `PARALLEL_VALUES` values (one decode row), on this thread, where waking the
/// workers costs more than the work. A row is computed the same either way. In a batched
/// decode step these element-wise passes were the engine thread's alone, and the workers waited.
pub(crate) fn each_row_on_workers(values: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    const PARALLEL_VALUES: usize = 8192;
    let rows = values.len() / width;
    if values.len() < PARALLEL_VALUES || rows < 2 {
        values.chunks_exact_mut(width).enumerate().for_each(|(i, row)| f(i, row));
        return;
    }
    let shared = SharedRows(values.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(rows, |range| {
        for i in range {
            // SAFETY: row i lies within `values`, and each row goes to exactly one call.
            let row = unsafe { std::slice::from_raw_parts_mut(shared.get().add(i * width), width) };
            f(i, row);
        }
    });
}

/// Shares `0..items` out over the serving workers in ranges of about an eighth of a thread's
/// share, taken as threads come free (as candle's `execute_chunked` does, so a slow thread takes
/// fewer), each thread making one `scratch` for all of its ranges rather than one per range.
/// `run` gets each item with the one this thread runs `lookahead` items later, if it has claimed
/// it: a thread claims its next range before it starts this one, so that what it prefetches is
/// what it will run, even across ranges (asking for the items after this range instead, the next
/// range's first tile rows were cold, and another thread's).
pub(crate) fn each_item_on_workers<S>(
    items: usize,
    lookahead: usize,
    scratch: impl Fn() -> S + Sync,
    run: impl Fn(usize, Option<usize>, &mut S) + Sync,
) {
    if items == 0 {
        return;
    }
    let pool = candle_core::utils::barrier_pool();
    let threads = pool.n_workers() + 1;
    let grab = items.div_ceil(threads * 8).max(1);
    let cursor = std::sync::atomic::AtomicUsize::new(0);
    let claim = || {
        let start = cursor.fetch_add(grab, std::sync::atomic::Ordering::Relaxed);
        start.min(items)..items.min(start.saturating_add(grab))
    };
    // One call per thread (or one call on this thread, from inside the pool).
    pool.execute_chunked(threads, |_| {
        let mut scratch = scratch();
        let (mut current, mut next) = (claim(), claim());
        while !current.is_empty() {
            for item in current.clone() {
                let later = item + lookahead;
                let ahead = if later < current.end { Some(later) } else { next.clone().nth(later - current.end) };
                run(item, ahead, &mut scratch);
            }
            current = std::mem::replace(&mut next, claim());
        }
    });
}

/// Rows being written by several threads, each row by one.
struct SharedRows(*mut f32);

// SAFETY: threads write disjoint rows (see `each_row_on_workers`).
unsafe impl Sync for SharedRows {}

impl SharedRows {
    fn get(&self) -> *mut f32 {
        self.0
    }
}
