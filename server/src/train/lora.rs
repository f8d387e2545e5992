//! Trainable adapter parameters of the three kinds, and their PEFT files (`adapter_config.json`
//! + `adapter_model.safetensors`), which the registry serves and training continues from:
//!
//! - LoRA: A and B beside each targeted linear layer;
//! - DoRA: the same, and the magnitude m `[out]` of each, initialised to the row norms ‖W‖ of
//!   the frozen weight (PEFT's initialisation, B = 0);
//! - IA³: a scale l on k's and v's outputs and on `down`'s input, initialised to 1.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tessera_adapters::peft::{config_kind, ia3_scales_input, BaseShape, CONFIG_FILE, IA3_MODULES, WEIGHTS_FILE};
use tessera_adapters::{AdapterKind, TargetModule};

use crate::train::durable;
use crate::train::ops::FrozenWeight;
use crate::train::TrainError;
use crate::LoadedModel;

/// A fresh adapter's shape: its kind, and for LoRA and DoRA the rank, α and the linear layers
/// it targets (IA³ always scales k, v and `down`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f32,
    pub targets: Vec<TargetModule>,
    pub kind: AdapterKind,
}

impl Default for LoraSpec {
    /// LoRA, r = 16, α = 32 on all seven linear layers.
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            targets: TargetModule::ALL.to_vec(),
            kind: AdapterKind::Lora,
        }
    }
}

/// The trainable tensors of an adapter.
pub struct AdapterParams {
    pub spec: LoraSpec,
    /// A `[r, in]` and B `[out, r]` of LoRA and DoRA.
    factors: BTreeMap<(usize, TargetModule), (Var, Var)>,
    /// DoRA's m `[out]`.
    magnitudes: BTreeMap<(usize, TargetModule), Var>,
    /// IA³'s l: `[out]` on k and v, `[in]` on `down`.
    scales: BTreeMap<(usize, TargetModule), Var>,
}

fn module_path(layer: usize, module: TargetModule) -> String {
    format!("base_model.model.model.layers.{layer}.{}", tessera_adapters::peft::module_path(module))
}

/// IA³'s l as PEFT shapes it: `[out, 1]` on an output, `[1, in]` on an input.
fn ia3_shape(module: TargetModule, len: usize) -> (usize, usize) {
    if ia3_scales_input(module) {
        (1, len)
    } else {
        (len, 1)
    }
}

fn var(values: Vec<f32>, shape: impl Into<candle_core::Shape>) -> Result<Var, TrainError> {
    Ok(Var::from_tensor(&Tensor::from_vec(values, shape, &Device::Cpu)?)?)
}

impl AdapterParams {
    /// PEFT's initialisation, so that a fresh adapter changes nothing: A ~ U(−1/√in, 1/√in)
    /// (Kaiming-uniform with a = √5) and B = 0; DoRA's m = ‖W‖ per row; IA³'s l = 1.
    pub fn fresh(model: &LoadedModel, spec: LoraSpec, seed: u64) -> Result<Self, TrainError> {
        let base = model.model.config().adapter_shape();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut params = Self { factors: BTreeMap::new(), magnitudes: BTreeMap::new(), scales: BTreeMap::new(), spec };
        if params.spec.kind == AdapterKind::Ia3 {
            params.spec.targets = IA3_MODULES.to_vec();
            for layer in 0..base.n_layers {
                for module in IA3_MODULES {
                    let (fan_in, fan_out) = base.features(module);
                    let len = if ia3_scales_input(module) { fan_in } else { fan_out };
                    params.scales.insert((layer, module), var(vec![1.0; len], len)?);
                }
            }
            return Ok(params);
        }
        for layer in 0..base.n_layers {
            for &module in &params.spec.targets {
                let (fan_in, fan_out) = base.features(module);
                let bound = 1.0 / (fan_in as f32).sqrt();
                let a: Vec<f32> = (0..params.spec.rank * fan_in).map(|_| rng.random_range(-bound..bound)).collect();
                let a = var(a, (params.spec.rank, fan_in))?;
                let b = Var::zeros((fan_out, params.spec.rank), candle_core::DType::F32, &Device::Cpu)?;
                if params.spec.kind == AdapterKind::Dora {
                    let norms = FrozenWeight { layer, module }.of(model).row_norms_with(|_, _| {}).map_err(|e| TrainError::Adapter(e.to_string()))?;
                    params.magnitudes.insert((layer, module), var(norms, fan_out)?);
                }
                params.factors.insert((layer, module), (a, b));
            }
        }
        Ok(params)
    }

    pub fn kind(&self) -> AdapterKind {
        self.spec.kind
    }

    /// α / r.
    pub fn scale(&self) -> f32 {
        self.spec.alpha / self.spec.rank as f32
    }

    pub fn factors(&self, layer: usize, module: TargetModule) -> Option<&(Var, Var)> {
        self.factors.get(&(layer, module))
    }

    pub fn magnitude(&self, layer: usize, module: TargetModule) -> Option<&Var> {
        self.magnitudes.get(&(layer, module))
    }

    /// IA³'s l at (layer, module), `[len]`.
    pub fn ia3_scale(&self, layer: usize, module: TargetModule) -> Option<&Var> {
        self.scales.get(&(layer, module))
    }

