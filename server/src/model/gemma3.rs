//! Gemma 3 (text), quantized, batched over sequences at different positions.
//!
//! For each layer ℓ, with x the residual stream of all rows of the batch:
//!   h   = RMSNorm_attn(x)
//!   q,k,v = h·Wqᵀ, h·Wkᵀ, h·Wvᵀ;  q,k ← RMSNorm per head, then RoPE (NeoX halves)
//!   a   = softmax(q·kᵀ / √head_dim + mask)·v     (local layers see the last `sliding_window`
//!                                                  positions, the current one included)
//!   x  ← x + RMSNorm_post_attn(a·Woᵀ)
//!   m   = RMSNorm_ffn(x)
//!   x  ← x + RMSNorm_post_ffw((gelu_tanh(m·W_gateᵀ) ⊙ m·W_upᵀ)·W_downᵀ)
//! Embeddings are scaled by √hidden; the output projection is tied to the embedding.
//! Every 6th layer (5, 11, 17, …) is global with RoPE base `rope.freq_base`; the others are
//! local with base 10 000. GGUF norm weights already hold (1 + w).

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, D};
use tessera_adapters::{AdapterMix, TargetModule};

use crate::gguf::{GgufError, GgufFile};
use crate::model::gelu::GeluTable;
use crate::model::linear::{load_vector, Kernels, QLinear, QWeight, RowSegment};
use crate::model::with_values;
use crate::model::{KvCache, LogitsFor, ModelError};

const ARCHITECTURE: &str = "gemma3";
/// Local layers use this RoPE base whatever the file says for the global ones.
const LOCAL_ROPE_BASE: f64 = 10_000.0;
/// One layer in this many is global.
const GLOBAL_LAYER_PERIOD: usize = 6;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub hidden: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_hidden: usize,
    pub vocab: usize,
    pub context_length: usize,
    pub sliding_window: usize,
    pub rope_base_global: f64,
    pub rope_base_local: f64,
    pub rms_eps: f64,
}

impl Config {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, GgufError> {
        let arch = gguf.get_str("general.architecture")?;
        if arch != ARCHITECTURE {
            return Err(GgufError::UnsupportedArchitecture {
                path: gguf.path().to_path_buf(),
                found: arch.to_string(),
                supported: ARCHITECTURE,
            });
        }
        let key = |k: &str| format!("{ARCHITECTURE}.{k}");
        let hidden = gguf.get_usize(&key("embedding_length"))?;
        let n_heads = gguf.get_usize(&key("attention.head_count"))?;
        let vocab = gguf
            .tensors
            .get("token_embd.weight")
            .map(|t| t.dims[0])
            .ok_or_else(|| GgufError::MissingTensor {
                path: gguf.path().to_path_buf(),
                tensor: "token_embd.weight".into(),
            })?;
        Ok(Self {
            hidden,
            n_layers: gguf.get_usize(&key("block_count"))?,
            n_heads,
            n_kv_heads: gguf.get_usize(&key("attention.head_count_kv"))?,
            head_dim: gguf
                .get_usize(&key("attention.key_length"))
                .unwrap_or(hidden / n_heads),
            ffn_hidden: gguf.get_usize(&key("feed_forward_length"))?,
            vocab,
            context_length: gguf.get_usize(&key("context_length"))?,
            sliding_window: gguf.get_usize(&key("attention.sliding_window"))?,
            rope_base_global: gguf.get_f64(&key("rope.freq_base")).unwrap_or(1_000_000.0),
            rope_base_local: LOCAL_ROPE_BASE,
            rms_eps: gguf
                .get_f64(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-6),
        })
    }

    /// The shapes a LoRA adapter for this model must have.
    pub fn adapter_shape(&self) -> tessera_adapters::peft::BaseShape {
        tessera_adapters::peft::BaseShape {
            n_layers: self.n_layers,
            hidden: self.hidden,
            q_width: self.n_heads * self.head_dim,
            kv_width: self.n_kv_heads * self.head_dim,
            ffn: self.ffn_hidden,
        }
    }

    pub fn is_global_layer(&self, layer: usize) -> bool {
        (layer + 1) % GLOBAL_LAYER_PERIOD == 0
    }
}

pub(crate) struct RmsNorm {
    /// Shared with the training ops, which take it without a copy.
    pub(crate) weight: Arc<Vec<f32>>,
    pub(crate) eps: f32,
}

