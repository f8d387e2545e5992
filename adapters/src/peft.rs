//! Hugging Face PEFT adapters: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! LoRA tensors are named `…layers.{i}.{self_attn|mlp}.{q,k,v,o,gate,up,down}_proj.lora_{A,B}.weight`,
//! A `[r, in]` and B `[out, r]`. A layer's delta is scaled by α/r, or α/√r with rsLoRA, where r and
//! α may be overridden per module by `rank_pattern` and `alpha_pattern`. DoRA (`use_dora: true`)
//! adds `….lora_magnitude_vector` `[out]` beside each pair. IA³ (`peft_type: "IA3"`) holds one
//! `….ia3_l` per module: `[out, 1]` on k and v, `[1, in]` on `down` (a `feedforward_modules` one).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::{AdapterKind, AdapterWeights, LoraDelta, ModuleDelta, TargetModule};

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

impl PeftError {
    /// What is wrong, naming the file by its name alone (never where it lies on the server).
    pub fn reason(&self) -> String {
        let file = |path: &Path| path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        match self {
            PeftError::Io { path, source } => format!("{}: {}", file(path), source.kind()),
            PeftError::Config { path, message } => format!("{}: invalid adapter config: {message}", file(path)),
            PeftError::Weights { path, message } => format!("{}: invalid safetensors file: {message}", file(path)),
            PeftError::Unsupported { path, feature } => format!("{}: unsupported: {feature}", file(path)),
            PeftError::Tensor { path, tensor, problem } => format!("{}: tensor `{tensor}`: {problem}", file(path)),
        }
    }
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

/// The frozen base model's weights, as DoRA needs them.
pub trait BaseWeights {
    /// `‖W + s·B·A‖` of each output row of (layer, module)'s weight, with `delta` at weight 1.
    fn row_norms(&self, layer: usize, module: TargetModule, delta: &LoraDelta) -> Result<Vec<f32>, String>;
}

/// The modules IA³ scales, and how: k's and v's outputs, `down`'s input.
pub const IA3_MODULES: [TargetModule; 3] = [TargetModule::K, TargetModule::V, TargetModule::Down];

/// Whether IA³ scales `module`'s input (else its output).
pub fn ia3_scales_input(module: TargetModule) -> bool {
    module == TargetModule::Down
}

/// `target_modules`: a list of names, or one string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TargetModules {
    List(Vec<String>),
    One(String),
}

impl TargetModules {
    fn names(this: Option<Self>) -> Vec<String> {
        match this {
            Some(TargetModules::List(names)) => names,
            Some(TargetModules::One(name)) => vec![name],
            None => Vec::new(),
        }
    }
}

/// What every PEFT config may say, whatever its type.
#[derive(Debug, Deserialize)]
struct CommonConfig {
    #[serde(default)]
    peft_type: Option<String>,
    target_modules: Option<TargetModules>,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
}

#[derive(Debug, Deserialize)]
struct LoraConfig {
    r: usize,
    lora_alpha: f32,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    rank_pattern: HashMap<String, usize>,
    #[serde(default)]
    alpha_pattern: HashMap<String, f32>,
    #[serde(default)]
    use_dora: bool,
}

#[derive(Debug, Deserialize)]
struct Ia3Config {
    #[serde(default)]
    feedforward_modules: Option<TargetModules>,
}

/// A loaded adapter: its deltas and what its config says.
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    pub weights: AdapterWeights,
    /// Default rank (`r`) and α; 0 for IA³, which has no low-rank factors.
    pub rank: usize,
    pub alpha: f32,
    pub target_modules: Vec<TargetModule>,
    pub base_model: Option<String>,
}

impl PeftAdapter {
    pub fn kind(&self) -> AdapterKind {
        self.weights.kind()
    }
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

/// What an adapter tensor holds for its (layer, module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole {
    LoraA,
    LoraB,
    /// DoRA's m, `[out]`.
    Magnitude,
    /// IA³'s l.
    Ia3Scale,
}

