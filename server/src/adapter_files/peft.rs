//! PEFT folders as [`AdapterFactors`]: the factors exactly as `adapter_model.safetensors`
//! stores them, with the scales its config gives (rank and α patterns, rsLoRA).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use tessera_adapters::peft::{alpha_is_valid, config_kind, module_path, parse_tensor_name, BaseShape, PeftAdapter, PeftError, TensorRole, CONFIG_FILE, WEIGHTS_FILE};
use tessera_adapters::{AdapterKind, TargetModule};

use super::{AdapterFactors, AdapterFileError, Factor, FactorPair, FloatType};

fn weights_error(path: &Path, message: String) -> PeftError {
    PeftError::Weights { path: path.to_path_buf(), message }
}

/// The factors of the PEFT LoRA folder `dir`, checked against `base` as loading checks them.
pub fn read(dir: &Path, base: &BaseShape) -> Result<AdapterFactors, AdapterFileError> {
    let io = |path: std::path::PathBuf| move |source| PeftError::Io { path, source };
    let config = std::fs::read_to_string(dir.join(CONFIG_FILE)).map_err(io(dir.join(CONFIG_FILE)))?;
    match config_kind(&config) {
        Some(AdapterKind::Dora) => {
            return Err(AdapterFileError::NoGgufForm { kind: AdapterKind::Dora, why: "llama.cpp cannot load a DoRA magnitude vector" })
        }
        Some(AdapterKind::Ia3) => return Err(AdapterFileError::NoGgufForm { kind: AdapterKind::Ia3, why: "llama.cpp has no IA³ adapters" }),
        Some(AdapterKind::Lora) | None => {}
    }
    let path = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path).map_err(io(path.clone()))?;
    // The same bytes, checked and scaled as loading does, then read as stored.
    let adapter = PeftAdapter::from_parts(&config, &bytes, dir, base, None)?;
    let tensors = SafeTensors::deserialize(&bytes).map_err(|e| weights_error(&path, e.to_string()))?;
    let mut halves: BTreeMap<(usize, TargetModule), (Option<Factor>, Option<Factor>)> = BTreeMap::new();
    for (name, view) in tensors.tensors() {
        let (layer, module, role) = parse_tensor_name(&name).map_err(|problem| PeftError::Tensor { path: path.clone(), tensor: name.clone(), problem })?;
        let is_b = role == TensorRole::LoraB;
        let dtype = match view.dtype() {
            Dtype::F32 => FloatType::F32,
            Dtype::F16 => FloatType::F16,
            Dtype::BF16 => FloatType::BF16,
            other => return Err(PeftError::Tensor { path: path.clone(), tensor: name, problem: format!("dtype {other:?} is not supported") }.into()),
        };
        let factor = Factor { dtype, dims: view.shape().to_vec(), bytes: view.data().to_vec() };
        let entry = halves.entry((layer, module)).or_default();
        *(if is_b { &mut entry.1 } else { &mut entry.0 }) = Some(factor);
    }
    let mut pairs = Vec::with_capacity(halves.len());
    for ((layer, module), halves) in halves {
        // Loading checked that both factors exist and fit; the delta holds the scale.
        if let ((Some(a), Some(b)), Some(delta)) = (halves, adapter.weights.get(layer, module)) {
            pairs.push(FactorPair { layer, module, a, b, scale: delta.scale });
        }
    }
    Ok(AdapterFactors { pairs })
}

fn tensor_name(pair: &FactorPair, factor: &str) -> String {
    format!("base_model.model.model.layers.{}.{}.{factor}.weight", pair.layer, module_path(pair.module))
}

fn dtype(t: FloatType) -> Dtype {
    match t {
        FloatType::F32 => Dtype::F32,
        FloatType::F16 => Dtype::F16,
        FloatType::BF16 => Dtype::BF16,
    }
}

/// `factors` as PEFT's config and safetensors bytes. The config's `r` and `lora_alpha` are the
/// first pair's; pairs that differ get `rank_pattern` and `alpha_pattern` entries. A scale no α
/// in range gives back exactly (α/r) is folded into B with α = r.
pub fn write(factors: &AdapterFactors, base_model: &str) -> Result<(Vec<u8>, Vec<u8>), PeftError> {
    let pairs: Vec<(FactorPair, f32)> = factors
        .pairs
        .iter()
        .map(|pair| {
            let rank = pair.rank() as f32;
            let alpha = pair.scale * rank;
            if alpha_is_valid(alpha) && alpha / rank == pair.scale {
                (pair.clone(), alpha)
            } else {
                (pair.with_scale(1.0), rank)
            }
        })
        .collect();
    let (rank, alpha) = pairs.first().map_or((0, 0.0), |(p, a)| (p.rank(), *a));
    let mut rank_pattern = BTreeMap::new();
    let mut alpha_pattern = BTreeMap::new();
    let mut targets = BTreeSet::new();
    for (pair, pair_alpha) in &pairs {
        let path = format!("model.layers.{}.{}", pair.layer, module_path(pair.module));
        if pair.rank() != rank {
            rank_pattern.insert(path.clone(), pair.rank());
        }
        if *pair_alpha != alpha {
            alpha_pattern.insert(path, *pair_alpha);
        }
        targets.insert(pair.module.peft_name());
    }
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "base_model_name_or_path": base_model,
    });
    let mut views = Vec::with_capacity(2 * pairs.len());
    for (pair, _) in &pairs {
        for (factor, tensor) in [("lora_A", &pair.a), ("lora_B", &pair.b)] {
            let view = TensorView::new(dtype(tensor.dtype), tensor.dims.clone(), &tensor.bytes)
                .map_err(|e| PeftError::Tensor { path: WEIGHTS_FILE.into(), tensor: tensor_name(pair, factor), problem: e.to_string() })?;
            views.push((tensor_name(pair, factor), view));
        }
    }
    let weights = safetensors::serialize(views, None).map_err(|e| weights_error(Path::new(WEIGHTS_FILE), e.to_string()))?;
    let config = serde_json::to_vec_pretty(&config).map_err(|e| weights_error(Path::new(WEIGHTS_FILE), e.to_string()))?;
    Ok((config, weights))
}
