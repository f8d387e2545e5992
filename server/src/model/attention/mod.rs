//! Causal (optionally sliding-window) grouped-query attention over paged KV blocks:
//!   a_h = softmax(q_h·K_gᵀ / √d + mask)·V_g,   g = h / (heads / kv_heads)
//! so each group of `heads / kv_heads` query heads shares one key/value head.
//!
//! The softmax is computed online (as FlashAttention does): each query row keeps its running
//! maximum m, denominator l and weighted sum o, and a key with score s updates them as
//!   m' = max(m, s),   l' = l·e^(m−m') + e^(s−m'),   o' = o·e^(m−m') + e^(s−m')·v,
//! with a = o/l at the end, at the precision of llama.cpp's CPU kernel for the same rows (`fold`):
//! a generated token's row folds key by key with its query and o rounded to f16; a long prompt's
//! rows fold a block of keys at once in f32. Nothing of size keys × queries is ever stored, so
//! prefill cost grows only with the keys each query sees. Work is split over (sequence, KV head,
//! tile of query rows) on the serving workers, and over the heads of a group too when that would
//! leave workers idle; the keys and values of a block are widened from 16 bits once per tile, and
//! a tile's scores against a block's keys, and a prompt token's weighted sums over its values,
//! are small matrix products.
//!
//! A row's result depends only on its own query, its position and the blocks it sees, visited
//! in order: never on which other rows share its tile or batch. So a sequence decoded token by
//! token, prefilled in one chunk, or batched with others gets the same bits.

use std::ops::Range;

use candle_core::utils::barrier_pool;
use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::model::kv::BLOCK_TOKENS;
use crate::model::{each_item_on_workers, Config, KvCache, ModelError};

mod fold;

/// Query rows (tokens × heads of one group) that share one pass over the key blocks.
const TILE_ROWS: usize = 32;

/// The oldest key any query of a chunk starting at `start_pos` may see.
pub(crate) fn first_visible_key(start_pos: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (start_pos + 1).saturating_sub(w))
}

/// Additive mask `[tokens, keys]` over keys `first_visible_key..start_pos + tokens`: the query at
/// position p sees key j iff j ≤ p and, with a window w, p − j < w (w keys, p's own included).
/// Training's dense attention uses it; serving applies the same rule block by block.
pub(crate) fn attention_mask(start_pos: usize, tokens: usize, window: Option<usize>) -> Vec<f32> {
    let first = first_visible_key(start_pos, window);
    let end = start_pos + tokens;
    let mut mask = Vec::with_capacity(tokens * (end - first));
    for p in start_pos..end {
        mask.extend((first..end).map(|j| {
            let visible = j <= p && window.is_none_or(|w| p - j < w);
            if visible {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        }));
    }
    mask
}

/// One sequence's share of a batched attention call: its query rows and where they start.
pub(crate) struct AttentionChunk<'a> {
    pub cache: &'a KvCache,
    /// Position of the chunk's first token; its keys and values are already in the cache.
    pub start_pos: usize,
    /// The chunk's rows in the batch's `q` and output.
    pub rows: Range<usize>,
}

/// A tile of work: some tokens of one chunk, some (usually all) of the query heads of one KV
/// head, numbered within its group.
struct Tile {
    chunk: usize,
    kv_head: usize,
    heads: Range<usize>,
    tokens: Range<usize>,
}

/// The output rows, written by the workers at disjoint places (each tile its own heads of its
/// own tokens).
#[derive(Clone, Copy)]
struct SharedOutput(*mut f32);
// SAFETY: tiles write disjoint elements, and the call returns only after every worker is done.
unsafe impl Send for SharedOutput {}
unsafe impl Sync for SharedOutput {}