/// Which adapter tensor a name is: (layer, module, role).
pub fn parse_tensor_name(name: &str) -> Result<(usize, TargetModule, TensorRole), String> {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.iter().any(|p| p.starts_with("lora_embedding")) {
        return Err("embedding LoRA is not supported".into());
    }
    let layer = parts
        .iter()
        .position(|p| *p == "layers")
        .and_then(|i| parts.get(i + 1))
        .and_then(|p| p.parse::<usize>().ok())
        .ok_or("not a per-layer adapter tensor (expected `…layers.N.…`)")?;
    let module = parts
        .iter()
        .find_map(|p| TargetModule::from_peft_name(p))
        .ok_or("targets no supported linear layer (q/k/v/o/gate/up/down_proj)")?;
    let role = match parts.iter().find(|p| p.starts_with("lora_") || p.starts_with("ia3_")) {
        Some(&"lora_A") => TensorRole::LoraA,
        Some(&"lora_B") => TensorRole::LoraB,
        Some(&"lora_magnitude_vector") => TensorRole::Magnitude,
        Some(&"ia3_l") => TensorRole::Ia3Scale,
        _ => return Err("is none of `lora_A`, `lora_B`, `lora_magnitude_vector` or `ia3_l`".into()),
    };
    Ok((layer, module, role))
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

/// One tensor of the file: its name, shape and values.
type Loaded = (String, Vec<usize>, Vec<f32>);

/// A (layer, module)'s tensors, by role.
#[derive(Default)]
struct ModuleTensors {
    a: Option<Loaded>,
    b: Option<Loaded>,
    magnitude: Option<Loaded>,
    ia3: Option<Loaded>,
}

/// Where errors about one adapter point: its two files.
struct Origin {
    config: PathBuf,
    weights: PathBuf,
}

impl Origin {
    fn unsupported(&self, feature: &str) -> PeftError {
        PeftError::Unsupported { path: self.config.clone(), feature: feature.to_string() }
    }

    fn config_error(&self, message: &str) -> PeftError {
        PeftError::Config { path: self.config.clone(), message: message.to_string() }
    }

    fn tensor_error(&self, tensor: &str, problem: String) -> PeftError {
        PeftError::Tensor { path: self.weights.clone(), tensor: tensor.to_string(), problem }
    }

    fn weights_error(&self, message: &str) -> PeftError {
        PeftError::Weights { path: self.weights.clone(), message: message.to_string() }
    }
}

impl PeftAdapter {
    /// Loads the adapter in `dir` and checks it against `base`; a DoRA adapter measures its row
    /// norms against `weights`.
    pub fn load(dir: &Path, base: &BaseShape, weights: Option<&dyn BaseWeights>) -> Result<Self, PeftError> {
        let (config, bytes) = Self::read_files(dir)?;
        Self::from_parts(&config, &bytes, dir, base, weights)
    }

    /// Builds an adapter from its config text and safetensors bytes; `origin` names it in
    /// errors. A DoRA adapter needs the base's `weights` to measure its row norms.
    pub fn from_parts(
        config: &str,
        safetensors: &[u8],
        origin: &Path,
        base: &BaseShape,
        weights: Option<&dyn BaseWeights>,
    ) -> Result<Self, PeftError> {
        Self::build(config, safetensors, origin, base, DoraNorms::Measure(weights))
    }

    /// Checks the adapter in `dir` against `base` as [`Self::load`] does, without measuring
    /// DoRA's row norms (a pass over the dequantized base per module): for a scan that keeps
    /// the weights on disk until first use, which then measures them, once. Returns its kind.
    pub fn check(dir: &Path, base: &BaseShape) -> Result<AdapterKind, PeftError> {
        let (config, bytes) = Self::read_files(dir)?;
        Ok(Self::build(&config, &bytes, dir, base, DoraNorms::Unmeasured)?.kind())
    }

    /// The config text and the safetensors bytes in `dir`.
    fn read_files(dir: &Path) -> Result<(String, Vec<u8>), PeftError> {
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path).map_err(|source| PeftError::Io { path: config_path.clone(), source })?;
        let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).map_err(|source| PeftError::Io { path: dir.join(WEIGHTS_FILE), source })?;
        Ok((text, bytes))
    }

    fn build(config: &str, safetensors: &[u8], origin: &Path, base: &BaseShape, norms: DoraNorms) -> Result<Self, PeftError> {
        let origin = Origin { config: origin.join(CONFIG_FILE), weights: origin.join(WEIGHTS_FILE) };
        let common: CommonConfig = serde_json::from_str(config).map_err(|e| origin.config_error(&e.to_string()))?;
        if common.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(origin.unsupported("`modules_to_save` (fully trained extra modules)"));
        }
        if common.fan_in_fan_out {
            return Err(origin.unsupported("`fan_in_fan_out: true`"));
        }
        let names = TargetModules::names(common.target_modules);
        let target_modules = names.iter().map(|name| target_module(&origin, name)).collect::<Result<Vec<_>, _>>()?;
        let (weights, rank, alpha) = match common.peft_type.as_deref().unwrap_or("LORA") {
            "LORA" => {
                let config: LoraConfig = serde_json::from_str(config).map_err(|e| origin.config_error(&e.to_string()))?;
                check_lora_config(&origin, &config)?;
                let tensors = read_tensors(&origin, safetensors, base)?;
                let weights = lora_weights(&origin, &config, tensors, base, norms)?;
                (weights, config.r, config.lora_alpha)
            }
            "IA3" => {
                let config: Ia3Config = serde_json::from_str(config).map_err(|e| origin.config_error(&e.to_string()))?;
                let feedforward = TargetModules::names(config.feedforward_modules);
                let tensors = read_tensors(&origin, safetensors, base)?;
                (ia3_weights(&origin, &feedforward, tensors, base)?, 0, 0.0)
            }
            other => return Err(origin.unsupported(&format!("peft_type `{other}` (LORA, with or without DoRA, or IA3)"))),
        };
        if weights.is_empty() {
            return Err(origin.weights_error("holds no adapter tensors"));
        }
        Ok(Self { weights, rank, alpha, target_modules, base_model: common.base_model_name_or_path })
    }
}

