//! The decoder every supported family runs, configured by its GGUF metadata (`model::config`),
//! batched over sequences at different positions. For each layer ℓ, with x the residual stream
//! of all rows of the batch:
//!   h     = RMSNorm_attn(x)
//!   q,k,v = h·Wqᵀ + b_q, h·Wkᵀ + b_k, h·Wvᵀ + b_v     (biases where the file has them: Qwen 2)
//!   q,k  ← RMSNorm per head where the file has q/k norms (Qwen 3, Gemma 3), then RoPE
//!   a     = softmax(q·kᵀ/√d + mask)·v                 (grouped heads, `model::attention`)
//!   x    ← x + post(a·Woᵀ)
//!   m     = RMSNorm_ffn(x)
//!   x    ← x + post((act(m·W_gateᵀ) ⊙ m·W_upᵀ)·W_downᵀ)
//! where `post` is Gemma's extra RMSNorm on each branch's output (the identity elsewhere) and
//! act is GELU-tanh for Gemma, SiLU for Llama and Qwen. The logits are RMSNorm_out(x)·Eᵀ with
//! E the untied `output.weight` when the file has one, else the token embedding. Gemma scales
//! the embeddings by √hidden; its GGUF norm weights already hold (1 + w).

use std::sync::Arc;

use candle_core::{Device, Tensor};
use tessera_adapters::peft::BaseWeights;
use tessera_adapters::{AdapterMix, LoraDelta, TargetModule};

use crate::gguf::GgufFile;
use crate::model::attention::{attend, AttentionChunk};
use crate::model::config::{Activation, Config};
use crate::model::embedding::MappedEmbedding;
use crate::model::gelu::GeluTable;
use crate::model::linear::{load_vector, Kernels, QLinear, QWeight, RowSegment};
use crate::model::quant::TileArena;
use crate::model::rope::{RopePlan, RotaryTables};
use crate::model::{each_row_on_workers, with_values};
use crate::model::{KvCache, LogitsFor, ModelError};

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

    /// The norm where the file has `name`, else `None`.
    fn load_optional(gguf: &GgufFile, name: &str, len: usize, eps: f64) -> Result<Option<Self>, ModelError> {
        gguf.has_tensor(name).then(|| Self::load(gguf, name, len, eps)).transpose()
    }

    /// x ← x / √(mean(x²) + ε) · w for one vector of the weight's length.
    fn normalize(&self, x: &mut [f32]) {
        let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        let scale = 1.0 / (mean_sq + self.eps).sqrt();
        for (v, &w) in x.iter_mut().zip(self.weight.iter()) {
            *v = *v * scale * w;
        }
    }

    /// RMSNorm over the last dimension, the rows on the workers.
    fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let mut out = with_values(x, <[f32]>::to_vec)?;
        each_row_on_workers(&mut out, self.weight.len(), |_, row| self.normalize(row));
        Ok(Tensor::from_vec(out, x.shape(), &Device::Cpu)?)
    }
}

/// `x: [rows, heads·d]`: RMSNorm of every head's d values (when the layer has one), then RoPE
/// at the row's position.
fn norm_and_rotate_heads(x: &Tensor, head_dim: usize, norm: Option<&RmsNorm>, rope: &RotaryTables) -> Result<Tensor, ModelError> {
    let mut out = with_values(x, <[f32]>::to_vec)?;
    each_row_on_workers(&mut out, x.dim(1)?, |r, row| {
        for head in row.chunks_exact_mut(head_dim) {
            if let Some(norm) = norm {
                norm.normalize(head);
            }
            rope.rotate(r, head, 1.0);
        }
    });
    Ok(Tensor::from_vec(out, x.shape(), &Device::Cpu)?)
}

