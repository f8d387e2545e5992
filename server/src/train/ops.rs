//! The two places where training meets the frozen quantized weights, as candle custom ops with
//! their own backward passes (candle's `QMatMul` has none):
//!
//! - `FrozenLinear`: y = x·Wᵀ, so ∂L/∂x = ∂L/∂y · W, through W dequantized chunk by chunk. W
//!   itself gets no gradient: QLoRA trains only the adapter factors beside it.
//! - `OutputLoss`: the cross-entropy of the output projection E (tied to the embedding or the
//!   file's own `output.weight`), ℓᵢ = logsumexp(hᵢ·Eᵀ) − hᵢ·e_{yᵢ}, computed over the
//!   vocabulary (262k tokens for Gemma) in chunks so that the full logits are never held: ∂ℓᵢ/∂hᵢ = Σ_v (softmax(hᵢ·Eᵀ)_v − [v = yᵢ])·e_v.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};
use rayon::prelude::*;
use tessera_adapters::TargetModule;

use crate::model::quant::{QuantWeight, QuantizedRows};
use crate::model::linear::{sgemm_on_this_thread, QLinear, QWeight, Strided};
use crate::LoadedModel;

/// Which frozen linear layer of the served model an op reads.
#[derive(Debug, Clone, Copy)]
pub struct FrozenWeight {
    pub layer: usize,
    pub module: TargetModule,
}

impl FrozenWeight {
    pub fn linear(self, model: &LoadedModel) -> &QLinear {
        let block = &model.model.blocks()[self.layer];
        match self.module {
            TargetModule::Q => &block.q,
            TargetModule::K => &block.k,
            TargetModule::V => &block.v,
            TargetModule::O => &block.o,
            TargetModule::Gate => &block.gate,
            TargetModule::Up => &block.up,
            TargetModule::Down => &block.down,
        }
    }

    pub fn of(self, model: &LoadedModel) -> &QWeight {
        &self.linear(model).weight
    }
}

pub(crate) fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(values), Some((start, end))) => Ok(&values[start..end]),
        _ => candle_core::bail!("{op} takes a contiguous f32 tensor"),
    }
}

pub(crate) fn model_error(e: crate::ModelError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// A tensor's values, row-major.
pub(crate) fn tensor_values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_vec1::<f32>()
}

/// `y = x·Wᵀ` for a frozen quantized `W: [out, in]`, `x: [rows, in]`.
pub struct FrozenLinear {
    pub model: Arc<LoadedModel>,
    pub weight: FrozenWeight,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let weight = self.weight.of(&self.model);
        let x = contiguous_f32(storage, layout, self.name())?;
        let rows = layout.shape().dims()[0];
        let y = weight
            .matmul_rows_background(x, 0..weight.out_features())
            .map_err(model_error)?;
        Ok((CpuStorage::F32(y), Shape::from((rows, weight.out_features()))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let weight = self.weight.of(&self.model);
        let rows = grad_y.dim(0)?;
        let grad_y = tensor_values(grad_y)?;
        let mut grad_x = vec![0f32; rows * weight.in_features()];
        weight
            .accumulate_input_grad(&grad_y, 0..weight.out_features(), &mut grad_x)
            .map_err(model_error)?;
        Ok(Some(Tensor::from_vec(grad_x, (rows, weight.in_features()), &Device::Cpu)?))
    }
}

/// One row's online softmax over the vocabulary chunks seen so far.
#[derive(Debug, Clone, Copy)]
struct RowSoftmax {
    max: f32,
    /// Σ exp(l − max).
    sum: f32,
    target_logit: f32,
}

impl Default for RowSoftmax {
    fn default() -> Self {
        Self {
            max: f32::NEG_INFINITY,
            sum: 0.0,
            target_logit: 0.0,
        }
    }
}

impl RowSoftmax {
    /// Takes in one chunk of logits (columns `range`), overwriting them with exp(l − max).
    /// Returns the factor that earlier sums (and gradient accumulators) must be rescaled by.
    fn absorb(&mut self, row: &mut [f32], range: std::ops::Range<usize>, target: usize) -> f32 {
        if range.contains(&target) {
            self.target_logit = row[target - range.start];
        }
        let chunk_max = lanewise(row, f32::NEG_INFINITY, f32::max).into_iter().fold(f32::NEG_INFINITY, f32::max);
        let mut rescale = 1.0;
        if chunk_max > self.max {
            rescale = exp_nonpositive(self.max - chunk_max);
            self.sum *= rescale;
            self.max = chunk_max;
        }
        let max = self.max;
        row.iter_mut().for_each(|l| *l = exp_nonpositive(*l - max));
        self.sum += lanewise(row, 0.0, |a, b| a + b).into_iter().sum::<f32>();
        rescale
    }
}

/// Folds `values` into 8 lanes (value i into lane i mod 8), a shape the compiler vectorises;
/// the tail past a multiple of 8 goes to the first lanes.
#[inline(always)]
fn lanewise(values: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> [f32; 8] {
    let mut lanes = [init; 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = f(*lane, v);
        }
    }
    for (lane, &v) in lanes.iter_mut().zip(tail) {
        *lane = f(*lane, v);
    }
    lanes
}

/// eˣ for x ≤ 0, vectorisable (no libm call): x = n·ln 2 + r with |r| ≤ ln 2 / 2, eʳ by its
/// degree-6 Taylor polynomial (relative error < 2e-7 there), times 2ⁿ built in the exponent
/// bits. Below −87 the result is 0 (it would be subnormal).
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    if x < -87.0 {
        return 0.0;
    }
    let n = (x * std::f32::consts::LOG2_E).round();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Vocabulary rows per chunk: the chunk's dequantized embedding rows and `[rows, VOCAB_CHUNK]`
/// logits stay in cache between the logits GEMM and the gradient GEMM.
const VOCAB_CHUNK: usize = 1024;

/// How the output loss computes its 262k logits per row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputLogits {
    /// In integer arithmetic where the embedding's type has those kernels (each row's h rounded
    /// to 8 bits per 32, as llama.cpp computes the output layer), in f32 elsewhere. The gradient is the
    /// f32 one at the softmax of these logits.
    #[default]
    Fastest,
    /// In f32 against the dequantized embedding: the loss is a smooth function of h, as a
    /// finite-difference check needs.
    Exact,
}

