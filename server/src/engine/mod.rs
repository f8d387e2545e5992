//! The inference engine: a queue actor on its own thread that runs continuous batching.
//!
//! HTTP handlers turn requests into validated [`GenerationRequest`]s and [`Engine::submit`] them;
//! each submission gets a channel of [`Event`]s. Between model steps the scheduler admits new
//! sequences, prefills long prompts in chunks, and decodes every running sequence together.
//! Dropping the event receiver (a client that went away) cancels the sequence. Keys and values
//! live in a paged pool with a byte budget, shared through an automatic prefix cache.

mod scheduler;
mod sequence;
pub mod text;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::grammar::Constraint;
use crate::metrics::Metrics;
use crate::model::kv::blocks_for_sequence;
use crate::model::{Config, KvPool};
use crate::registry::AdapterGeneration;
use crate::sampler::SamplingParams;
use crate::LoadedModel;

pub use crate::generate::FinishReason;

/// A request the engine can run as it is: every field already checked.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Token ids that end the generation (empty with `ignore_eos`).
    pub stop_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
    /// Report the sampled token's logprob and this many alternatives at each step.
    pub logprobs: Option<usize>,
    /// Also score every prompt token (completions' `echo` with `logprobs`).
    pub prompt_logprobs: bool,
    /// Adapters and their composition weights, leased for the whole generation.
    pub adapters: Vec<(Arc<AdapterGeneration>, f32)>,
    /// The shape the answer must have, enforced on every sampled token.
    pub constraint: Option<Constraint>,
    /// Generate nothing: finish once the prompt is prefilled, with its embedding (the mean of
    /// its final hidden states after the output norm, L2-normalised). `max_tokens` is 0.
    pub embed: bool,
}

/// One candidate token with its log-probability under the raw logits.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
}

#[derive(Debug, Clone)]
pub struct GeneratedToken {
    pub id: u32,
    /// Text this token completes, after stop-string hold-back (may be empty).
    pub text: String,
    pub logprob: Option<TokenLogprob>,
    pub top_logprobs: Vec<TokenLogprob>,
}

#[derive(Debug, Clone)]
pub struct Finished {
    pub reason: FinishReason,
    /// Text held back for a possible stop string and released at the end.
    pub trailing_text: String,
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    /// For each prompt position after the first: the prompt token's logprob and the top ones.
    pub prompt_logprobs: Option<Vec<(TokenLogprob, Vec<TokenLogprob>)>>,
    /// The prompt's embedding, for a request that asked for one instead of tokens.
    pub embedding: Option<Vec<f32>>,
}

#[derive(Debug, Clone)]
pub enum Event {
    Token(GeneratedToken),
    Finished(Finished),
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Longest prompt plus completion of one sequence.
    pub ctx_len: usize,
    /// Sequences decoded together in one step.
    pub max_running_seqs: usize,
    /// Requests waiting for a place; beyond it `submit` refuses.
    pub max_queue: usize,
    /// Prompt tokens prefilled per step across sequences, so decoding streams do not stall.
    pub prefill_tokens_per_step: usize,
    /// Most bytes of keys and values held at once (blocks of every running sequence and of the
    /// prefix cache).
    pub kv_cache_bytes: usize,
    /// Share the keys and values of common prompt prefixes between requests.
    pub prefix_cache: bool,
}

/// Prompts are prefilled in chunks ending on multiples of this, whatever else is running.
pub(crate) const PREFILL_CHUNK: usize = 256;

