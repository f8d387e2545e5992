//! Trainable LoRA factors, and their PEFT files (`adapter_config.json` +
//! `adapter_model.safetensors`), which the registry serves and training continues from.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tessera_adapters::peft::{BaseShape, CONFIG_FILE, WEIGHTS_FILE};
use tessera_adapters::TargetModule;

use crate::train::durable;
use crate::train::TrainError;

/// A fresh adapter's shape: rank, α and the linear layers it targets.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f32,
    pub targets: Vec<TargetModule>,
}

impl Default for LoraSpec {
    /// r = 16, α = 32 on all seven linear layers.
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            targets: TargetModule::ALL.to_vec(),
        }
    }
}

/// A (f32, trainable) and B for every targeted (layer, module).
pub struct LoraParams {
    pub spec: LoraSpec,
    factors: BTreeMap<(usize, TargetModule), (Var, Var)>,
}

fn module_path(layer: usize, module: TargetModule) -> String {
    let parent = match module {
        TargetModule::Q | TargetModule::K | TargetModule::V | TargetModule::O => "self_attn",
        TargetModule::Gate | TargetModule::Up | TargetModule::Down => "mlp",
    };
    format!("base_model.model.model.layers.{layer}.{parent}.{}", module.peft_name())
}

impl LoraParams {
    /// PEFT's initialisation: A ~ U(−1/√in, 1/√in) (Kaiming-uniform with a = √5), B = 0, so a
    /// fresh adapter changes nothing.
    pub fn fresh(base: &BaseShape, spec: LoraSpec, seed: u64) -> Result<Self, TrainError> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut factors = BTreeMap::new();
        for layer in 0..base.n_layers {
            for &module in &spec.targets {
                let (fan_in, fan_out) = base.features(module);
                let bound = 1.0 / (fan_in as f32).sqrt();
                let a: Vec<f32> = (0..spec.rank * fan_in).map(|_| rng.random_range(-bound..bound)).collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (spec.rank, fan_in), &Device::Cpu)?)?;
                let b = Var::zeros((fan_out, spec.rank), candle_core::DType::F32, &Device::Cpu)?;
                factors.insert((layer, module), (a, b));
            }
        }
        Ok(Self { spec, factors })
    }

    /// α / r.
    pub fn scale(&self) -> f32 {
        self.spec.alpha / self.spec.rank as f32
    }

    pub fn factors(&self, layer: usize, module: TargetModule) -> Option<&(Var, Var)> {
        self.factors.get(&(layer, module))
    }

    /// Every trainable tensor by its PEFT name.
    pub fn named_vars(&self) -> Vec<(String, &Var)> {
        self.factors
            .iter()
            .flat_map(|(&(layer, module), (a, b))| {
                let path = module_path(layer, module);
                [(format!("{path}.lora_A.weight"), a), (format!("{path}.lora_B.weight"), b)]
            })
            .collect()
    }

    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.named_vars()
            .into_iter()
            .map(|(name, var)| (name, var.as_tensor().clone()))
            .collect()
    }

    /// Writes the adapter as a PEFT folder, durably: each file lands whole or not at all.
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<(), TrainError> {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.spec.rank,
            "lora_alpha": self.spec.alpha,
            "target_modules": self.spec.targets.iter().map(|m| m.peft_name()).collect::<Vec<_>>(),
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": false,
            "base_model_name_or_path": base_model,
        });
        durable::save_tensors(&dir.join(WEIGHTS_FILE), &self.tensors())?;
        durable::write(&dir.join(CONFIG_FILE), serde_json::to_string_pretty(&config)?.as_bytes())?;
        Ok(())
    }

    /// Reads a folder written by `save_peft`, checking every factor against `base`.
    pub fn load_peft(dir: &Path, base: &BaseShape) -> Result<Self, TrainError> {
        let config_path = dir.join(CONFIG_FILE);
        let config: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&config_path).map_err(|e| TrainError::io(&config_path, e))?,
        )?;
        let rank = config["r"].as_u64().unwrap_or(0) as usize;
        let alpha = config["lora_alpha"].as_f64().unwrap_or(rank as f64) as f32;
        let targets: Vec<TargetModule> = config["target_modules"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m.as_str().and_then(TargetModule::from_peft_name))
            .collect();
        if rank == 0 || targets.is_empty() {
            return Err(TrainError::Adapter(format!("{}: no rank or no target modules", config_path.display())));
        }
        let weights_path = dir.join(WEIGHTS_FILE);
        let mut tensors = candle_core::safetensors::load(&weights_path, &Device::Cpu)?;
        let mut factors = BTreeMap::new();
        for layer in 0..base.n_layers {
            for &module in &targets {
                let path = module_path(layer, module);
                let (fan_in, fan_out) = base.features(module);
                let mut take = |factor: &str, shape: (usize, usize)| {
                    let name = format!("{path}.{factor}.weight");
                    let t = tensors.remove(&name).ok_or_else(|| {
                        TrainError::Adapter(format!("{}: `{name}` is missing", weights_path.display()))
                    })?;
                    if t.dims() != [shape.0, shape.1] {
                        return Err(TrainError::Adapter(format!(
                            "{}: `{name}` is {:?}, expected {shape:?}",
                            weights_path.display(),
                            t.dims()
                        )));
                    }
                    Ok(Var::from_tensor(&t.to_dtype(candle_core::DType::F32)?)?)
                };
                let a = take("lora_A", (rank, fan_in))?;
                let b = take("lora_B", (fan_out, rank))?;
                factors.insert((layer, module), (a, b));
            }
        }
        Ok(Self {
            spec: LoraSpec { rank, alpha, targets },
            factors,
        })
    }
}
