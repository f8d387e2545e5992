//! What a GGUF file's metadata says about its decoder, for every family the one decoder runs:
//! `gemma3`, `llama` (Llama 2/3.x, Mistral, TinyLlama), `qwen2` (Qwen 2 and 2.5) and `qwen3`.
//!
//! Everything that a `{arch}.*` key or a tensor's presence can say is read from there; the
//! architecture name decides only what no key records (Gemma's √hidden embedding scale, its
//! GELU, its local/global layer pattern, and the RoPE style llama.cpp hard-codes per family).

use std::sync::Arc;

use crate::gguf::{GgufError, GgufFile};
use crate::model::linear::load_vector;
use crate::model::ModelError;

/// The architectures the decoder runs.
pub const SUPPORTED: &str = "gemma3, llama, qwen2, qwen3";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Gemma3,
    Llama,
    Qwen2,
    Qwen3,
}

impl Family {
    fn from_architecture(arch: &str) -> Option<Self> {
        Some(match arch {
            "gemma3" => Family::Gemma3,
            "llama" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            _ => return None,
        })
    }

    pub fn architecture(self) -> &'static str {
        match self {
            Family::Gemma3 => "gemma3",
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }
}

/// How RoPE pairs a head's dimensions, as llama.cpp applies it per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Dimensions (2i, 2i+1) rotate together (`llama`: its converter permutes q and k for this).
    Interleaved,
    /// Dimensions (i, i + d/2) rotate together (GPT-NeoX; `qwen2`, `qwen3`, `gemma3`).
    NeoX,
}

/// The feed-forward's gate: m ↦ act(m·W_gateᵀ) ⊙ m·W_upᵀ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// GELU, tanh approximation (GeGLU: Gemma).
    GeluTanh,
    /// SiLU (SwiGLU: Llama, Qwen).
    Silu,
}

/// Rotary position embedding: θ_i(p) = p · s / f_i · base^(−2i/dims) for i < dims/2, where s is
/// a linear scaling factor's inverse and f_i Llama 3.1's per-frequency factors.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub style: RopeStyle,
    /// Rotated dimensions of each head (the first `dims`; the rest pass unrotated).
    pub dims: usize,
    pub base: f64,
    /// Gemma 3's local (sliding-window) layers rotate with their own base.
    pub local_base: Option<f64>,
    /// `rope.scaling.type = linear`: positions are multiplied by 1/factor.
    pub position_scale: f64,
    /// `rope_freqs.weight` (Llama 3.1): each frequency divided by its factor.
    pub freq_factors: Option<Arc<Vec<f32>>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub family: Family,
    pub hidden: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_hidden: usize,
    pub vocab: usize,
    pub context_length: usize,
    pub rope: Rope,
    /// Local layers (Gemma 3: five of every six) see only this many latest positions.
    pub sliding_window: Option<usize>,
    pub rms_eps: f64,
    pub activation: Activation,
    /// Gemma multiplies the embeddings by √hidden.
    pub embedding_scale: Option<f64>,
}

/// Gemma 3: one layer in this many is global; local layers rotate with base 10 000 whatever
/// the file says for the global ones (llama.cpp hard-codes both).
const GEMMA3_GLOBAL_LAYER_PERIOD: usize = 6;
const GEMMA3_LOCAL_ROPE_BASE: f64 = 10_000.0;

impl Config {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, ModelError> {
        let arch = gguf.get_str("general.architecture")?;
        let family = Family::from_architecture(arch).ok_or_else(|| GgufError::UnsupportedArchitecture {
            path: gguf.path().to_path_buf(),
            found: arch.to_string(),
            supported: SUPPORTED,
        })?;
        let key = |k: &str| format!("{arch}.{k}");
        let hidden = gguf.get_usize(&key("embedding_length"))?;
        let n_heads = gguf.get_usize(&key("attention.head_count"))?;
        let n_kv_heads = match gguf.get_usize(&key("attention.head_count_kv")) {
            Ok(n) => n,
            // Files from before grouped attention leave it out: one KV head per query head.
            Err(_) if !gguf.has_key(&key("attention.head_count_kv")) => n_heads,
            Err(e) => return Err(e.into()),
        };
        let unsupported = |reason: String| GgufError::UnsupportedShape {
            path: gguf.path().to_path_buf(),
            arch: arch.to_string(),
            reason,
        };
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(unsupported(format!(
                "`{}` = {n_kv_heads} must divide `{}` = {n_heads}",
                key("attention.head_count_kv"),
                key("attention.head_count")
            ))
            .into());
        }
        if let Some(experts) = optional_usize(gguf, &key("expert_count"))?.filter(|&n| n > 0) {
            return Err(unsupported(format!("mixture-of-experts files (`{}` = {experts}) are not supported", key("expert_count"))).into());
        }
        let head_dim = optional_usize(gguf, &key("attention.key_length"))?.unwrap_or(hidden / n_heads);
        if let Some(value_dim) = optional_usize(gguf, &key("attention.value_length"))? {
            if value_dim != head_dim {
                return Err(unsupported(format!("value heads of {value_dim} dimensions differ from key heads of {head_dim}")).into());
            }
        }
        let vocab = gguf
            .tensors
            .get("token_embd.weight")
            .map(|t| t.dims[0])
            .ok_or_else(|| GgufError::MissingTensor {
                path: gguf.path().to_path_buf(),
                tensor: "token_embd.weight".into(),
            })?;
        let rope = Rope::from_gguf(gguf, family, head_dim)?;
        let gemma = family == Family::Gemma3;
        Ok(Self {
            family,
            hidden,
            n_layers: gguf.get_usize(&key("block_count"))?,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_hidden: gguf.get_usize(&key("feed_forward_length"))?,
            vocab,
            context_length: gguf.get_usize(&key("context_length"))?,
            rope,
            sliding_window: if gemma { Some(gguf.get_usize(&key("attention.sliding_window"))?) } else { None },
            rms_eps: optional_f64(gguf, &key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6),
            activation: if gemma { Activation::GeluTanh } else { Activation::Silu },
            embedding_scale: gemma.then(|| (hidden as f64).sqrt()),
        })
    }

    /// The shapes a LoRA adapter for this model must have.
    pub fn adapter_shape(&self) -> tessera_adapters::peft::BaseShape {
        tessera_adapters::peft::BaseShape {
            architecture: self.family.architecture().to_string(),
            n_layers: self.n_layers,
            hidden: self.hidden,
            q_width: self.n_heads * self.head_dim,
            kv_width: self.n_kv_heads * self.head_dim,
            ffn: self.ffn_hidden,
        }
    }

    /// The window of `layer`'s attention: `None` for global layers (every earlier position).
    pub fn window(&self, layer: usize) -> Option<usize> {
        let global = (layer + 1) % GEMMA3_GLOBAL_LAYER_PERIOD == 0;
        self.sliding_window.filter(|_| !global)
    }

    /// θ_i per unit of position for `layer`'s rotation, `[rope.dims / 2]`. Gemma 3's local
    /// layers use their own base and no scaling (as llama.cpp's `*_swa` parameters).
    pub fn rope_frequencies(&self, layer: usize) -> Vec<f32> {
        match (self.window(layer), self.rope.local_base) {
            (Some(_), Some(local)) => self.rope.inverse_frequencies(local, 1.0),
            _ => self.rope.inverse_frequencies(self.rope.base, self.rope.position_scale),
        }
    }

    /// Key/value values per position: KV heads × head dimension.
    pub fn kv_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

