//! The engine thread: admit, batch, step, repeat.
//!
//! Keys and values come from one [`KvPool`]: a sequence takes blocks as it grows. When a step
//! needs more blocks than are free, the prefix cache gives back blocks no sequence uses (least
//! recently used first); when that is not enough, the most recently admitted sequence is
//! preempted: it gives back its blocks and waits at the front of the line, to recompute its
//! prompt and what it generated when there is room again.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::utils::barrier_pool;

use tessera_adapters::AdapterMix;

use super::sequence::{Sequence, StepInput};
use super::{EngineConfig, Priority, Submission, PREFILL_CHUNK};
use crate::metrics::Metrics;
use crate::model::decoder::{Logits, SequenceChunk};
use crate::model::kv::prefix::PrefixCache;
use crate::model::{KvPool, ModelError};
use crate::LoadedModel;

pub(super) struct Scheduler {
    model: Arc<LoadedModel>,
    config: EngineConfig,
    metrics: Arc<Metrics>,
    submissions: Receiver<Submission>,
    /// Submissions not yet running, counted in `waiting` with those still in the channel.
    queue: VecDeque<Submission>,
    waiting: Arc<AtomicUsize>,
    running: Vec<Sequence>,
    /// Sequences admitted before that wait for blocks (preempted, or their first chunk did
    /// not fit). They hold no blocks and go before the queue.
    paused: VecDeque<Sequence>,
    pool: KvPool,
    prefix: Option<PrefixCache>,
}

impl Scheduler {
    pub(super) fn new(
        model: Arc<LoadedModel>,
        config: EngineConfig,
        pool: KvPool,
        metrics: Arc<Metrics>,
        submissions: Receiver<Submission>,
        waiting: Arc<AtomicUsize>,
    ) -> Self {
        metrics.kv_cache_capacity_bytes.set((pool.capacity_blocks() * pool.block_bytes()) as i64);
        Self {
            prefix: config.prefix_cache.then(PrefixCache::new),
            model,
            config,
            metrics,
            submissions,
            queue: VecDeque::new(),
            waiting,
            running: Vec::new(),
            paused: VecDeque::new(),
            pool,
        }
    }

