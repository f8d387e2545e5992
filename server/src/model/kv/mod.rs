//! A sequence's keys and values: per layer, a table of blocks from a [`KvPool`], taken as the
//! sequence grows rather than reserved for the context it might reach. Sliding-window layers
//! let go of the blocks no later query can see. Full blocks can be shared with other sequences
//! through the prefix cache (`prefix`), since nothing writes a block once it is full.

mod pool;
pub mod prefix;

use std::sync::Arc;

pub use pool::{blocks_for_layer, blocks_for_sequence, KvBlock, KvPool, BLOCK_TOKENS};

use crate::model::{Config, ModelError};

pub struct KvCache {
    pool: KvPool,
    /// `blocks[layer][i]` holds positions `i·BLOCK_TOKENS..(i+1)·BLOCK_TOKENS` of `layer`;
    /// `None` once it lies behind the layer's window.
    blocks: Vec<Vec<Option<Arc<KvBlock>>>>,
    windows: Vec<Option<usize>>,
    /// Positions written: the position of the next token.
    len: usize,
    /// Most positions this sequence may reach.
    capacity: usize,
    /// Positions below this are the prompt's, which attention folds in f32 over key blocks (as
    /// llama.cpp's tiled CPU flash attention does for a batch of prompt rows); later ones, the
    /// generated tokens, it folds one key at a time at f16 precision (as llama.cpp decodes).
    prompt_len: usize,
}

impl KvCache {
    /// A cache of up to `capacity` positions with a pool of its own, large enough for them.
    pub fn new(config: &Config, capacity: usize) -> Result<Self, ModelError> {
        Ok(Self::in_pool(&KvPool::for_one_sequence(config, capacity), config, capacity))
    }

    /// A cache of up to `capacity` positions taking its blocks from `pool` as it grows.
    pub fn in_pool(pool: &KvPool, config: &Config, capacity: usize) -> Self {
        Self {
            pool: pool.clone(),
            blocks: vec![Vec::new(); config.n_layers],
            windows: (0..config.n_layers).map(|layer| config.window(layer)).collect(),
            len: 0,
            capacity,
            prompt_len: 0,
        }
    }

    /// Marks the first `tokens` positions as the prompt's (see `prompt_len`).
    pub fn set_prompt_len(&mut self, tokens: usize) {
        self.prompt_len = tokens;
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// Tokens already cached: the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn pool(&self) -> &KvPool {
        &self.pool
    }

    /// Blocks `layer` holds now.
    pub fn blocks_held(&self, layer: usize) -> usize {
        self.blocks[layer].iter().flatten().count()
    }

    /// Blocks held over all layers (shared ones included).
    pub fn total_blocks_held(&self) -> usize {
        (0..self.blocks.len()).map(|layer| self.blocks_held(layer)).sum()
    }

    pub(crate) fn check_room(&self, new_tokens: usize) -> Result<(), ModelError> {
        if self.len + new_tokens > self.capacity {
            return Err(ModelError::ContextLength {
                needed: self.len + new_tokens,
                limit: self.capacity,
            });
        }
        Ok(())
    }

    /// The first block of `layer` that a chunk starting at `start` still reads.
    fn first_needed_block(&self, layer: usize, start: usize) -> usize {
        self.windows[layer].map_or(0, |w| (start + 1).saturating_sub(w) / BLOCK_TOKENS)
    }

    /// Blocks [`reserve`](Self::reserve) would take from the pool for `new_tokens` more.
    pub fn blocks_to_reserve(&self, new_tokens: usize) -> usize {
        let end_blocks = (self.len + new_tokens).div_ceil(BLOCK_TOKENS);
        self.blocks.iter().map(|table| end_blocks.saturating_sub(table.len())).sum()
    }

    /// Makes room for `new_tokens` more positions: lets go of the blocks that fall behind each
    /// sliding window, then takes blocks from the pool for the new positions. On an empty
    /// pool the blocks taken so far stay (the next try needs fewer).
    pub fn reserve(&mut self, new_tokens: usize) -> Result<(), ModelError> {
        self.check_room(new_tokens)?;
        let end_blocks = (self.len + new_tokens).div_ceil(BLOCK_TOKENS);
        for layer in 0..self.blocks.len() {
            let behind = self.first_needed_block(layer, self.len);
            let table = &mut self.blocks[layer];
            table.iter_mut().take(behind).for_each(|block| *block = None);
            while table.len() < end_blocks {
                let block = self.pool.allocate().ok_or(ModelError::KvPoolExhausted {
                    capacity_blocks: self.pool.capacity_blocks(),
                })?;
                table.push(Some(block));
            }
        }
        Ok(())
    }

    /// Stores the keys and values of this chunk's positions (`[tokens, kv_width]` each) on
    /// `layer`, after the cached ones. The blocks must have been reserved.
    pub(crate) fn write(&mut self, layer: usize, keys: &[f32], values: &[f32], kv_width: usize) -> Result<(), ModelError> {
        for (i, (k, v)) in keys.chunks_exact(kv_width).zip(values.chunks_exact(kv_width)).enumerate() {
            let position = self.len + i;
            let block = self.blocks[layer]
                .get_mut(position / BLOCK_TOKENS)
                .and_then(Option::as_mut)
                .and_then(Arc::get_mut)
                .ok_or(ModelError::KvBlockUnwritable { layer, position })?;
            block.store(position % BLOCK_TOKENS, k, v);
        }
        Ok(())
    }

    /// `layer`'s block table.
    pub(crate) fn layer_blocks(&self, layer: usize) -> &[Option<Arc<KvBlock>>] {
        &self.blocks[layer]
    }

    /// Marks `tokens` more positions as cached, once every layer has written them.
    pub(crate) fn advance(&mut self, tokens: usize) {
        self.len += tokens;
    }

    /// Full block `index` on every layer, or `None` when it is not full yet or a window has
    /// let go of it on some layer.
    pub(crate) fn full_block(&self, index: usize) -> Option<Vec<Arc<KvBlock>>> {
        if (index + 1) * BLOCK_TOKENS > self.len {
            return None;
        }
        self.blocks.iter().map(|table| table.get(index).cloned().flatten()).collect()
    }

    /// Starts an empty cache on shared full blocks (`blocks[i][layer]`), as if it had
    /// computed their positions itself.
    pub(crate) fn adopt_prefix(&mut self, blocks: Vec<Vec<Arc<KvBlock>>>) {
        debug_assert!(self.is_empty(), "a prefix is adopted before anything is written");
        self.len = blocks.len() * BLOCK_TOKENS;
        for block in blocks {
            for (table, layer_block) in self.blocks.iter_mut().zip(block) {
                table.push(Some(layer_block));
            }
        }
    }
}