impl Rope {
    fn from_gguf(gguf: &GgufFile, family: Family, head_dim: usize) -> Result<Self, ModelError> {
        let arch = family.architecture();
        let key = |k: &str| format!("{arch}.{k}");
        let unsupported = |reason: String| GgufError::UnsupportedShape {
            path: gguf.path().to_path_buf(),
            arch: arch.to_string(),
            reason,
        };
        let dims = optional_usize(gguf, &key("rope.dimension_count"))?.unwrap_or(head_dim);
        if dims == 0 || dims % 2 != 0 || dims > head_dim {
            return Err(unsupported(format!("`{}` = {dims} must be even and at most the head dimension {head_dim}", key("rope.dimension_count"))).into());
        }
        let position_scale = match gguf.get_str(&key("rope.scaling.type")) {
            Err(_) => 1.0,
            Ok("none") => 1.0,
            Ok("linear") => 1.0 / optional_f64(gguf, &key("rope.scaling.factor"))?.filter(|f| *f > 0.0).unwrap_or(1.0),
            Ok(other) => return Err(unsupported(format!("RoPE scaling `{other}` (`{}`) is not supported (linear and Llama 3.1 frequency factors are)", key("rope.scaling.type"))).into()),
        };
        let freq_factors = if gguf.has_tensor("rope_freqs.weight") {
            Some(Arc::new(load_vector(gguf, "rope_freqs.weight", dims / 2)?.to_vec1::<f32>()?))
        } else {
            None
        };
        let gemma = family == Family::Gemma3;
        Ok(Self {
            style: if family == Family::Llama { RopeStyle::Interleaved } else { RopeStyle::NeoX },
            dims,
            base: optional_f64(gguf, &key("rope.freq_base"))?.unwrap_or(if gemma { 1_000_000.0 } else { 10_000.0 }),
            local_base: gemma.then_some(GEMMA3_LOCAL_ROPE_BASE),
            position_scale,
            freq_factors,
        })
    }

    /// θ_i = s · base^(−2i/dims) / f_i.
    fn inverse_frequencies(&self, base: f64, position_scale: f64) -> Vec<f32> {
        (0..self.dims / 2)
            .map(|i| {
                let factor = self.freq_factors.as_ref().map_or(1.0, |f| f[i] as f64);
                (position_scale * base.powf(-((2 * i) as f64) / self.dims as f64) / factor) as f32
            })
            .collect()
    }
}

/// A metadata number that may be absent, but not of the wrong type.
fn optional_usize(gguf: &GgufFile, key: &str) -> Result<Option<usize>, GgufError> {
    if gguf.has_key(key) {
        gguf.get_usize(key).map(Some)
    } else {
        Ok(None)
    }
}

fn optional_f64(gguf: &GgufFile, key: &str) -> Result<Option<f64>, GgufError> {
    if gguf.has_key(key) {
        gguf.get_f64(key).map(Some)
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rope(position_scale: f64, freq_factors: Option<Vec<f32>>) -> Rope {
        Rope {
            style: RopeStyle::Interleaved,
            dims: 4,
            base: 10_000.0,
            local_base: None,
            position_scale,
            freq_factors: freq_factors.map(Arc::new),
        }
    }

    #[test]
    fn frequencies_follow_the_base_and_their_scaling() {
        let plain = rope(1.0, None).inverse_frequencies(10_000.0, 1.0);
        assert_eq!(plain, vec![1.0, 0.01]);
        // Llama 3.1: each frequency divided by its factor.
        let factored = rope(1.0, Some(vec![1.0, 8.0])).inverse_frequencies(10_000.0, 1.0);
        assert_eq!(factored, vec![1.0, 0.01 / 8.0]);
        // Linear scaling by 4: positions count a quarter.
        let linear = rope(0.25, None).inverse_frequencies(10_000.0, 0.25);
        assert_eq!(linear, vec![0.25, 0.0025]);
    }
}
