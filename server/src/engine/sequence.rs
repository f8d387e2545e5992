//! One request's life in the engine: its cache, its sampler, and what it has produced.

use std::collections::HashMap;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::text::{IncrementalDecoder, StopMatcher, StopScan};
use super::{Event, FinishReason, Finished, GeneratedToken, GenerationRequest, Submission, TokenLogprob};
use crate::metrics::Metrics;
use crate::model::{Config, KvCache, LogitsFor, ModelError};
use crate::sampler::{log_softmax_at, top_logprobs, Sampler};
use crate::tokenizer::Tokenizer;

pub(super) struct Sequence {
    request: GenerationRequest,
    events: UnboundedSender<Event>,
    pub(super) cache: KvCache,
    prefilled: usize,
    generated: Vec<u32>,
    counts: HashMap<u32, u32>,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    prompt_logprobs: Option<Vec<(TokenLogprob, Vec<TokenLogprob>)>>,
    submitted_at: Instant,
    last_token_at: Option<Instant>,
}

/// What a sequence feeds the model in one step.
pub(super) struct StepInput {
    pub tokens: Vec<u32>,
    pub logits: LogitsFor,
}

impl Sequence {
    pub(super) fn new(submission: Submission, config: &Config) -> Result<Self, ModelError> {
        let request = submission.request;
        let capacity = request.prompt.len() + request.max_tokens;
        Ok(Self {
            cache: KvCache::new(config, capacity)?,
            sampler: Sampler::new(request.sampling.clone()),
            stops: StopMatcher::new(request.stop_strings.clone()),
            prompt_logprobs: request.prompt_logprobs.then(Vec::new),
            request,
            events: submission.events,
            prefilled: 0,
            generated: Vec::new(),
            counts: HashMap::new(),
            decoder: IncrementalDecoder::default(),
            submitted_at: submission.submitted_at,
            last_token_at: None,
        })
    }

    /// Bytes of KV cache a request will hold.
    pub(super) fn cache_bytes(request: &GenerationRequest, config: &Config) -> usize {
        (request.prompt.len() + request.max_tokens) * config.n_layers * 2 * config.n_kv_heads * config.head_dim * 4
    }

    /// The adapters this sequence leased, with their weights.
    pub(super) fn leases(&self) -> &[(std::sync::Arc<crate::registry::AdapterGeneration>, f32)] {
        &self.request.adapters
    }

    pub(super) fn cancelled(&self) -> bool {
        self.events.is_closed()
    }

    pub(super) fn prefilling(&self) -> bool {
        self.prefilled < self.request.prompt.len()
    }

    /// The next input: a prompt chunk ending on a multiple of `chunk` (so chunk boundaries
    /// never depend on the rest of the batch), or the last sampled token.
    pub(super) fn next_input(&self, chunk: usize) -> StepInput {
        if self.prefilling() {
            let end = ((self.prefilled / chunk + 1) * chunk).min(self.request.prompt.len());
            let last = end == self.request.prompt.len();
            StepInput {
                tokens: self.request.prompt[self.prefilled..end].to_vec(),
                logits: match (self.request.prompt_logprobs, last) {
                    (true, _) => LogitsFor::All,
                    (false, true) => LogitsFor::Last,
                    (false, false) => LogitsFor::None,
                },
            }
        } else {
            StepInput {
                tokens: vec![*self.generated.last().expect("decoding follows a sampled token")],
                logits: LogitsFor::Last,
            }
        }
    }

    /// Takes this step's logit rows (`rows[i]` for the i-th requested row). Returns whether the
    /// sequence is finished.
    pub(super) fn advance(
        &mut self,
        fed: usize,
        rows: &[&[f32]],
        tokenizer: &Tokenizer,
        metrics: &Metrics,
    ) -> bool {
        if self.prefilling() {
            if let Some(scored) = self.prompt_logprobs.as_mut() {
                let k = self.request.logprobs.unwrap_or(0);
                for (i, row) in rows.iter().enumerate() {
                    let target = self.prefilled + i + 1;
                    if let Some(&id) = self.request.prompt.get(target) {
                        let logprob = log_softmax_at(row, [id])[0];
                        scored.push((TokenLogprob { id, logprob }, to_logprobs(top_logprobs(row, k))));
                    }
                }
            }
            self.prefilled += fed;
            metrics.prompt_tokens.inc_by(fed as u64);
            if self.prefilling() {
                return false;
            }
        }
        let Some(logits) = rows.last() else {
            return false;
        };
        self.sample(logits, tokenizer, metrics)
    }

    fn sample(&mut self, logits: &[f32], tokenizer: &Tokenizer, metrics: &Metrics) -> bool {
        let params = &self.request.sampling;
        let token = if params.has_penalties() {
            let mut penalised = logits.to_vec();
            let seen = self.request.prompt.iter().chain(&self.generated).copied();
            params.apply_penalties(&mut penalised, &self.counts, seen);
            self.sampler.sample(&penalised)
        } else {
            self.sampler.sample(logits)
        };
        let now = Instant::now();
        match self.last_token_at {
            None => metrics
                .time_to_first_token
                .observe((now - self.submitted_at).as_secs_f64()),
            Some(previous) => metrics.inter_token_latency.observe((now - previous).as_secs_f64()),
        }
        self.last_token_at = Some(now);
        metrics.generated_tokens.inc();
        self.generated.push(token);
        *self.counts.entry(token).or_default() += 1;

        if self.request.stop_ids.contains(&token) {
            return self.finish(FinishReason::Stop);
        }
        let (logprob, top) = match self.request.logprobs {
            Some(k) => (
                Some(TokenLogprob {
                    id: token,
                    logprob: log_softmax_at(logits, [token])[0],
                }),
                to_logprobs(top_logprobs(logits, k)),
            ),
            None => (None, Vec::new()),
        };
        let delta = self.decoder.push(tokenizer, token);
        let (text, stopped) = match self.stops.feed(&delta) {
            StopScan::Continue(text) => (text, false),
            StopScan::Stopped(text) => (text, true),
        };
        let _ = self.events.send(Event::Token(GeneratedToken {
            id: token,
            text,
            logprob,
            top_logprobs: top,
        }));
        if stopped {
            return self.finish(FinishReason::Stop);
        }
        if self.generated.len() >= self.request.max_tokens {
            return self.finish(FinishReason::Length);
        }
        false
    }

    fn finish(&mut self, reason: FinishReason) -> bool {
        // Text held back as a possible stop-string start is real output when the generation ends
        // otherwise (a matched stop string already cleared it).
        let _ = self.events.send(Event::Finished(Finished {
            reason,
            trailing_text: self.stops.flush(),
            prompt_tokens: self.request.prompt.len(),
            completion_tokens: self.generated.len(),
            prompt_logprobs: self.prompt_logprobs.take(),
        }));
        true
    }

    pub(super) fn fail(&self, message: &str) {
        let _ = self.events.send(Event::Failed(message.to_string()));
    }
}

fn to_logprobs(top: Vec<(u32, f32)>) -> Vec<TokenLogprob> {
    top.into_iter()
        .map(|(id, logprob)| TokenLogprob { id, logprob })
        .collect()
}
