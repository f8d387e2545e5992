//! Hugging Face PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Tensors are named `…layers.{i}.{self_attn|mlp}.{q,k,v,o,gate,up,down}_proj.lora_{A,B}.weight`,
//! A `[r, in]` and B `[out, r]`. A layer's delta is scaled by α/r, or α/√r with rsLoRA, where r and
//! α may be overridden per module by `rank_pattern` and `alpha_pattern`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::{LoraDelta, LoraWeights, TargetModule};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid adapter config: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: invalid safetensors file: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("{path}: unsupported: {feature}")]
    Unsupported { path: PathBuf, feature: String },
    #[error("{path}: tensor `{tensor}`: {problem}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        problem: String,
    },
}

/// The largest rank an adapter may have.
pub const MAX_RANK: usize = 256;
/// The largest `lora_alpha` an adapter may have: beyond it the deltas swamp the base model.
pub const MAX_ALPHA: f32 = 1024.0;

pub fn rank_is_valid(rank: usize) -> bool {
    (1..=MAX_RANK).contains(&rank)
}

/// Finite, above 0 and at most [`MAX_ALPHA`] (NaN is none of these).
pub fn alpha_is_valid(alpha: f32) -> bool {
    alpha > 0.0 && alpha <= MAX_ALPHA
}

/// The shapes an adapter must fit: the base model's layer count and linear layer sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseShape {
    /// The GGUF architecture name (`gemma3`, `llama`, …), which a GGUF-LoRA file must repeat.
    pub architecture: String,
    pub n_layers: usize,
    pub hidden: usize,
    /// Query projection width: heads × head dimension.
    pub q_width: usize,
    /// Key and value projection width: KV heads × head dimension.
    pub kv_width: usize,
    pub ffn: usize,
}

impl BaseShape {
    /// (in_features, out_features) of a target module.
    pub fn features(&self, module: TargetModule) -> (usize, usize) {
        match module {
            TargetModule::Q => (self.hidden, self.q_width),
            TargetModule::K | TargetModule::V => (self.hidden, self.kv_width),
            TargetModule::O => (self.q_width, self.hidden),
            TargetModule::Gate | TargetModule::Up => (self.hidden, self.ffn),
            TargetModule::Down => (self.ffn, self.hidden),
        }
    }
}

/// `target_modules`: a list of names, or one string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TargetModules {
    List(Vec<String>),
    One(String),
}

#[derive(Debug, Deserialize)]
struct PeftConfig {
    #[serde(default)]
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f32,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    rank_pattern: HashMap<String, usize>,
    #[serde(default)]
    alpha_pattern: HashMap<String, f32>,
    target_modules: Option<TargetModules>,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
}

/// A loaded adapter: its deltas and what its config says.
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    pub weights: LoraWeights,
    /// Default rank (`r`) and the modules it targets.
    pub rank: usize,
    pub alpha: f32,
    pub target_modules: Vec<TargetModule>,
    pub base_model: Option<String>,
}

/// The value of the first pattern key that `module_path` ends with (PEFT matches keys against
/// the end of the module's dotted name).
fn pattern_value<T: Copy>(patterns: &HashMap<String, T>, module_path: &str) -> Option<T> {
    let mut keys: Vec<&String> = patterns.keys().collect();
    // Longest keys first, so `layers.3.self_attn.q_proj` wins over `q_proj`.
    keys.sort_by_key(|k| std::cmp::Reverse(k.len()));
    keys.into_iter()
        .find(|k| module_path == k.as_str() || module_path.ends_with(&format!(".{k}")))
        .map(|k| patterns[k])
}

/// Which adapter tensor a name is: (layer, module, is_b).
pub fn parse_tensor_name(name: &str) -> Result<(usize, TargetModule, bool), String> {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.iter().any(|p| p.starts_with("lora_embedding")) {
        return Err("embedding LoRA is not supported".into());
    }
    if parts.iter().any(|p| p.starts_with("lora_magnitude")) {
        return Err("DoRA magnitude vectors are not supported".into());
    }
    let layer = parts
        .iter()
        .position(|p| *p == "layers")
        .and_then(|i| parts.get(i + 1))
        .and_then(|p| p.parse::<usize>().ok())
        .ok_or("not a per-layer LoRA tensor (expected `…layers.N.…`)")?;
    let module = parts
        .iter()
        .find_map(|p| TargetModule::from_peft_name(p))
        .ok_or("targets no supported linear layer (q/k/v/o/gate/up/down_proj)")?;
    let is_b = match parts.iter().find(|p| p.starts_with("lora_")) {
        Some(&"lora_A") => false,
        Some(&"lora_B") => true,
        _ => return Err("is neither `lora_A` nor `lora_B`".into()),
    };
    Ok((layer, module, is_b))
}

