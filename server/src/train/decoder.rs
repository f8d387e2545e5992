//! The decoder once more, differentiable: the same maths as `model::decoder`, configured by the
//! same `Config` for every family, written with candle tensor ops that carry gradients (RMSNorm,
//! RoPE, the gated activation and softmax as fused ops with their own backward passes,
//! `train::fused`), over the served model's frozen quantized weights, with trainable LoRA
//! factors beside every targeted linear layer:
//!
//!   y = x·Wᵀ + (α/r)·(x·Aᵀ)·Bᵀ        (W frozen, 8-bit; A, B f32 and trained)
//!
//! or DoRA's rescaled rows of it, or IA³'s scales (see `Trainable::linear`).
//!
//! Whole sequences only (no KV cache): every sequence of a batch starts at position 0.

use std::sync::Arc;

use candle_core::{Device, Tensor, Var};
use tessera_adapters::peft::ia3_scales_input;
use tessera_adapters::TargetModule;

use crate::model::attention::attention_mask;
use crate::model::decoder::{Block, RmsNorm};
use crate::model::rope::RotaryTables;
use crate::model::Config;
use crate::train::fused;
use crate::train::lora::AdapterParams;
use crate::train::ops::{model_error, tensor_values, FrozenLinear, FrozenWeight, OutputLogits, OutputLoss};
use crate::LoadedModel;

/// `‖W + s·B·A‖` of each output row, as a constant `[out]`.
fn adapted_row_norms(model: &LoadedModel, weight: FrozenWeight, a: &Tensor, b: &Tensor, scale: f32) -> candle_core::Result<Tensor> {
    let (a, b) = (tensor_values(a)?, tensor_values(b)?);
    let w = weight.of(model);
    let (k, n) = (w.in_features(), w.out_features());
    let rank = a.len() / k;
    let norms = w
        .row_norms_with(|o, row| {
            for (a_row, &b) in a.chunks_exact(k).zip(&b[o * rank..(o + 1) * rank]) {
                for (v, a) in row.iter_mut().zip(a_row) {
                    *v += scale * b * a;
                }
            }
        })
        .map_err(model_error)?;
    Tensor::from_vec(norms, n, &Device::Cpu)
}

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
#[derive(Clone, Copy)]
pub struct Trainable<'a> {
    pub model: &'a Arc<LoadedModel>,
    pub lora: &'a AdapterParams,
    pub logits: OutputLogits,
}

impl<'a> Trainable<'a> {
    /// The fastest arithmetic this CPU has for the output logits.
    pub fn new(model: &'a Arc<LoadedModel>, lora: &'a AdapterParams) -> Self {
        Self {
            model,
            lora,
            logits: OutputLogits::Fastest,
        }
    }

    /// The output logits in f32: a loss smooth in the adapter factors.
    pub fn exact(self) -> Self {
        Self {
            logits: OutputLogits::Exact,
            ..self
        }
    }
}

/// How many top layers keep their forward graphs through a training step (the rest are
/// checkpointed and run again in the backward pass). Both give the same gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeptGraphs {
    /// As many as fit in [`KEPT_GRAPH_BUDGET`].
    WithinBudget,
    /// Exactly this many (at most every layer).
    Layers(usize),
}

/// x / √(mean(x²) + ε) · w over the last axis.
fn rms_norm(x: &Tensor, norm: &RmsNorm) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(fused::RmsNorm {
        weight: norm.weight.clone(),
        eps: norm.eps,
    })
}

/// RoPE of `x: [rows, heads, d]` at each row's position.
fn rotate(x: &Tensor, tables: &Arc<RotaryTables>) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(fused::Rope { tables: tables.clone() })
}

/// `x: [rows, heads·d]` through the per-head norm (where the layer has one), then RoPE.
fn norm_and_rotate_heads(x: &Tensor, heads: usize, head_dim: usize, norm: Option<&RmsNorm>, rope: &Arc<RotaryTables>) -> candle_core::Result<Tensor> {
    let rows = x.dim(0)?;
    let mut h = x.reshape((rows, heads, head_dim))?;
    if let Some(norm) = norm {
        h = rms_norm(&h, norm)?;
    }
    rotate(&h, rope)?.reshape((rows, heads * head_dim))
}

