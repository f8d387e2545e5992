//! The two places where training meets the frozen quantized weights, as candle custom ops with
//! their own backward passes (candle's `QMatMul` has none):
//!
//! - `FrozenLinear`: y = x·Wᵀ, so ∂L/∂x = ∂L/∂y · W, through W dequantized chunk by chunk. W
//!   itself gets no gradient: QLoRA trains only the adapter factors beside it.
//! - `TiedOutputLoss`: the cross-entropy of the tied output projection, ℓᵢ = logsumexp(hᵢ·Eᵀ) −
//!   hᵢ·e_{yᵢ}, computed over the 262k-token vocabulary in chunks so that the full logits are
//!   never held: ∂ℓᵢ/∂hᵢ = Σ_v (softmax(hᵢ·Eᵀ)_v − [v = yᵢ])·e_v.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};
use tessera_adapters::TargetModule;

use crate::model::linear::QWeight;
use crate::LoadedModel;

/// Which frozen weight of the served model an op reads.
#[derive(Debug, Clone, Copy)]
pub enum FrozenWeight {
    Linear { layer: usize, module: TargetModule },
    Embedding,
}

impl FrozenWeight {
    pub fn of(self, model: &LoadedModel) -> &QWeight {
        match self {
            FrozenWeight::Embedding => model.model.embedding(),
            FrozenWeight::Linear { layer, module } => {
                let block = &model.model.blocks()[layer];
                let linear = match module {
                    TargetModule::Q => &block.q,
                    TargetModule::K => &block.k,
                    TargetModule::V => &block.v,
                    TargetModule::O => &block.o,
                    TargetModule::Gate => &block.gate,
                    TargetModule::Up => &block.up,
                    TargetModule::Down => &block.down,
                };
                &linear.weight
            }
        }
    }
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(values), Some((start, end))) => Ok(&values[start..end]),
        _ => candle_core::bail!("{op} takes a contiguous f32 tensor"),
    }
}

fn model_error(e: crate::ModelError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
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
        let grad_y = grad_y.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut grad_x = vec![0f32; rows * weight.in_features()];
        weight
            .accumulate_input_grad(&grad_y, 0..weight.out_features(), &mut grad_x)
            .map_err(model_error)?;
        Ok(Some(Tensor::from_vec(grad_x, (rows, weight.in_features()), &Device::Cpu)?))
    }
}

/// Vocabulary rows per chunk of logits: `[rows, VOCAB_CHUNK]` is all that exists at once.
const VOCAB_CHUNK: usize = 16384;

/// Per-row cross-entropy `[rows]` of the tied output projection for `h: [rows, hidden]` (already
/// through the final norm) against `targets`.
///
/// With `gradient`, the same single pass over the vocabulary also accumulates ∂ℓᵢ/∂hᵢ, the
/// online-softmax way: Σ_v exp(l_v − mᵢ)·e_v with the running maximum mᵢ, rescaled whenever mᵢ
/// grows, divided by the final Σ_v exp(l_v − mᵢ) at the end. Each row's loss depends on its own
/// h only, so the backward pass just scales those rows by the incoming gradient.
pub struct TiedOutputLoss {
    pub model: Arc<LoadedModel>,
    pub targets: Vec<u32>,
    pub gradient: bool,
    grad_h: std::sync::Mutex<Option<Vec<f32>>>,
}

impl TiedOutputLoss {
    pub fn new(model: Arc<LoadedModel>, targets: Vec<u32>, gradient: bool) -> Self {
        Self {
            model,
            targets,
            gradient,
            grad_h: std::sync::Mutex::new(None),
        }
    }
}

impl CustomOp1 for TiedOutputLoss {
    fn name(&self) -> &'static str {
        "tied-output-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = contiguous_f32(storage, layout, self.name())?;
        let rows = layout.shape().dims()[0];
        if rows != self.targets.len() {
            candle_core::bail!("{rows} rows for {} targets", self.targets.len());
        }
        let embedding = self.model.model.embedding();
        let (vocab, hidden) = (embedding.out_features(), embedding.in_features());
        let mut max = vec![f32::NEG_INFINITY; rows];
        let mut sum = vec![0f32; rows];
        let mut target_logit = vec![0f32; rows];
        let mut accumulated = if self.gradient { vec![0f32; rows * hidden] } else { Vec::new() };
        for start in (0..vocab).step_by(VOCAB_CHUNK) {
            let range = start..(start + VOCAB_CHUNK).min(vocab);
            let width = range.len();
            let mut logits = embedding.matmul_rows_background(h, range.clone()).map_err(model_error)?;
            for (i, row) in logits.chunks_exact_mut(width).enumerate() {
                let target = self.targets[i] as usize;
                if range.contains(&target) {
                    target_logit[i] = row[target - range.start];
                }
                let chunk_max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                if chunk_max > max[i] {
                    let rescale = (max[i] - chunk_max).exp();
                    sum[i] *= rescale;
                    if self.gradient {
                        accumulated[i * hidden..(i + 1) * hidden].iter_mut().for_each(|a| *a *= rescale);
                    }
                    max[i] = chunk_max;
                }
                for l in row.iter_mut() {
                    *l = (*l - max[i]).exp();
                }
                sum[i] += row.iter().sum::<f32>();
            }
            if self.gradient {
                embedding
                    .accumulate_input_grad(&logits, range, &mut accumulated)
                    .map_err(model_error)?;
            }
        }
        let loss = (0..rows).map(|i| max[i] + sum[i].ln() - target_logit[i]).collect();
        if self.gradient {
            // ∂ℓᵢ/∂hᵢ = softmax·E − e_target.
            let ids = Tensor::from_slice(&self.targets, rows, &Device::Cpu)?;
            let target_rows = embedding.rows(&ids).map_err(model_error)?.flatten_all()?.to_vec1::<f32>()?;
            for (i, (grad, target)) in accumulated.chunks_exact_mut(hidden).zip(target_rows.chunks_exact(hidden)).enumerate() {
                for (g, &e) in grad.iter_mut().zip(target) {
                    *g = *g / sum[i] - e;
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
