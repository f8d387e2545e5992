//! `tessera bench embeddings`: embeddings throughput against the prefill of the same tokens.
//! Both loads are `inputs` distinct prompts of `tokens` tokens submitted to the engine at once:
//! as embeddings, and as generations of one token (the prompt's prefill, then one sample). Runs
//! alternate between the two; the prefix cache is off, so every run computes every token.

use std::sync::Arc;
use std::time::Instant;

use super::{median, BENCH_TEXT};
use crate::engine::{Engine, EngineConfig, Event, GenerationRequest};
use crate::metrics::Metrics;
use crate::sampler::SamplingParams;
use crate::LoadedModel;

#[derive(Debug, thiserror::Error)]
pub enum EmbeddingsBenchError {
    #[error("starting the engine: {0}")]
    Start(#[from] std::io::Error),
    #[error("{0}")]
    Engine(String),
}

pub struct EmbeddingsLoad {
    pub inputs: usize,
    pub tokens: usize,
    pub runs: usize,
}

/// Median tokens per second of each load.
pub struct EmbeddingsReport {
    pub embeddings: f64,
    pub prefill: f64,
}

/// `inputs` prompts of `tokens` ids each, cut from different places of a long text so that no
/// two share a prefix.
fn prompts(model: &LoadedModel, load: &EmbeddingsLoad) -> Result<Vec<Vec<u32>>, EmbeddingsBenchError> {
    let text = model.tokenizer.encode(&BENCH_TEXT.repeat(40), true, false).map_err(|e| EmbeddingsBenchError::Engine(e.to_string()))?;
    let span = load.tokens.saturating_sub(1).max(1);
    (0..load.inputs)
        .map(|i| {
            let start = (i * 7) % text.len().saturating_sub(span).max(1);
            let body = text.get(start..start + span).ok_or_else(|| EmbeddingsBenchError::Engine("the bench text is too short for these inputs".into()))?;
            // Each prompt starts with `<bos>`, as a tokenized input does.
            Ok(std::iter::once(model.tokenizer.bos_id()).chain(body.iter().copied()).collect())
        })
        .collect()
}

fn request(prompt: &[u32], embed: bool) -> GenerationRequest {
    GenerationRequest {
        prompt: prompt.to_vec(),
        max_tokens: usize::from(!embed),
        sampling: SamplingParams::default(),
        stop_ids: Vec::new(),
        stop_strings: Vec::new(),
        logprobs: None,
        prompt_logprobs: false,
        adapters: Vec::new(),
        constraint: None,
        embed,
    }
}

/// Tokens per second of every prompt submitted at once, from the submission to the last finish.
fn rate(engine: &Engine, prompts: &[Vec<u32>], embed: bool) -> Result<f64, EmbeddingsBenchError> {
    let started = Instant::now();
    let streams = prompts.iter().map(|p| engine.submit(request(p, embed))).collect::<Result<Vec<_>, _>>().map_err(|e| EmbeddingsBenchError::Engine(e.to_string()))?;
    for mut events in streams {
        loop {
            match events.blocking_recv() {
                Some(Event::Token(_)) => {}
                Some(Event::Finished(_)) => break,
                Some(Event::Failed(message)) => return Err(EmbeddingsBenchError::Engine(message)),
                None => return Err(EmbeddingsBenchError::Engine("the engine stopped".into())),
            }
        }
    }
    let tokens: usize = prompts.iter().map(Vec::len).sum();
    Ok(tokens as f64 / started.elapsed().as_secs_f64())
}

pub fn run(model: &Arc<LoadedModel>, load: &EmbeddingsLoad) -> Result<EmbeddingsReport, EmbeddingsBenchError> {
    let config = EngineConfig { ctx_len: 2048, max_queue: 2 * load.inputs.max(1), prefix_cache: false, ..EngineConfig::default() };
    let (engine, _) = Engine::start(model.clone(), config, Arc::new(Metrics::new()))?;
    let prompts = prompts(model, load)?;
    // Warm-up: the engine's first steps, the kernels' buffers.
    rate(&engine, &prompts, true)?;
    rate(&engine, &prompts, false)?;
    let (mut embeddings, mut prefill) = (Vec::new(), Vec::new());
    for _ in 0..load.runs.max(1) {
        embeddings.push(rate(&engine, &prompts, true)?);
        prefill.push(rate(&engine, &prompts, false)?);
    }
    Ok(EmbeddingsReport { embeddings: median(&embeddings), prefill: median(&prefill) })
}

pub fn format_table(cpu: &str, load: &EmbeddingsLoad, report: &EmbeddingsReport) -> String {
    format!(
        "CPU: {cpu}; {} inputs × {} tokens, medians of {} runs\n\n| measure | tok/s |\n|---|---|\n| embeddings | {:.1} |\n| prefill of the same tokens (one generated token each) | {:.1} |\n| embeddings / prefill | {:.2}× (target ≥ 0.8×) |\n",
        load.inputs,
        load.tokens,
        load.runs.max(1),
        report.embeddings,
        report.prefill,
        report.embeddings / report.prefill
    )
}