pub(crate) struct Block {
    pub(crate) attn_norm: RmsNorm,
    pub(crate) q: QLinear,
    pub(crate) k: QLinear,
    pub(crate) v: QLinear,
    pub(crate) o: QLinear,
    pub(crate) q_norm: Option<RmsNorm>,
    pub(crate) k_norm: Option<RmsNorm>,
    pub(crate) post_attn_norm: Option<RmsNorm>,
    pub(crate) ffn_norm: RmsNorm,
    pub(crate) gate: QLinear,
    pub(crate) up: QLinear,
    pub(crate) down: QLinear,
    pub(crate) post_ffw_norm: Option<RmsNorm>,
}

impl Block {
    fn load(gguf: &GgufFile, c: &Config, layer: usize, kernels: Kernels, arena: &TileArena) -> Result<Self, ModelError> {
        let name = |t: &str| format!("blk.{layer}.{t}.weight");
        let norm = |t: &str, len| RmsNorm::load(gguf, &name(t), len, c.rms_eps);
        let optional_norm = |t: &str, len| RmsNorm::load_optional(gguf, &name(t), len, c.rms_eps);
        let linear = |module, shape| QLinear::load(gguf, layer, module, shape, kernels, arena);
        let q_width = c.n_heads * c.head_dim;
        let kv_width = c.kv_width();
        Ok(Self {
            attn_norm: norm("attn_norm", c.hidden)?,
            q: linear(TargetModule::Q, (q_width, c.hidden))?,
            k: linear(TargetModule::K, (kv_width, c.hidden))?,
            v: linear(TargetModule::V, (kv_width, c.hidden))?,
            o: linear(TargetModule::O, (c.hidden, q_width))?,
            q_norm: optional_norm("attn_q_norm", c.head_dim)?,
            k_norm: optional_norm("attn_k_norm", c.head_dim)?,
            post_attn_norm: optional_norm("post_attention_norm", c.hidden)?,
            ffn_norm: norm("ffn_norm", c.hidden)?,
            gate: linear(TargetModule::Gate, (c.ffn_hidden, c.hidden))?,
            up: linear(TargetModule::Up, (c.ffn_hidden, c.hidden))?,
            down: linear(TargetModule::Down, (c.hidden, c.ffn_hidden))?,
            post_ffw_norm: optional_norm("post_ffw_norm", c.hidden)?,
        })
    }
}

impl Block {
    /// The block's linear layer that `module` names.
    pub(crate) fn linear(&self, module: TargetModule) -> &QLinear {
        match module {
            TargetModule::Q => &self.q,
            TargetModule::K => &self.k,
            TargetModule::V => &self.v,
            TargetModule::O => &self.o,
            TargetModule::Gate => &self.gate,
            TargetModule::Up => &self.up,
            TargetModule::Down => &self.down,
        }
    }
}

/// DoRA measures its row norms against the weights as served, dequantized.
impl BaseWeights for Decoder {
    fn row_norms(&self, layer: usize, module: TargetModule, delta: &LoraDelta) -> Result<Vec<f32>, String> {
        let block = self.blocks.get(layer).ok_or_else(|| format!("the base has no layer {layer}"))?;
        block.linear(module).weight.adapted_row_norms(delta).map_err(|e| e.to_string())
    }
}

/// x + post(branch): Gemma normalises each branch's output before the residual add.
fn residual_add(x: &Tensor, branch: &Tensor, post: Option<&RmsNorm>) -> Result<Tensor, ModelError> {
    Ok(match post {
        Some(norm) => (x + norm.forward(branch)?)?,
        None => (x + branch)?,
    })
}

/// One sequence's share of a forward call: its new tokens, appended after what its cache holds.
pub struct SequenceChunk<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub logits: LogitsFor,
    pub adapters: &'a AdapterMix<'a>,
}

/// Logits of the rows asked for, `[rows, vocab]`, and which rows belong to which sequence;
/// for chunks that asked for [`LogitsFor::PooledHidden`], their summed final hidden states.
pub struct Logits {
    values: Vec<f32>,
    vocab: usize,
    rows_of_sequence: Vec<std::ops::Range<usize>>,
    pooled: Vec<Option<Vec<f32>>>,
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