/// The logits GEMM of one vocabulary chunk.
#[derive(Clone, Copy)]
enum LogitsKernel<'a> {
    F32,
    Integer { weight: &'a QuantWeight, h: &'a QuantizedRows },
}

/// What one thread gathers over its share of the vocabulary: each row's online softmax and, with
/// the gradient, Σ_v exp(l_v − max)·e_v over that share.
struct VocabShare {
    rows: Vec<RowSoftmax>,
    accumulated: Vec<f32>,
}

impl VocabShare {
    /// Streams the embedding rows `vocab` chunk by chunk on this thread.
    fn gather(
        embedding: &QWeight,
        h: &[f32],
        kernel: LogitsKernel,
        targets: &[u32],
        vocab: std::ops::Range<usize>,
        gradient: bool,
    ) -> candle_core::Result<Self> {
        let (rows, hidden) = (targets.len(), embedding.in_features());
        let mut share = Self {
            rows: vec![RowSoftmax::default(); rows],
            accumulated: if gradient { vec![0f32; rows * hidden] } else { Vec::new() },
        };
        let integer = match kernel {
            LogitsKernel::Integer { weight, h } => Some((weight, h)),
            LogitsKernel::F32 => None,
        };
        let dequantized = gradient || integer.is_none();
        let mut weight = vec![0f32; if dequantized { VOCAB_CHUNK * hidden } else { 0 }];
        let mut logits = vec![0f32; rows * VOCAB_CHUNK];
        for start in vocab.clone().step_by(VOCAB_CHUNK) {
            let range = start..(start + VOCAB_CHUNK).min(vocab.end);
            let width = range.len();
            let logits = &mut logits[..rows * width];
            let weight = &mut weight[..if dequantized { width * hidden } else { 0 }];
            if dequantized {
                embedding.dequantize_rows_into(range.clone(), weight).map_err(model_error)?;
            }
            match integer {
                Some((weight, h)) => weight.matmul_rows_on_this_thread(h, range.clone(), logits),
                // SAFETY: h is [rows, hidden], the chunk [width, hidden] read as its transpose,
                // logits [rows, width].
                None => unsafe {
                    sgemm_on_this_thread((rows, width, hidden), logits, false, Strided::rows(h, hidden), Strided::transposed(weight, hidden))
                },
            }
            for (i, row) in logits.chunks_exact_mut(width).enumerate() {
                let rescale = share.rows[i].absorb(row, range.clone(), targets[i] as usize);
                if gradient && rescale != 1.0 {
                    share.accumulated[i * hidden..(i + 1) * hidden].iter_mut().for_each(|a| *a *= rescale);
                }
            }
            if gradient {
                // SAFETY: exp(l − max) is [rows, width], the chunk [width, hidden], the sums
                // [rows, hidden].
                unsafe {
                    sgemm_on_this_thread(
                        (rows, hidden, width),
                        &mut share.accumulated,
                        true,
                        Strided::rows(logits, width),
                        Strided::rows(weight, hidden),
                    )
                };
            }
        }
        Ok(share)
    }

