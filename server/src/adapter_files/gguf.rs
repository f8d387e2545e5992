//! llama.cpp's GGUF-LoRA files. Metadata: `general.type = adapter`, `general.architecture` (the
//! base model's), `adapter.type = lora`, `adapter.lora.alpha`. Tensors, per layer and module:
//! `blk.N.<module>.weight.lora_a`, ggml `ne = [in, r]`, i.e. row-major `[r, in]` like PEFT's A,
//! and `.lora_b`, row-major `[out, r]` like PEFT's B; f32, f16 or bf16. llama.cpp scales each
//! pair by α/r with r that pair's own rank, or by 1 when α is 0.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use tessera_adapters::peft::{alpha_is_valid, rank_is_valid, BaseShape, PeftAdapter, MAX_ALPHA, MAX_RANK};
use tessera_adapters::{AdapterKind, AdapterWeights, LoraDelta, TargetModule};

use super::{AdapterFactors, Factor, FactorPair, FloatType};
use crate::gguf::writer::GgufWriter;
use crate::gguf::{dtype_name, GgufError, GgufFile, Value};

const ALPHA_KEY: &str = "adapter.lora.alpha";

#[derive(Debug, thiserror::Error)]
pub enum GgufLoraError {
    #[error(transparent)]
    File(#[from] GgufError),
    #[error("{path}: not a GGUF-LoRA adapter: {reason}")]
    NotLora { path: PathBuf, reason: String },
    #[error("{path}: made for a `{found}` model, but the base model is `{expected}`")]
    Architecture { path: PathBuf, found: String, expected: String },
    #[error("{path}: tensor `{tensor}`: {problem}")]
    Tensor { path: PathBuf, tensor: String, problem: String },
}

impl GgufLoraError {
    /// What is wrong, naming the file by its name alone (never where it lies on the server).
    pub fn reason(&self) -> String {
        let file = |path: &Path| path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        match self {
            GgufLoraError::File(_) => "not a readable GGUF file".into(),
            GgufLoraError::NotLora { path, reason } => format!("{}: not a GGUF-LoRA adapter: {reason}", file(path)),
            GgufLoraError::Architecture { path, found, expected } => format!("{}: made for a `{found}` model, but the base model is `{expected}`", file(path)),
            GgufLoraError::Tensor { path, tensor, problem } => format!("{}: tensor `{tensor}`: {problem}", file(path)),
        }
    }
}

/// `blk.N.<module>.weight.lora_{a,b}` as (layer, module, is_b).
fn parse_name(name: &str) -> Option<(usize, TargetModule, bool)> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, factor) = rest.split_once(".weight.lora_")?;
    let module = TargetModule::ALL.into_iter().find(|m| m.gguf_name() == module)?;
    let is_b = match factor {
        "a" => false,
        "b" => true,
        _ => return None,
    };
    Some((layer.parse().ok()?, module, is_b))
}

fn float_type(dtype: GgmlDType) -> Option<FloatType> {
    match dtype {
        GgmlDType::F32 => Some(FloatType::F32),
        GgmlDType::F16 => Some(FloatType::F16),
        GgmlDType::BF16 => Some(FloatType::BF16),
        _ => None,
    }
}

fn ggml_type(dtype: FloatType) -> GgmlDType {
    match dtype {
        FloatType::F32 => GgmlDType::F32,
        FloatType::F16 => GgmlDType::F16,
        FloatType::BF16 => GgmlDType::BF16,
    }
}

/// The file's α; 0 (llama.cpp's "scale by 1") when it has none.
fn alpha(file: &GgufFile, path: &Path) -> Result<f32, GgufLoraError> {
    let not_lora = |reason: String| GgufLoraError::NotLora { path: path.to_path_buf(), reason };
    let general_type = file.metadata.get("general.type").and_then(Value::as_str);
    if general_type != Some("adapter") {
        return Err(not_lora(format!("`general.type` is {general_type:?}, not \"adapter\"")));
    }
    let adapter_type = file.metadata.get("adapter.type").and_then(Value::as_str);
    if adapter_type != Some("lora") {
        return Err(not_lora(format!("`adapter.type` is {adapter_type:?}, not \"lora\"")));
    }
    let alpha = file.metadata.get(ALPHA_KEY).map_or(Some(0.0), Value::as_f64).unwrap_or(f64::NAN) as f32;
    if alpha != 0.0 && !alpha_is_valid(alpha) {
        return Err(not_lora(format!("`{ALPHA_KEY}` is {alpha}; it must be 0 or finite, above 0 and at most {MAX_ALPHA}")));
    }
    Ok(alpha)
}

