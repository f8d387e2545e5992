//! Automatic prefix caching. Every full block a sequence writes is remembered under a hash
//! chained over the tokens of all blocks up to it,
//!   h₀ = H(salt),   hᵢ = H(hᵢ₋₁, tokens of block i),
//! where the salt names whatever else changes the keys and values (the adapters and their
//! scales). A new sequence walks its prompt's chain and adopts the longest run of blocks found,
//! skipping their prefill. Entries are checked by their tokens and parent, not by the hash alone.
//! Entries no sequence holds are evicted least recently used first when the pool needs room.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::Arc;

use super::{KvBlock, KvCache, BLOCK_TOKENS};

struct Entry {
    parent: u64,
    tokens: [u32; BLOCK_TOKENS],
    /// The block on every layer.
    blocks: Vec<Arc<KvBlock>>,
    last_used: u64,
    /// Blocks before this one in its chain; deeper entries go first among equally old ones,
    /// so a chain is evicted from its end.
    depth: usize,
}

impl Entry {
    /// Whether only the cache holds its blocks, so evicting it gives them back to the pool.
    fn unused(&self) -> bool {
        self.blocks.iter().all(|block| Arc::strong_count(block) == 1)
    }
}

/// Where a sequence's chain stands: its hash so far and the blocks registered.
#[derive(Debug, Clone, Copy)]
pub struct ChainCursor {
    hash: u64,
    blocks: usize,
}

pub struct PrefixCache {
    entries: HashMap<u64, Entry>,
    /// Keyed per process, so nobody outside can aim two prompts at one hash.
    hasher: RandomState,
    clock: u64,
}

impl Default for PrefixCache {
    fn default() -> Self {
        Self::new()
    }
}

impl PrefixCache {
    pub fn new() -> Self {
        Self {
            entries: HashMap::new(),
            hasher: RandomState::new(),
            clock: 0,
        }
    }

    /// The start of the chain for sequences whose keys and values `salt` identifies.
    pub fn root(&self, salt: u64) -> ChainCursor {
        let mut h = self.hasher.build_hasher();
        ("tessera-kv-prefix", salt).hash(&mut h);
        ChainCursor { hash: h.finish(), blocks: 0 }
    }

    fn child_hash(&self, parent: u64, tokens: &[u32]) -> u64 {
        let mut h = self.hasher.build_hasher();
        (parent, tokens).hash(&mut h);
        h.finish()
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Adopts into the empty `cache` the longest cached prefix of `tokens`, leaving at least
    /// one token to compute (its logits are needed). Returns the cursor after the adopted
    /// blocks; `cursor.tokens()` is how many positions were found.
    pub fn adopt_longest_prefix(&mut self, root: ChainCursor, tokens: &[u32], cache: &mut KvCache) -> ChainCursor {
        let now = self.tick();
        let mut cursor = root;
        let mut found = Vec::new();
        let usable = tokens.len().saturating_sub(1) / BLOCK_TOKENS;
        for block_tokens in tokens.chunks_exact(BLOCK_TOKENS).take(usable) {
            let hash = self.child_hash(cursor.hash, block_tokens);
            let Some(entry) = self.entries.get_mut(&hash) else { break };
            if entry.parent != cursor.hash || entry.tokens[..] != *block_tokens {
                break;
            }
            entry.last_used = now;
            found.push(entry.blocks.clone());
            cursor = ChainCursor { hash, blocks: cursor.blocks + 1 };
        }
        if !found.is_empty() {
            cache.adopt_prefix(found);
        }
        cursor
    }

    /// Registers the full blocks `cache` has written past `cursor` (`tokens` are the cached
    /// positions' tokens), and returns the cursor after them. A block already cached under
    /// the same chain (another sequence computed it first) keeps the first copy.
    pub fn register(&mut self, mut cursor: ChainCursor, tokens: &[u32], cache: &KvCache) -> ChainCursor {
        let now = self.tick();
        while let Some(blocks) = cache.full_block(cursor.blocks) {
            let start = cursor.blocks * BLOCK_TOKENS;
            let Some(block_tokens) = tokens.get(start..start + BLOCK_TOKENS) else { break };
            let hash = self.child_hash(cursor.hash, block_tokens);
            let mut token_array = [0u32; BLOCK_TOKENS];
            token_array.copy_from_slice(block_tokens);
            let entry = self.entries.entry(hash).or_insert_with(|| Entry {
                parent: cursor.hash,
                tokens: token_array,
                blocks,
                last_used: now,
                depth: cursor.blocks,
            });
            entry.last_used = now;
            cursor = ChainCursor { hash, blocks: cursor.blocks + 1 };
        }
        cursor
    }

    /// Evicts unused entries, least recently used first, until `blocks` blocks have gone back
    /// to the pool or none is left to evict. Returns the blocks freed.
    pub fn evict(&mut self, blocks: usize) -> usize {
        let mut victims: Vec<(u64, std::cmp::Reverse<usize>, u64)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.unused())
            .map(|(&hash, e)| (e.last_used, std::cmp::Reverse(e.depth), hash))
            .collect();
        victims.sort_unstable();
        let mut freed = 0;
        for (_, _, hash) in victims {
            if freed >= blocks {
                break;
            }
            if let Some(entry) = self.entries.remove(&hash) {
                freed += entry.blocks.len();
            }
        }
        freed
    }