    /// Sequence `seq`'s sum of final hidden states over its chunk, when it asked for it.
    pub fn pooled_hidden(&self, seq: usize) -> Option<&[f32]> {
        self.pooled.get(seq).and_then(Option::as_deref)
    }
}

/// Where one sequence's rows sit in the batch.
struct SequenceLayout {
    rows: std::ops::Range<usize>,
    /// Position of the chunk's first token.
    start_pos: usize,
}

/// Where a token's embedding row is read from.
enum TokenEmbedding {
    /// The output projection's rows: the table every step reads whole anyway.
    TiedToOutput,
    /// The file's own table, read in place (see [`MappedEmbedding`]).
    Mapped(MappedEmbedding),
}

pub struct Decoder {
    config: Config,
    embedding: TokenEmbedding,
    /// `output.weight`, or the embedding where the two are tied.
    output: QWeight,
    blocks: Vec<Block>,
    output_norm: RmsNorm,
    /// Which RoPE frequencies each layer rotates with.
    rope: RopePlan,
    gelu: GeluTable,
}

impl Decoder {
    /// Loads the weights the file's metadata describes; a missing or misshapen tensor is named
    /// with the architecture that needs it.
    pub fn load(gguf: &GgufFile, kernels: Kernels) -> Result<Self, ModelError> {
        let config = Config::from_gguf(gguf)?;
        let decoder = Self::load_weights(gguf, config, kernels).map_err(|e| e.for_architecture(gguf))?;
        decoder.report_portable_weights();
        Ok(decoder)
    }

    /// One line for the whole model when some of its matrices have a type no integer kernel
    /// takes: they run on candle's portable kernels, slower, with the same results.
    fn report_portable_weights(&self) {
        let mut types: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
        let linears = self.blocks.iter().flat_map(|b| [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down]).map(|l| &l.weight);
        for weight in linears.chain([&self.output]) {
            if let Some(dtype) = weight.portable_dtype() {
                *types.entry(format!("{dtype:?}")).or_default() += 1;
            }
        }
        if !types.is_empty() {
            let summary: Vec<String> = types.iter().map(|(dtype, n)| format!("{n} {dtype}")).collect();
            tracing::warn!(
                "no integer kernel for {} matrices of this model: they run on candle's portable kernels, slower, with the same results",
                summary.join(", ")
            );
        }
    }