fn to_f32(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

impl PeftAdapter {
    /// Loads the adapter in `dir` and checks it against `base`.
    pub fn load(dir: &Path, base: &BaseShape) -> Result<Self, PeftError> {
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path).map_err(|source| PeftError::Io {
            path: config_path.clone(),
            source,
        })?;
        let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).map_err(|source| PeftError::Io {
            path: dir.join(WEIGHTS_FILE),
            source,
        })?;
        Self::from_parts(&text, &bytes, dir, base)
    }

    /// Builds an adapter from its config text and safetensors bytes; `origin` names it in errors.
    pub fn from_parts(
        config: &str,
        safetensors: &[u8],
        origin: &Path,
        base: &BaseShape,
    ) -> Result<Self, PeftError> {
        let config_path = origin.join(CONFIG_FILE);
        let weights_path = origin.join(WEIGHTS_FILE);
        let config: PeftConfig = serde_json::from_str(config).map_err(|e| PeftError::Config {
            path: config_path.clone(),
            message: e.to_string(),
        })?;
        let unsupported = |feature: &str| PeftError::Unsupported {
            path: config_path.clone(),
            feature: feature.to_string(),
        };
        if let Some(kind) = config.peft_type.as_deref().filter(|t| *t != "LORA") {
            return Err(unsupported(&format!("peft_type `{kind}` (only LORA)")));
        }
        if config.use_dora {
            return Err(unsupported("DoRA (`use_dora: true`)"));
        }
        if config.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(unsupported("`modules_to_save` (fully trained extra modules)"));
        }
        if config.fan_in_fan_out {
            return Err(unsupported("`fan_in_fan_out: true`"));
        }
        let config_error = |message: &str| PeftError::Config {
            path: config_path.clone(),
            message: message.to_string(),
        };
        if !rank_is_valid(config.r) || !config.rank_pattern.values().all(|&r| rank_is_valid(r)) {
            return Err(config_error(&format!("`r` and every `rank_pattern` value must be between 1 and {MAX_RANK}")));
        }
        if !alpha_is_valid(config.lora_alpha) || !config.alpha_pattern.values().all(|&a| alpha_is_valid(a)) {
            return Err(config_error(&format!(
                "`lora_alpha` and every `alpha_pattern` value must be finite, above 0 and at most {MAX_ALPHA}"
            )));
        }
        let names = match config.target_modules {
            Some(TargetModules::List(names)) => names,
            Some(TargetModules::One(name)) => vec![name],
            None => Vec::new(),
        };
        let mut target_modules = Vec::new();
        for name in &names {
            match TargetModule::from_peft_name(name) {
                Some(m) => target_modules.push(m),
                None if name.contains("embed") || name == "lm_head" => {
                    return Err(unsupported(&format!("LoRA on `{name}` (embedding/output LoRA)")))
                }
                None => {
                    return Err(unsupported(&format!(
                        "target module `{name}` (supported: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
                    )))
                }
            }
        }

        let tensors = SafeTensors::deserialize(safetensors).map_err(|e| PeftError::Weights {
            path: weights_path.clone(),
            message: e.to_string(),
        })?;
        let tensor_error = |tensor: &str, problem: String| PeftError::Tensor {
            path: weights_path.clone(),
            tensor: tensor.to_string(),
            problem,
        };
        // (layer, module) → (A, B), each with its name, shape and values.
        type Factor = (String, Vec<usize>, Vec<f32>);
        let mut pairs: BTreeMap<(usize, TargetModule), (Option<Factor>, Option<Factor>)> = BTreeMap::new();
        for (name, view) in tensors.tensors() {
            let (layer, module, is_b) = parse_tensor_name(&name).map_err(|p| tensor_error(&name, p))?;
            if layer >= base.n_layers {
                return Err(tensor_error(
                    &name,
                    format!("layer {layer} does not exist (the base has {} layers)", base.n_layers),
                ));
            }
            let values = to_f32(view.dtype(), view.data()).ok_or_else(|| {
                tensor_error(&name, format!("dtype {:?} is not supported (f32, f16 or bf16)", view.dtype()))
            })?;
            if !values.iter().all(|v| v.is_finite()) {
                return Err(tensor_error(&name, "holds a value that is not finite (NaN or infinity)".into()));
            }
            let entry = pairs.entry((layer, module)).or_default();
            let slot = if is_b { &mut entry.1 } else { &mut entry.0 };
            *slot = Some((name.clone(), view.shape().to_vec(), values));
        }

        let mut weights = LoraWeights::default();
        for ((layer, module), (a, b)) in pairs {
            let path = format!("model.layers.{layer}.{}", module_path(module));
            let (a_name, a_shape, a) = a.ok_or_else(|| tensor_error(&path, "has lora_B but no lora_A".into()))?;
            let (b_name, b_shape, b) = b.ok_or_else(|| tensor_error(&path, "has lora_A but no lora_B".into()))?;
            let (in_features, out_features) = base.features(module);
            let rank = pattern_value(&config.rank_pattern, &path).unwrap_or(config.r);
            let alpha = pattern_value(&config.alpha_pattern, &path).unwrap_or(config.lora_alpha);
            if a_shape != [rank, in_features] {
                return Err(tensor_error(
                    &a_name,
                    format!("has shape {a_shape:?}, expected [{rank}, {in_features}] (rank {rank}, the base's {module} input)"),
                ));
            }
            if b_shape != [out_features, rank] {
                return Err(tensor_error(
                    &b_name,
                    format!("has shape {b_shape:?}, expected [{out_features}, {rank}] (the base's {module} output, rank {rank})"),
                ));
            }
            let scale = if config.use_rslora {
                alpha / (rank as f32).sqrt()
            } else {
                alpha / rank as f32
            };
            let delta = LoraDelta::new(layer, module, (in_features, out_features, rank), scale, a, b)
                .map_err(|e| tensor_error(&a_name, e.to_string()))?;
            weights.insert(layer, module, delta);
        }
        if weights.is_empty() {
            return Err(PeftError::Weights {
                path: weights_path,
                message: "holds no LoRA tensors".into(),
            });
        }
        Ok(Self {
            weights,
            rank: config.r,
            alpha: config.lora_alpha,
            target_modules,
            base_model: config.base_model_name_or_path,
        })
    }
}

