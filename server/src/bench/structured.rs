//! `tessera bench structured`: what enforcing a JSON Schema while decoding costs.
//! - Decode throughput of `clients` concurrent requests under a schema they cannot finish
//!   within `max_tokens` (so every request generates all its tokens), against the same load
//!   unconstrained; runs alternate between the two.
//! - Time to first token of a request whose schema is new (compiled, and its first mask
//!   computed from a cold lexer) against one whose schema is cached.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::median;
use crate::chat_template::Turn;
use crate::engine::{Engine, EngineConfig, Event, GenerationRequest};
use crate::grammar::{Constraint, ConstraintSpec, Grammars};
use crate::metrics::Metrics;
use crate::sampler::SamplingParams;
use crate::LoadedModel;

#[derive(Debug, thiserror::Error)]
pub enum StructuredBenchError {
    #[error("starting the engine: {0}")]
    Start(#[from] std::io::Error),
    #[error("{0}")]
    Engine(String),
}

pub struct StructuredLoad {
    pub clients: usize,
    pub max_tokens: usize,
    pub runs: usize,
}

pub struct StructuredRow {
    pub measure: String,
    pub constrained: f64,
    pub free: f64,
    pub unit: &'static str,
    /// Constrained against free, as the target reads it (a ratio or a difference).
    pub comparison: String,
    pub target: &'static str,
}

/// A list of records no answer of `max_tokens` tokens completes: strings, integers, enums and
/// nested keys all take part. `salt` renames a key, making a schema no cache has seen.
fn records_schema(salt: Option<usize>) -> ConstraintSpec {
    let score = salt.map_or("score".to_string(), |s| format!("score_{s}"));
    ConstraintSpec::JsonSchema(
        json!({
            "type": "object",
            "properties": {"records": {"type": "array", "minItems": 500, "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    score.clone(): {"type": "integer", "minimum": 0, "maximum": 100},
                    "team": {"enum": ["web", "data", "ops"]}
                },
                "required": ["name", score, "team"],
                "additionalProperties": false
            }}},
            "required": ["records"]
        })
        .to_string(),
    )
}

struct Harness {
    model: Arc<LoadedModel>,
    engine: Engine,
    grammars: Grammars,
}

impl Harness {
    fn new(model: &Arc<LoadedModel>, clients: usize) -> Result<Self, StructuredBenchError> {
        // No prefix cache: every request prefills its prompt, as the first of its kind would.
        let config = EngineConfig { ctx_len: 2048, max_running_seqs: clients.max(1), prefix_cache: false, ..EngineConfig::default() };
        let (engine, _) = Engine::start(model.clone(), config, Arc::new(Metrics::new()))?;
        let grammars = Grammars::for_model(model.clone())?;
        Ok(Self { model: model.clone(), engine, grammars })
    }

    fn prompt(&self, client: usize) -> Result<Vec<u32>, StructuredBenchError> {
        let turn = Turn { role: "user", text: format!("List the staff of team {client} as JSON records."), ..Default::default() };
        let text = self.model.chat.render(&[turn], true).map_err(|e| StructuredBenchError::Engine(e.to_string()))?;
        self.model.tokenizer.encode(&text, true, true).map_err(|e| StructuredBenchError::Engine(e.to_string()))
    }

    fn compile(&self, spec: &ConstraintSpec) -> Result<Constraint, StructuredBenchError> {
        self.grammars.compile(spec).map_err(|e| StructuredBenchError::Engine(e.to_string()))
    }

    fn submit(&self, client: usize, max_tokens: usize, constraint: Option<Constraint>) -> Result<tokio::sync::mpsc::UnboundedReceiver<Event>, StructuredBenchError> {
        let request = GenerationRequest {
            prompt: self.prompt(client)?,
            max_tokens,
            sampling: SamplingParams { temperature: 0.8, seed: client as u64, ..SamplingParams::default() },
            stop_ids: Vec::new(),
            stop_strings: Vec::new(),
            logprobs: None,
            prompt_logprobs: false,
            adapters: Vec::new(),
            constraint,
            embed: false,
        };
        self.engine.submit(request).map_err(|e| StructuredBenchError::Engine(e.to_string()))
    }

