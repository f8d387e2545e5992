//! Single-sequence generation: chunked prefill, then one token per step.

use tessera_adapters::AdapterMix;

use crate::model::decoder::SequenceChunk;
use crate::model::{Decoder, KvCache, LogitsFor, ModelError};
use crate::sampler::{top_logprobs, Sampler, SamplingParams};

/// Longest slice of a prompt run through the model at once.
pub const PREFILL_CHUNK: usize = 512;

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// How many most-likely tokens to report at each step (0 for none).
    pub top_logprobs: usize,
    /// Tokens that end the generation (they are kept in the output).
    pub stop_ids: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub token_ids: Vec<u32>,
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    pub finish_reason: FinishReason,
}

/// Runs `prompt` through a fresh cache in chunks and returns the last position's logits.
pub fn prefill(
    model: &Decoder,
    cache: &mut KvCache,
    prompt: &[u32],
    adapters: &AdapterMix,
) -> Result<Vec<f32>, ModelError> {
    if prompt.is_empty() {
        return Err(ModelError::EmptyInput);
    }
    cache.check_room(prompt.len())?;
    if cache.is_empty() {
        cache.set_prompt_len(prompt.len());
    }
    let mut last = Vec::new();
    let n_chunks = prompt.len().div_ceil(PREFILL_CHUNK);
    for (i, tokens) in prompt.chunks(PREFILL_CHUNK).enumerate() {
        let wants_logits = i + 1 == n_chunks;
        let logits = model.forward(&mut [SequenceChunk {
            tokens,
            cache,
            logits: if wants_logits {
                LogitsFor::Last
            } else {
                LogitsFor::None
            },
            adapters,
        }])?;
        if wants_logits {
            last = logits.row(0, 0).to_vec();
        }
    }
    Ok(last)
}

/// Generates up to `max_tokens` after `prompt`, calling `on_token` as each one is chosen.
pub fn generate(
    model: &Decoder,
    prompt: &[u32],
    params: &GenerateParams,
    adapters: &AdapterMix,
    mut on_token: impl FnMut(u32),
) -> Result<Generation, ModelError> {
    let limit = model.config().context_length;
    let needed = prompt.len() + params.max_tokens;
    if needed > limit {
        return Err(ModelError::ContextLength { needed, limit });
    }
    let mut cache = KvCache::new(model.config(), needed)?;
    let mut sampler = Sampler::new(params.sampling.clone());
    let mut logits = prefill(model, &mut cache, prompt, adapters)?;
    let mut out = Generation {
        token_ids: Vec::with_capacity(params.max_tokens),
        top_logprobs: Vec::new(),
        finish_reason: FinishReason::Length,
    };
    for step in 0..params.max_tokens {
        if params.top_logprobs > 0 {
            out.top_logprobs
                .push(top_logprobs(&logits, params.top_logprobs));
        }
        let token = sampler.sample(&logits);
        out.token_ids.push(token);
        on_token(token);
        if params.stop_ids.contains(&token) {
            out.finish_reason = FinishReason::Stop;
            break;
        }
        if step + 1 == params.max_tokens {
            break;
        }
        let next = model.forward(&mut [SequenceChunk {
            tokens: &[token],
            cache: &mut cache,
            logits: LogitsFor::Last,
            adapters,
        }])?;
        logits.clear();
        logits.extend_from_slice(next.row(0, 0));
    }
    Ok(out)
}