    /// Every trainable tensor by its PEFT name.
    pub fn named_vars(&self) -> Vec<(String, &Var)> {
        let factors = self.factors.iter().flat_map(|(&(layer, module), (a, b))| {
            let path = module_path(layer, module);
            [(format!("{path}.lora_A.weight"), a), (format!("{path}.lora_B.weight"), b)]
        });
        let magnitudes = self.magnitudes.iter().map(|(&(layer, module), m)| (format!("{}.lora_magnitude_vector", module_path(layer, module)), m));
        let scales = self.scales.iter().map(|(&(layer, module), l)| (format!("{}.ia3_l", module_path(layer, module)), l));
        factors.chain(magnitudes).chain(scales).collect()
    }

    /// Every tensor as PEFT stores it (IA³'s l as `[out, 1]` or `[1, in]`).
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>, TrainError> {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (name, var) in self.named_vars() {
            tensors.insert(name, var.as_tensor().clone());
        }
        for (&(layer, module), l) in &self.scales {
            let name = format!("{}.ia3_l", module_path(layer, module));
            tensors.insert(name, l.as_tensor().reshape(ia3_shape(module, l.as_tensor().elem_count()))?);
        }
        Ok(tensors)
    }

    /// The PEFT config of this adapter.
    fn config(&self, base_model: &str) -> serde_json::Value {
        let targets: Vec<&str> = self.spec.targets.iter().map(|m| m.peft_name()).collect();
        match self.spec.kind {
            AdapterKind::Ia3 => serde_json::json!({
                "peft_type": "IA3",
                "task_type": "CAUSAL_LM",
                "target_modules": targets,
                "feedforward_modules": IA3_MODULES.iter().filter(|m| ia3_scales_input(**m)).map(|m| m.peft_name()).collect::<Vec<_>>(),
                "init_ia3_weights": true,
                "fan_in_fan_out": false,
                "base_model_name_or_path": base_model,
            }),
            AdapterKind::Lora | AdapterKind::Dora => serde_json::json!({
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": self.spec.rank,
                "lora_alpha": self.spec.alpha,
                "target_modules": targets,
                "lora_dropout": 0.0,
                "bias": "none",
                "fan_in_fan_out": false,
                "use_dora": self.spec.kind == AdapterKind::Dora,
                "base_model_name_or_path": base_model,
            }),
        }
    }

    /// Writes the adapter as a PEFT folder, durably: each file lands whole or not at all.
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<(), TrainError> {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        durable::save_tensors(&dir.join(WEIGHTS_FILE), &self.tensors()?)?;
        durable::write(&dir.join(CONFIG_FILE), serde_json::to_string_pretty(&self.config(base_model))?.as_bytes())?;
        Ok(())
    }

    /// Reads a PEFT folder of any of the three kinds, checking every tensor against `base`.
    pub fn load_peft(dir: &Path, base: &BaseShape) -> Result<Self, TrainError> {
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path).map_err(|e| TrainError::io(&config_path, e))?;
        let config: serde_json::Value = serde_json::from_str(&text)?;
        let kind = config_kind(&text).ok_or_else(|| TrainError::Adapter(format!("{}: not a LoRA, DoRA or IA3 config", config_path.display())))?;
        let rank = config["r"].as_u64().unwrap_or(0) as usize;
        let alpha = config["lora_alpha"].as_f64().unwrap_or(rank as f64) as f32;
        let targets: Vec<TargetModule> = config["target_modules"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m.as_str().and_then(TargetModule::from_peft_name))
            .collect();
        if (kind != AdapterKind::Ia3 && rank == 0) || targets.is_empty() {
            return Err(TrainError::Adapter(format!("{}: no rank or no target modules", config_path.display())));
        }
        let weights_path = dir.join(WEIGHTS_FILE);
        let mut tensors = candle_core::safetensors::load(&weights_path, &Device::Cpu)?;
        let mut take = |name: String, shape: (usize, usize)| {
            let t = tensors
                .remove(&name)
                .ok_or_else(|| TrainError::Adapter(format!("{}: `{name}` is missing", weights_path.display())))?;
            if t.elem_count() != shape.0 * shape.1 || (t.rank() == 2 && t.dims() != [shape.0, shape.1]) {
                return Err(TrainError::Adapter(format!("{}: `{name}` is {:?}, expected {shape:?}", weights_path.display(), t.dims())));
            }
            Ok(Var::from_tensor(&t.to_dtype(candle_core::DType::F32)?)?)
        };
        let mut params = Self { spec: LoraSpec { rank, alpha, targets, kind }, factors: BTreeMap::new(), magnitudes: BTreeMap::new(), scales: BTreeMap::new() };
        for layer in 0..base.n_layers {
            for module in params.spec.targets.clone() {
                let path = module_path(layer, module);
                let (fan_in, fan_out) = base.features(module);
                if kind == AdapterKind::Ia3 {
                    let len = if ia3_scales_input(module) { fan_in } else { fan_out };
                    let l = take(format!("{path}.ia3_l"), ia3_shape(module, len))?;
                    params.scales.insert((layer, module), Var::from_tensor(&l.as_tensor().reshape(len)?)?);
                    continue;
                }
                let a = take(format!("{path}.lora_A.weight"), (rank, fan_in))?;
                let b = take(format!("{path}.lora_B.weight"), (fan_out, rank))?;
                if kind == AdapterKind::Dora {
                    let m = take(format!("{path}.lora_magnitude_vector"), (fan_out, 1))?;
                    params.magnitudes.insert((layer, module), Var::from_tensor(&m.as_tensor().reshape(fan_out)?)?);
                }
                params.factors.insert((layer, module), (a, b));
            }
        }
        Ok(params)
    }
}
