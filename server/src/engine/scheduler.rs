//! The engine thread: admit, batch, step, repeat.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

use tessera_adapters::AdapterMix;

use super::sequence::Sequence;
use super::{EngineConfig, Submission};
use crate::metrics::Metrics;
use crate::model::decoder::SequenceChunk;
use crate::LoadedModel;

/// Prompts are prefilled in chunks ending on multiples of this, whatever else is running.
const PREFILL_CHUNK: usize = 256;

pub(super) struct Scheduler {
    model: Arc<LoadedModel>,
    config: EngineConfig,
    metrics: Arc<Metrics>,
    submissions: Receiver<Submission>,
    /// Submissions not yet running, counted in `waiting` with those still in the channel.
    queue: VecDeque<Submission>,
    waiting: Arc<AtomicUsize>,
    running: Vec<Sequence>,
    /// KV cache bytes of the running sequences and the most they may hold together.
    cache_bytes: usize,
    cache_budget: usize,
}

impl Scheduler {
    pub(super) fn new(
        model: Arc<LoadedModel>,
        config: EngineConfig,
        metrics: Arc<Metrics>,
        submissions: Receiver<Submission>,
        waiting: Arc<AtomicUsize>,
    ) -> Self {
        let c = model.model.config();
        // Room for every running sequence at full context.
        let cache_budget = config.max_running_seqs * config.ctx_len * c.n_layers * 2 * c.n_kv_heads * c.head_dim * 4;
        Self {
            model,
            config,
            metrics,
            submissions,
            queue: VecDeque::new(),
            waiting,
            running: Vec::new(),
            cache_bytes: 0,
            cache_budget,
        }
    }

    pub(super) fn run(mut self) {
        loop {
            if self.running.is_empty() && self.queue.is_empty() {
                // Idle: block until work arrives, or stop once every handle is gone.
                match self.submissions.recv() {
                    Ok(s) => self.queue.push_back(s),
                    Err(_) => return,
                }
            }
            loop {
                match self.submissions.try_recv() {
                    Ok(s) => self.queue.push_back(s),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        if self.running.is_empty() && self.queue.is_empty() {
                            return;
                        }
                        break;
                    }
                }
            }
            self.drop_cancelled();
            self.admit();
            self.metrics.queue_depth.set(self.waiting.load(Ordering::SeqCst) as i64);
            self.metrics.running_sequences.set(self.running.len() as i64);
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
                self.cache_bytes = 0;
            }
        }
    }

    fn drop_cancelled(&mut self) {
        let before = self.queue.len();
        self.queue.retain(|s| !s.events.is_closed());
        self.waiting.fetch_sub(before - self.queue.len(), Ordering::SeqCst);
        let mut freed = 0;
        self.running.retain(|seq| {
            let keep = !seq.cancelled();
            if !keep {
                freed += seq.cache.size_in_bytes();
                tracing::debug!("client went away; sequence cancelled");
            }
            keep
        });
        self.cache_bytes -= freed;
    }

    fn admit(&mut self) {
        let config = self.model.model.config();
        while self.running.len() < self.config.max_running_seqs {
            let Some(front) = self.queue.front() else {
                break;
            };
            let bytes = Sequence::cache_bytes(&front.request, config);
            if self.cache_bytes + bytes > self.cache_budget && !self.running.is_empty() {
                break;
            }
            let Some(submission) = self.queue.pop_front() else {
                break;
            };
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            let events = submission.events.clone();
            match Sequence::new(submission, config) {
                Ok(seq) => {
                    self.cache_bytes += seq.cache.size_in_bytes();
                    self.running.push(seq);
                }
                Err(e) => {
                    let _ = events.send(super::Event::Failed(e.to_string()));
                }
            }
        }
    }

    /// One model step: a prompt chunk for sequences still prefilling (within the step's prompt
    /// budget), one token for every decoding sequence.
    fn step(&mut self) {
        let mut budget = self.config.prefill_tokens_per_step;
        let mut inputs = Vec::with_capacity(self.running.len());
        for seq in &self.running {
            let input = seq.next_input(PREFILL_CHUNK);
            if seq.prefilling() {
                let first_prefill = budget == self.config.prefill_tokens_per_step;
                if input.tokens.len() > budget && !first_prefill {
                    inputs.push(None);
                    continue;
                }
                budget = budget.saturating_sub(input.tokens.len());
            }
            inputs.push(Some(input));
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
                for (seq, input) in self.running.iter().zip(&inputs) {
                    if input.is_some() {
                        seq.fail(&e.to_string());
                    }
                }
                self.running.retain(|_| false);
                self.cache_bytes = 0;
                return;
            }
        };
        let tokenizer = &self.model.tokenizer;
        let mut batch_index = 0;
        let mut finished = vec![false; self.running.len()];
        for (i, (seq, input)) in self.running.iter_mut().zip(&inputs).enumerate() {
            let Some(input) = input else { continue };
            let rows: Vec<&[f32]> = (0..logits.rows(batch_index))
                .map(|r| logits.row(batch_index, r))
                .collect();
            batch_index += 1;
            finished[i] = seq.advance(input.tokens.len(), &rows, tokenizer, &self.metrics);
        }
        let mut index = 0;
        let mut freed = 0;
        self.running.retain(|seq| {
            let done = finished[index];
            index += 1;
            if done {
                freed += seq.cache.size_in_bytes();
            }
            !done
        });
        self.cache_bytes -= freed;
    }
}