/// `out[rows, heads·d] = attention of q[rows, heads·d]` for every chunk of the batch on `layer`.
pub(crate) fn attend(c: &Config, layer: usize, q: &[f32], chunks: &[AttentionChunk], out: &mut [f32]) -> Result<(), ModelError> {
    let group = c.n_heads / c.n_kv_heads;
    let window = c.window(layer);
    for chunk in chunks {
        check_blocks_present(chunk, layer, window)?;
    }
    let tokens_per_tile = (TILE_ROWS / group).max(1);
    let tiles_per_group = chunks.iter().map(|chunk| chunk.rows.len().div_ceil(tokens_per_tile)).sum::<usize>() * c.n_kv_heads;
    let pool = barrier_pool();
    // Fewer tiles than threads (a decode step of one sequence with one KV head is one tile)
    // would leave threads idle: the group's heads are then split over tiles, each widening the
    // block's keys and values for itself. A row's arithmetic is the same whichever heads share
    // its tile.
    let parts = (pool.n_workers() + 1).div_ceil(tiles_per_group.max(1)).clamp(1, group);
    let head_parts: Vec<Range<usize>> = (0..parts).map(|i| group * i / parts..group * (i + 1) / parts).collect();
    let tiles: Vec<Tile> = chunks
        .iter()
        .enumerate()
        .flat_map(|(i, chunk)| {
            let t = chunk.rows.len();
            let head_parts = &head_parts;
            (0..c.n_kv_heads).flat_map(move |kv_head| {
                (0..t).step_by(tokens_per_tile).flat_map(move |first| {
                    head_parts.iter().map(move |heads| Tile {
                        chunk: i,
                        kv_head,
                        heads: heads.clone(),
                        tokens: first..(first + tokens_per_tile).min(t),
                    })
                })
            })
        })
        .collect();
    assert_eq!(out.len(), q.len(), "attention output and queries differ in size");
    let output = SharedOutput(out.as_mut_ptr());
    // One scratch per thread, for the most rows a tile has: made per range of tiles, and for a
    // whole tile of prompt rows, it was 16 sets of buffers (about 100 KiB zeroed each for Gemma 3)
    // per layer in a 16-sequence decode step.
    let most_rows = tiles.iter().map(|tile| tile.tokens.len() * tile.heads.len()).max().unwrap_or(0);
    each_item_on_workers(tiles.len(), 0, || Scratch::new(c.head_dim, most_rows), |i, _, scratch| {
        let tile = &tiles[i];
        attend_tile(c, layer, q, &chunks[tile.chunk], tile, scratch, output);
    });
    Ok(())
}

/// The blocks a chunk reads are all there (a window may only have let go of older ones).
fn check_blocks_present(chunk: &AttentionChunk, layer: usize, window: Option<usize>) -> Result<(), ModelError> {
    let first = first_visible_key(chunk.start_pos, window) / BLOCK_TOKENS;
    let end = chunk.start_pos + chunk.rows.len();
    let blocks = chunk.cache.layer_blocks(layer);
    match (first..end.div_ceil(BLOCK_TOKENS)).find(|&b| blocks.get(b).is_none_or(Option::is_none)) {
        Some(b) => Err(ModelError::KvBlockUnwritable { layer, position: b * BLOCK_TOKENS }),
        None => Ok(()),
    }
}

/// Per-worker buffers for one tile.
struct Scratch {
    /// The tile's query rows, `[rows][d]` (a generated token's rounded to f16).
    q: Vec<f32>,
    /// One block's keys, `[d][BLOCK_TOKENS]`, and values, `[BLOCK_TOKENS][d]`, widened.
    keys: Vec<f32>,
    values: Vec<f32>,
    scores: Vec<[f32; BLOCK_TOKENS]>,
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
}

impl Scratch {
    fn new(d: usize, rows: usize) -> Self {
        Self {
            q: vec![0.0; rows * d],
            keys: vec![0.0; d * BLOCK_TOKENS],
            values: vec![0.0; BLOCK_TOKENS * d],
            scores: vec![[0.0; BLOCK_TOKENS]; rows],
            max: vec![0.0; rows],
            sum: vec![0.0; rows],
            acc: vec![0.0; rows * d],
        }
    }
}

