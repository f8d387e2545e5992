//! AdaLomo (Lv et al. 2023, "AdaLomo: Low-memory Optimization with Adaptive Learning Rate"):
//! LOMO's fused update, where each tensor moves as soon as the backward pass has its gradient
//! and the gradient is then dropped, with Adafactor's factored second moment and per-tensor
//! update normalisation in place of a gradient-norm pass. For a tensor θ with gradient g at
//! step t (1-based):
//!
//!   β₂ₜ = 1 − t^c                                   (c = −0.8; β₂₁ = 0)
//!   u = g² + ε₁
//!   matrix [n, m]: r ← β₂ₜ·r + (1−β₂ₜ)·mean_row(u),  s ← β₂ₜ·s + (1−β₂ₜ)·mean_col(u)
//!                  v̂ᵢⱼ = rᵢ·sⱼ / mean(r)
//!   vector:        v ← β₂ₜ·v + (1−β₂ₜ)·u,  v̂ = v
//!   Δ = g / √v̂,    Δ ← Δ / max(1, RMS(Δ)/d)          (d = 1)
//!   η = ηₜ·max(ε₂, RMS(θ))
//!   θ ← θ·(1 − η·λ) − η·Δ
//!
//! The state is two vectors per matrix (one per vector tensor): a few kilobytes for an adapter
//! whose AdamW moments take twice its size. The update is invariant to the gradient's scale
//! (up to ε₁), so the summed loss's gradient serves as well as the mean's.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};

use crate::train::decoder::GradientSink;
use crate::train::optim::{scheduled_rate, Schedule};
use crate::train::{durable, TrainError};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaLomoConfig {
    /// The peak relative step ηₜ follows (warmup, then cosine decay).
    pub schedule: Schedule,
    /// c of β₂ₜ = 1 − t^c.
    pub decay_rate: f64,
    /// ε₁, added to g².
    pub eps_square: f64,
    /// ε₂: the smallest parameter RMS a step is scaled by, so that a tensor starting at zero
    /// (LoRA's B) moves.
    pub eps_scale: f64,
    /// d, the largest RMS an update may have.
    pub clip_threshold: f64,
    pub weight_decay: f64,
}

impl AdaLomoConfig {
    /// lomo-optim's defaults for everything but the rate and its schedule.
    pub fn new(schedule: Schedule) -> Self {
        Self { schedule, decay_rate: -0.8, eps_square: 1e-30, eps_scale: 1e-3, clip_threshold: 1.0, weight_decay: 0.0 }
    }
}

/// The second moment of one tensor: factored for a matrix, whole for a vector.
#[derive(Debug, Clone, PartialEq)]
enum SecondMoment {
    Factored { rows: Vec<f32>, cols: Vec<f32> },
    Whole(Vec<f32>),
}

impl SecondMoment {
    fn zeros(dims: &[usize]) -> Self {
        match dims {
            [n, m] => Self::Factored { rows: vec![0.0; *n], cols: vec![0.0; *m] },
            _ => Self::Whole(vec![0.0; dims.iter().product()]),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Factored { rows, cols } => rows.len() + cols.len(),
            Self::Whole(v) => v.len(),
        }
    }

    /// Folds in the squared gradient (`u = g² + ε₁`) with weight 1 − β, and returns
    /// g / √v̂.
    fn scaled_gradient(&mut self, g: &[f32], beta: f32, eps: f32) -> Vec<f32> {
        let ema = |old: &mut f32, new: f32| *old = beta * *old + (1.0 - beta) * new;
        match self {
            Self::Whole(v) => {
                for (v, &g) in v.iter_mut().zip(g) {
                    ema(v, g * g + eps);
                }
                v.iter().zip(g).map(|(&v, &g)| g / v.sqrt()).collect()
            }
            Self::Factored { rows, cols } => {
                let m = cols.len();
                let mut col_sums = vec![0f32; m];
                for (r, row) in rows.iter_mut().zip(g.chunks_exact(m)) {
                    let mut sum = 0f32;
                    for (c, &g) in col_sums.iter_mut().zip(row) {
                        let u = g * g + eps;
                        sum += u;
                        *c += u;
                    }
                    ema(r, sum / m as f32);
                }
                for (c, sum) in cols.iter_mut().zip(col_sums) {
                    ema(c, sum / rows.len() as f32);
                }
                let mean_row = rows.iter().sum::<f32>() / rows.len() as f32;
                let mut out = Vec::with_capacity(g.len());
                for (&r, row) in rows.iter().zip(g.chunks_exact(m)) {
                    let r = (r / mean_row).sqrt().recip();
                    out.extend(row.iter().zip(cols.iter()).map(|(&g, &c)| g * r * c.sqrt().recip()));
                }
                out
            }
        }
    }
}