impl RmsNorm {
    fn load(gguf: &GgufFile, name: &str, len: usize, eps: f64) -> Result<Self, ModelError> {
        Ok(Self {
            weight: Arc::new(load_vector(gguf, name, len)?.to_vec1::<f32>()?),
            eps: eps as f32,
        })
    }

    /// out = x / √(mean(x²) + ε) · w for one vector of the weight's length.
    fn normalize_into(&self, x: &[f32], out: &mut [f32]) {
        let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        let scale = 1.0 / (mean_sq + self.eps).sqrt();
        for ((o, &v), &w) in out.iter_mut().zip(x).zip(self.weight.iter()) {
            *o = v * scale * w;
        }
    }

    /// RMSNorm over the last dimension, one pass.
    fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let n = self.weight.len();
        let out = with_values(x, |xs| {
            let mut out = vec![0f32; xs.len()];
            for (row, o) in xs.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
                self.normalize_into(row, o);
            }
            out
        })?;
        Ok(Tensor::from_vec(out, x.shape(), &Device::Cpu)?)
    }

    /// `x: [rows, heads·d]`: RMSNorm of every head's d values, then RoPE at the row's position.
    fn forward_heads_rotated(&self, x: &Tensor, rope: &Rotary) -> Result<Tensor, ModelError> {
        let d = self.weight.len();
        let width = x.dim(1)?;
        let out = with_values(x, |xs| {
            let mut out = vec![0f32; xs.len()];
            for (r, (row, o)) in xs.chunks_exact(width).zip(out.chunks_exact_mut(width)).enumerate() {
                for (head, o_head) in row.chunks_exact(d).zip(o.chunks_exact_mut(d)) {
                    self.normalize_into(head, o_head);
                    rope.rotate(r, o_head);
                }
            }
            out
        })?;
        Ok(Tensor::from_vec(out, x.shape(), &Device::Cpu)?)
    }
}

pub(crate) struct Block {
    pub(crate) attn_norm: RmsNorm,
    pub(crate) q: QLinear,
    pub(crate) k: QLinear,
    pub(crate) v: QLinear,
    pub(crate) o: QLinear,
    pub(crate) q_norm: RmsNorm,
    pub(crate) k_norm: RmsNorm,
    pub(crate) post_attn_norm: RmsNorm,
    pub(crate) ffn_norm: RmsNorm,
    pub(crate) gate: QLinear,
    pub(crate) up: QLinear,
    pub(crate) down: QLinear,
    pub(crate) post_ffw_norm: RmsNorm,
    pub(crate) global: bool,
}

impl Block {
    fn load(gguf: &GgufFile, c: &Config, layer: usize, kernels: Kernels) -> Result<Self, ModelError> {
        let norm = |name: &str, len| {
            RmsNorm::load(gguf, &format!("blk.{layer}.{name}.weight"), len, c.rms_eps)
        };
        let linear = |module, shape| QLinear::load(gguf, layer, module, shape, kernels);
        let q_width = c.n_heads * c.head_dim;
        let kv_width = c.n_kv_heads * c.head_dim;
        Ok(Self {
            attn_norm: norm("attn_norm", c.hidden)?,
            q: linear(TargetModule::Q, (q_width, c.hidden))?,
            k: linear(TargetModule::K, (kv_width, c.hidden))?,
            v: linear(TargetModule::V, (kv_width, c.hidden))?,
            o: linear(TargetModule::O, (c.hidden, q_width))?,
            q_norm: norm("attn_q_norm", c.head_dim)?,
            k_norm: norm("attn_k_norm", c.head_dim)?,
            post_attn_norm: norm("post_attention_norm", c.hidden)?,
            ffn_norm: norm("ffn_norm", c.hidden)?,
            gate: linear(TargetModule::Gate, (c.ffn_hidden, c.hidden))?,
            up: linear(TargetModule::Up, (c.ffn_hidden, c.hidden))?,
            down: linear(TargetModule::Down, (c.hidden, c.ffn_hidden))?,
            post_ffw_norm: norm("post_ffw_norm", c.hidden)?,
            global: c.is_global_layer(layer),
        })
    }
}

/// One sequence's share of a forward call: its new tokens, appended after what its cache holds.
pub struct SequenceChunk<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub logits: LogitsFor,
    pub adapters: &'a AdapterMix<'a>,
}

/// Logits of the rows asked for, `[rows, vocab]`, and which rows belong to which sequence.
pub struct Logits {
    values: Vec<f32>,
    vocab: usize,
    rows_of_sequence: Vec<std::ops::Range<usize>>,
}

