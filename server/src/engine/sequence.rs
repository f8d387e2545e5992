//! One request's life in the engine: its cache, its sampler, and what it has produced.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::text::{IncrementalDecoder, StopMatcher, StopScan};
use super::{Event, FinishReason, Finished, GeneratedToken, GenerationRequest, Priority, Submission, TokenLogprob};
use tessera_adapters::TargetModule;

use crate::grammar::{Accepted, ConstrainedDecoder};
use crate::metrics::Metrics;
use crate::registry::AdapterGeneration;
use crate::model::kv::prefix::{ChainCursor, PrefixCache};
use crate::model::kv::BLOCK_TOKENS;
use crate::model::{Config, KvCache, KvPool, LogitsFor};
use crate::sampler::{log_softmax_at, top_logprobs, Sampler};
use crate::tokenizer::Tokenizer;

pub(super) struct Sequence {
    request: GenerationRequest,
    events: UnboundedSender<Event>,
    pub(super) cache: KvCache,
    /// Leading tokens of `prompt ++ generated` whose keys and values are in the cache.
    prefilled: usize,
    generated: Vec<u32>,
    counts: HashMap<u32, u32>,
    sampler: Sampler,
    /// The answer's shape, when the request has one.
    grammar: Option<ConstrainedDecoder>,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    prompt_logprobs: Option<Vec<(TokenLogprob, Vec<TokenLogprob>)>>,
    /// An embedding request's sum of final hidden states over the prompt prefilled so far.
    pooled: Option<Vec<f32>>,
    /// Prompt tokens found in the prefix cache at admission (reported in the usage).
    cached_tokens: usize,
    /// What makes this sequence's keys and values differ from the base model's on the same
    /// tokens, and how far its blocks are registered in the prefix cache (`None`: not shared).
    prefix: Option<(u64, ChainCursor)>,
    submitted_at: Instant,
    last_token_at: Option<Instant>,
    pub(super) priority: Priority,
}

/// What a sequence feeds the model in one step.
pub(super) struct StepInput {
    pub tokens: Vec<u32>,
    pub logits: LogitsFor,
}

impl Sequence {
    pub(super) fn new(submission: Submission, pool: &KvPool, config: &Config) -> Self {
        let request = submission.request;
        let capacity = request.prompt.len() + request.max_tokens;
        let mut cache = KvCache::in_pool(pool, config, capacity);
        cache.set_prompt_len(request.prompt.len());
        Self {
            cache,
            sampler: Sampler::new(request.sampling.clone()),
            grammar: request.constraint.clone().map(ConstrainedDecoder::start),
            stops: StopMatcher::new(request.stop_strings.clone()),
            prompt_logprobs: request.prompt_logprobs.then(Vec::new),
            pooled: request.embed.then(|| vec![0.0; config.hidden]),
            // Prompt logprobs and embeddings need every prompt position, so nothing is skipped.
            prefix: (!request.prompt_logprobs && !request.embed).then(|| (kv_salt(&request.adapters, config.n_layers), ChainCursor::EMPTY)),
            request,
            events: submission.events,
            prefilled: 0,
            generated: Vec::new(),
            counts: HashMap::new(),
            decoder: IncrementalDecoder::default(),
            cached_tokens: 0,
            submitted_at: submission.submitted_at,
            last_token_at: None,
            priority: submission.priority,
        }
    }

    /// `prompt ++ generated`: what the cache holds a prefix of.
    fn tokens(&self) -> Vec<u32> {
        let mut tokens = Vec::with_capacity(self.request.prompt.len() + self.generated.len());
        tokens.extend_from_slice(&self.request.prompt);
        tokens.extend_from_slice(&self.generated);
        tokens
    }

    pub(super) fn prompt_len(&self) -> usize {
        self.request.prompt.len()
    }

    fn known_len(&self) -> usize {
        self.request.prompt.len() + self.generated.len()
    }

    /// On a fresh cache, adopts the longest run of blocks the prefix cache holds for this
    /// sequence's tokens and adapters. Returns the positions found.
    pub(super) fn adopt_cached_prefix(&mut self, prefix: &mut PrefixCache) -> usize {
        let Some((salt, _)) = self.prefix else { return 0 };
        if !self.cache.is_empty() {
            return 0;
        }
        let root = prefix.root(salt);
        let cursor = prefix.adopt_longest_prefix(root, &self.tokens(), &mut self.cache);
        self.prefilled = cursor.tokens();
        if self.generated.is_empty() {
            self.cached_tokens = cursor.tokens();
        }
        self.prefix = Some((salt, cursor));
        cursor.tokens()
    }