fn rms(values: &[f32]) -> f64 {
    (values.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / values.len().max(1) as f64).sqrt()
}

pub struct AdaLomo {
    pub config: AdaLomoConfig,
    /// Steps begun (the one in progress included).
    pub step: usize,
    moments: Vec<SecondMoment>,
    /// Σ‖g‖² of the step in progress, for the record (nothing is clipped by it).
    squared_norm: f64,
}

impl AdaLomo {
    pub fn new(config: AdaLomoConfig, vars: &[&Var]) -> Self {
        Self { config, step: 0, moments: vars.iter().map(|v| SecondMoment::zeros(v.as_tensor().dims())).collect(), squared_norm: 0.0 }
    }

    /// Starts a step: the updates [`AdaLomo::update`] makes until the next call belong to it.
    /// Returns the step's relative rate ηₜ.
    pub fn begin_step(&mut self) -> f64 {
        self.step += 1;
        self.squared_norm = 0.0;
        scheduled_rate(&self.config.schedule, self.step)
    }

    /// ‖g‖ over the gradients of the step so far.
    pub fn gradient_norm(&self) -> f64 {
        self.squared_norm.sqrt()
    }

    /// Moves `vars[index]` by its gradient `grad`, now.
    pub fn update(&mut self, index: usize, var: &Var, grad: &Tensor) -> Result<(), TrainError> {
        let c = self.config;
        let g = grad.flatten_all()?.to_vec1::<f32>()?;
        self.squared_norm += g.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>();
        // At t = 1, 1 − 1^c = 0 whatever c: the first gradient is the whole estimate.
        let beta = 1.0 - (self.step as f64).powf(c.decay_rate);
        let moment = self.moments.get_mut(index).ok_or_else(|| TrainError::Adapter(format!("no AdaLomo state for tensor {index}")))?;
        let mut delta = moment.scaled_gradient(&g, beta as f32, c.eps_square as f32);
        let shrink = (rms(&delta) / c.clip_threshold).max(1.0) as f32;
        delta.iter_mut().for_each(|d| *d /= shrink);
        let theta = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let rate = scheduled_rate(&c.schedule, self.step) * c.eps_scale.max(rms(&theta));
        let keep = (1.0 - rate * c.weight_decay) as f32;
        let next: Vec<f32> = theta.iter().zip(&delta).map(|(&p, &d)| p * keep - rate as f32 * d).collect();
        var.set(&Tensor::from_vec(next, var.as_tensor().shape(), &Device::Cpu)?)?;
        Ok(())
    }

    /// Bytes of optimizer state.
    pub fn state_bytes(&self) -> usize {
        self.moments.iter().map(|m| 4 * m.len()).sum()
    }

    /// Writes the second moments (the step count is the caller's to record).
    pub fn save(&self, path: &Path) -> Result<(), TrainError> {
        let mut tensors = HashMap::new();
        for (i, moment) in self.moments.iter().enumerate() {
            match moment {
                SecondMoment::Factored { rows, cols } => {
                    tensors.insert(format!("{i}.rows"), Tensor::from_slice(rows, rows.len(), &Device::Cpu)?);
                    tensors.insert(format!("{i}.cols"), Tensor::from_slice(cols, cols.len(), &Device::Cpu)?);
                }
                SecondMoment::Whole(v) => {
                    tensors.insert(format!("{i}.v"), Tensor::from_slice(v, v.len(), &Device::Cpu)?);
                }
            }
        }
        durable::save_tensors(path, &tensors)
    }