/// x + post(branch), as in the serving decoder.
fn residual_add(x: &Tensor, branch: &Tensor, post: Option<&RmsNorm>) -> candle_core::Result<Tensor> {
    match post {
        Some(norm) => x + rms_norm(branch, norm)?,
        None => x + branch,
    }
}

impl Trainable<'_> {
    /// The layer with its adapter: x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ (LoRA); g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b
    /// (DoRA); l ⊙ (x·Wᵀ + b) on k and v, (l ⊙ x)·Wᵀ + b on `down` (IA³). W is frozen.
    fn linear(&self, x: &Tensor, layer: usize, module: TargetModule) -> candle_core::Result<Tensor> {
        let ia3 = self.lora.ia3_scale(layer, module).map(Var::as_tensor);
        let x = match ia3 {
            Some(l) if ia3_scales_input(module) => x.broadcast_mul(l)?,
            _ => x.clone(),
        };
        let y = self.linear_without_bias(&x, layer, module)?;
        let y = match &(FrozenWeight { layer, module }).linear(self.model).bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        };
        match ia3 {
            Some(l) if !ia3_scales_input(module) => y.broadcast_mul(l),
            _ => Ok(y),
        }
    }

    fn linear_without_bias(&self, x: &Tensor, layer: usize, module: TargetModule) -> candle_core::Result<Tensor> {
        let weight = FrozenWeight { layer, module };
        let x = x.contiguous()?;
        let Some((a, b)) = self.lora.factors(layer, module) else {
            return x.apply_op1(FrozenLinear { model: self.model.clone(), weight });
        };
        let scale = self.lora.scale();
        let y = x.apply_op3(a.as_tensor(), b.as_tensor(), fused::LoraLinear { model: self.model.clone(), weight, scale })?;
        match self.lora.magnitude(layer, module) {
            None => Ok(y),
            Some(m) => {
                // The norm is a constant of the step: its gradient is detached, as PEFT does
                // (DoRA §4.3), so only m and the low-rank term carry gradients.
                let norms = adapted_row_norms(self.model, weight, a.as_tensor(), b.as_tensor(), scale)?;
                y.broadcast_mul(&(m.as_tensor() / norms)?)
            }
        }
    }

    /// softmax(q·kᵀ/√d + mask)·v for one sequence: `q: [t, heads·d]`, `k, v: [t, kv_heads·d]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, window: Option<usize>) -> candle_core::Result<Tensor> {
        let c = self.model.model.config();
        let (t, d) = (q.dim(0)?, c.head_dim);
        let group = c.n_heads / c.n_kv_heads;
        // Query heads sharing a KV head fold into its rows: [kv_heads, group·t, d].
        let q = q.reshape((t, c.n_heads, d))?.transpose(0, 1)?.contiguous()?;
        let q = q.reshape((c.n_kv_heads, group * t, d))?;
        let k = k.reshape((t, c.n_kv_heads, d))?.transpose(0, 1)?.contiguous()?;
        let v = v.reshape((t, c.n_kv_heads, d))?.transpose(0, 1)?.contiguous()?;
        let mask = Tensor::from_vec(attention_mask(0, t, window), (t, t), &Device::Cpu)?;
        let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?
            .reshape((c.n_heads, t, t))?
            .broadcast_add(&mask)?;
        let weights = scores.contiguous()?.apply_op1(fused::Softmax)?;
        let out = weights.reshape((c.n_kv_heads, group * t, t))?.matmul(&v)?;
        out.reshape((c.n_heads, t, d))?.transpose(0, 1)?.reshape((t, c.n_heads * d))
    }

    fn block(&self, layer: usize, block: &Block, x: &Tensor, sequences: &[std::ops::Range<usize>], rope: &Arc<RotaryTables>) -> candle_core::Result<Tensor> {
        let c = self.model.model.config();
        let h = rms_norm(x, &block.attn_norm)?;
        let q = self.linear(&h, layer, TargetModule::Q)?;
        let k = self.linear(&h, layer, TargetModule::K)?;
        let v = self.linear(&h, layer, TargetModule::V)?;
        let q = norm_and_rotate_heads(&q, c.n_heads, c.head_dim, block.q_norm.as_ref(), rope)?;
        let k = norm_and_rotate_heads(&k, c.n_kv_heads, c.head_dim, block.k_norm.as_ref(), rope)?;
        let attended = sequences
            .iter()
            .map(|r| {
                let (start, t) = (r.start, r.len());
                self.attend(&q.narrow(0, start, t)?, &k.narrow(0, start, t)?, &v.narrow(0, start, t)?, c.window(layer))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let attn = self.linear(&Tensor::cat(&attended, 0)?, layer, TargetModule::O)?;
        let x = residual_add(x, &attn, block.post_attn_norm.as_ref())?;

        let m = rms_norm(&x, &block.ffn_norm)?;
        let gate = self.linear(&m, layer, TargetModule::Gate)?.contiguous()?;
        let up = self.linear(&m, layer, TargetModule::Up)?.contiguous()?;
        let gated = gate.apply_op2(&up, fused::GatedUnit { activation: c.activation })?;
        let ffn = self.linear(&gated, layer, TargetModule::Down)?;
        residual_add(&x, &ffn, block.post_ffw_norm.as_ref())
    }

    /// Embeddings, rotary tables and targets of a batch laid end to end.
    fn prepare(&self, batch: &[Example]) -> candle_core::Result<Prepared> {
        let model = &self.model.model;
        let c = model.config();
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut sequences = Vec::with_capacity(batch.len());
        let mut scored_rows = Vec::new();
        let mut targets = Vec::new();
        let mut target_sequence = Vec::new();
        for (sequence, example) in batch.iter().enumerate() {
            let start = ids.len();
            for (i, &scored) in example.scored.iter().enumerate() {
                if scored && i + 1 < example.tokens.len() {
                    scored_rows.push((start + i) as u32);
                    targets.push(example.tokens[i + 1]);
                    target_sequence.push(sequence);
                }
            }
            ids.extend_from_slice(&example.tokens);
            positions.extend(0..example.tokens.len());
            sequences.push(start..ids.len());
        }
        if targets.is_empty() {
            candle_core::bail!("the batch scores no tokens");
        }
        let n = ids.len();
        let ids = Tensor::from_vec(ids, n, &Device::Cpu)?;
        let embedded = model.embed(&ids).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let plan = model.rope_plan();
        let tables: Vec<Arc<RotaryTables>> = plan.tables(&positions).into_iter().map(Arc::new).collect();
        let rope = (0..c.n_layers).map(|layer| tables[plan.set_of(layer)].clone()).collect();
        Ok(Prepared {
            embedded,
            sequences,
            rope,
            scored_rows: Tensor::from_vec(scored_rows, targets.len(), &Device::Cpu)?,
            targets,
            target_sequence,
        })
    }

    fn layer(&self, layer: usize, x: &Tensor, p: &Prepared) -> candle_core::Result<Tensor> {
        let block = &self.model.model.blocks()[layer];
        self.block(layer, block, x, &p.sequences, &p.rope[layer])
    }

    /// The cross-entropy `[scored rows]` of each scored row of the last layer's output.
    fn row_losses(&self, top: &Tensor, p: &Prepared, gradient: bool) -> candle_core::Result<Tensor> {
        let h = rms_norm(&top.index_select(&p.scored_rows, 0)?, self.model.model.output_norm())?.contiguous()?;
        h.apply_op1(OutputLoss::new(self.model.clone(), p.targets.clone(), gradient, self.logits))
    }

    /// The summed loss of the scored rows of the last layer's output.
    fn head(&self, top: &Tensor, p: &Prepared, gradient: bool) -> candle_core::Result<Tensor> {
        self.row_losses(top, p, gradient)?.sum_all()
    }

    /// The last layer's output, without keeping any graph.
    fn forward_layers(&self, p: &Prepared) -> candle_core::Result<Tensor> {
        let mut x = p.embedded.clone();
        for layer in 0..self.model.model.blocks().len() {
            x = self.layer(layer, &x, p)?.detach();
        }
        Ok(x)
    }

    /// The summed cross-entropy of every scored next token of the batch, and how many there are.
    pub fn loss(&self, batch: &[Example]) -> candle_core::Result<(f64, usize)> {
        let p = self.prepare(batch)?;
        let top = self.forward_layers(&p)?;
        let sum = self.head(&top, &p, false)?.detach().to_scalar::<f32>()? as f64;
        Ok((sum, p.targets.len()))
    }

    /// −log π(y|x) of each sequence of the batch: the summed cross-entropy of its scored
    /// tokens, without gradients.
    pub fn sequence_losses(&self, batch: &[Example]) -> candle_core::Result<Vec<f64>> {
        let p = self.prepare(batch)?;
        let top = self.forward_layers(&p)?;
        let rows = self.row_losses(&top, &p, false)?;
        Ok(p.per_sequence(&rows, batch.len())?.to_vec1::<f32>()?.into_iter().map(f64::from).collect())
    }

    /// Gives the gradients of the summed loss to `sink` and returns the summed loss and token
    /// count.
    pub fn accumulate_gradients<S: GradientSink + ?Sized>(&self, batch: &[Example], kept: KeptGraphs, vars: &[&Var], sink: &mut S) -> candle_core::Result<(f64, usize)> {
        let (loss, p) = self.accumulate_gradients_of(batch, kept, vars, sink, |rows, _| rows.sum_all())?;
        Ok((loss, p.targets.len()))
    }

    /// Gives the gradients of `objective` to `sink` and returns its value and each sequence's
    /// −log π(y|x). The objective sees the sequences' summed cross-entropies `[batch]` (the
    /// negated log-probabilities of their scored tokens).
    pub fn accumulate_sequence_gradients<S: GradientSink + ?Sized>(
        &self,
        batch: &[Example],
        kept: KeptGraphs,
        vars: &[&Var],
        sink: &mut S,
        objective: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<(f64, Vec<f64>)> {
        let losses = std::cell::RefCell::new(Vec::new());
        let (value, _) = self.accumulate_gradients_of(batch, kept, vars, sink, |rows, p| {
            let sequences = p.per_sequence(rows, batch.len())?;
            *losses.borrow_mut() = sequences.detach().to_vec1::<f32>()?.into_iter().map(f64::from).collect();
            objective(&sequences)
        })?;
        Ok((value, losses.into_inner()))
    }

    /// Gives the gradients of `loss_of(row losses)` to `sink`, a layer's (or the top layers')
    /// as soon as the backward pass has them, and returns its value.
    ///
    /// Gradient checkpointing below the top `kept` layers: the forward pass keeps only each lower
    /// layer's input; the backward pass runs each of them again from it, from the top down, and
    /// takes its gradients through the surrogate Σ(output ⊙ ∂L/∂output), so memory holds one
    /// lower layer's activations at a time. The top layers keep their graphs from the forward
    /// pass (no second run), as many as `kept` says.
    fn accumulate_gradients_of<S: GradientSink + ?Sized>(
        &self,
        batch: &[Example],
        kept: KeptGraphs,
        vars: &[&Var],
        sink: &mut S,
        loss_of: impl FnOnce(&Tensor, &Prepared) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<(f64, Prepared)> {
        let p = self.prepare(batch)?;
        let layers = self.model.model.blocks().len();
        let kept = match kept {
            KeptGraphs::WithinBudget => kept_layers(self.model.model.config(), &p.sequences),
            KeptGraphs::Layers(n) => n,
        };
        let checkpointed = layers - kept.min(layers);
        let mut x = p.embedded.clone();
        let mut inputs = Vec::with_capacity(checkpointed);
        for layer in 0..checkpointed {
            inputs.push(x.clone());
            x = self.layer(layer, &x, &p)?.detach();
        }
        let boundary = Var::from_tensor(&x)?;
        let mut top = boundary.as_tensor().clone();
        for layer in checkpointed..layers {
            top = self.layer(layer, &top, &p)?;
        }
        let loss = loss_of(&self.row_losses(&top, &p, true)?, &p)?;
        let value = loss.to_scalar::<f32>()? as f64;
        // Before any gradient: a fused optimizer would otherwise move the adapter by NaNs.
        if !value.is_finite() {
            candle_core::bail!("the loss is {value}: training diverged");
        }
        let grads = loss.backward()?;
        let mut grad_out = grads
            .get(boundary.as_tensor())
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("the loss does not depend on the top layers' input".into()))?;
        sink.absorb(vars, &grads)?;
        // The top layers' graphs and gradients go before the lower layers run again.
        drop(grads);
        for (layer, input) in inputs.iter().enumerate().rev() {
            let input = Var::from_tensor(input)?;
            let out = self.layer(layer, input.as_tensor(), &p)?;
            let grads = (out * &grad_out)?.sum_all()?.backward()?;
            if layer > 0 {
                grad_out = grads
                    .get(input.as_tensor())
                    .cloned()
                    .ok_or_else(|| candle_core::Error::Msg(format!("layer {layer} does not depend on its input")))?;
            }
            // The gradient passed down was taken with this layer's weights as they were: only
            // now may a fused optimizer move them.
            sink.absorb(vars, &grads)?;
        }
        Ok((value, p))
    }
}

/// Memory the top layers' forward graphs may hold during a training step, beside what
/// checkpointing needs anyway. 192 MiB keeps the trainer (model included) under 1 GB at
/// b4 × 128 and saves re-running 6 of 18 layers there.
pub const KEPT_GRAPH_BUDGET: usize = 192 << 20;

/// How many top layers keep their forward graphs for `sequences`, within [`KEPT_GRAPH_BUDGET`].
///
/// A layer's graph holds about 8 hidden-wide, 2 FFN-wide and 4 query-wide f32 tensors per row
/// (inputs, norms, projections, rotations and the GeGLU's two inputs), plus 3 score-shaped
/// tensors per head of each sequence (scores, masked scores, softmax): 31 MB at b4 × 128 by
/// this count, 29–35 MiB measured by peak RSS with all 18 layers kept.
fn kept_layers(config: &Config, sequences: &[std::ops::Range<usize>]) -> usize {
    let rows: usize = sequences.iter().map(|s| s.len()).sum();
    let per_row = 8 * config.hidden + 2 * config.ffn_hidden + 4 * config.n_heads * config.head_dim;
    let scores: usize = sequences.iter().map(|s| 3 * config.n_heads * s.len() * s.len()).sum();
    let per_layer = 4 * (rows * per_row + scores);
    KEPT_GRAPH_BUDGET / per_layer.max(1)
}

/// Where the gradients of a backward pass go as each part of it (the top layers, then each
/// checkpointed layer) finishes: summed for an optimizer that steps after the batch, or applied
/// at once by one that fuses its update into the pass.
pub trait GradientSink {
    /// Takes ∂/∂vars[i] for the variables `grads` holds.
    fn absorb(&mut self, vars: &[&Var], grads: &candle_core::backprop::GradStore) -> candle_core::Result<()>;
}

/// One running sum per variable: `sums[i] += ∂/∂vars[i]`.
impl GradientSink for [Option<Tensor>] {
    fn absorb(&mut self, vars: &[&Var], grads: &candle_core::backprop::GradStore) -> candle_core::Result<()> {
        for (sum, var) in self.iter_mut().zip(vars) {
            if let Some(g) = grads.get(var.as_tensor()) {
                *sum = Some(match sum.take() {
                    Some(s) => (s + g)?,
                    None => g.clone(),
                });
            }
        }
        Ok(())
    }
}

struct Prepared {
    embedded: Tensor,
    sequences: Vec<std::ops::Range<usize>>,
    /// Each layer's rotary tables.
    rope: Vec<Arc<RotaryTables>>,
    scored_rows: Tensor,
    targets: Vec<u32>,
    /// The batch index of the sequence each target belongs to.
    target_sequence: Vec<usize>,
}

impl Prepared {
    /// Σ of `rows` (one value per target) over each of the batch's `sequences`: `[sequences]`,
    /// through a 0/1 membership matrix so that gradients flow back to the rows.
    fn per_sequence(&self, rows: &Tensor, sequences: usize) -> candle_core::Result<Tensor> {
        let n = self.targets.len();
        let mut membership = vec![0f32; sequences * n];
        for (row, &sequence) in self.target_sequence.iter().enumerate() {
            membership[sequence * n + row] = 1.0;
        }
        let membership = Tensor::from_vec(membership, (sequences, n), &Device::Cpu)?;
        membership.matmul(&rows.reshape((n, 1))?)?.reshape(sequences)
    }
}