    /// Joins the shares of one row set: each share's sums are rescaled to the common maximum.
    fn join(shares: Vec<VocabShare>, hidden: usize) -> VocabShare {
        let mut shares = shares.into_iter();
        let Some(mut joined) = shares.next() else {
            return VocabShare { rows: Vec::new(), accumulated: Vec::new() };
        };
        for share in shares {
            for (i, (into, from)) in joined.rows.iter_mut().zip(&share.rows).enumerate() {
                let max = into.max.max(from.max);
                // A share that saw no logits (max −∞) weighs nothing.
                let weight = |m: f32| if m == f32::NEG_INFINITY { 0.0 } else { exp_nonpositive(m - max) };
                let (keep, take) = (weight(into.max), weight(from.max));
                into.sum = into.sum * keep + from.sum * take;
                into.max = max;
                // Only the share holding the target saw its logit; the others hold 0.
                into.target_logit += from.target_logit;
                if !joined.accumulated.is_empty() {
                    let (into_acc, from_acc) = (&mut joined.accumulated[i * hidden..(i + 1) * hidden], &share.accumulated[i * hidden..(i + 1) * hidden]);
                    for (a, &b) in into_acc.iter_mut().zip(from_acc) {
                        *a = *a * keep + b * take;
                    }
                }
            }
        }
        joined
    }
}

/// Per-row cross-entropy `[rows]` of the output projection for `h: [rows, hidden]` (already
/// through the final norm) against `targets`.
///
/// With `gradient`, the same single pass over the vocabulary also accumulates ∂ℓᵢ/∂hᵢ, the
/// online-softmax way: Σ_v exp(l_v − mᵢ)·e_v with the running maximum mᵢ, rescaled whenever mᵢ
/// grows, divided by the final Σ_v exp(l_v − mᵢ) at the end. Each row's loss depends on its own
/// h only, so the backward pass just scales those rows by the incoming gradient.
pub struct OutputLoss {
    pub model: Arc<LoadedModel>,
    pub targets: Vec<u32>,
    pub gradient: bool,
    pub logits: OutputLogits,
    grad_h: std::sync::Mutex<Option<Vec<f32>>>,
}

impl OutputLoss {
    pub fn new(model: Arc<LoadedModel>, targets: Vec<u32>, gradient: bool, logits: OutputLogits) -> Self {
        Self {
            model,
            targets,
            gradient,
            logits,
            grad_h: std::sync::Mutex::new(None),
        }
    }
}