/// The module's path inside a decoder layer, as Hugging Face names it.
pub fn module_path(module: TargetModule) -> String {
    let block = match module {
        TargetModule::Q | TargetModule::K | TargetModule::V | TargetModule::O => "self_attn",
        TargetModule::Gate | TargetModule::Up | TargetModule::Down => "mlp",
    };
    format!("{block}.{}", module.peft_name())
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn base() -> BaseShape {
        BaseShape {
            architecture: "gemma3".into(),
            n_layers: 2,
            hidden: 8,
            q_width: 8,
            kv_width: 4,
            ffn: 16,
        }
    }

    /// Safetensors bytes holding f32 tensors.
    fn safetensors(tensors: &[(&str, Vec<usize>)]) -> Vec<u8> {
        let data: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
            .iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let bytes = (0..n).flat_map(|i| (i as f32 * 0.01).to_le_bytes()).collect();
                (name.to_string(), bytes, shape.clone())
            })
            .collect();
        let views: Vec<(String, TensorView)> = data
            .iter()
            .map(|(n, b, s)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize(views, None).unwrap()
    }

    fn q_pair(layer: usize, rank: usize) -> Vec<(String, Vec<usize>)> {
        let p = format!("base_model.model.model.layers.{layer}.self_attn.q_proj");
        vec![(format!("{p}.lora_A.weight"), vec![rank, 8]), (format!("{p}.lora_B.weight"), vec![8, rank])]
    }

    fn load(config: &str, tensors: Vec<(String, Vec<usize>)>) -> Result<PeftAdapter, PeftError> {
        let named: Vec<(&str, Vec<usize>)> = tensors.iter().map(|(n, s)| (n.as_str(), s.clone())).collect();
        PeftAdapter::from_parts(config, &safetensors(&named), Path::new("/adapters/test"), &base())
    }

    #[test]
    fn scales_by_alpha_over_r_with_patterns_and_rslora() {
        let cfg = r#"{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["q_proj"],
                     "rank_pattern":{"layers.1.self_attn.q_proj":4},"alpha_pattern":{"layers.1.self_attn.q_proj":2}}"#;
        let mut tensors = q_pair(0, 2);
        tensors.extend(q_pair(1, 4));
        let adapter = load(cfg, tensors).unwrap();
        assert_eq!(adapter.weights.get(0, TargetModule::Q).unwrap().scale, 2.0);
        assert_eq!(adapter.weights.get(1, TargetModule::Q).unwrap().scale, 0.5);
        let rs = r#"{"r":4,"lora_alpha":4,"use_rslora":true,"target_modules":"q_proj"}"#;
        assert_eq!(load(rs, q_pair(0, 4)).unwrap().weights.get(0, TargetModule::Q).unwrap().scale, 2.0);
    }

    #[test]
    fn unsupported_features_are_refused_by_name() {
        let cases = [
            (r#"{"r":2,"lora_alpha":4,"target_modules":["q_proj"],"use_dora":true}"#, "DoRA"),
            (r#"{"r":2,"lora_alpha":1e30,"target_modules":["q_proj"]}"#, "`lora_alpha` and every `alpha_pattern` value must be finite"),
            (r#"{"r":2,"lora_alpha":0,"target_modules":["q_proj"]}"#, "`lora_alpha` and every"),
            (r#"{"r":2,"lora_alpha":-1,"target_modules":["q_proj"]}"#, "`lora_alpha` and every"),
            (r#"{"r":2,"lora_alpha":4,"alpha_pattern":{"q_proj":2000},"target_modules":["q_proj"]}"#, "`lora_alpha` and every"),
            (r#"{"r":300,"lora_alpha":4,"target_modules":["q_proj"]}"#, "between 1 and 256"),
            (r#"{"r":0,"lora_alpha":4,"target_modules":["q_proj"]}"#, "between 1 and 256"),
            (r#"{"r":2,"lora_alpha":4,"target_modules":["q_proj"],"modules_to_save":["lm_head"]}"#, "modules_to_save"),
            (r#"{"r":2,"lora_alpha":4,"target_modules":["embed_tokens"]}"#, "embedding"),
            (r#"{"r":2,"lora_alpha":4,"target_modules":["q_proj"],"peft_type":"IA3"}"#, "IA3"),
        ];
        for (cfg, word) in cases {
            let err = load(cfg, q_pair(0, 2)).unwrap_err().to_string();
            assert!(err.contains(word) && err.contains("/adapters/test"), "{err}");
        }
        let embedding = vec![("base_model.model.model.embed_tokens.lora_embedding_A".to_string(), vec![2, 8])];
        let err = load(r#"{"r":2,"lora_alpha":4,"target_modules":["q_proj"]}"#, embedding).unwrap_err();
        assert!(err.to_string().contains("embedding LoRA"), "{err}");
    }

    #[test]
    fn f16_and_bf16_factors_are_widened_exactly() {
        let cfg = r#"{"r":1,"lora_alpha":1,"target_modules":["q_proj"]}"#;
        let values = [0.5f32, -1.25, 3.0, 0.125, -0.75, 2.0, 1.5, -4.0];
        let halves: Vec<u8> = values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
        let brains: Vec<u8> = values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
        let p = "base_model.model.model.layers.0.self_attn.q_proj";
        let views = vec![
            (format!("{p}.lora_A.weight"), TensorView::new(Dtype::F16, vec![1, 8], &halves).unwrap()),
            (format!("{p}.lora_B.weight"), TensorView::new(Dtype::BF16, vec![8, 1], &brains).unwrap()),
        ];
        let bytes = safetensors::serialize(views, None).unwrap();
        let adapter = PeftAdapter::from_parts(cfg, &bytes, Path::new("/a"), &base()).unwrap();
        let delta = adapter.weights.get(0, TargetModule::Q).unwrap();
        // x = e_0 picks A[0][0] = 0.5; y = 0.5·B[:, 0] = 0.5·values.
        let mut x = vec![0f32; 8];
        x[0] = 1.0;
        let mut y = vec![0f32; 8];
        delta.add_to(1.0, &x, &mut y);
        let expected: Vec<f32> = values.iter().map(|v| 0.5 * v).collect();
        assert_eq!(y, expected);
    }

    #[test]
    fn shape_and_layer_mismatches_name_the_tensor() {
        let cfg = r#"{"r":2,"lora_alpha":4,"target_modules":["q_proj"]}"#;
        let mut wrong = q_pair(0, 2);
        wrong[1].1 = vec![6, 2];
        let err = load(cfg, wrong).unwrap_err().to_string();
        assert!(err.contains("layers.0.self_attn.q_proj.lora_B.weight") && err.contains("expected [8, 2]"), "{err}");
        let err = load(cfg, q_pair(5, 2)).unwrap_err().to_string();
        assert!(err.contains("layer 5 does not exist"), "{err}");
        let err = load(cfg, q_pair(0, 2)[..1].to_vec()).unwrap_err().to_string();
        assert!(err.contains("no lora_B"), "{err}");
    }
}