    fn load_weights(gguf: &GgufFile, config: Config, kernels: Kernels) -> Result<Self, ModelError> {
        // The layers' matrices are small: shared huge-page slabs hold them (see `TileArena`).
        let arena = TileArena::default();
        let shape = (config.vocab, config.hidden);
        let (embedding, output) = if gguf.has_tensor("output.weight") {
            let embedding = TokenEmbedding::Mapped(MappedEmbedding::load(gguf, "token_embd.weight", shape)?);
            (embedding, QWeight::load(gguf, "output.weight", shape, kernels, &arena)?)
        } else {
            (TokenEmbedding::TiedToOutput, QWeight::load(gguf, "token_embd.weight", shape, kernels, &arena)?)
        };
        let blocks = (0..config.n_layers)
            .map(|layer| Block::load(gguf, &config, layer, kernels, &arena))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            output_norm: RmsNorm::load(gguf, "output_norm.weight", config.hidden, config.rms_eps)?,
            embedding,
            output,
            blocks,
            rope: RopePlan::new(&config),
            config,
            gelu: GeluTable::new(kernels.isa()),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The output projection `[vocab, hidden]`: its own matrix or the tied embedding.
    pub(crate) fn output(&self) -> &QWeight {
        &self.output
    }

    pub(crate) fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    pub(crate) fn output_norm(&self) -> &RmsNorm {
        &self.output_norm
    }

    pub(crate) fn rope_plan(&self) -> &RopePlan {
        &self.rope
    }

    /// The embeddings of `ids`, scaled where the family scales them: `[n, hidden]`.
    pub(crate) fn embed(&self, ids: &Tensor) -> Result<Tensor, ModelError> {
        let x = match &self.embedding {
            TokenEmbedding::TiedToOutput => self.output.rows(ids)?,
            TokenEmbedding::Mapped(table) => table.rows(ids)?,
        };
        Ok(match self.config.embedding_scale {
            Some(scale) => (x * scale)?,
            None => x,
        })
    }

    /// act(gate) ⊙ up of the feed-forward.
    fn gated(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor, ModelError> {
        Ok(match self.config.activation {
            Activation::GeluTanh => self.gelu.geglu(gate, up)?,
            Activation::Silu => (gate.silu()? * up)?,
        })
    }

    /// Checks each chunk and lays the batch out: token ids, positions, and each one's rows.
    fn layout(&self, batch: &[SequenceChunk]) -> Result<(Vec<u32>, Vec<usize>, Vec<SequenceLayout>), ModelError> {
        let vocab = self.config.vocab;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut layouts = Vec::with_capacity(batch.len());
        for chunk in batch {
            if chunk.tokens.is_empty() {
                return Err(ModelError::EmptyInput);
            }
            if let Some(&id) = chunk.tokens.iter().find(|&&id| id as usize >= vocab) {
                return Err(ModelError::TokenOutOfRange { id, vocab });
            }
            let start_pos = chunk.cache.len();
            let rows = ids.len()..ids.len() + chunk.tokens.len();
            ids.extend_from_slice(chunk.tokens);
            positions.extend(start_pos..start_pos + chunk.tokens.len());
            layouts.push(SequenceLayout { rows, start_pos });
        }
        Ok((ids, positions, layouts))
    }

    /// Runs every chunk of the batch through the model at once, appending their keys and values
    /// to their caches, and returns the logits each chunk asked for.
    pub fn forward(&self, batch: &mut [SequenceChunk]) -> Result<Logits, ModelError> {
        let (ids, positions, layouts) = self.layout(batch)?;
        for chunk in batch.iter_mut() {
            chunk.cache.reserve(chunk.tokens.len())?;
        }
        let n_rows = ids.len();
        let segments: Vec<RowSegment> = batch
            .iter()
            .zip(&layouts)
            .map(|(chunk, layout)| RowSegment {
                rows: layout.rows.clone(),
                adapters: chunk.adapters,
            })
            .collect();
        let tables = self.rope.tables(&positions);
        let mut x = self.embed(&Tensor::from_vec(ids, n_rows, &Device::Cpu)?)?;
        for layer in 0..self.blocks.len() {
            let rope = &tables[self.rope.set_of(layer)];
            x = self.layer(layer, &x, batch, &layouts, &segments, rope)?;
        }
        for (chunk, layout) in batch.iter_mut().zip(&layouts) {
            chunk.cache.advance(layout.rows.len());
        }
        self.logits(&x, batch, &layouts)
    }

    /// One transformer block over the whole batch.
    #[allow(clippy::too_many_arguments)]
    fn layer(
        &self,
        layer: usize,
        x: &Tensor,
        batch: &mut [SequenceChunk],
        layouts: &[SequenceLayout],
        segments: &[RowSegment],
        rope: &RotaryTables,
    ) -> Result<Tensor, ModelError> {
        let (c, block) = (&self.config, &self.blocks[layer]);
        let h = block.attn_norm.forward(x)?;
        let [q, k, v] = QLinear::forward_each([&block.q, &block.k, &block.v], &h, segments)?;
        let q = norm_and_rotate_heads(&q, c.head_dim, block.q_norm.as_ref(), rope)?;
        let k = norm_and_rotate_heads(&k, c.head_dim, block.k_norm.as_ref(), rope)?;
        let attn = self.attend_batch(layer, &q, &k, &v, batch, layouts)?;
        let attn = block.o.forward(&attn, segments)?;
        let x = residual_add(x, &attn, block.post_attn_norm.as_ref())?;

        let m = block.ffn_norm.forward(&x)?;
        let [gate, up] = QLinear::forward_each([&block.gate, &block.up], &m, segments)?;
        let ffn = block.down.forward(&self.gated(&gate, &up)?, segments)?;
        residual_add(&x, &ffn, block.post_ffw_norm.as_ref())
    }

    /// Writes each sequence's new keys and values to its cache and attends over it.
    fn attend_batch(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        batch: &mut [SequenceChunk],
        layouts: &[SequenceLayout],
    ) -> Result<Tensor, ModelError> {
        let c = &self.config;
        let kv_width = c.kv_width();
        let keys = k.flatten_all()?.to_vec1::<f32>()?;
        let values = v.flatten_all()?.to_vec1::<f32>()?;
        for (chunk, layout) in batch.iter_mut().zip(layouts) {
            let span = layout.rows.start * kv_width..layout.rows.end * kv_width;
            chunk.cache.write(layer, &keys[span.clone()], &values[span], kv_width)?;
        }
        let chunks: Vec<AttentionChunk> = batch
            .iter()
            .zip(layouts)
            .map(|(chunk, layout)| AttentionChunk {
                cache: &*chunk.cache,
                start_pos: layout.start_pos,
                rows: layout.rows.clone(),
            })
            .collect();
        let rows = q.dim(0)?;
        let mut out = vec![0f32; rows * c.n_heads * c.head_dim];
        with_values(q, |q| attend(c, layer, q, &chunks, &mut out))??;
        Ok(Tensor::from_vec(out, (rows, c.n_heads * c.head_dim), &Device::Cpu)?)
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
                LogitsFor::None | LogitsFor::PooledHidden => {}
                LogitsFor::Last => wanted.push((layout.rows.end - 1) as u32),
                LogitsFor::All => wanted.extend(layout.rows.start as u32..layout.rows.end as u32),
            }
            rows_of_sequence.push(start..wanted.len());
        }
        let values = if wanted.is_empty() {
            Vec::new()
        } else {
            let h = self.output_norm.forward(&self.select_rows(x, wanted)?)?;
            self.output().forward_values(&h)?
        };
        Ok(Logits {
            values,
            vocab: self.config.vocab,
            rows_of_sequence,
            pooled: self.pooled_hidden(x, batch, layouts)?,
        })
    }

