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
pub struct TiedOutputLoss {
    pub model: Arc<LoadedModel>,
    pub targets: Vec<u32>,
}

impl TiedOutputLoss {
    /// Calls `f(vocab range, logits [rows, range])` for each chunk of the vocabulary.
    fn for_each_chunk(
        &self,
        h: &[f32],
        mut f: impl FnMut(std::ops::Range<usize>, &[f32]) -> candle_core::Result<()>,
    ) -> candle_core::Result<()> {
        let embedding = self.model.model.embedding();
        let vocab = embedding.out_features();
        for start in (0..vocab).step_by(VOCAB_CHUNK) {
            let range = start..(start + VOCAB_CHUNK).min(vocab);
            let logits = embedding
                .matmul_rows_background(h, range.clone())
                .map_err(model_error)?;
            f(range, &logits)?;
        }
        Ok(())
    }

    /// logsumexp of each row's logits and the logit of its target.
    fn log_normalizers(&self, h: &[f32], rows: usize) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        let mut max = vec![f32::NEG_INFINITY; rows];
        let mut sum = vec![0f32; rows];
        let mut target_logit = vec![0f32; rows];
        self.for_each_chunk(h, |range, logits| {
            let width = range.len();
            for (i, row) in logits.chunks_exact(width).enumerate() {
                let chunk_max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                if chunk_max > max[i] {
                    sum[i] *= (max[i] - chunk_max).exp();
                    max[i] = chunk_max;
                }
                sum[i] += row.iter().map(|&l| (l - max[i]).exp()).sum::<f32>();
                let target = self.targets[i] as usize;
                if range.contains(&target) {
                    target_logit[i] = row[target - range.start];
                }
            }
            Ok(())
        })?;
        let lse = max.iter().zip(&sum).map(|(m, s)| m + s.ln()).collect();
        Ok((lse, target_logit))
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
        let (lse, target_logit) = self.log_normalizers(h, rows)?;
        let loss = lse.iter().zip(&target_logit).map(|(l, t)| l - t).collect();
        Ok((CpuStorage::F32(loss), Shape::from(rows)))
    }

    fn bwd(&self, h: &Tensor, _loss: &Tensor, grad_loss: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let embedding = self.model.model.embedding();
        let (rows, hidden) = h.dims2()?;
        let h = h.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let grad_loss = grad_loss.to_vec1::<f32>()?;
        let (lse, _) = self.log_normalizers(&h, rows)?;
        let mut grad_h = vec![0f32; rows * hidden];
        self.for_each_chunk(&h, |range, logits| {
            let width = range.len();
            let mut grad_logits = logits.to_vec();
            for (i, row) in grad_logits.chunks_exact_mut(width).enumerate() {
                for v in row.iter_mut() {
                    *v = (*v - lse[i]).exp() * grad_loss[i];
                }
                let target = self.targets[i] as usize;
                if range.contains(&target) {
                    row[target - range.start] -= grad_loss[i];
                }
            }
            embedding
                .accumulate_input_grad(&grad_logits, range, &mut grad_h)
                .map_err(model_error)
        })?;
        Ok(Some(Tensor::from_vec(grad_h, (rows, hidden), &Device::Cpu)?))
    }
}