/// The online softmax of one tile over every block its rows see.
fn attend_tile(c: &Config, layer: usize, q: &[f32], chunk: &AttentionChunk, tile: &Tile, s: &mut Scratch, out: SharedOutput) {
    let d = c.head_dim;
    let group = c.n_heads / c.n_kv_heads;
    let heads = tile.heads.len();
    let q_width = c.n_heads * d;
    let window = c.window(layer);
    let rows = tile.tokens.len() * heads;
    // Row r is token tile.tokens.start + r / heads, head kv_head·group + heads.start + r % heads.
    let position = |r: usize| chunk.start_pos + tile.tokens.start + r / heads;
    let q_offset = |r: usize| (chunk.rows.start + tile.tokens.start + r / heads) * q_width + (tile.kv_head * group + tile.heads.start + r % heads) * d;
    let scale = 1.0 / (d as f32).sqrt();
    let f32_end = f32_rows_end(chunk.cache.prompt_len());
    for r in 0..rows {
        let src = &q[q_offset(r)..q_offset(r) + d];
        let dst = &mut s.q[r * d..(r + 1) * d];
        if position(r) < f32_end {
            dst.copy_from_slice(src);
        } else {
            // Queries are rounded to 16 bits like the keys they meet, as llama.cpp does when
            // it decodes.
            for (dst, &x) in dst.iter_mut().zip(src) {
                *dst = f16::from_f32(x).to_f32();
            }
        }
    }
    s.max[..rows].fill(f32::NEG_INFINITY);
    s.sum[..rows].fill(0.0);
    s.acc[..rows * d].fill(0.0);

    let blocks = chunk.cache.layer_blocks(layer);
    let first_block = first_visible_key(position(0), window) / BLOCK_TOKENS;
    let last_block = position(rows - 1) / BLOCK_TOKENS;
    for b in first_block..=last_block {
        let Some(block) = blocks.get(b).and_then(Option::as_ref) else { continue };
        block.keys_transposed(tile.kv_head).convert_to_f32_slice(&mut s.keys);
        block.values(tile.kv_head).convert_to_f32_slice(&mut s.values);
        block_scores(&s.q[..rows * d], &s.keys, d, scale, &mut s.scores[..rows]);
        // The rows of a token share its position, so they see the same keys.
        for token in 0..tile.tokens.len() {
            let p = position(token * heads);
            let visible = first_visible_key(p, window).max(b * BLOCK_TOKENS)..(p + 1).min((b + 1) * BLOCK_TOKENS);
            if visible.is_empty() {
                continue;
            }
            let slots = visible.start - b * BLOCK_TOKENS..visible.end - b * BLOCK_TOKENS;
            let token_rows = token * heads..(token + 1) * heads;
            let (max, sum) = (&mut s.max[token_rows.clone()], &mut s.sum[token_rows.clone()]);
            let acc = &mut s.acc[token_rows.start * d..token_rows.end * d];
            if p < f32_end {
                fold::fold_block_f32(&s.scores[token_rows], slots, max, sum, &s.values, acc, d);
            } else {
                for (r, ((max, sum), acc)) in token_rows.zip(max.iter_mut().zip(sum).zip(acc.chunks_exact_mut(d))) {
                    fold::fold_keys_f16(&s.scores[r], slots.clone(), max, sum, &s.values, acc);
                }
            }
        }
    }

    for r in 0..rows {
        let inv = 1.0 / s.sum[r];
        let dst = q_offset(r);
        for (i, &a) in s.acc[r * d..(r + 1) * d].iter().enumerate() {
            // SAFETY: row r of this tile is written by this tile only; see `SharedOutput`.
            unsafe { *out.0.add(dst + i) = a * inv };
        }
    }
}