    /// Blocks the cache holds that no sequence uses (what [`evict`](Self::evict) could free).
    pub fn evictable_blocks(&self) -> usize {
        self.entries.values().filter(|e| e.unused()).map(|e| e.blocks.len()).sum()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Forgets every entry (their blocks go back to the pool once no sequence holds them).
    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

impl ChainCursor {
    /// Before the first block, the chain's root not yet taken (see [`PrefixCache::root`]).
    pub const EMPTY: Self = Self { hash: 0, blocks: 0 };

    pub fn is_empty(&self) -> bool {
        self.blocks == 0
    }

    /// Positions covered by the blocks up to this cursor.
    pub fn tokens(&self) -> usize {
        self.blocks * BLOCK_TOKENS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Config, KvPool};

    /// The tiny synthetic Gemma's configuration with its layers' windows out of the way.
    fn config() -> Config {
        let mut c = crate::model::synthetic::tiny_config();
        c.sliding_window = None;
        c
    }

    /// A sequence of `blocks` full blocks of `tokens` written into `pool` (the values do not
    /// matter to the cache's bookkeeping).
    fn filled(pool: &KvPool, c: &Config, tokens: &[u32]) -> KvCache {
        let mut cache = KvCache::in_pool(pool, c, tokens.len());
        cache.reserve(tokens.len()).unwrap();
        cache.advance(tokens.len());
        cache
    }

    #[test]
    fn unused_entries_go_least_recently_used_first_and_a_chain_from_its_end() {
        let c = config();
        let pool = KvPool::new(&c, 64 * c.n_layers * KvPool::block_bytes_for(&c));
        let mut prefix = PrefixCache::new();
        let old: Vec<u32> = (0..32).collect();
        let new: Vec<u32> = (100..132).collect();
        for tokens in [&old, &new] {
            let cache = filled(&pool, &c, tokens);
            prefix.register(prefix.root(0), tokens, &cache);
        }
        assert_eq!((prefix.len(), pool.allocated_blocks()), (4, 4 * c.n_layers));

        // A sequence holding `new`'s first block keeps that entry from eviction.
        let mut reader = KvCache::in_pool(&pool, &c, 40);
        let probe: Vec<u32> = (100..116).chain(500..510).collect();
        assert_eq!(prefix.adopt_longest_prefix(prefix.root(0), &probe, &mut reader).tokens(), 16);
        assert_eq!(prefix.evictable_blocks(), 3 * c.n_layers);

        // One entry's worth: the older chain's last block goes first.
        assert_eq!(prefix.evict(1), c.n_layers);
        let mut check = KvCache::in_pool(&pool, &c, 40);
        assert_eq!(prefix.adopt_longest_prefix(prefix.root(0), &[old.clone(), vec![9]].concat(), &mut check).tokens(), 16);
        drop(check);

        // Everything unused: only the block the reader holds stays.
        prefix.evict(usize::MAX);
        assert_eq!(prefix.len(), 1);
        drop(reader);
        assert_eq!(pool.allocated_blocks(), c.n_layers, "the cache still holds the entry the reader used");
        prefix.clear();
        assert_eq!(pool.allocated_blocks(), 0);
    }
}
