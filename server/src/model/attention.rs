//! Causal (optionally sliding-window) grouped-query attention over a sequence's KV cache:
//!   a_h = softmax(q_h·K_gᵀ / √d + mask)·V_g,   g = h / (heads / kv_heads)
//! so each group of `heads / kv_heads` query heads shares one key/value head.

use candle_core::{Device, Tensor, D};

use crate::model::{Config, KvCache, ModelError};

/// The oldest key any query of a chunk starting at `start_pos` may see.
pub(crate) fn first_visible_key(start_pos: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (start_pos + 1).saturating_sub(w))
}

/// Additive mask `[tokens, keys]` over keys `first_visible_key..start_pos + tokens`: the query at
/// position p sees key j iff j ≤ p and, with a window w, p − j < w (w keys, p's own included).
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

/// The mask of a chunk with each query row repeated for the `group` query heads that share a KV
/// head, `[tokens·group, keys]` (rows ordered token-major), or `None` for a single token.
pub(crate) fn grouped_mask(start_pos: usize, tokens: usize, window: Option<usize>, group: usize) -> Result<Option<Tensor>, ModelError> {
    if tokens == 1 {
        return Ok(None);
    }
    let n_keys = start_pos + tokens - first_visible_key(start_pos, window);
    let mask = attention_mask(start_pos, tokens, window)
        .chunks_exact(n_keys)
        .flat_map(|row| std::iter::repeat_n(row, group).flatten().copied())
        .collect::<Vec<f32>>();
    Ok(Some(Tensor::from_vec(mask, (tokens * group, n_keys), &Device::Cpu)?))
}

/// softmax(q·kᵀ/√d + mask)·v for a chunk of one sequence, `q: [t, heads·d]`, over the cached keys
/// its queries may see (the chunk's own already written). Returns `[t, heads·d]`.
pub(crate) fn attend_chunk(
    c: &Config,
    cache: &KvCache,
    layer: usize,
    start_pos: usize,
    q: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor, ModelError> {
    let (t, d) = (q.dim(0)?, c.head_dim);
    let (kv_heads, group) = (c.n_kv_heads, c.n_heads / c.n_kv_heads);
    let first_key = first_visible_key(start_pos, c.window(layer));
    let (keys, values) = cache.window(layer, first_key, start_pos + t)?;
    let n_keys = keys.dim(0)?;
    // [kv_heads, t·group, d]: the query heads of one KV head, token-major.
    let q = q.reshape((t, kv_heads, group, d))?.transpose(0, 1)?.contiguous()?.reshape((kv_heads, t * group, d))?;
    let keys = keys.reshape((n_keys, kv_heads, d))?.transpose(0, 1)?.contiguous()?;
    let values = values.reshape((n_keys, kv_heads, d))?.transpose(0, 1)?.contiguous()?;
    let mut scores = (q.matmul(&keys.t()?)? * (1.0 / (d as f64).sqrt()))?;
    if let Some(mask) = mask {
        scores = scores.broadcast_add(mask)?;
    }
    let max = scores.max_keepdim(D::Minus1)?;
    let weights = scores.broadcast_sub(&max)?.exp()?;
    let weights = weights.broadcast_div(&weights.sum_keepdim(D::Minus1)?)?;
    Ok(weights
        .matmul(&values)?
        .reshape((kv_heads, t, group, d))?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((t, c.n_heads * d))?)
}

/// Attention of one query position (`q`: heads × head_dim) over its cached keys, computed in
/// place: the same softmax(q·kᵀ/√d)·v as [`attend_chunk`], without a tensor op per step.
pub(crate) fn attend_one(c: &Config, cache: &KvCache, layer: usize, pos: usize, q: &[f32]) -> Result<Tensor, ModelError> {
    let d = c.head_dim;
    let (group, kv_width) = (c.n_heads / c.n_kv_heads, c.kv_width());
    let first = first_visible_key(pos, c.window(layer));
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; c.n_heads * d];
    cache.with_window_slices(layer, first, pos + 1, |keys, values| {
        let mut weights = vec![0f32; pos + 1 - first];
        for (h, (q_head, out_head)) in q.chunks_exact(d).zip(out.chunks_exact_mut(d)).enumerate() {
            let kv = (h / group) * d;
            for (w, key) in weights.iter_mut().zip(keys.chunks_exact(kv_width)) {
                *w = dot(q_head, &key[kv..kv + d]) * scale;
            }
            let max = weights.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for w in weights.iter_mut() {
                *w = (*w - max).exp();
                sum += *w;
            }
            for (&w, value) in weights.iter().zip(values.chunks_exact(kv_width)) {
                let p = w / sum;
                for (o, &v) in out_head.iter_mut().zip(&value[kv..kv + d]) {
                    *o += p * v;
                }
            }
        }
    })?;
    Ok(Tensor::from_vec(out, (1, c.n_heads * d), &Device::Cpu)?)
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Sixteen partial sums let the compiler vectorise the reduction.
    let mut acc = [0f32; 16];
    for (ca, cb) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
        for i in 0..16 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let tail = a.len() / 16 * 16;
    acc.iter().sum::<f32>() + a[tail..].iter().zip(&b[tail..]).map(|(x, y)| x * y).sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visible(mask: &[f32], keys: usize) -> Vec<Vec<bool>> {
        mask.chunks(keys)
            .map(|row| row.iter().map(|&m| m == 0.0).collect())
            .collect()
    }

    #[test]
    fn global_mask_is_causal() {
        let rows = visible(&attention_mask(0, 3, None), 3);
        assert_eq!(
            rows,
            [[true, false, false], [true, true, false], [true, true, true]]
        );
    }

    #[test]
    fn sliding_window_counts_the_current_token() {
        // Window 2 over positions 3..6: keys start at 2 (position 3 sees 2 and 3).
        assert_eq!(first_visible_key(3, Some(2)), 2);
        let rows = visible(&attention_mask(3, 3, Some(2)), 4);
        assert_eq!(
            rows,
            [
                [true, true, false, false],
                [false, true, true, false],
                [false, false, true, true]
            ]
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