/// scores[r][j] = (q_r · k_j)·scale for every row of the tile and key of the block (`keys`:
/// `[d][BLOCK_TOKENS]`). Each score sums over i in order, whatever rows share the call.
fn block_scores(q: &[f32], keys: &[f32], d: usize, scale: f32, scores: &mut [[f32; BLOCK_TOKENS]]) {
    // Eight rows at a time share each loaded row of keys: eight independent chains keep both
    // FMA pipes busy. (Without AVX-512 a row of keys is two registers, and four rows fill the
    // sixteen.)
    let whole = scores.len() - scores.len() % 8;
    for (q, scores) in q[..whole * d].chunks_exact(8 * d).zip(scores[..whole].chunks_exact_mut(8)) {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
        // SAFETY: AVX-512F is enabled at compile time; `q` holds 8 rows of d and `keys` d rows of
        // BLOCK_TOKENS (`chunks_exact` and the widened block).
        unsafe {
            rows_scores_avx512(q, keys, d, scale, scores)
        };
        #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
        for (q, scores) in q.chunks_exact(4 * d).zip(scores.chunks_exact_mut(4)) {
            rows_scores::<4>(q, keys, d, scale, scores);
        }
    }
    // The rest four, two or one at a time: a row's score is a chain of d dependent FMAs, so a
    // decode step's few rows each alone would wait on every one of them.
    let mut first = whole;
    while first < scores.len() {
        let (q, scores) = (&q[first * d..], &mut scores[first..]);
        first += match scores.len() {
            4.. => rows_scores::<4>(q, keys, d, scale, scores),
            2 | 3 => rows_scores::<2>(q, keys, d, scale, scores),
            _ => rows_scores::<1>(q, keys, d, scale, scores),
        };
    }
}

/// [`block_scores`] for the first `R` rows; returns R.
#[inline(always)]
fn rows_scores<const R: usize>(q: &[f32], keys: &[f32], d: usize, scale: f32, scores: &mut [[f32; BLOCK_TOKENS]]) -> usize {
    let mut acc = [[0f32; BLOCK_TOKENS]; R];
    for (i, key_row) in keys.chunks_exact(BLOCK_TOKENS).enumerate() {
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = q[r * d + i];
            for (a, &k) in acc.iter_mut().zip(key_row) {
                *a = x.mul_add(k, *a);
            }
        }
    }
    for (out, acc) in scores.iter_mut().zip(acc) {
        *out = acc.map(|a| a * scale);
    }
    R
}

/// [`rows_scores`] for eight rows in sixteen-lane registers, the same operations in the same order.
///
/// # Safety
/// The CPU has AVX-512F; `q` holds 8 rows of `d` and `keys` `d` rows of `BLOCK_TOKENS`.
#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
unsafe fn rows_scores_avx512(q: &[f32], keys: &[f32], d: usize, scale: f32, scores: &mut [[f32; BLOCK_TOKENS]]) {
    use std::arch::x86_64::*;
    debug_assert!(q.len() >= 8 * d && keys.len() >= d * BLOCK_TOKENS && scores.len() >= 8);
    let mut acc = [_mm512_setzero_ps(); 8];
    for i in 0..d {
        let k = _mm512_loadu_ps(keys.as_ptr().add(i * BLOCK_TOKENS));
        for (r, acc) in acc.iter_mut().enumerate() {
            *acc = _mm512_fmadd_ps(_mm512_set1_ps(*q.get_unchecked(r * d + i)), k, *acc);
        }
    }
    for (out, acc) in scores.iter_mut().zip(acc) {
        _mm512_storeu_ps(out.as_mut_ptr(), _mm512_mul_ps(acc, _mm512_set1_ps(scale)));
    }
}

/// Prompts at least this long have their rows folded in f32 over key blocks: llama.cpp takes its
/// tiled flash-attention path for a batch of 64 query rows or more.
const F32_PROMPT_MIN: usize = 64;

