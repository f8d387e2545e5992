//! Gemma 3 once more, differentiable: the same maths as `model::gemma3`, written with candle
//! tensor ops that carry gradients (RMSNorm, RoPE and softmax in their plain forms, GELU-tanh),
//! over the served model's frozen quantized weights, with trainable LoRA factors beside every
//! targeted linear layer:
//!
//!   y = x·Wᵀ + (α/r)·(x·Aᵀ)·Bᵀ        (W frozen, 8-bit; A, B f32 and trained)
//!
//! Whole sequences only (no KV cache): every sequence of a batch starts at position 0.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use tessera_adapters::TargetModule;

use crate::model::gemma3::{attention_mask, Block, RmsNorm};
use crate::train::lora::LoraParams;
use crate::train::ops::{FrozenLinear, FrozenWeight, TiedOutputLoss};
use crate::LoadedModel;

/// One training sequence: its tokens, and for each position whether the next token is scored.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub tokens: Vec<u32>,
    /// `scored[i]`: the loss includes predicting `tokens[i + 1]` from the prefix up to i.
    pub scored: Vec<bool>,
}

impl Example {
    pub fn scored_tokens(&self) -> usize {
        self.scored.iter().filter(|&&s| s).count()
    }
}

/// The model's loss on a batch with the adapter factors as they are now.
pub struct Trainable<'a> {
    pub model: &'a Arc<LoadedModel>,
    pub lora: &'a LoraParams,
}

/// Summed loss and how many tokens it covers; `loss / tokens` is the mean.
pub struct BatchLoss {
    pub sum: Tensor,
    pub tokens: usize,
}

fn rms_norm(x: &Tensor, norm: &RmsNorm) -> candle_core::Result<Tensor> {
    // x / √(mean(x²) + ε) · w
    let weight = Tensor::from_slice(&norm.weight, norm.weight.len(), &Device::Cpu)?;
    let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_rms = (mean_sq + norm.eps as f64)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv_rms)?.broadcast_mul(&weight)
}

/// cos and sin of θ_i·p for positions p, θ_i = base^(−2i/d): each `[rows, 1, d/2]`.
fn rotary(positions: &[usize], base: f64, head_dim: usize) -> candle_core::Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(positions.len() * half);
    let mut sin = Vec::with_capacity(positions.len() * half);
    for &p in positions {
        for i in 0..half {
            let angle = p as f32 * base.powf(-((2 * i) as f64) / head_dim as f64) as f32;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let shape = (positions.len(), 1, half);
    Ok((Tensor::from_vec(cos, shape, &Device::Cpu)?, Tensor::from_vec(sin, shape, &Device::Cpu)?))
}

/// NeoX rotation of `x: [rows, heads, d]`: (x₁, x₂) ↦ (x₁·cos − x₂·sin, x₂·cos + x₁·sin).
fn rotate(x: &Tensor, (cos, sin): &(Tensor, Tensor)) -> candle_core::Result<Tensor> {
    let half = x.dim(2)? / 2;
    let x1 = x.narrow(2, 0, half)?;
    let x2 = x.narrow(2, half, half)?;
    let first = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let second = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[first, second], 2)
}