/// The kind of adapter a PEFT config describes, when it parses.
pub fn config_kind(config: &str) -> Option<AdapterKind> {
    #[derive(Deserialize)]
    struct Kind {
        #[serde(default)]
        peft_type: Option<String>,
        #[serde(default)]
        use_dora: bool,
    }
    let kind: Kind = serde_json::from_str(config).ok()?;
    match (kind.peft_type.as_deref().unwrap_or("LORA"), kind.use_dora) {
        ("LORA", false) => Some(AdapterKind::Lora),
        ("LORA", true) => Some(AdapterKind::Dora),
        ("IA3", _) => Some(AdapterKind::Ia3),
        _ => None,
    }
}

fn target_module(origin: &Origin, name: &str) -> Result<TargetModule, PeftError> {
    match TargetModule::from_peft_name(name) {
        Some(m) => Ok(m),
        None if name.contains("embed") || name == "lm_head" => Err(origin.unsupported(&format!("`{name}` as a target (embedding/output adapters)"))),
        None => Err(origin.unsupported(&format!(
            "target module `{name}` (supported: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
        ))),
    }
}

/// Every tensor of the file, widened to f32, checked to be finite and on an existing layer.
fn read_tensors(origin: &Origin, safetensors: &[u8], base: &BaseShape) -> Result<BTreeMap<(usize, TargetModule), ModuleTensors>, PeftError> {
    let tensors = SafeTensors::deserialize(safetensors).map_err(|e| origin.weights_error(&e.to_string()))?;
    let mut modules: BTreeMap<(usize, TargetModule), ModuleTensors> = BTreeMap::new();
    for (name, view) in tensors.tensors() {
        let (layer, module, role) = parse_tensor_name(&name).map_err(|p| origin.tensor_error(&name, p))?;
        if layer >= base.n_layers {
            return Err(origin.tensor_error(&name, format!("layer {layer} does not exist (the base has {} layers)", base.n_layers)));
        }
        let values = to_f32(view.dtype(), view.data())
            .ok_or_else(|| origin.tensor_error(&name, format!("dtype {:?} is not supported (f32, f16 or bf16)", view.dtype())))?;
        if !values.iter().all(|v| v.is_finite()) {
            return Err(origin.tensor_error(&name, "holds a value that is not finite (NaN or infinity)".into()));
        }
        let entry = modules.entry((layer, module)).or_default();
        let slot = match role {
            TensorRole::LoraA => &mut entry.a,
            TensorRole::LoraB => &mut entry.b,
            TensorRole::Magnitude => &mut entry.magnitude,
            TensorRole::Ia3Scale => &mut entry.ia3,
        };
        *slot = Some((name.clone(), view.shape().to_vec(), values));
    }
    Ok(modules)
}