    /// Offers the prefix cache the blocks this sequence has filled since the last call.
    pub(super) fn register_blocks(&mut self, prefix: &mut PrefixCache) {
        let Some((salt, cursor)) = self.prefix else { return };
        // Decoding fills a block every 16 steps; the steps between have nothing to offer.
        if self.cache.len() / BLOCK_TOKENS <= cursor.tokens() / BLOCK_TOKENS {
            return;
        }
        let cursor = if cursor.is_empty() { prefix.root(salt) } else { cursor };
        let cursor = prefix.register(cursor, &self.tokens()[..self.cache.len()], &self.cache);
        self.prefix = Some((salt, cursor));
    }

    /// Gives back every block and starts over from nothing; the tokens generated so far are
    /// kept and recomputed with the prompt when the sequence runs again.
    pub(super) fn preempt(&mut self, pool: &KvPool, config: &Config) {
        let prompt_len = self.cache.prompt_len();
        self.cache = KvCache::in_pool(pool, config, self.cache.capacity());
        // Recomputed, the generated tokens are still folded as when they were decoded.
        self.cache.set_prompt_len(prompt_len);
        self.prefilled = 0;
        if let Some(pooled) = self.pooled.as_mut() {
            pooled.fill(0.0);
        }
        if let Some((_, cursor)) = self.prefix.as_mut() {
            *cursor = ChainCursor::EMPTY;
        }
    }

    /// The adapters this sequence leased, with their weights.
    pub(super) fn leases(&self) -> &[(std::sync::Arc<crate::registry::AdapterGeneration>, f32)] {
        &self.request.adapters
    }

    pub(super) fn cancelled(&self) -> bool {
        self.events.is_closed()
    }

    /// Whether this step feeds more than the one token decoding feeds.
    pub(super) fn prefilling(&self) -> bool {
        self.prefilled + 1 < self.known_len() || self.generated.is_empty()
    }

    /// The next input: the tokens not yet cached, in chunks ending on multiples of `chunk` (so
    /// chunk boundaries never depend on the rest of the batch). When decoding that is the last
    /// sampled token; after a preemption, the prompt and what was generated.
    pub(super) fn next_input(&self, chunk: usize) -> StepInput {
        let known = self.known_len();
        let end = ((self.prefilled / chunk + 1) * chunk).min(known);
        let last = end == known;
        let in_prompt = self.prefilled < self.request.prompt.len();
        let tokens = self.tokens_range(self.prefilled..end);
        StepInput {
            tokens,
            logits: match (self.prompt_logprobs.is_some() && in_prompt, last) {
                _ if self.pooled.is_some() => LogitsFor::PooledHidden,
                (true, _) => LogitsFor::All,
                (false, true) => LogitsFor::Last,
                (false, false) => LogitsFor::None,
            },
        }
    }

    fn tokens_range(&self, range: std::ops::Range<usize>) -> Vec<u32> {
        let prompt = self.request.prompt.len();
        let from_prompt = range.start.min(prompt)..range.end.min(prompt);
        let from_generated = range.start.max(prompt) - prompt..range.end.max(prompt) - prompt;
        let mut tokens = self.request.prompt[from_prompt].to_vec();
        tokens.extend_from_slice(&self.generated[from_generated]);
        tokens
    }

    /// Takes this step's logit rows (`rows[i]` for the i-th requested row), or for an embedding
    /// its chunk's summed hidden states. Returns whether the sequence is finished.
    pub(super) fn advance(
        &mut self,
        fed: usize,
        rows: &[&[f32]],
        pooled: Option<&[f32]>,
        tokenizer: &Tokenizer,
        metrics: &Metrics,
    ) -> bool {
        if let Some(scored) = self.prompt_logprobs.as_mut() {
            let k = self.request.logprobs.unwrap_or(0);
            for (i, row) in rows.iter().enumerate() {
                // Targets already scored before a preemption are not scored again.
                let target = self.prefilled + i + 1;
                if target != scored.len() + 1 {
                    continue;
                }
                if let Some(&id) = self.request.prompt.get(target) {
                    let logprob = log_softmax_at(row, [id])[0];
                    scored.push((TokenLogprob { id, logprob }, to_logprobs(top_logprobs(row, k))));
                }
            }
        }
        let prompt_fed = self.request.prompt.len().saturating_sub(self.prefilled).min(fed);
        metrics.prompt_tokens.inc_by(prompt_fed as u64);
        self.prefilled += fed;
        if let Some(sum) = self.pooled.as_mut() {
            if let Some(chunk) = pooled {
                sum.iter_mut().zip(chunk).for_each(|(s, v)| *s += v);
            }
            return self.prefilled >= self.known_len() && self.finish_embedding();
        }
        if self.prefilled < self.known_len() {
            return false;
        }
        let Some(logits) = rows.last() else {
            return false;
        };
        self.sample(logits, tokenizer, metrics)
    }