impl Trainable<'_> {
    fn linear(&self, x: &Tensor, layer: usize, module: TargetModule) -> candle_core::Result<Tensor> {
        let base = x.apply_op1(FrozenLinear {
            model: self.model.clone(),
            weight: FrozenWeight::Linear { layer, module },
        })?;
        match self.lora.factors(layer, module) {
            None => Ok(base),
            Some((a, b)) => {
                let delta = x.matmul(&a.as_tensor().t()?)?.matmul(&b.as_tensor().t()?)?;
                base + (delta * self.lora.scale() as f64)?
            }
        }
    }

    /// softmax(q·kᵀ/√d + mask)·v for one sequence: `q: [t, heads·d]`, `k, v: [t, kv_heads·d]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, global: bool) -> candle_core::Result<Tensor> {
        let c = self.model.model.config();
        let (t, d) = (q.dim(0)?, c.head_dim);
        let group = c.n_heads / c.n_kv_heads;
        // Query heads sharing a KV head fold into its rows: [kv_heads, group·t, d].
        let q = q.reshape((t, c.n_heads, d))?.transpose(0, 1)?.contiguous()?;
        let q = q.reshape((c.n_kv_heads, group * t, d))?;
        let k = k.reshape((t, c.n_kv_heads, d))?.transpose(0, 1)?.contiguous()?;
        let v = v.reshape((t, c.n_kv_heads, d))?.transpose(0, 1)?.contiguous()?;
        let window = (!global).then_some(c.sliding_window);
        let mask = Tensor::from_vec(attention_mask(0, t, window), (t, t), &Device::Cpu)?;
        let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?
            .reshape((c.n_heads, t, t))?
            .broadcast_add(&mask)?;
        let max = scores.max_keepdim(D::Minus1)?.detach();
        let weights = scores.broadcast_sub(&max)?.exp()?;
        let weights = weights.broadcast_div(&weights.sum_keepdim(D::Minus1)?)?;
        let out = weights.reshape((c.n_kv_heads, group * t, t))?.matmul(&v)?;
        out.reshape((c.n_heads, t, d))?.transpose(0, 1)?.reshape((t, c.n_heads * d))
    }

    fn block(
        &self,
        layer: usize,
        block: &Block,
        x: &Tensor,
        sequences: &[std::ops::Range<usize>],
        rope: &(Tensor, Tensor),
    ) -> candle_core::Result<Tensor> {
        let c = self.model.model.config();
        let rows = x.dim(0)?;
        let h = rms_norm(x, &block.attn_norm)?;
        let q = self.linear(&h, layer, TargetModule::Q)?;
        let k = self.linear(&h, layer, TargetModule::K)?;
        let v = self.linear(&h, layer, TargetModule::V)?;
        let q = rotate(&rms_norm(&q.reshape((rows, c.n_heads, c.head_dim))?, &block.q_norm)?, rope)?
            .reshape((rows, c.n_heads * c.head_dim))?;
        let k = rotate(&rms_norm(&k.reshape((rows, c.n_kv_heads, c.head_dim))?, &block.k_norm)?, rope)?
            .reshape((rows, c.n_kv_heads * c.head_dim))?;
        let attended = sequences
            .iter()
            .map(|r| {
                let (start, t) = (r.start, r.len());
                self.attend(&q.narrow(0, start, t)?, &k.narrow(0, start, t)?, &v.narrow(0, start, t)?, block.global)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let attn = self.linear(&Tensor::cat(&attended, 0)?, layer, TargetModule::O)?;
        let x = (x + rms_norm(&attn, &block.post_attn_norm)?)?;

        let m = rms_norm(&x, &block.ffn_norm)?;
        let gate = self.linear(&m, layer, TargetModule::Gate)?;
        let up = self.linear(&m, layer, TargetModule::Up)?;
        let ffn = self.linear(&(gate.gelu()? * up)?, layer, TargetModule::Down)?;
        x + rms_norm(&ffn, &block.post_ffw_norm)?
    }

    /// The summed cross-entropy of every scored next token of the batch.
    pub fn loss(&self, batch: &[Example]) -> candle_core::Result<BatchLoss> {
        let model = &self.model.model;
        let c = model.config();
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut sequences = Vec::with_capacity(batch.len());
        let mut scored_rows = Vec::new();
        let mut targets = Vec::new();
        for example in batch {
            let start = ids.len();
            for (i, &scored) in example.scored.iter().enumerate() {
                if scored && i + 1 < example.tokens.len() {
                    scored_rows.push((start + i) as u32);
                    targets.push(example.tokens[i + 1]);
                }
            }
            ids.extend_from_slice(&example.tokens);
            positions.extend(0..example.tokens.len());
            sequences.push(start..ids.len());
        }
        if targets.is_empty() {
            candle_core::bail!("the batch scores no tokens");
        }
        let rope_global = rotary(&positions, c.rope_base_global, c.head_dim)?;
        let rope_local = rotary(&positions, c.rope_base_local, c.head_dim)?;
        let n = ids.len();
        let ids = Tensor::from_vec(ids, n, &Device::Cpu)?;
        let mut x = (model
            .embedding()
            .rows(&ids)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            * (c.hidden as f64).sqrt())?;
        for (layer, block) in model.blocks().iter().enumerate() {
            let rope = if block.global { &rope_global } else { &rope_local };
            x = self.block(layer, block, &x, &sequences, rope)?;
        }
        let scored = Tensor::from_vec(scored_rows, targets.len(), &Device::Cpu)?;
        let h = rms_norm(&x.index_select(&scored, 0)?, model.output_norm())?.contiguous()?;
        let tokens = targets.len();
        let losses = h.apply_op1(TiedOutputLoss {
            model: self.model.clone(),
            targets,
        })?;
        Ok(BatchLoss {
            sum: losses.sum_all()?.to_dtype(DType::F32)?,
            tokens,
        })
    }
}
