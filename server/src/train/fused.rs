//! The per-layer elementwise maths of the decoder as single ops with hand-written backward passes,
//! instead of chains of generic tensor ops (each of which allocates, and keeps, a tensor):
//!
//! - RMSNorm: y = x·r·w, r = 1/√(mean(x²) + ε);  ∂x_j = r·w_j·g_j − x_j·r³·Σ_i(g_i·w_i·x_i)/d
//! - RoPE (either pairing): (x₁, x₂) ↦ (x₁c − x₂s, x₂c + x₁s);  the backward rotates by −θ
//! - GeGLU / SwiGLU: y = act(a)·u (GELU-tanh or SiLU);  ∂a = g·u·act′(a), ∂u = g·act(a)
//! - softmax over the last axis: ∂x = y ⊙ (g − Σ g⊙y)
//! - a frozen linear layer with its LoRA factors: y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ;
//!   ∂B = s·gᵀ·(x·Aᵀ), ∂A = s·(g·B)ᵀ·x, ∂x = g·W + s·(g·B)·A
//!
//! The training gradient check (tests/training.rs) covers every one of them.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::model::config::Activation;
use crate::model::linear::{sgemm, Strided};
use crate::model::rope::RotaryTables;
use crate::train::ops::{contiguous_f32, exp_nonpositive, model_error, tensor_values, FrozenWeight};
use crate::LoadedModel;

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 16;

pub struct RmsNorm {
    pub weight: Arc<Vec<f32>>,
    pub eps: f32,
}

fn inverse_rms(row: &[f32], eps: f32) -> f32 {
    1.0 / (row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32 + eps).sqrt()
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let d = self.weight.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d * ROWS_PER_TASK).zip(x.par_chunks(d * ROWS_PER_TASK)).for_each(|(y, x)| {
            for (y, x) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                let r = inverse_rms(x, self.eps);
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(self.weight.iter()) {
                    *y = x * r * w;
                }
            }
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (xs, gs) = (tensor_values(x)?, tensor_values(g)?);
        let d = self.weight.len();
        let mut dx = vec![0f32; xs.len()];
        dx.par_chunks_mut(d * ROWS_PER_TASK)
            .zip(xs.par_chunks(d * ROWS_PER_TASK).zip(gs.par_chunks(d * ROWS_PER_TASK)))
            .for_each(|(dx, (x, g))| {
                for ((dx, x), g) in dx.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(g.chunks_exact(d)) {
                    let r = inverse_rms(x, self.eps);
                    let s: f32 = g.iter().zip(self.weight.iter()).zip(x).map(|((g, w), x)| g * w * x).sum();
                    let k = r * r * r * s / d as f32;
                    for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(self.weight.iter()) {
                        *dx = r * w * g - x * k;
                    }
                }
            });
        Ok(Some(Tensor::from_vec(dx, x.shape(), &Device::Cpu)?))
    }
}

/// RoPE over `x: [rows, heads, d]` with the rows' tables.
pub struct Rope {
    pub tables: Arc<RotaryTables>,
}