    pub fn load(&mut self, path: &Path, step: usize) -> Result<(), TrainError> {
        let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)?;
        let mut take = |name: String, len: usize| -> Result<Vec<f32>, TrainError> {
            tensors
                .remove(&name)
                .filter(|t| t.dims() == [len])
                .ok_or_else(|| TrainError::Checkpoint(format!("AdaLomo state: `{name}` is missing or misshapen")))?
                .to_vec1::<f32>()
                .map_err(TrainError::from)
        };
        for (i, moment) in self.moments.iter_mut().enumerate() {
            match moment {
                SecondMoment::Factored { rows, cols } => {
                    *rows = take(format!("{i}.rows"), rows.len())?;
                    *cols = take(format!("{i}.cols"), cols.len())?;
                }
                SecondMoment::Whole(v) => *v = take(format!("{i}.v"), v.len())?,
            }
        }
        self.step = step;
        Ok(())
    }
}

/// The backward pass's gradients applied by AdaLomo as they appear, each then dropped.
pub struct FusedUpdate<'a> {
    optimizer: &'a mut AdaLomo,
    /// The most gradient bytes that were alive at once.
    pub peak_gradient_bytes: usize,
}

impl<'a> FusedUpdate<'a> {
    pub fn new(optimizer: &'a mut AdaLomo) -> Self {
        Self { optimizer, peak_gradient_bytes: 0 }
    }
}

impl GradientSink for FusedUpdate<'_> {
    fn absorb(&mut self, vars: &[&Var], grads: &candle_core::backprop::GradStore) -> candle_core::Result<()> {
        let mut bytes = 0;
        for (index, var) in vars.iter().enumerate() {
            if let Some(grad) = grads.get(var.as_tensor()) {
                bytes += 4 * grad.elem_count();
                self.optimizer.update(index, var, grad).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            }
        }
        self.peak_gradient_bytes = self.peak_gradient_bytes.max(bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn constant(rate: f64) -> Schedule {
        Schedule { learning_rate: rate, warmup_steps: 0, total_steps: usize::MAX }
    }

    /// At t = 1 the factored moment of a rank-one g² is exact, so Δ = g/|g| elementwise: every
    /// entry moves by the same amount, before the RMS clip (which leaves a unit RMS alone).
    #[test]
    fn the_first_step_of_a_rank_one_square_is_a_sign_step_scaled_by_the_parameters_rms() -> Result<(), TrainError> {
        let var = Var::from_tensor(&Tensor::from_vec(vec![3.0f32, -4.0, 0.0, 0.0], (2, 2), &Device::Cpu)?)?;
        let mut optimizer = AdaLomo::new(AdaLomoConfig::new(constant(0.1)), &[&var]);
        optimizer.begin_step();
        let grad = Tensor::from_vec(vec![1.0f32, -2.0, 2.0, -4.0], (2, 2), &Device::Cpu)?;
        optimizer.update(0, &var, &grad)?;
        // RMS(θ) = 5/2, so η = 0.25.
        let moved = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        for (got, want) in moved.iter().zip([2.75f32, -3.75, -0.25, 0.25]) {
            assert!((got - want).abs() < 1e-5, "{moved:?}");
        }
        assert!((optimizer.gradient_norm() - 25f64.sqrt()).abs() < 1e-9);
        Ok(())
    }

    #[test]
    fn the_state_survives_a_checkpoint() -> Result<(), TrainError> {
        let dir = tempfile::tempdir().map_err(|e| TrainError::io(Path::new("tempdir"), e))?;
        let (a, b) = (Var::zeros((3, 2), candle_core::DType::F32, &Device::Cpu)?, Var::zeros(4, candle_core::DType::F32, &Device::Cpu)?);
        let mut optimizer = AdaLomo::new(AdaLomoConfig::new(constant(0.1)), &[&a, &b]);
        optimizer.begin_step();
        optimizer.update(0, &a, &Tensor::from_vec(vec![1f32, 2., 3., 4., 5., 6.], (3, 2), &Device::Cpu)?)?;
        optimizer.update(1, &b, &Tensor::from_vec(vec![1f32, -1., 2., 0.5], 4, &Device::Cpu)?)?;
        let path = dir.path().join("optimizer.safetensors");
        optimizer.save(&path)?;
        let mut resumed = AdaLomo::new(optimizer.config, &[&a, &b]);
        resumed.load(&path, optimizer.step)?;
        assert_eq!(resumed.moments, optimizer.moments);
        assert_eq!(resumed.state_bytes(), 4 * (3 + 2 + 4));
        Ok(())
    }
}