impl CustomOp1 for OutputLoss {
    fn name(&self) -> &'static str {
        "output-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = contiguous_f32(storage, layout, self.name())?;
        let rows = layout.shape().dims()[0];
        if rows != self.targets.len() {
            candle_core::bail!("{rows} rows for {} targets", self.targets.len());
        }
        let embedding = self.model.model.output();
        let (vocab, hidden) = (embedding.out_features(), embedding.in_features());
        // One contiguous share of the vocabulary per thread, each streamed on its own thread:
        // no synchronisation inside the loop, and every share's softmax state joins at the end.
        let threads = rayon::current_num_threads().max(1);
        let per_thread = vocab.div_ceil(threads).div_ceil(VOCAB_CHUNK) * VOCAB_CHUNK;
        let integer = match self.logits {
            OutputLogits::Fastest => embedding.integer().map(|weight| (weight, QuantizedRows::quantize(h, hidden, weight.activation_format()))),
            OutputLogits::Exact => None,
        };
        let kernel = match &integer {
            Some((weight, h)) => LogitsKernel::Integer { weight, h },
            None => LogitsKernel::F32,
        };
        let shares = (0..threads)
            .into_par_iter()
            .map(|t| {
                let share = (t * per_thread).min(vocab)..((t + 1) * per_thread).min(vocab);
                VocabShare::gather(embedding, h, kernel, &self.targets, share, self.gradient)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let VocabShare { rows: rows_state, mut accumulated } = VocabShare::join(shares, hidden);
        // Integer logits quantize a NaN activation to 0: a row that is not finite must say so
        // in its loss, or a diverged adapter would train on as if nothing were wrong.
        let loss = rows_state
            .iter()
            .zip(h.chunks_exact(hidden))
            .map(|(s, row)| if row.iter().all(|v| v.is_finite()) { s.max + s.sum.ln() - s.target_logit } else { f32::NAN })
            .collect();
        if self.gradient {
            // ∂ℓᵢ/∂hᵢ = softmax·E − e_target.
            let ids = Tensor::from_slice(&self.targets, rows, &Device::Cpu)?;
            let target_rows = embedding.rows(&ids).map_err(model_error)?.flatten_all()?.to_vec1::<f32>()?;
            for ((grad, target), state) in accumulated.chunks_exact_mut(hidden).zip(target_rows.chunks_exact(hidden)).zip(&rows_state) {
                for (g, &e) in grad.iter_mut().zip(target) {
                    *g = *g / state.sum - e;
                }
            }
            *self.grad_h.lock().unwrap_or_else(|p| p.into_inner()) = Some(accumulated);
        }
        Ok((CpuStorage::F32(loss), Shape::from(rows)))
    }

    fn bwd(&self, h: &Tensor, _loss: &Tensor, grad_loss: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let Some(grad_h) = self.grad_h.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            candle_core::bail!("the output loss was computed without its gradient");
        };
        let grad_h = Tensor::from_vec(grad_h, h.dims(), &Device::Cpu)?;
        Ok(Some(grad_h.broadcast_mul(&grad_loss.unsqueeze(1)?)?))
    }
}

#[cfg(test)]
mod tests {
    use super::{exp_nonpositive, RowSoftmax, VocabShare};

    /// One row's share of a vocabulary `range` as `gather` builds it, chunk by chunk, with a
    /// one-dimensional "embedding" e_v = embed(v).
    fn share(logits: &[f32], range: std::ops::Range<usize>, chunk: usize, target: usize, embed: impl Fn(usize) -> f32) -> VocabShare {
        let mut row = RowSoftmax::default();
        let mut accumulated = 0f32;
        for start in range.clone().step_by(chunk) {
            let part = start..(start + chunk).min(range.end);
            let mut values = logits[part.clone()].to_vec();
            accumulated *= row.absorb(&mut values, part.clone(), target);
            accumulated += values.iter().zip(part).map(|(p, v)| p * embed(v)).sum::<f32>();
        }
        VocabShare { rows: vec![row], accumulated: vec![accumulated] }
    }

    #[test]
    fn vocabulary_shares_join_into_the_whole_softmax() {
        let vocab = 3000;
        // Rising then falling logits, so the running maximum moves within and across shares.
        let logits: Vec<f32> = (0..vocab).map(|v| (v as f32 / 300.0).sin() * 12.0 + (v % 7) as f32 * 0.1).collect();
        let embed = |v: usize| (v % 13) as f32 - 6.0;
        let target = 2100;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
        let expected_loss = max + sum.ln() - logits[target] as f64;
        let expected_mean: f64 = logits.iter().enumerate().map(|(v, &l)| (l as f64 - max).exp() / sum * embed(v) as f64).sum();
        let shares = vec![
            share(&logits, 0..1024, 256, target, embed),
            share(&logits, 1024..vocab, 256, target, embed),
            share(&logits, vocab..vocab, 256, target, embed),
        ];
        let joined = VocabShare::join(shares, 1);
        let row = joined.rows[0];
        let loss = row.max as f64 + (row.sum as f64).ln() - row.target_logit as f64;
        assert!((loss - expected_loss).abs() < 1e-4, "{loss} vs {expected_loss}");
        let mean = joined.accumulated[0] as f64 / row.sum as f64;
        assert!((mean - expected_mean).abs() < 1e-4, "{mean} vs {expected_mean}");
    }

    #[test]
    fn the_fast_exponential_matches_libm() {
        for i in 0..=100_000 {
            let x = -(i as f32) * 1e-3;
            let (fast, exact) = (exp_nonpositive(x), x.exp());
            assert!((fast - exact).abs() <= 4e-7 * exact + 2e-38, "{x}: {fast} vs {exact}");
        }
        assert_eq!(exp_nonpositive(-100.0), 0.0);
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }
}