/// The positions whose rows are folded in f32: a long enough prompt's.
fn f32_rows_end(prompt_len: usize) -> usize {
    if prompt_len >= F32_PROMPT_MIN {
        prompt_len
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::KvPool;
    use rand::{Rng, SeedableRng};

    /// The tiny synthetic Gemma's configuration, reshaped: `head_dim` 24 (not a multiple of
    /// 16), 4 query heads on 2 KV heads.
    fn config(window: Option<usize>) -> Config {
        let mut c = crate::model::synthetic::tiny_config();
        (c.n_heads, c.n_kv_heads, c.head_dim, c.sliding_window) = (4, 2, 24, window);
        c
    }

    fn random(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
    }

    /// softmax(q·kᵀ/√d)·v in f64 for one query row over keys `first..=p` (already rounded to
    /// f16 as the cache stores them).
    /// Softmax attention in f64 over the f16 keys and values, the query rounded to f16 first or
    /// not.
    fn dense(q: &[f32], round_q: bool, keys: &[Vec<f32>], values: &[Vec<f32>], first: usize, p: usize) -> Vec<f64> {
        let d = q.len();
        let q: Vec<f32> = q.iter().map(|&a| if round_q { f16::from_f32(a).to_f32() } else { a }).collect();
        let scores: Vec<f64> = (first..=p)
            .map(|j| q.iter().zip(&keys[j]).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() / (d as f64).sqrt())
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        (0..d)
            .map(|i| (first..=p).zip(&weights).map(|(j, w)| w * values[j][i] as f64).sum::<f64>() / total)
            .collect()
    }

    /// However many rows share a block's scores (eight at a time, then four, two or one), each
    /// row gets the bits it gets alone, and its dot products.
    #[test]
    fn block_scores_give_each_row_its_own_bits() {
        let d = 40;
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (q, keys) = (random(&mut rng, 11 * d), random(&mut rng, d * BLOCK_TOKENS));
        let scale = 0.3;
        let alone: Vec<[f32; BLOCK_TOKENS]> = (0..11)
            .map(|r| {
                let mut out = [[0f32; BLOCK_TOKENS]];
                block_scores(&q[r * d..(r + 1) * d], &keys, d, scale, &mut out);
                out[0]
            })
            .collect();
        for rows in 1..=11 {
            let mut together = vec![[0f32; BLOCK_TOKENS]; rows];
            block_scores(&q[..rows * d], &keys, d, scale, &mut together);
            assert_eq!(together, alone[..rows], "{rows} rows");
        }
        for (r, scores) in alone.iter().enumerate() {
            for (j, &score) in scores.iter().enumerate() {
                let dot: f64 = (0..d).map(|i| q[r * d + i] as f64 * keys[i * BLOCK_TOKENS + j] as f64).sum();
                assert!((score as f64 - dot * scale as f64).abs() < 1e-4, "row {r} key {j}");
            }
        }
    }

    /// Two sequences in one batch, one prefilling a chunk after cached positions and one
    /// decoding, across block edges, with and without a window: every row matches the dense
    /// reference, and a row's bits do not depend on the rest of the batch. With one KV head the
    /// decoding row alone is one tile, which is split by heads over the threads.
    #[test]
    fn attention_over_blocks_matches_dense_softmax_and_ignores_its_batch() {
        // Without a prompt every row is folded key by key at f16 precision; as rows of a long
        // prompt, in f32 a block at a time.
        let cases = [(None, 0), (Some(21), 0), (None, 100), (Some(21), 100)];
        for ((window, prompt_len), kv_heads) in cases.into_iter().flat_map(|case| [(case, 2), (case, 1)]) {
            let mut c = config(window);
            (c.n_layers, c.n_kv_heads) = (1, kv_heads);
            let (d, kv_width, q_width) = (c.head_dim, c.kv_width(), c.n_heads * c.head_dim);
            let layer = 0;
            let mut rng = rand::rngs::StdRng::seed_from_u64(3);
            let pool = KvPool::new(&c, 1 << 20);
            let lengths = [(37usize, 13usize), (50, 1)];
            let mut caches = Vec::new();
            let mut all_q = Vec::new();
            let mut rounded: Vec<(Vec<Vec<f32>>, Vec<Vec<f32>>)> = Vec::new();
            for &(cached, new) in &lengths {
                let mut cache = KvCache::in_pool(&pool, &c, cached + new);
                cache.set_prompt_len(prompt_len);
                let (k, v) = (random(&mut rng, (cached + new) * kv_width), random(&mut rng, (cached + new) * kv_width));
                for (start, n) in [(0, cached), (cached, new)] {
                    cache.reserve(n).unwrap();
                    let span = start * kv_width..(start + n) * kv_width;
                    cache.write(layer, &k[span.clone()], &v[span], kv_width).unwrap();
                    if start == 0 {
                        cache.advance(n);
                    }
                }
                let round = |x: &[f32]| x.chunks(kv_width).map(|r| r.iter().map(|&y| f16::from_f32(y).to_f32()).collect()).collect();
                rounded.push((round(&k), round(&v)));
                all_q.push(random(&mut rng, new * q_width));
                caches.push(cache);
            }
            let mut rows = 0;
            let chunks: Vec<AttentionChunk> = caches
                .iter()
                .zip(&lengths)
                .map(|(cache, &(cached, new))| {
                    rows += new;
                    AttentionChunk { cache, start_pos: cached, rows: rows - new..rows }
                })
                .collect();
            let q: Vec<f32> = all_q.concat();
            let mut together = vec![0f32; q.len()];
            attend(&c, layer, &q, &chunks, &mut together).unwrap();

            for (s, chunk) in chunks.iter().enumerate() {
                let mut alone = vec![0f32; chunk.rows.len() * q_width];
                let single = [AttentionChunk { cache: chunk.cache, start_pos: chunk.start_pos, rows: 0..chunk.rows.len() }];
                attend(&c, layer, &all_q[s], &single, &mut alone).unwrap();
                assert_eq!(alone, together[chunk.rows.start * q_width..chunk.rows.end * q_width], "batching changed bits");
                let (keys, values) = &rounded[s];
                for t in 0..chunk.rows.len() {
                    let p = chunk.start_pos + t;
                    for h in 0..c.n_heads {
                        let g = h / (c.n_heads / c.n_kv_heads);
                        let head_keys: Vec<Vec<f32>> = keys.iter().map(|k| k[g * d..(g + 1) * d].to_vec()).collect();
                        let head_values: Vec<Vec<f32>> = values.iter().map(|v| v[g * d..(g + 1) * d].to_vec()).collect();
                        let qh = &all_q[s][t * q_width + h * d..t * q_width + (h + 1) * d];
                        let want = dense(qh, prompt_len == 0, &head_keys, &head_values, first_visible_key(p, window), p);
                        let got = &alone[t * q_width + h * d..t * q_width + (h + 1) * d];
                        // Decoding keeps the running sum at f16 precision, as llama.cpp does; a
                        // prompt's rows keep it in f32.
                        let tolerance = if prompt_len == 0 { 2e-2 } else { 1e-4 };
                        for (g, w) in got.iter().zip(&want) {
                            assert!((*g as f64 - w).abs() < tolerance, "window {window:?} prompt {prompt_len} seq {s} pos {p} head {h}: {g} vs {w}");
                        }
                    }
                }
            }
        }
    }

    fn visible(mask: &[f32], keys: usize) -> Vec<Vec<bool>> {
        mask.chunks(keys).map(|row| row.iter().map(|&m| m == 0.0).collect()).collect()
    }

    #[test]
    fn global_mask_is_causal() {
        let rows = visible(&attention_mask(0, 3, None), 3);
        assert_eq!(rows, [[true, false, false], [true, true, false], [true, true, true]]);
    }

    #[test]
    fn sliding_window_counts_the_current_token() {
        // Window 2 over positions 3..6: keys start at 2 (position 3 sees 2 and 3).
        assert_eq!(first_visible_key(3, Some(2)), 2);
        let rows = visible(&attention_mask(3, 3, Some(2)), 4);
        assert_eq!(
            rows,
            [[true, true, false, false], [false, true, true, false], [false, false, true, true]]
        );
    }

    #[test]
    fn decoding_sees_exactly_the_window() {
        // One token at position 600 with a 512 window sees positions 89..=600: 512 keys.
        assert_eq!(first_visible_key(600, Some(512)), 89);
        assert_eq!(first_visible_key(600, None), 0);
        assert_eq!(first_visible_key(10, Some(512)), 0);
    }
}
