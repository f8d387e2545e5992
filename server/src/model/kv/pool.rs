//! The memory keys and values live in: fixed-size blocks of [`BLOCK_TOKENS`] positions of one
//! layer, counted against one byte budget. A block is shared by `Arc`: the sequence writing it
//! owns it alone until it is full; after that it may also be held by the prefix cache and by
//! other sequences that found the same prefix, and it is never written again. Dropping the last
//! holder gives the block back to the budget.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use half::f16;

use crate::model::Config;

/// Positions per block. Small enough that a sliding window wastes little past its edge and a
/// prefix is shared to within a few tokens; large enough that a block's keys make a tile.
pub const BLOCK_TOKENS: usize = 16;

/// Shape and budget of a pool; shared by every block it hands out.
struct PoolShared {
    kv_heads: usize,
    head_dim: usize,
    capacity_blocks: usize,
    allocated_blocks: AtomicUsize,
    /// Most blocks allocated at once since the pool was made.
    peak_blocks: AtomicUsize,
}

/// A budget of KV blocks. Cheap to clone: clones share the budget.
#[derive(Clone)]
pub struct KvPool {
    shared: Arc<PoolShared>,
}

/// One layer's keys and values for [`BLOCK_TOKENS`] positions, 16-bit.
///
/// Keys are stored transposed per KV head (`[kv_heads][head_dim][BLOCK_TOKENS]`), so the
/// attention kernel multiplies a query row with a block's keys as one row of 16 scores; values
/// are stored as rows (`[kv_heads][BLOCK_TOKENS][head_dim]`) to be summed by those scores.
pub struct KvBlock {
    keys: Box<[f16]>,
    values: Box<[f16]>,
    pool: Arc<PoolShared>,
}

impl KvPool {
    /// A pool of at most `bytes` of keys and values for `config`'s layers.
    pub fn new(config: &Config, bytes: usize) -> Self {
        let block_bytes = Self::block_bytes_for(config);
        Self::with_blocks(config, bytes / block_bytes)
    }

    /// Enough blocks for one sequence of `tokens` positions, however it is fed.
    pub fn for_one_sequence(config: &Config, tokens: usize) -> Self {
        Self::with_blocks(config, blocks_for_sequence(config, tokens, tokens))
    }

    fn with_blocks(config: &Config, capacity_blocks: usize) -> Self {
        Self {
            shared: Arc::new(PoolShared {
                kv_heads: config.n_kv_heads,
                head_dim: config.head_dim,
                capacity_blocks,
                allocated_blocks: AtomicUsize::new(0),
                peak_blocks: AtomicUsize::new(0),
            }),
        }
    }

    /// Bytes of one block: keys and values of one layer for [`BLOCK_TOKENS`] positions.
    pub fn block_bytes_for(config: &Config) -> usize {
        2 * BLOCK_TOKENS * config.kv_width() * std::mem::size_of::<f16>()
    }

    pub fn block_bytes(&self) -> usize {
        2 * BLOCK_TOKENS * self.shared.kv_heads * self.shared.head_dim * std::mem::size_of::<f16>()
    }

    pub fn capacity_blocks(&self) -> usize {
        self.shared.capacity_blocks
    }

    /// Blocks in memory now: held by sequences or kept by the prefix cache.
    pub fn allocated_blocks(&self) -> usize {
        self.shared.allocated_blocks.load(Ordering::SeqCst)
    }

    pub fn free_blocks(&self) -> usize {
        self.capacity_blocks().saturating_sub(self.allocated_blocks())
    }

    pub fn peak_blocks(&self) -> usize {
        self.shared.peak_blocks.load(Ordering::SeqCst)
    }

    pub fn reset_peak(&self) {
        self.shared.peak_blocks.store(self.allocated_blocks(), Ordering::SeqCst);
    }

    /// Whether two handles share one budget.
    pub fn same_pool(&self, other: &KvPool) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// A zeroed block, or `None` when the budget is spent.
    pub(crate) fn allocate(&self) -> Option<Arc<KvBlock>> {
        let shared = &self.shared;
        let taken = shared
            .allocated_blocks
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < shared.capacity_blocks).then_some(n + 1))
            .ok()?;
        shared.peak_blocks.fetch_max(taken + 1, Ordering::SeqCst);
        let elems = BLOCK_TOKENS * shared.kv_heads * shared.head_dim;
        Some(Arc::new(KvBlock {
            keys: vec![f16::ZERO; elems].into_boxed_slice(),
            values: vec![f16::ZERO; elems].into_boxed_slice(),
            pool: shared.clone(),
        }))
    }
}

impl Drop for KvBlock {
    fn drop(&mut self) {
        self.pool.allocated_blocks.fetch_sub(1, Ordering::SeqCst);
    }
}

impl KvBlock {
    /// Stores the keys and values (`[kv_heads·head_dim]` each) of the position at `slot`.
    pub(crate) fn store(&mut self, slot: usize, k: &[f32], v: &[f32]) {
        let d = self.pool.head_dim;
        for (head, (k_head, v_head)) in k.chunks_exact(d).zip(v.chunks_exact(d)).enumerate() {
            let keys = &mut self.keys[head * d * BLOCK_TOKENS..(head + 1) * d * BLOCK_TOKENS];
            for (i, &x) in k_head.iter().enumerate() {
                keys[i * BLOCK_TOKENS + slot] = f16::from_f32(x);
            }
            let row = (head * BLOCK_TOKENS + slot) * d;
            for (o, &x) in self.values[row..row + d].iter_mut().zip(v_head) {
                *o = f16::from_f32(x);
            }
        }
    }

    /// KV head `head`'s keys, `[head_dim][BLOCK_TOKENS]`.
    pub(crate) fn keys_transposed(&self, head: usize) -> &[f16] {
        let n = self.pool.head_dim * BLOCK_TOKENS;
        &self.keys[head * n..(head + 1) * n]
    }

    /// KV head `head`'s values, `[BLOCK_TOKENS][head_dim]`.
    pub(crate) fn values(&self, head: usize) -> &[f16] {
        let n = self.pool.head_dim * BLOCK_TOKENS;
        &self.values[head * n..(head + 1) * n]
    }
}

/// Blocks one layer holds at most for a sequence of `tokens` positions fed at most `chunk` at a
/// time: all of them on a global layer. A sliding-window layer of width w keeps the w − 1 keys
/// before the chunk that its first query sees, and the chunk: at most w − 1 + chunk positions,
/// starting anywhere in a block.
pub fn blocks_for_layer(window: Option<usize>, tokens: usize, chunk: usize) -> usize {
    let all = tokens.div_ceil(BLOCK_TOKENS);
    match window {
        Some(w) => all.min((w - 1 + chunk).div_ceil(BLOCK_TOKENS) + 1),
        None => all,
    }
}

/// Blocks a whole sequence of `tokens` positions, fed at most `chunk` at a time, holds at most
/// over every layer.
pub fn blocks_for_sequence(config: &Config, tokens: usize, chunk: usize) -> usize {
    (0..config.n_layers).map(|layer| blocks_for_layer(config.window(layer), tokens, chunk)).sum()
}