/// The factors of the GGUF-LoRA file at `path`, checked against `base`: its architecture, layer
/// count and every factor's shape.
pub fn read(path: &Path, base: &BaseShape) -> Result<AdapterFactors, GgufLoraError> {
    let file = GgufFile::open(path)?;
    let alpha = alpha(&file, path)?;
    let architecture = file.metadata.get("general.architecture").and_then(Value::as_str).unwrap_or_default();
    if architecture != base.architecture {
        return Err(GgufLoraError::Architecture { path: path.to_path_buf(), found: architecture.to_string(), expected: base.architecture.clone() });
    }
    let problem = |tensor: &str, problem: String| GgufLoraError::Tensor { path: path.to_path_buf(), tensor: tensor.to_string(), problem };
    let mut halves: BTreeMap<(usize, TargetModule), (Option<Factor>, Option<Factor>)> = BTreeMap::new();
    for (name, info) in &file.tensors {
        let (layer, module, is_b) = parse_name(name).ok_or_else(|| {
            problem(name, "not a LoRA factor of a supported layer (blk.N.{attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down}.weight.lora_{a,b})".into())
        })?;
        if layer >= base.n_layers {
            return Err(problem(name, format!("layer {layer} does not exist (the base has {} layers)", base.n_layers)));
        }
        let dtype = float_type(info.dtype).ok_or_else(|| problem(name, format!("type {} is not supported (f32, f16 or bf16)", dtype_name(info.dtype))))?;
        let factor = Factor { dtype, dims: info.dims.clone(), bytes: file.tensor_bytes(info).to_vec() };
        let entry = halves.entry((layer, module)).or_default();
        *(if is_b { &mut entry.1 } else { &mut entry.0 }) = Some(factor);
    }
    let mut pairs = Vec::with_capacity(halves.len());
    for ((layer, module), (a, b)) in halves {
        let name = format!("blk.{layer}.{}.weight", module.gguf_name());
        let (a, b) = match (a, b) {
            (Some(a), Some(b)) => (a, b),
            _ => return Err(problem(&name, "needs both lora_a and lora_b".into())),
        };
        let (in_features, out_features) = base.features(module);
        let rank = a.dims.first().copied().unwrap_or(0);
        if !rank_is_valid(rank) {
            return Err(problem(&format!("{name}.lora_a"), format!("rank {rank} is not between 1 and {MAX_RANK}")));
        }
        if a.dims != [rank, in_features] {
            return Err(problem(&format!("{name}.lora_a"), format!("has shape {:?}, expected [{rank}, {in_features}] (rank, the base's {module} input)", a.dims)));
        }
        if b.dims != [out_features, rank] {
            return Err(problem(&format!("{name}.lora_b"), format!("has shape {:?}, expected [{out_features}, {rank}] (the base's {module} output, rank)", b.dims)));
        }
        let scale = if alpha == 0.0 { 1.0 } else { alpha / rank as f32 };
        pairs.push(FactorPair { layer, module, a, b, scale });
    }
    if pairs.is_empty() {
        return Err(GgufLoraError::NotLora { path: path.to_path_buf(), reason: "it holds no LoRA tensors".into() });
    }
    Ok(AdapterFactors { pairs })
}

/// The GGUF-LoRA file at `path` as deltas the server applies.
pub fn load(path: &Path, base: &BaseShape) -> Result<PeftAdapter, GgufLoraError> {
    let factors = read(path, base)?;
    let mut weights = AdapterWeights::new(AdapterKind::Lora);
    for pair in &factors.pairs {
        let (in_features, out_features) = base.features(pair.module);
        let name = format!("blk.{}.{}.weight", pair.layer, pair.module.gguf_name());
        let delta = LoraDelta::new(pair.layer, pair.module, (in_features, out_features, pair.rank()), pair.scale, pair.a.values(), pair.b.values())
            .map_err(|e| GgufLoraError::Tensor { path: path.to_path_buf(), tensor: name, problem: e.to_string() })?;
        weights.insert(pair.layer, pair.module, delta);
    }
    let (rank, alpha) = factors.pairs.first().map_or((0, 0.0), |p| (p.rank(), p.scale * p.rank() as f32));
    let mut target_modules: Vec<TargetModule> = factors.pairs.iter().map(|p| p.module).collect();
    target_modules.sort();
    target_modules.dedup();
    Ok(PeftAdapter { weights, rank, alpha, target_modules, base_model: None })
}