/// A LORA config's ranks and αs, checked before any tensor is read.
fn check_lora_config(origin: &Origin, config: &LoraConfig) -> Result<(), PeftError> {
    if !rank_is_valid(config.r) || !config.rank_pattern.values().all(|&r| rank_is_valid(r)) {
        return Err(origin.config_error(&format!("`r` and every `rank_pattern` value must be between 1 and {MAX_RANK}")));
    }
    if !alpha_is_valid(config.lora_alpha) || !config.alpha_pattern.values().all(|&a| alpha_is_valid(a)) {
        return Err(origin.config_error(&format!(
            "`lora_alpha` and every `alpha_pattern` value must be finite, above 0 and at most {MAX_ALPHA}"
        )));
    }
    Ok(())
}

/// What a load does about DoRA's row norms.
#[derive(Clone, Copy)]
enum DoraNorms<'a> {
    /// Measures them against the base's weights; without weights, DoRA is refused.
    Measure(Option<&'a dyn BaseWeights>),
    /// Leaves them out: every other check runs, and DoRA modules keep only their low-rank
    /// pair, so such weights serve nothing (see [`PeftAdapter::check`]).
    Unmeasured,
}

/// The LoRA (or, with `use_dora`, DoRA) deltas of a LORA config.
fn lora_weights(
    origin: &Origin,
    config: &LoraConfig,
    tensors: BTreeMap<(usize, TargetModule), ModuleTensors>,
    base: &BaseShape,
    norms: DoraNorms,
) -> Result<AdapterWeights, PeftError> {
    let kind = if config.use_dora { AdapterKind::Dora } else { AdapterKind::Lora };
    let mut weights = AdapterWeights::new(kind);
    for ((layer, module), found) in tensors {
        let path = format!("model.layers.{layer}.{}", module_path(module));
        if let Some((name, _, _)) = &found.ia3 {
            return Err(origin.tensor_error(name, "is an IA³ vector, in a LORA adapter".into()));
        }
        let (a_name, a_shape, a) = found.a.ok_or_else(|| origin.tensor_error(&path, "has lora_B but no lora_A".into()))?;
        let (b_name, b_shape, b) = found.b.ok_or_else(|| origin.tensor_error(&path, "has lora_A but no lora_B".into()))?;
        let (in_features, out_features) = base.features(module);
        let rank = pattern_value(&config.rank_pattern, &path).unwrap_or(config.r);
        let alpha = pattern_value(&config.alpha_pattern, &path).unwrap_or(config.lora_alpha);
        if a_shape != [rank, in_features] {
            return Err(origin.tensor_error(
                &a_name,
                format!("has shape {a_shape:?}, expected [{rank}, {in_features}] (rank {rank}, the base's {module} input)"),
            ));
        }
        if b_shape != [out_features, rank] {
            return Err(origin.tensor_error(
                &b_name,
                format!("has shape {b_shape:?}, expected [{out_features}, {rank}] (the base's {module} output, rank {rank})"),
            ));
        }
        let scale = if config.use_rslora { alpha / (rank as f32).sqrt() } else { alpha / rank as f32 };
        let shape = (in_features, out_features, rank);
        let delta = LoraDelta::new(layer, module, shape, scale, a.clone(), b.clone()).map_err(|e| origin.tensor_error(&a_name, e.to_string()))?;
        let delta = match (config.use_dora, found.magnitude) {
            (false, None) => ModuleDelta::LowRank(delta),
            (false, Some((name, _, _))) => {
                return Err(origin.tensor_error(&name, "is a DoRA magnitude vector, but the config does not say `use_dora: true`".into()))
            }
            (true, None) => return Err(origin.tensor_error(&path, "has no lora_magnitude_vector (DoRA needs one per module)".into())),
            (true, Some((m_name, m_shape, magnitude))) => {
                if m_shape != [out_features] {
                    return Err(origin.tensor_error(
                        &m_name,
                        format!("has shape {m_shape:?}, expected [{out_features}] (one magnitude per output of the base's {module})"),
                    ));
                }
                let base_weights = match norms {
                    DoraNorms::Measure(weights) => weights.ok_or_else(|| origin.unsupported("DoRA without the base model's weights to measure it against"))?,
                    DoraNorms::Unmeasured => {
                        weights.insert_delta(layer, module, ModuleDelta::LowRank(delta));
                        continue;
                    }
                };
                let norms = base_weights.row_norms(layer, module, &delta).map_err(|e| origin.tensor_error(&m_name, e))?;
                let row_scale = dora_row_scale(&magnitude, &norms).map_err(|e| origin.tensor_error(&m_name, e))?;
                // g ⊙ B, so that the low-rank term comes out already scaled by g.
                let scaled_b: Vec<f32> = b.chunks_exact(rank).zip(&row_scale).flat_map(|(row, g)| row.iter().map(move |v| v * g)).collect();
                let low_rank = LoraDelta::new(layer, module, shape, scale, a, scaled_b).map_err(|e| origin.tensor_error(&b_name, e.to_string()))?;
                ModuleDelta::Dora { low_rank, row_scale }
            }
        };
        weights.insert_delta(layer, module, delta);
    }
    Ok(weights)
}