    fn sample(&mut self, logits: &[f32], tokenizer: &Tokenizer, metrics: &Metrics) -> bool {
        let token = match self.draw(logits) {
            Ok(token) => token,
            Err(message) => {
                self.fail(&message);
                return true;
            }
        };
        let now = Instant::now();
        // Background work waits out interactive steps by design: its gaps are not latency.
        match self.last_token_at {
            _ if self.priority == Priority::Background => {}
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
        let complete = match self.grammar.as_mut().map(|g| g.accept(token)) {
            None | Some(Ok(Accepted::Continue)) => false,
            Some(Ok(Accepted::Complete)) => true,
            Some(Err(e)) => {
                self.fail(&e.to_string());
                return true;
            }
        };
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
        if stopped || complete {
            return self.finish(FinishReason::Stop);
        }
        if self.generated.len() >= self.request.max_tokens {
            return self.finish(FinishReason::Length);
        }
        false
    }

    /// The next token: the grammar's mask, then the penalties, then the sampler. Logprobs are
    /// reported under the raw logits.
    fn draw(&mut self, logits: &[f32]) -> Result<u32, String> {
        let params = &self.request.sampling;
        let mask = match self.grammar.as_mut() {
            Some(grammar) => Some(grammar.mask().map_err(|e| e.to_string())?),
            None => None,
        };
        if mask.is_none() && !params.has_penalties() {
            return Ok(self.sampler.sample(logits));
        }
        let mut adjusted = logits.to_vec();
        if let Some(mask) = &mask {
            if !mask.apply(&mut adjusted, &self.request.stop_ids) {
                return Err("the answer's grammar allows no token here".into());
            }
        }
        if params.has_penalties() {
            let seen = self.request.prompt.iter().chain(&self.generated).copied();
            params.apply_penalties(&mut adjusted, &self.counts, seen);
        }
        Ok(self.sampler.sample(&adjusted))
    }

    /// Ends an embedding request with the mean of its prompt's hidden states, L2-normalised.
    fn finish_embedding(&mut self) -> bool {
        if let Some(sum) = self.pooled.as_mut() {
            let norm = sum.iter().map(|v| v * v).sum::<f32>().sqrt();
            // The mean's 1/n cancels in the normalisation: dividing the sum by its norm suffices.
            if norm > 0.0 {
                sum.iter_mut().for_each(|v| *v /= norm);
            }
        }
        self.finish(FinishReason::Stop)
    }

    fn finish(&mut self, reason: FinishReason) -> bool {
        // Text held back as a possible stop-string start is real output when the generation ends
        // otherwise (a matched stop string already cleared it).
        let _ = self.events.send(Event::Finished(Finished {
            reason,
            trailing_text: self.stops.flush(),
            prompt_tokens: self.request.prompt.len(),
            cached_tokens: self.cached_tokens,
            completion_tokens: self.generated.len(),
            prompt_logprobs: self.prompt_logprobs.take(),
            embedding: self.pooled.take(),
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

/// Names what, besides the tokens, decides this sequence's keys and values: the adapters (by
/// generation) and their scales, in the order they are added. An adapter changes the keys and
/// values of layer ℓ when it has a delta on ℓ's k or v projection or on any module of an
/// earlier layer (whose output feeds ℓ); one that only touches the last layer past k and v
/// leaves every cached key and value as the base model's.
fn kv_salt(adapters: &[(Arc<AdapterGeneration>, f32)], n_layers: usize) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    for (generation, scale) in adapters {
        let changes_kv = generation
            .weights
            .targets()
            .any(|(layer, module)| layer + 1 < n_layers || matches!(module, TargetModule::K | TargetModule::V));
        if changes_kv {
            (generation.generation, scale.to_bits()).hash(&mut h);
        }
    }
    h.finish()
}