impl Rope {
    /// Rotates every head of every row by +θ (`sign` 1) or −θ (`sign` −1).
    fn rotate(&self, x: &[f32], shape: &Shape, sign: f32) -> candle_core::Result<Vec<f32>> {
        let (_, heads, d) = shape.dims3()?;
        let mut y = x.to_vec();
        y.par_chunks_mut(heads * d).enumerate().for_each(|(row, y)| {
            for head in y.chunks_exact_mut(d) {
                self.tables.rotate(row, head, sign);
            }
        });
        Ok(y)
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        Ok((CpuStorage::F32(self.rotate(x, layout.shape(), 1.0)?), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(Tensor::from_vec(self.rotate(&tensor_values(g)?, x.shape(), -1.0)?, x.shape(), &Device::Cpu)?))
    }
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044_715;

/// tanh z = sign(z)·(1 − e^{−2|z|})/(1 + e^{−2|z|}), vectorisable (libm's tanhf is a call per
/// value); absolute error below 1e-6.
#[inline(always)]
fn tanh(z: f32) -> f32 {
    let e = exp_nonpositive(-2.0 * z.abs());
    ((1.0 - e) / (1.0 + e)).copysign(z)
}

/// gelu(a) (tanh form) and its derivative.
fn gelu_and_slope(a: f32) -> (f32, f32) {
    let t = tanh(SQRT_2_OVER_PI * (a + GELU_CUBIC * a * a * a));
    let gelu = 0.5 * a * (1.0 + t);
    let slope = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * a * a);
    (gelu, slope)
}

/// silu(a) = a·σ(a) and its derivative σ(a)·(1 + a·(1 − σ(a))).
fn silu_and_slope(a: f32) -> (f32, f32) {
    let sigmoid = 1.0 / (1.0 + (-a).exp());
    (a * sigmoid, sigmoid * (1.0 + a * (1.0 - sigmoid)))
}

/// act(gate)·up, with the family's activation (GeGLU or SwiGLU).
pub struct GatedUnit {
    pub activation: Activation,
}

impl GatedUnit {
    fn act_and_slope(&self, a: f32) -> (f32, f32) {
        match self.activation {
            Activation::GeluTanh => gelu_and_slope(a),
            Activation::Silu => silu_and_slope(a),
        }
    }
}

impl CustomOp2 for GatedUnit {
    fn name(&self) -> &'static str {
        "gated-unit"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (gate, up) = (contiguous_f32(s1, l1, self.name())?, contiguous_f32(s2, l2, self.name())?);
        let mut y = vec![0f32; gate.len()];
        y.par_chunks_mut(4096).zip(gate.par_chunks(4096).zip(up.par_chunks(4096))).for_each(|(y, (a, u))| {
            for ((y, &a), &u) in y.iter_mut().zip(a).zip(u) {
                *y = self.act_and_slope(a).0 * u;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, gate: &Tensor, up: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (a, u, g) = (tensor_values(gate)?, tensor_values(up)?, tensor_values(g)?);
        let mut d_gate = vec![0f32; a.len()];
        let mut d_up = vec![0f32; a.len()];
        d_gate
            .par_chunks_mut(4096)
            .zip(d_up.par_chunks_mut(4096))
            .zip(a.par_chunks(4096).zip(u.par_chunks(4096)).zip(g.par_chunks(4096)))
            .for_each(|((dg, du), ((a, u), g))| {
                for i in 0..a.len() {
                    let (act, slope) = self.act_and_slope(a[i]);
                    dg[i] = g[i] * u[i] * slope;
                    du[i] = g[i] * act;
                }
            });
        Ok((
            Some(Tensor::from_vec(d_gate, gate.shape(), &Device::Cpu)?),
            Some(Tensor::from_vec(d_up, up.shape(), &Device::Cpu)?),
        ))
    }
}

/// Softmax over the last axis (masked entries already −∞).
pub struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let n = *layout.shape().dims().last().unwrap_or(&1);
        let mut y = x.to_vec();
        y.par_chunks_mut(n).for_each(|row| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for v in row.iter_mut() {
                *v = exp_nonpositive(*v - max);
                sum += *v;
            }
            row.iter_mut().for_each(|v| *v /= sum);
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (ys, gs) = (tensor_values(y)?, tensor_values(g)?);
        let n = *x.dims().last().unwrap_or(&1);
        let mut dx = vec![0f32; ys.len()];
        dx.par_chunks_mut(n).zip(ys.par_chunks(n).zip(gs.par_chunks(n))).for_each(|(dx, (y, g))| {
            let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
            for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                *dx = y * (g - dot);
            }
        });
        Ok(Some(Tensor::from_vec(dx, x.shape(), &Device::Cpu)?))
    }
}

/// y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ over a frozen quantized W, for `x: [m, in]`, `A: [r, in]`,
/// `B: [out, r]`.
pub struct LoraLinear {
    pub model: Arc<LoadedModel>,
    pub weight: FrozenWeight,
    pub scale: f32,
}

impl LoraLinear {
    /// x·Aᵀ: `[m, r]`.
    fn down(x: &[f32], a: &[f32], (m, k, r): (usize, usize, usize)) -> Vec<f32> {
        let mut xa = vec![0f32; m * r];
        // SAFETY: x is [m, k], A [r, k] read as its transpose [k, r], xa [m, r].
        unsafe { sgemm((m, r, k), &mut xa, false, Strided::rows(x, k), Strided::transposed(a, k)) };
        xa
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, a, b) = (contiguous_f32(s1, l1, self.name())?, contiguous_f32(s2, l2, self.name())?, contiguous_f32(s3, l3, self.name())?);
        let w = self.weight.of(&self.model);
        let (n, k, r) = (w.out_features(), w.in_features(), l2.shape().dims()[0]);
        let m = x.len() / k;
        let mut y = w
            .matmul_rows_background(x, 0..n)
            .map_err(model_error)?;
        let mut xa = Self::down(x, a, (m, k, r));
        xa.iter_mut().for_each(|v| *v *= self.scale);
        // SAFETY: xa is [m, r], B [n, r] read as its transpose [r, n], y [m, n].
        unsafe { sgemm((m, n, r), &mut y, true, Strided::rows(&xa, r), Strided::transposed(b, r)) };
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let w = self.weight.of(&self.model);
        let (n, k) = (w.out_features(), w.in_features());
        let r = a.dim(0)?;
        let (xs, av, bv, gs) = (tensor_values(x)?, tensor_values(a)?, tensor_values(b)?, tensor_values(g)?);
        let m = xs.len() / k;
        let xa = Self::down(&xs, &av, (m, k, r));
        // g·B: [m, r].
        let mut gb = vec![0f32; m * r];
        // SAFETY: g is [m, n], B [n, r], gb [m, r].
        unsafe { sgemm((m, r, n), &mut gb, false, Strided::rows(&gs, n), Strided::rows(&bv, r)) };
        // ∂B = s·gᵀ·xa: [n, r].
        let mut d_b = vec![0f32; n * r];
        // SAFETY: gᵀ is g [m, n] read with rows 1 apart and columns n apart; xa [m, r].
        unsafe { sgemm((n, r, m), &mut d_b, false, Strided::transposed(&gs, n), Strided::rows(&xa, r)) };
        d_b.iter_mut().for_each(|v| *v *= self.scale);
        // ∂A = s·gbᵀ·x: [r, k].
        let mut d_a = vec![0f32; r * k];
        // SAFETY: gbᵀ from gb [m, r]; x [m, k].
        unsafe { sgemm((r, k, m), &mut d_a, false, Strided::transposed(&gb, r), Strided::rows(&xs, k)) };
        d_a.iter_mut().for_each(|v| *v *= self.scale);
        // ∂x = g·W + s·gb·A.
        let mut dx = vec![0f32; m * k];
        w.accumulate_input_grad(&gs, 0..n, &mut dx)
            .map_err(model_error)?;
        gb.iter_mut().for_each(|v| *v *= self.scale);
        // SAFETY: gb [m, r], A [r, k], dx [m, k].
        unsafe { sgemm((m, k, r), &mut dx, true, Strided::rows(&gb, r), Strided::rows(&av, k)) };
        Ok((
            Some(Tensor::from_vec(dx, (m, k), &Device::Cpu)?),
            Some(Tensor::from_vec(d_a, (r, k), &Device::Cpu)?),
            Some(Tensor::from_vec(d_b, (n, r), &Device::Cpu)?),
        ))
    }
}