/// `g = m / ‖W + s·B·A‖` per output row.
pub fn dora_row_scale(magnitude: &[f32], norms: &[f32]) -> Result<Vec<f32>, String> {
    if let Some(o) = norms.iter().position(|n| !(*n > 0.0 && n.is_finite())) {
        return Err(format!("output row {o} of the adapted weight has norm {}: DoRA cannot rescale it", norms[o]));
    }
    Ok(magnitude.iter().zip(norms).map(|(m, n)| m / n).collect())
}

/// The scales of an IA3 config: outputs of k and v, the input of `down` (which must be one of
/// its `feedforward_modules`).
fn ia3_weights(
    origin: &Origin,
    feedforward: &[String],
    tensors: BTreeMap<(usize, TargetModule), ModuleTensors>,
    base: &BaseShape,
) -> Result<AdapterWeights, PeftError> {
    for name in feedforward {
        if TargetModule::from_peft_name(name).is_some_and(|m| !ia3_scales_input(m)) {
            return Err(origin.unsupported(&format!("IA³ on the input of `{name}` (Tessera scales k_proj's and v_proj's outputs and down_proj's input)")));
        }
    }
    let mut weights = AdapterWeights::new(AdapterKind::Ia3);
    for ((layer, module), found) in tensors {
        let path = format!("model.layers.{layer}.{}", module_path(module));
        if let Some((name, _, _)) = found.a.or(found.b).or(found.magnitude) {
            return Err(origin.tensor_error(&name, "is a LoRA tensor, in an IA3 adapter".into()));
        }
        let (name, shape, l) = found.ia3.ok_or_else(|| origin.tensor_error(&path, "has no ia3_l".into()))?;
        if !IA3_MODULES.contains(&module) {
            return Err(origin.tensor_error(&name, format!("scales {module}, which IA³ does not scale here (k_proj, v_proj and down_proj)")));
        }
        let (in_features, out_features) = base.features(module);
        let input = ia3_scales_input(module);
        if input && !feedforward.iter().any(|f| f == module.peft_name()) {
            return Err(origin.unsupported(&format!("IA³ on the output of `{module}` (list it in `feedforward_modules`: its input is scaled)")));
        }
        let expected = if input { vec![1, in_features] } else { vec![out_features, 1] };
        if shape != expected {
            return Err(origin.tensor_error(&name, format!("has shape {shape:?}, expected {expected:?} (one scale per {} of the base's {module})", if input { "input" } else { "output" })));
        }
        weights.insert_delta(layer, module, if input { ModuleDelta::ScaleInput(l) } else { ModuleDelta::ScaleOutput(l) });
    }
    Ok(weights)
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
        PeftAdapter::from_parts(config, &safetensors(&named), Path::new("/adapters/test"), &base(), Some(&ConstantBase))
    }

    /// A base whose every weight is 0.5: a row of `in` features has norm 0.5·√in.
    struct ConstantBase;

    impl BaseWeights for ConstantBase {
        fn row_norms(&self, _layer: usize, _module: TargetModule, delta: &LoraDelta) -> Result<Vec<f32>, String> {
            Ok((0..delta.out_features)
                .map(|o| {
                    let mut row = vec![0.5; delta.in_features];
                    delta.add_row_of_product(o, &mut row);
                    row.iter().map(|v| v * v).sum::<f32>().sqrt()
                })
                .collect())
        }
    }

    fn ia3(layer: usize, module: &str, shape: Vec<usize>) -> (String, Vec<usize>) {
        let block = if module == "down_proj" { "mlp" } else { "self_attn" };
        (format!("base_model.model.model.layers.{layer}.{block}.{module}.ia3_l"), shape)
    }

    fn magnitude(layer: usize, len: usize) -> (String, Vec<usize>) {
        (format!("base_model.model.model.layers.{layer}.self_attn.q_proj.lora_magnitude_vector"), vec![len])
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
            (r#"{"r":2,"lora_alpha":1e30,"target_modules":["q_proj"]}"#, "`lora_alpha` and every `alpha_pattern` value must be finite"),
            (r#"{"r":2,"lora_alpha":0,"target_modules":["q_proj"]}"#, "`lora_alpha` and every"),
            (r#"{"r":2,"lora_alpha":-1,"target_modules":["q_proj"]}"#, "`lora_alpha` and every"),
            (r#"{"r":2,"lora_alpha":4,"alpha_pattern":{"q_proj":2000},"target_modules":["q_proj"]}"#, "`lora_alpha` and every"),
            (r#"{"r":300,"lora_alpha":4,"target_modules":["q_proj"]}"#, "between 1 and 256"),
            (r#"{"r":0,"lora_alpha":4,"target_modules":["q_proj"]}"#, "between 1 and 256"),
            (r#"{"r":2,"lora_alpha":4,"target_modules":["q_proj"],"modules_to_save":["lm_head"]}"#, "modules_to_save"),
            (r#"{"r":2,"lora_alpha":4,"target_modules":["embed_tokens"]}"#, "embedding"),
            (r#"{"r":2,"lora_alpha":4,"target_modules":["q_proj"],"peft_type":"PREFIX_TUNING"}"#, "PREFIX_TUNING"),
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
        let adapter = PeftAdapter::from_parts(cfg, &bytes, Path::new("/a"), &base(), None).unwrap();
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

    #[test]
    fn dora_measures_its_row_scale_against_the_base() {
        let cfg = r#"{"r":2,"lora_alpha":4,"target_modules":["q_proj"],"use_dora":true}"#;
        let mut tensors = q_pair(0, 2);
        tensors.push(magnitude(0, 8));
        let adapter = load(cfg, tensors).unwrap();
        assert_eq!(adapter.kind(), AdapterKind::Dora);
        let Some(ModuleDelta::Dora { row_scale, .. }) = adapter.weights.delta(0, TargetModule::Q) else { panic!("not DoRA") };
        // m[o] = 0.01·o (the helper's values), over ‖0.5 + s·(B·A)[o, :]‖ with s = 2.
        let a: Vec<f32> = (0..16).map(|i| half::f16::from_f32(i as f32 * 0.01).to_f32()).collect();
        let b: Vec<f32> = (0..16).map(|i| half::f16::from_f32(i as f32 * 0.01).to_f32()).collect();
        for (o, g) in row_scale.iter().enumerate() {
            let norm = (0..8).map(|i| 0.5 + 2.0 * (b[o * 2] * a[i] + b[o * 2 + 1] * a[8 + i])).map(|v| v * v).sum::<f32>().sqrt();
            assert!((g - 0.01 * o as f32 / norm).abs() < 1e-6, "row {o}: {g} against {}", 0.01 * o as f32 / norm);
        }
    }

    #[test]
    fn dora_mistakes_name_the_tensor() {
        let cfg = r#"{"r":2,"lora_alpha":4,"target_modules":["q_proj"],"use_dora":true}"#;
        let mut wrong_length = q_pair(0, 2);
        wrong_length.push(magnitude(0, 6));
        let err = load(cfg, wrong_length).unwrap_err().to_string();
        assert!(err.contains("q_proj.lora_magnitude_vector") && err.contains("expected [8]"), "{err}");
        let err = load(cfg, q_pair(0, 2)).unwrap_err().to_string();
        assert!(err.contains("no lora_magnitude_vector"), "{err}");
        let mut undeclared = q_pair(0, 2);
        undeclared.push(magnitude(0, 8));
        let err = load(r#"{"r":2,"lora_alpha":4,"target_modules":["q_proj"]}"#, undeclared).unwrap_err().to_string();
        assert!(err.contains("lora_magnitude_vector") && err.contains("use_dora"), "{err}");
    }

    #[test]
    fn ia3_scales_k_and_v_outputs_and_the_down_input() {
        let cfg = r#"{"peft_type":"IA3","target_modules":["k_proj","v_proj","down_proj"],"feedforward_modules":["down_proj"]}"#;
        let tensors = vec![ia3(0, "k_proj", vec![4, 1]), ia3(0, "v_proj", vec![4, 1]), ia3(1, "down_proj", vec![1, 16])];
        let adapter = load(cfg, tensors).unwrap();
        assert_eq!(adapter.kind(), AdapterKind::Ia3);
        assert!(matches!(adapter.weights.delta(0, TargetModule::K), Some(ModuleDelta::ScaleOutput(l)) if l.len() == 4));
        assert!(matches!(adapter.weights.delta(1, TargetModule::Down), Some(ModuleDelta::ScaleInput(l)) if l.len() == 16));
        assert_eq!(adapter.weights.size_in_bytes(), (4 + 4 + 16) * 4);
    }

    #[test]
    fn ia3_mistakes_name_the_tensor_or_the_setting() {
        let cfg = r#"{"peft_type":"IA3","target_modules":["q_proj","k_proj","down_proj"],"feedforward_modules":["down_proj"]}"#;
        let err = load(cfg, vec![ia3(0, "q_proj", vec![8, 1])]).unwrap_err().to_string();
        assert!(err.contains("layers.0.self_attn.q_proj.ia3_l") && err.contains("does not scale"), "{err}");
        let err = load(cfg, vec![ia3(0, "k_proj", vec![8, 1])]).unwrap_err().to_string();
        assert!(err.contains("k_proj.ia3_l") && err.contains("expected [4, 1]"), "{err}");
        let no_feedforward = r#"{"peft_type":"IA3","target_modules":["down_proj"]}"#;
        let err = load(no_feedforward, vec![ia3(0, "down_proj", vec![1, 16])]).unwrap_err().to_string();
        assert!(err.contains("feedforward_modules"), "{err}");
        let k_as_input = r#"{"peft_type":"IA3","target_modules":["k_proj"],"feedforward_modules":["k_proj"]}"#;
        assert!(load(k_as_input, vec![ia3(0, "k_proj", vec![1, 8])]).unwrap_err().to_string().contains("input of `k_proj`"));
    }

    #[test]
    fn a_value_that_is_not_finite_is_refused_by_tensor_name() {
        let name = "base_model.model.model.layers.0.self_attn.v_proj.ia3_l";
        let bytes: Vec<u8> = [1.0f32, f32::NAN, 1.0, 1.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let views = vec![(name.to_string(), TensorView::new(Dtype::F32, vec![4, 1], &bytes).unwrap())];
        let st = safetensors::serialize(views, None).unwrap();
        let cfg = r#"{"peft_type":"IA3","target_modules":["v_proj"],"feedforward_modules":[]}"#;
        let err = PeftAdapter::from_parts(cfg, &st, Path::new("/adapters/x"), &base(), None).unwrap_err();
        assert!(err.to_string().contains(name) && err.to_string().contains("not finite"), "{err}");
        assert!(!err.reason().contains("/adapters"), "{}", err.reason());
    }
}