impl Logits {
    /// The logits of the `i`-th requested row of sequence `seq`.
    pub fn row(&self, seq: usize, i: usize) -> &[f32] {
        let row = self.rows_of_sequence[seq].start + i;
        &self.values[row * self.vocab..(row + 1) * self.vocab]
    }

    pub fn rows(&self, seq: usize) -> usize {
        self.rows_of_sequence[seq].len()
    }
}

/// cos and sin of θ_i·p for each row's position p, θ_i = base^(−2i/head_dim): `[rows, d/2]`.
struct Rotary {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl Rotary {
    fn new(positions: &[usize], base: f64, head_dim: usize) -> Result<Self, ModelError> {
        let (cos, sin) = rotary_tables(positions, base, head_dim);
        Ok(Self {
            cos,
            sin,
            half: head_dim / 2,
        })
    }

    /// NeoX rotation of one head of row `row`: (x₁, x₂) ↦ (x₁·cos − x₂·sin, x₂·cos + x₁·sin)
    /// over the two halves.
    fn rotate(&self, row: usize, head: &mut [f32]) {
        let (first, second) = head.split_at_mut(self.half);
        let cos = &self.cos[row * self.half..(row + 1) * self.half];
        let sin = &self.sin[row * self.half..(row + 1) * self.half];
        for (((x1, x2), &c), &s) in first.iter_mut().zip(second.iter_mut()).zip(cos).zip(sin) {
            let (a, b) = (*x1, *x2);
            *x1 = a * c - b * s;
            *x2 = b * c + a * s;
        }
    }
}

/// cos and sin of θ_i·p for each position p, θ_i = base^(−2i/head_dim): `[positions, d/2]` each.
pub(crate) fn rotary_tables(positions: &[usize], base: f64, head_dim: usize) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| base.powf(-((2 * i) as f64) / head_dim as f64) as f32)
        .collect();
    let mut cos = Vec::with_capacity(positions.len() * half);
    let mut sin = Vec::with_capacity(positions.len() * half);
    for &p in positions {
        for &f in &inv_freq {
            let angle = p as f32 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    (cos, sin)
}

/// Where one sequence's rows sit in the batch and what its attention may see.
struct SequenceLayout {
    rows: std::ops::Range<usize>,
    /// Position of the chunk's first token.
    start_pos: usize,
    /// Additive masks `[tokens·heads, keys]` for global and local layers (None when nothing is
    /// masked, as in single-token decoding).
    global_mask: Option<Tensor>,
    local_mask: Option<Tensor>,
}

pub struct Gemma3 {
    config: Config,
    /// The token embedding, also the (tied) output projection.
    embedding: QWeight,
    blocks: Vec<Block>,
    output_norm: RmsNorm,
    gelu: GeluTable,
    /// Dequantized-weight buffer reused across layers and calls; a second concurrent caller
    /// gets a buffer of its own instead of waiting.
    scratch: Mutex<Vec<f32>>,
}

impl Gemma3 {
    pub fn load(gguf: &GgufFile, kernels: Kernels) -> Result<Self, ModelError> {
        let config = Config::from_gguf(gguf)?;
        let embedding = QWeight::load(
            gguf,
            "token_embd.weight",
            (config.vocab, config.hidden),
            kernels,
        )?;
        let blocks = (0..config.n_layers)
            .map(|layer| Block::load(gguf, &config, layer, kernels))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            output_norm: RmsNorm::load(gguf, "output_norm.weight", config.hidden, config.rms_eps)?,
            embedding,
            blocks,
            config,
            scratch: Mutex::new(Vec::new()),
            gelu: GeluTable::new(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The tied token embedding and output projection `[vocab, hidden]`.
    pub(crate) fn embedding(&self) -> &QWeight {
        &self.embedding
    }

    pub(crate) fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    pub(crate) fn output_norm(&self) -> &RmsNorm {
        &self.output_norm
    }

    /// Runs every chunk of the batch through the model at once, appending their keys and values
    /// to their caches, and returns the logits each chunk asked for.
    pub fn forward(&self, batch: &mut [SequenceChunk]) -> Result<Logits, ModelError> {
        let c = &self.config;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut layouts = Vec::with_capacity(batch.len());
        for chunk in batch.iter() {
            if chunk.tokens.is_empty() {
                return Err(ModelError::EmptyInput);
            }
            chunk.cache.check_room(chunk.tokens.len())?;
            if let Some(&id) = chunk.tokens.iter().find(|&&id| id as usize >= c.vocab) {
                return Err(ModelError::TokenOutOfRange { id, vocab: c.vocab });
            }
            let start_pos = chunk.cache.len();
            let rows = ids.len()..ids.len() + chunk.tokens.len();
            ids.extend_from_slice(chunk.tokens);
            positions.extend(start_pos..start_pos + chunk.tokens.len());
            layouts.push(SequenceLayout {
                global_mask: self.attention_mask(start_pos, chunk.tokens.len(), true)?,
                local_mask: self.attention_mask(start_pos, chunk.tokens.len(), false)?,
                rows,
                start_pos,
            });
        }
        let n_rows = ids.len();
        let mut shared_scratch = self.scratch.try_lock();
        let mut own_scratch = Vec::new();
        let scratch = match shared_scratch.as_deref_mut() {
            Ok(buffer) => buffer,
            Err(_) => &mut own_scratch,
        };
        let segments: Vec<RowSegment> = batch
            .iter()
            .zip(&layouts)
            .map(|(chunk, layout)| RowSegment {
                rows: layout.rows.clone(),
                adapters: chunk.adapters,
            })
            .collect();
        let rope_global = Rotary::new(&positions, c.rope_base_global, c.head_dim)?;
        let rope_local = Rotary::new(&positions, c.rope_base_local, c.head_dim)?;

        let ids = Tensor::from_vec(ids, n_rows, &Device::Cpu)?;
        let mut x = (self.embedding.rows(&ids)? * (c.hidden as f64).sqrt())?;

        for (layer, block) in self.blocks.iter().enumerate() {
            // Attention.
            let h = block.attn_norm.forward(&x)?;
            let q = block.q.forward(&h, &segments, scratch)?;
            let k = block.k.forward(&h, &segments, scratch)?;
            let v = block.v.forward(&h, &segments, scratch)?;
            let rope = if block.global {
                &rope_global
            } else {
                &rope_local
            };
            let q = block.q_norm.forward_heads_rotated(&q, rope)?;
            let k = block.k_norm.forward_heads_rotated(&k, rope)?;

            // Single-token (decoding) sequences attend straight from their caches' memory.
            let q_values = if layouts.iter().any(|l| l.rows.len() == 1) {
                q.flatten_all()?.to_vec1::<f32>()?
            } else {
                Vec::new()
            };
            let q_width = c.n_heads * c.head_dim;
            let mut per_sequence = Vec::with_capacity(batch.len());
            for (chunk, layout) in batch.iter().zip(&layouts) {
                let rows = layout.rows.clone();
                let t = rows.len();
                chunk.cache.write(
                    layer,
                    &k.narrow(0, rows.start, t)?,
                    &v.narrow(0, rows.start, t)?,
                )?;
                if t == 1 {
                    let q_row = &q_values[rows.start * q_width..(rows.start + 1) * q_width];
                    per_sequence.push(self.attend_one(layer, chunk.cache, layout.start_pos, q_row, block.global)?);
                    continue;
                }
                let q_seq = q.narrow(0, rows.start, t)?;
                let mask = if block.global {
                    &layout.global_mask
                } else {
                    &layout.local_mask
                };
                per_sequence.push(self.attend(layer, chunk.cache, layout, &q_seq, mask, block.global)?);
            }
            let attn = Tensor::cat(&per_sequence, 0)?;
            let attn = block.o.forward(&attn, &segments, scratch)?;
            x = (x + block.post_attn_norm.forward(&attn)?)?;

            // Feed-forward.
            let m = block.ffn_norm.forward(&x)?;
            let gate = block.gate.forward(&m, &segments, scratch)?;
            let up = block.up.forward(&m, &segments, scratch)?;
            let ffn = block
                .down
                .forward(&self.gelu.geglu(&gate, &up)?, &segments, scratch)?;
            x = (x + block.post_ffw_norm.forward(&ffn)?)?;
        }

        for (chunk, layout) in batch.iter_mut().zip(&layouts) {
            chunk.cache.advance(layout.rows.len());
        }
        self.logits(&x, batch, &layouts)
    }

    /// softmax(q·kᵀ·scale + mask)·v for one sequence, over the keys its queries may see.
    fn attend(
        &self,
        layer: usize,
        cache: &KvCache,
        layout: &SequenceLayout,
        q: &Tensor,
        mask: &Option<Tensor>,
        global: bool,
    ) -> Result<Tensor, ModelError> {
        let c = &self.config;
        let t = q.dim(0)?;
        let end = layout.start_pos + t;
        let first_key = first_visible_key(layout.start_pos, self.window(global));
        let (keys, values) = cache.window(layer, first_key, end)?;
        // One KV head serves every query head: fold heads into rows.
        debug_assert_eq!(c.n_kv_heads, 1, "grouped attention with several KV heads");
        let q = q.reshape((t * c.n_heads, c.head_dim))?;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let mut scores = (q.matmul(&keys.t()?)? * scale)?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let max = scores.max_keepdim(D::Minus1)?;
        let weights = scores.broadcast_sub(&max)?.exp()?;
        let weights = weights.broadcast_div(&weights.sum_keepdim(D::Minus1)?)?;
        Ok(weights
            .matmul(&values)?
            .reshape((t, c.n_heads * c.head_dim))?)
    }

    /// Attention of one query position (`q`: heads × head_dim) over its cached keys, computed in
    /// place: the same softmax(q·kᵀ/√d)·v as `attend`, without a tensor op per step.
    fn attend_one(
        &self,
        layer: usize,
        cache: &KvCache,
        pos: usize,
        q: &[f32],
        global: bool,
    ) -> Result<Tensor, ModelError> {
        let c = &self.config;
        let d = c.head_dim;
        debug_assert_eq!(c.n_kv_heads, 1, "grouped attention with several KV heads");
        let first = first_visible_key(pos, self.window(global));
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0f32; c.n_heads * d];
        cache.with_window_slices(layer, first, pos + 1, |keys, values| {
            let mut weights = vec![0f32; pos + 1 - first];
            for (q_head, out_head) in q.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
                for (w, key) in weights.iter_mut().zip(keys.chunks_exact(d)) {
                    *w = dot(q_head, key) * scale;
                }
                let max = weights.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for w in weights.iter_mut() {
                    *w = (*w - max).exp();
                    sum += *w;
                }
                for (&w, value) in weights.iter().zip(values.chunks_exact(d)) {
                    let p = w / sum;
                    for (o, &v) in out_head.iter_mut().zip(value) {
                        *o += p * v;
                    }
                }
            }
        })?;
        Ok(Tensor::from_vec(out, (1, c.n_heads * d), &Device::Cpu)?)
    }

    fn window(&self, global: bool) -> Option<usize> {
        (!global).then_some(self.config.sliding_window)
    }

    fn attention_mask(
        &self,
        start_pos: usize,
        tokens: usize,
        global: bool,
    ) -> Result<Option<Tensor>, ModelError> {
        if tokens == 1 {
            return Ok(None);
        }
        let window = self.window(global);
        let heads = self.config.n_heads;
        let n_keys = start_pos + tokens - first_visible_key(start_pos, window);
        let mask = attention_mask(start_pos, tokens, window)
            .chunks_exact(n_keys)
            .flat_map(|row| std::iter::repeat_n(row, heads).flatten().copied())
            .collect::<Vec<f32>>();
        Ok(Some(Tensor::from_vec(mask, (tokens * heads, n_keys), &Device::Cpu)?))
    }

    fn logits(
        &self,
        x: &Tensor,
        batch: &[SequenceChunk],
        layouts: &[SequenceLayout],
    ) -> Result<Logits, ModelError> {
        let mut wanted = Vec::new();
        let mut rows_of_sequence = Vec::with_capacity(batch.len());
        for (chunk, layout) in batch.iter().zip(layouts) {
            let start = wanted.len();
            match chunk.logits {
                LogitsFor::None => {}
                LogitsFor::Last => wanted.push((layout.rows.end - 1) as u32),
                LogitsFor::All => wanted.extend(layout.rows.start as u32..layout.rows.end as u32),
            }
            rows_of_sequence.push(start..wanted.len());
        }
        let values = if wanted.is_empty() {
            Vec::new()
        } else {
            let n = wanted.len();
            let index = Tensor::from_vec(wanted, n, &Device::Cpu)?;
            let h = self.output_norm.forward(&x.index_select(&index, 0)?)?;
            self.embedding
                .forward_quantized(&h)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?
        };
        Ok(Logits {
            values,
            vocab: self.config.vocab,
            rows_of_sequence,
        })
    }
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

/// The oldest key any query of a chunk starting at `start_pos` may see.
fn first_visible_key(start_pos: usize, window: Option<usize>) -> usize {
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