    fn select_rows(&self, x: &Tensor, rows: Vec<u32>) -> Result<Tensor, ModelError> {
        let n = rows.len();
        Ok(x.index_select(&Tensor::from_vec(rows, n, &Device::Cpu)?, 0)?)
    }

    /// For each chunk that asked for it, the sum of its rows' final hidden states after the
    /// output norm; every such row is normed in one pass.
    fn pooled_hidden(&self, x: &Tensor, batch: &[SequenceChunk], layouts: &[SequenceLayout]) -> Result<Vec<Option<Vec<f32>>>, ModelError> {
        let pooled_rows: Vec<u32> = batch
            .iter()
            .zip(layouts)
            .filter(|(chunk, _)| chunk.logits == LogitsFor::PooledHidden)
            .flat_map(|(_, layout)| layout.rows.start as u32..layout.rows.end as u32)
            .collect();
        if pooled_rows.is_empty() {
            return Ok(vec![None; batch.len()]);
        }
        let hidden = self.config.hidden;
        let normed = self.output_norm.forward(&self.select_rows(x, pooled_rows)?)?;
        with_values(&normed, |values| {
            let mut rows = values.chunks_exact(hidden);
            batch
                .iter()
                .zip(layouts)
                .map(|(chunk, layout)| {
                    (chunk.logits == LogitsFor::PooledHidden).then(|| {
                        let mut sum = vec![0f32; hidden];
                        for row in rows.by_ref().take(layout.rows.len()) {
                            sum.iter_mut().zip(row).for_each(|(s, v)| *s += v);
                        }
                        sum
                    })
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use candle_core::quantized::{GgmlDType, QTensor};
    use tessera_adapters::AdapterMix;

    use super::*;
    use crate::generate::{generate, GenerateParams};
    use crate::model::synthetic::{tiny_gemma3, FFN, HIDDEN, LAYERS};
    use crate::sampler::SamplingParams;

    /// Log output written by a test's subscriber.
    #[derive(Clone, Default)]
    struct CapturedLog(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for CapturedLog {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The pooled rows of a prompt fed in two chunks (the second attending to the first through
    /// the cache) add up to those of the prompt fed at once.
    #[test]
    fn pooled_hidden_states_add_up_over_chunks() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("tiny.gguf");
        tiny_gemma3(3).write(&path)?;
        let decoder = Decoder::load(&GgufFile::open(&path)?, Kernels::Best)?;
        let ids: Vec<u32> = (0..24).map(|i| 100 + i).collect();
        let none = AdapterMix::default();
        let pooled = |chunks: &[&[u32]]| -> Result<Vec<f32>, ModelError> {
            let mut cache = KvCache::new(decoder.config(), ids.len())?;
            let mut sum = vec![0f32; HIDDEN];
            for tokens in chunks {
                let logits = decoder.forward(&mut [SequenceChunk { tokens, cache: &mut cache, logits: LogitsFor::PooledHidden, adapters: &none }])?;
                assert_eq!(logits.rows(0), 0, "pooling asked for no logits");
                let part = logits.pooled_hidden(0).ok_or(ModelError::EmptyInput)?;
                sum.iter_mut().zip(part).for_each(|(s, v)| *s += v);
            }
            Ok(sum)
        };
        let whole = pooled(&[&ids])?;
        let split = pooled(&[&ids[..10], &ids[10..]])?;
        let largest = whole.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(largest > 0.0);
        for (a, b) in whole.iter().zip(&split) {
            assert!((a - b).abs() <= 1e-4 * largest, "{a} vs {b}");
        }
        Ok(())
    }

    /// A model whose gate and up matrices are Q4_0, a type no integer kernel takes, loads with one
    /// warning that counts them, and generates.
    #[test]
    fn a_model_with_a_type_no_integer_kernel_takes_says_so_in_one_line_and_generates() -> Result<(), Box<dyn std::error::Error>> {
        let mut writer = tiny_gemma3(1);
        let values: Vec<f32> = (0..FFN * HIDDEN).map(|i| ((i * 7 % 23) as f32 - 11.0) / 200.0).collect();
        let q4_0 = QTensor::quantize(&Tensor::from_vec(values, (FFN, HIDDEN), &Device::Cpu)?, GgmlDType::Q4_0)?;
        for layer in 0..LAYERS {
            for matrix in ["ffn_gate", "ffn_up"] {
                writer.tensor(&format!("blk.{layer}.{matrix}.weight"), GgmlDType::Q4_0, &[FFN, HIDDEN], q4_0.data()?.into_owned());
            }
        }
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("q4_0-ffn.gguf");
        writer.write(&path)?;
        let gguf = GgufFile::open(&path)?;

        let log = CapturedLog::default();
        let sink = log.clone();
        let subscriber = tracing_subscriber::fmt().with_writer(move || sink.clone()).with_ansi(false).with_max_level(tracing::Level::INFO).finish();
        let decoder = tracing::subscriber::with_default(subscriber, || Decoder::load(&gguf, Kernels::Best))?;
        let text = String::from_utf8(log.0.lock().map_err(|_| "the log's lock is poisoned")?.clone())?;
        let lines: Vec<&str> = text.lines().filter(|line| line.contains("no integer kernel")).collect();
        assert_eq!(lines.len(), 1, "{text}");
        assert!(lines[0].contains("WARN") && lines[0].contains(&format!("no integer kernel for {} Q4_0 matrices", 2 * LAYERS)), "{}", lines[0]);

        let params = GenerateParams { max_tokens: 6, sampling: SamplingParams::default(), top_logprobs: 0, stop_ids: Vec::new() };
        let generation = generate(&decoder, &[2, 270, 271, 272], &params, &AdapterMix::default(), |_| {})?;
        assert_eq!(generation.token_ids.len(), 6);
        Ok(())
    }
}