/// The default KV budget: a quarter of the memory available now (2 GiB where that cannot be
/// read). Blocks are taken only as sequences grow, so an idle server holds none of it.
pub fn default_kv_cache_bytes() -> usize {
    const FALLBACK: usize = 2 << 30;
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|info| {
        info.lines()
            .find_map(|line| line.strip_prefix("MemAvailable:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            .map(|kib| kib * 1024)
    });
    available.map_or(FALLBACK, |bytes| bytes / 4)
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            ctx_len: 8192,
            max_running_seqs: 16,
            max_queue: 64,
            prefill_tokens_per_step: 512,
            kv_cache_bytes: default_kv_cache_bytes(),
            prefix_cache: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is busy: {0} requests are already waiting")]
    QueueFull(usize),
    #[error("the engine has stopped")]
    Stopped,
    /// Prompt plus completion need more KV blocks than the whole pool has.
    #[error("{requested} tokens need more KV cache than the server has (room for {limit} tokens)")]
    ExceedsKvCache { requested: usize, limit: usize, prompt: usize },
}

/// Which work goes first. Interactive requests have a client waiting on every token; background
/// work (batch lines) runs in the steps interactive work leaves idle, so it never slows a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    #[default]
    Interactive,
    Background,
}

struct Submission {
    request: GenerationRequest,
    events: mpsc::UnboundedSender<Event>,
    submitted_at: Instant,
    priority: Priority,
}

/// A handle to the engine thread; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    submissions: std::sync::mpsc::Sender<Submission>,
    waiting: Arc<AtomicUsize>,
    max_queue: usize,
    pool: KvPool,
    /// The longest sequence the pool can hold alone.
    max_sequence_tokens: usize,
    /// What this handle's submissions are.
    priority: Priority,
}

impl Engine {
    /// Starts the engine thread. It stops once every handle is dropped and its work is done.
    pub fn start(
        model: Arc<LoadedModel>,
        config: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        let (tx, rx) = std::sync::mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let model_config = model.model.config();
        let pool = KvPool::new(model_config, config.kv_cache_bytes);
        let engine = Self {
            submissions: tx,
            waiting: waiting.clone(),
            max_queue: config.max_queue,
            max_sequence_tokens: longest_sequence_in(model_config, pool.capacity_blocks(), config.ctx_len),
            pool: pool.clone(),
            priority: Priority::Interactive,
        };
        let thread = std::thread::Builder::new()
            .name("tessera-engine".into())
            .spawn(move || scheduler::Scheduler::new(model, config, pool, metrics, rx, waiting).run())?;
        Ok((engine, thread))
    }

    /// Queues a request. The receiver yields its tokens, then one `Finished` or `Failed`.
    pub fn submit(
        &self,
        request: GenerationRequest,
    ) -> Result<mpsc::UnboundedReceiver<Event>, SubmitError> {
        let requested = request.prompt.len() + request.max_tokens;
        if requested > self.max_sequence_tokens {
            return Err(SubmitError::ExceedsKvCache {
                requested,
                limit: self.max_sequence_tokens,
                prompt: request.prompt.len(),
            });
        }
        let waiting = self.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.max_queue {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull(waiting));
        }
        let (events, rx) = mpsc::unbounded_channel();
        self.submissions
            .send(Submission {
                request,
                events,
                submitted_at: Instant::now(),
                priority: self.priority,
            })
            .map_err(|_| {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                SubmitError::Stopped
            })?;
        Ok(rx)
    }

    /// A handle to the same engine whose submissions are background work.
    pub fn background(&self) -> Self {
        Self { priority: Priority::Background, ..self.clone() }
    }

    /// Requests waiting for a place in the running batch.
    pub fn queue_depth(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// The pool keys and values come from (for its counters).
    pub fn kv_pool(&self) -> &KvPool {
        &self.pool
    }

    /// The longest prompt plus completion one request may have.
    pub fn max_sequence_tokens(&self) -> usize {
        self.max_sequence_tokens
    }
}

/// The most positions (up to `ctx_len`) one sequence can reach in a pool of `blocks` blocks.
fn longest_sequence_in(config: &Config, blocks: usize, ctx_len: usize) -> usize {
    if blocks_for_sequence(config, ctx_len, PREFILL_CHUNK) <= blocks {
        return ctx_len;
    }
    // Blocks needed grow with the length: search for the last length that fits.
    let (mut fits, mut too_long) = (0, ctx_len);
    while too_long - fits > 1 {
        let mid = (fits + too_long) / 2;
        if blocks_for_sequence(config, mid, PREFILL_CHUNK) <= blocks {
            fits = mid;
        } else {
            too_long = mid;
        }
    }
    fits
}
