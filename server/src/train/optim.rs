//! AdamW (Loshchilov & Hutter) with linear warmup then cosine decay, and global-norm clipping:
//!
//!   g ← g·min(1, c/‖g‖)
//!   m ← β₁m + (1−β₁)g,   v ← β₂v + (1−β₂)g²
//!   θ ← θ − η_t·( m̂/(√v̂ + ε) + λθ ),   m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ)
//!   η_t = η·t/w for t ≤ w, then η·½(1 + cos(π·(t−w)/(T−w)))

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};

use crate::train::adalomo::AdaLomo;
use crate::train::{durable, TrainError};

/// Which optimizer a job trains with (`hyperparameters.optimizer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// AdamW over the whole adapter's gradient, accumulated over micro-batches.
    #[default]
    Adamw,
    /// AdaLomo: each tensor updated inside the backward pass, no stored gradient.
    Adalomo,
}

impl OptimizerKind {
    pub const NAMES: &'static str = "`adamw` or `adalomo`";

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "adamw" => Some(Self::Adamw),
            "adalomo" => Some(Self::Adalomo),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Adamw => "adamw",
            Self::Adalomo => "adalomo",
        }
    }
}

/// A job's optimizer, whichever it is.
pub enum Optimizer {
    AdamW(AdamW),
    AdaLomo(AdaLomo),
}

impl Optimizer {
    /// Optimizer steps taken.
    pub fn step(&self) -> usize {
        match self {
            Self::AdamW(o) => o.step,
            Self::AdaLomo(o) => o.step,
        }
    }

    /// Bytes of optimizer state.
    pub fn state_bytes(&self) -> usize {
        match self {
            Self::AdamW(o) => o.state_bytes(),
            Self::AdaLomo(o) => o.state_bytes(),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), TrainError> {
        match self {
            Self::AdamW(o) => o.save(path),
            Self::AdaLomo(o) => o.save(path),
        }
    }

    pub fn load(&mut self, path: &Path, step: usize) -> Result<(), TrainError> {
        match self {
            Self::AdamW(o) => o.load(path, step),
            Self::AdaLomo(o) => o.load(path, step),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub learning_rate: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl AdamWConfig {
    pub fn schedule(&self) -> Schedule {
        Schedule { learning_rate: self.learning_rate, warmup_steps: self.warmup_steps, total_steps: self.total_steps }
    }
}

/// A peak learning rate reached by linear warmup, then decayed along a cosine to zero.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub learning_rate: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

/// The learning rate at optimizer step `step` (1-based).
pub fn scheduled_rate(c: &Schedule, step: usize) -> f64 {
    if step <= c.warmup_steps {
        return c.learning_rate * step as f64 / c.warmup_steps.max(1) as f64;
    }
    let decay_steps = c.total_steps.saturating_sub(c.warmup_steps).max(1);
    let progress = ((step - c.warmup_steps) as f64 / decay_steps as f64).min(1.0);
    c.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

pub struct AdamW {
    pub config: AdamWConfig,
    /// Optimizer steps taken.
    pub step: usize,
    moments: Vec<(Tensor, Tensor)>,
}

impl AdamW {
    pub fn new(config: AdamWConfig, vars: &[&Var]) -> Result<Self, TrainError> {
        let moments = vars
            .iter()
            .map(|v| Ok((v.as_tensor().zeros_like()?, v.as_tensor().zeros_like()?)))
            .collect::<Result<_, TrainError>>()?;
        Ok(Self {
            config,
            step: 0,
            moments,
        })
    }

    /// One update from gradients already averaged over the accumulated batch. Returns the
    /// gradient norm before clipping and the learning rate used.
    pub fn step(&mut self, vars: &[&Var], grads: &[Tensor]) -> Result<(f64, f64), TrainError> {
        let c = self.config;
        self.step += 1;
        let t = self.step as i32;
        let norm = grads
            .iter()
            .map(|g| Ok(g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64))
            .sum::<Result<f64, TrainError>>()?
            .sqrt();
        let clip = if norm > c.max_grad_norm { c.max_grad_norm / norm } else { 1.0 };
        let rate = scheduled_rate(&c.schedule(), self.step);
        let (bias1, bias2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for ((var, grad), (m, v)) in vars.iter().zip(grads).zip(self.moments.iter_mut()) {
            let g = (grad * clip)?;
            *m = ((&*m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            *v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&*m / bias1)? / ((&*v / bias2)?.sqrt()? + c.eps)?)?;
            let theta = var.as_tensor();
            let next = (theta - ((update + (theta * c.weight_decay)?)? * rate)?)?;
            var.set(&next)?;
        }
        Ok((norm, rate))
    }

    /// Bytes of the two moments.
    pub fn state_bytes(&self) -> usize {
        self.moments.iter().map(|(m, v)| 4 * (m.elem_count() + v.elem_count())).sum()
    }

    /// Writes the moments (the step count is the caller's to record).
    pub fn save(&self, path: &Path) -> Result<(), TrainError> {
        let tensors: HashMap<String, Tensor> = self
            .moments
            .iter()
            .enumerate()
            .flat_map(|(i, (m, v))| [(format!("{i}.m"), m.clone()), (format!("{i}.v"), v.clone())])
            .collect();
        durable::save_tensors(path, &tensors)
    }

    pub fn load(&mut self, path: &Path, step: usize) -> Result<(), TrainError> {
        let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)?;
        for (i, (m, v)) in self.moments.iter_mut().enumerate() {
            let mut take = |name: String, like: &Tensor| {
                tensors
                    .remove(&name)
                    .filter(|t| t.dims() == like.dims())
                    .ok_or_else(|| TrainError::Checkpoint(format!("{}: `{name}` is missing or misshapen", path.display())))
            };
            *m = take(format!("{i}.m"), m)?;
            *v = take(format!("{i}.v"), v)?;
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_warms_up_linearly_then_decays_to_zero() {
        let c = AdamWConfig {
            learning_rate: 1.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            warmup_steps: 4,
            total_steps: 14,
        };
        let c = c.schedule();
        assert_eq!(scheduled_rate(&c, 1), 0.25);
        assert_eq!(scheduled_rate(&c, 4), 1.0);
        assert!((scheduled_rate(&c, 9) - 0.5).abs() < 1e-12);
        assert!(scheduled_rate(&c, 14).abs() < 1e-12);
    }
}