    pub(super) fn run(mut self) {
        loop {
            if self.running.is_empty() && self.paused.is_empty() && self.queue.is_empty() {
                // Idle: block until work arrives, or stop once every handle is gone.
                match self.submissions.recv() {
                    Ok(s) => self.queue.push_back(s),
                    Err(_) => return,
                }
            }
            if !self.take_submissions() {
                return;
            }
            self.drop_cancelled();
            self.admit();
            self.publish_gauges();
            if self.running.is_empty() {
                continue;
            }
            // A panic in a step fails that step's sequences; the engine keeps serving.
            if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| self.step())) {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!(%message, "engine step panicked");
                for seq in self.running.drain(..) {
                    seq.fail(&format!("internal error in the engine: {message}"));
                }
            }
        }
    }

    /// Moves what has arrived into the queue. Returns false when every handle is gone and
    /// nothing is left to do.
    fn take_submissions(&mut self) -> bool {
        loop {
            match self.submissions.try_recv() {
                Ok(s) => self.queue.push_back(s),
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => {
                    return !(self.running.is_empty() && self.paused.is_empty() && self.queue.is_empty());
                }
            }
        }
    }

    fn publish_gauges(&self) {
        let m = &self.metrics;
        m.queue_depth.set((self.waiting.load(Ordering::SeqCst) + self.paused.len()) as i64);
        m.running_sequences.set(self.running.len() as i64);
        m.kv_cache_used_bytes.set((self.pool.allocated_blocks() * self.pool.block_bytes()) as i64);
        let cached = self.prefix.as_ref().map_or(0, |p| p.len() * self.model.model.config().n_layers);
        m.prefix_cache_bytes.set((cached * self.pool.block_bytes()) as i64);
    }

    fn drop_cancelled(&mut self) {
        let before = self.queue.len();
        self.queue.retain(|s| !s.events.is_closed());
        self.waiting.fetch_sub(before - self.queue.len(), Ordering::SeqCst);
        self.paused.retain(|seq| !seq.cancelled());
        self.running.retain(|seq| {
            let keep = !seq.cancelled();
            if !keep {
                tracing::debug!("client went away; sequence cancelled");
            }
            keep
        });
    }

    /// Starts waiting sequences while there are places in the batch and blocks for their first
    /// chunk (after what the prefix cache already holds of them). Interactive work goes first,
    /// taking the place and the blocks of background sequences when it needs them.
    fn admit(&mut self) {
        let model = self.model.clone();
        let config = model.model.config();
        while self.running.len() >= self.config.max_running_seqs && self.interactive_waiting() && self.preempt_newest_background() {}
        while self.running.len() < self.config.max_running_seqs {
            let Some((mut seq, new)) = self.next_to_admit() else { break };
            if let Some(prefix) = self.prefix.as_mut() {
                let found = seq.adopt_cached_prefix(prefix);
                if new {
                    self.metrics.prefix_cache_query_tokens.inc_by(seq.prompt_len() as u64);
                    self.metrics.prefix_cache_hit_tokens.inc_by(found as u64);
                }
            }
            let first_chunk = seq.next_input(PREFILL_CHUNK).tokens.len();
            let fits = loop {
                if make_room(&mut seq, first_chunk, self.prefix.as_mut()) {
                    break true;
                }
                if seq.priority == Priority::Background || !self.preempt_newest_background() {
                    break false;
                }
            };
            if fits {
                self.start_running(seq);
                continue;
            }
            seq.preempt(&self.pool, config);
            if self.running.is_empty() {
                // Nothing else holds blocks and the prefix cache gave back all it could.
                seq.fail(&ModelError::KvPoolExhausted { capacity_blocks: self.pool.capacity_blocks() }.to_string());
                continue;
            }
            self.paused.push_front(seq);
            break;
        }
    }

    /// The next sequence to start and whether it is new: interactive ones first (paused, then
    /// queued), then background ones while they hold fewer than half the places.
    fn next_to_admit(&mut self) -> Option<(Sequence, bool)> {
        let interactive = |p: Priority| p == Priority::Interactive;
        if let Some(i) = self.paused.iter().position(|seq| interactive(seq.priority)) {
            return self.paused.remove(i).map(|seq| (seq, false));
        }
        let queued = match self.queue.iter().position(|s| interactive(s.priority)) {
            Some(i) => i,
            None if self.running_background() >= (self.config.max_running_seqs / 2).max(1) => return None,
            None if !self.paused.is_empty() => return self.paused.pop_front().map(|seq| (seq, false)),
            None => 0,
        };
        let submission = self.queue.remove(queued)?;
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        Some((Sequence::new(submission, &self.pool, self.model.model.config()), true))
    }

    /// Adds an admitted sequence to the batch, keeping interactive sequences before background
    /// ones: preemption takes the last, so background work gives way first.
    fn start_running(&mut self, seq: Sequence) {
        let at = match seq.priority {
            Priority::Interactive => self.running.iter().position(|s| s.priority == Priority::Background).unwrap_or(self.running.len()),
            Priority::Background => self.running.len(),
        };
        self.running.insert(at, seq);
    }

    fn running_background(&self) -> usize {
        self.running.iter().filter(|s| s.priority == Priority::Background).count()
    }

    fn interactive_waiting(&self) -> bool {
        self.queue.iter().any(|s| s.priority == Priority::Interactive) || self.paused.iter().any(|s| s.priority == Priority::Interactive)
    }

    /// Sends the newest running background sequence back to wait, its blocks freed. False when
    /// none runs.
    fn preempt_newest_background(&mut self) -> bool {
        if self.running.last().is_none_or(|s| s.priority != Priority::Background) {
            return false;
        }
        let Some(mut seq) = self.running.pop() else { return false };
        self.metrics.preemptions.inc();
        seq.preempt(&self.pool, self.model.model.config());
        self.paused.push_back(seq);
        true
    }

    /// Each running sequence's input this step, with its blocks reserved: a prompt chunk for
    /// sequences still prefilling (within the step's prompt budget), one token for every
    /// decoding sequence. Preempts the newest sequences when the pool runs out. Background
    /// sequences sit out every step that has interactive work, which then runs as fast as alone.
    fn plan_step(&mut self) -> Vec<Option<StepInput>> {
        let full_budget = self.config.prefill_tokens_per_step;
        let mut budget = full_budget;
        let mut inputs = Vec::with_capacity(self.running.len());
        let interactive = self.running.iter().any(|s| s.priority == Priority::Interactive);
        let mut i = 0;
        while i < self.running.len() {
            if interactive && self.running[i].priority == Priority::Background {
                inputs.push(None);
                i += 1;
                continue;
            }
            let input = self.running[i].next_input(PREFILL_CHUNK);
            let prefilling = self.running[i].prefilling();
            if prefilling && input.tokens.len() > budget && budget != full_budget {
                inputs.push(None);
                i += 1;
                continue;
            }
            if !self.make_room_or_preempt(i, input.tokens.len()) {
                // Sequence i itself went back to wait; the one after it is now at i.
                continue;
            }
            if prefilling {
                budget = budget.saturating_sub(input.tokens.len());
            }
            inputs.push(Some(input));
            i += 1;
        }
        inputs
    }

    /// Reserves blocks for `tokens` more positions of running sequence `i`, preempting the
    /// most recently admitted sequences until they fit. Returns false when `i` itself had to go.
    fn make_room_or_preempt(&mut self, i: usize, tokens: usize) -> bool {
        let config = self.model.model.config();
        while !make_room(&mut self.running[i], tokens, self.prefix.as_mut()) {
            let victim = self.running.len() - 1;
            let mut seq = self.running.remove(victim);
            tracing::debug!(running = self.running.len(), "KV pool full; sequence preempted");
            self.metrics.preemptions.inc();
            seq.preempt(&self.pool, config);
            self.paused.push_front(seq);
            if victim == i {
                return false;
            }
        }
        true
    }

    /// One model step over the planned inputs, then sampling and bookkeeping.
    fn step(&mut self) {
        let inputs = self.plan_step();
        if inputs.iter().all(Option::is_none) {
            return;
        }
        let leases: Vec<_> = self.running.iter().map(|seq| seq.leases().to_vec()).collect();
        let mixes: Vec<AdapterMix> = leases
            .iter()
            .map(|leased| AdapterMix {
                parts: leased.iter().map(|(g, weight)| (&g.weights, *weight)).collect(),
            })
            .collect();
        let mut chunks: Vec<SequenceChunk> = self
            .running
            .iter_mut()
            .zip(&inputs)
            .zip(&mixes)
            .filter_map(|((seq, input), mix)| {
                input.as_ref().map(|input| SequenceChunk {
                    tokens: &input.tokens,
                    cache: &mut seq.cache,
                    logits: input.logits,
                    adapters: mix,
                })
            })
            .collect();
        let result = self.model.model.forward(&mut chunks);
        drop(chunks);

        let logits = match result {
            Ok(logits) => logits,
            Err(e) => {
                tracing::error!(error = %e, "model step failed");
                let mut fed = inputs.iter().map(Option::is_some);
                self.running.retain(|seq| {
                    let failed = fed.next().unwrap_or(false);
                    if failed {
                        seq.fail(&e.to_string());
                    }
                    !failed
                });
                return;
            }
        };
        let finished = self.advance_fed(&inputs, &logits);
        if let Some(prefix) = self.prefix.as_mut() {
            for (seq, input) in self.running.iter_mut().zip(&inputs) {
                if input.is_some() {
                    seq.register_blocks(prefix);
                }
            }
        }
        let mut done = finished.into_iter();
        self.running.retain(|_| !done.next().unwrap_or(false));
    }

    /// Hands each fed sequence its logits (it samples, streams and checks its stops); returns
    /// which running sequences finished. The sequences are shared out over the workers: with
    /// many of them, their 262k-wide scans were the engine thread's alone, and the workers
    /// waited. Each sequence does what it would alone.
    fn advance_fed(&mut self, inputs: &[Option<StepInput>], logits: &Logits) -> Vec<bool> {
        let (tokenizer, metrics) = (&self.model.tokenizer, &*self.metrics);
        let finished: Vec<AtomicBool> = self.running.iter().map(|_| AtomicBool::new(false)).collect();
        let fed: Vec<Mutex<(usize, &mut Sequence, usize)>> = self
            .running
            .iter_mut()
            .zip(inputs)
            .enumerate()
            .filter_map(|(i, (seq, input))| input.as_ref().map(|input| (i, seq, input.tokens.len())))
            .map(Mutex::new)
            .collect();
        let advance = |batch_index: usize| {
            let mut guard = fed[batch_index].lock().unwrap_or_else(PoisonError::into_inner);
            let (i, seq, tokens) = &mut *guard;
            let rows: Vec<&[f32]> = (0..logits.rows(batch_index)).map(|r| logits.row(batch_index, r)).collect();
            finished[*i].store(seq.advance(*tokens, &rows, logits.pooled_hidden(batch_index), tokenizer, metrics), Ordering::Relaxed);
        };
        if fed.len() < 2 {
            (0..fed.len()).for_each(advance);
        } else {
            barrier_pool().execute_chunked(fed.len(), |range| range.for_each(advance));
        }
        finished.into_iter().map(AtomicBool::into_inner).collect()
    }
}

/// Reserves blocks for `tokens` more positions of `seq`, evicting unused prefix-cache blocks
/// while that helps. Returns false when the pool cannot provide them.
fn make_room(seq: &mut Sequence, tokens: usize, mut prefix: Option<&mut PrefixCache>) -> bool {
    loop {
        match seq.cache.reserve(tokens) {
            Ok(()) => return true,
            Err(ModelError::KvPoolExhausted { .. }) => {}
            // Anything else is the step's to report.
            Err(_) => return true,
        }
        let wanted = seq.cache.blocks_to_reserve(tokens);
        let freed = prefix.as_deref_mut().map_or(0, |p| p.evict(wanted));
        if freed == 0 {
            return false;
        }
    }
}