    /// Tokens per second of `clients` requests of `max_tokens` tokens each, from the first
    /// token to the last.
    fn decode_rate(&self, load: &StructuredLoad, constraint: Option<&Constraint>) -> Result<f64, StructuredBenchError> {
        let mut streams = (0..load.clients).map(|c| self.submit(c, load.max_tokens, constraint.cloned())).collect::<Result<Vec<_>, _>>()?;
        let (mut first, mut tokens) = (None, 0usize);
        for events in &mut streams {
            while let Some(event) = events.blocking_recv() {
                match event {
                    Event::Token(_) => {
                        first.get_or_insert_with(Instant::now);
                        tokens += 1;
                    }
                    Event::Finished(_) => break,
                    Event::Failed(message) => return Err(StructuredBenchError::Engine(message)),
                }
            }
        }
        let elapsed = first.map_or(Duration::ZERO, |f| f.elapsed());
        Ok(tokens as f64 / elapsed.as_secs_f64())
    }

    /// Milliseconds from the request (its schema compiled first) to its first token.
    fn first_token_ms(&self, spec: &ConstraintSpec) -> Result<f64, StructuredBenchError> {
        let started = Instant::now();
        let constraint = self.compile(spec)?;
        let mut events = self.submit(0, 1, Some(constraint))?;
        loop {
            match events.blocking_recv() {
                Some(Event::Token(_)) | Some(Event::Finished(_)) | None => break,
                Some(Event::Failed(message)) => return Err(StructuredBenchError::Engine(message)),
            }
        }
        Ok(started.elapsed().as_secs_f64() * 1000.0)
    }
}

pub fn run(model: &Arc<LoadedModel>, load: &StructuredLoad) -> Result<Vec<StructuredRow>, StructuredBenchError> {
    let harness = Harness::new(model, load.clients)?;
    let shared = harness.compile(&records_schema(None))?;
    // Warm-up: the engine, the vocabulary's first masks.
    harness.decode_rate(&StructuredLoad { max_tokens: 8, ..*load }, Some(&shared))?;
    let (mut constrained, mut free) = (Vec::new(), Vec::new());
    for _ in 0..load.runs.max(1) {
        constrained.push(harness.decode_rate(load, Some(&shared))?);
        free.push(harness.decode_rate(load, None)?);
    }
    let (mut new, mut cached) = (Vec::new(), Vec::new());
    for run in 0..load.runs.max(1) {
        new.push(harness.first_token_ms(&records_schema(Some(run)))?);
        cached.push(harness.first_token_ms(&records_schema(None))?);
    }
    let (c, f) = (median(&constrained), median(&free));
    let (n, k) = (median(&new), median(&cached));
    Ok(vec![
        StructuredRow {
            measure: format!("decode, {} clients × {} tokens", load.clients, load.max_tokens),
            constrained: c,
            free: f,
            unit: "tok/s",
            comparison: format!("{:.2}×", c / f),
            target: "≥ 0.9×",
        },
        StructuredRow {
            measure: "time to first token: new schema vs cached".into(),
            constrained: n,
            free: k,
            unit: "ms",
            comparison: format!("+{:.1} ms", n - k),
            target: "≤ +50 ms",
        },
    ])
}

pub fn format_table(cpu: &str, rows: &[StructuredRow], elapsed: Duration) -> String {
    let mut out = format!("CPU: {cpu}; {:.0} s\n\n", elapsed.as_secs_f64());
    out.push_str("| measure | under a JSON schema / new schema | free / cached schema | unit | comparison | target |\n|---|---|---|---|---|---|\n");
    for r in rows {
        out.push_str(&format!("| {} | {:.1} | {:.1} | {} | {} | {} |\n", r.measure, r.constrained, r.free, r.unit, r.comparison, r.target));
    }
    out
}