/// `factors` as a GGUF-LoRA file for an `architecture` base. The file has one α, the first
/// pair's; a pair whose scale α/r does not give back carries the difference in B.
pub fn write(factors: &AdapterFactors, architecture: &str) -> Vec<u8> {
    let alpha = factors.pairs.first().map_or(0.0, |p| p.scale * p.rank() as f32);
    let alpha = if alpha_is_valid(alpha) { alpha } else { 0.0 };
    let mut writer = GgufWriter::default();
    writer
        .metadata("general.architecture", Value::String(architecture.to_string()))
        .metadata("general.type", Value::String("adapter".into()))
        .metadata("adapter.type", Value::String("lora".into()))
        .metadata(ALPHA_KEY, Value::F32(alpha));
    for pair in &factors.pairs {
        let pair = pair.with_scale(if alpha == 0.0 { 1.0 } else { alpha / pair.rank() as f32 });
        let name = format!("blk.{}.{}.weight", pair.layer, pair.module.gguf_name());
        for (suffix, factor) in [("lora_a", &pair.a), ("lora_b", &pair.b)] {
            writer.tensor(&format!("{name}.{suffix}"), ggml_type(factor.dtype), &factor.dims, factor.bytes.clone());
        }
    }
    writer.to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> BaseShape {
        BaseShape { architecture: "llama".into(), n_layers: 2, hidden: 8, q_width: 8, kv_width: 4, ffn: 16 }
    }

    fn f32_bytes(n: usize) -> Vec<u8> {
        (0..n).flat_map(|i| (i as f32 * 0.01).to_le_bytes()).collect()
    }

    /// A rank-2 adapter on layer 1's q projection, changed by `edit` before it is written.
    fn file(edit: impl FnOnce(&mut GgufWriter)) -> (tempfile::TempDir, PathBuf) {
        let mut w = GgufWriter::default();
        w.metadata("general.architecture", Value::String("llama".into()))
            .metadata("general.type", Value::String("adapter".into()))
            .metadata("adapter.type", Value::String("lora".into()))
            .metadata(ALPHA_KEY, Value::F32(4.0))
            .tensor("blk.1.attn_q.weight.lora_a", GgmlDType::F32, &[2, 8], f32_bytes(16))
            .tensor("blk.1.attn_q.weight.lora_b", GgmlDType::F32, &[8, 2], f32_bytes(16));
        edit(&mut w);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.gguf");
        w.write(&path).unwrap();
        (dir, path)
    }

    fn refusal(edit: impl FnOnce(&mut GgufWriter)) -> String {
        let (_dir, path) = file(edit);
        load(&path, &base()).map(|_| ()).unwrap_err().to_string()
    }

    #[test]
    fn a_gguf_lora_file_loads_with_llama_cpps_scale() {
        let (_dir, path) = file(|_| {});
        let adapter = load(&path, &base()).unwrap();
        assert_eq!((adapter.rank, adapter.alpha), (2, 4.0));
        assert_eq!(adapter.weights.get(1, TargetModule::Q).unwrap().scale, 2.0, "α/r");
        let (_dir, path) = file(|w| {
            w.metadata(ALPHA_KEY, Value::F32(0.0));
        });
        assert_eq!(load(&path, &base()).unwrap().weights.get(1, TargetModule::Q).unwrap().scale, 1.0, "α = 0 scales by 1");
    }

    #[test]
    fn files_that_do_not_fit_the_base_are_refused_with_the_reason() {
        let cases: Vec<(Box<dyn FnOnce(&mut GgufWriter)>, &str)> = vec![
            (Box::new(|w| { w.metadata("general.type", Value::String("model".into())); }), "not a GGUF-LoRA adapter"),
            (Box::new(|w| { w.metadata("general.architecture", Value::String("qwen3".into())); }), "made for a `qwen3` model, but the base model is `llama`"),
            (Box::new(|w| { w.metadata(ALPHA_KEY, Value::F32(f32::NAN)); }), "adapter.lora.alpha"),
            (Box::new(|w| { w.tensor("blk.2.attn_q.weight.lora_a", GgmlDType::F32, &[2, 8], f32_bytes(16)); }), "layer 2 does not exist"),
            (Box::new(|w| { w.tensor("blk.1.attn_q.weight.lora_b", GgmlDType::F32, &[4, 2], f32_bytes(8)); }), "expected [8, 2]"),
            (Box::new(|w| { w.tensor("blk.1.attn_k.weight.lora_a", GgmlDType::F32, &[2, 8], f32_bytes(16)); }), "needs both lora_a and lora_b"),
            (Box::new(|w| { w.tensor("token_embd.weight.lora_a", GgmlDType::F32, &[2, 8], f32_bytes(16)); }), "not a LoRA factor of a supported layer"),
            (Box::new(|w| { w.tensor("blk.0.attn_v.weight.lora_a", GgmlDType::Q8_0, &[2, 32], vec![0; 68]); }), "is not supported (f32, f16 or bf16)"),
        ];
        for (edit, reason) in cases {
            let message = refusal(edit);
            assert!(message.contains(reason), "{message:?} lacks {reason:?}");
        }
    }
}
