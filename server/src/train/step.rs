//! One optimizer step of a job, whichever optimizer it trains with.
//!
//! AdamW sums the gradients of micro-batches and steps after the batch. AdaLomo cannot sum
//! (that is the buffer it exists to avoid): it runs the batch's pairs in one pass and its
//! preferences in another, each tensor moving as soon as its gradient appears. A batch that
//! mixes the two kinds of record therefore moves the adapter twice in one step, the DPO pass
//! seeing what the SFT pass left.

use crate::train::adalomo::{AdaLomo, FusedUpdate};
use crate::train::decoder::{Example, KeptGraphs, Trainable};
use crate::train::dpo::{self, Both, MixedStats, PreferenceExample, Rewards};
use crate::train::optim::Optimizer;
use crate::train::TrainError;

/// One step on `pairs` (the SFT loss, mean per scored token) and `preferences` (the DPO loss,
/// mean per pair); AdamW's in micro-batches of `micro_batch` sequences.
pub fn job_step(
    trainable: Trainable,
    optimizer: &mut Optimizer,
    pairs: &[Example],
    preferences: &[PreferenceExample],
    beta: f64,
    micro_batch: usize,
) -> Result<MixedStats, TrainError> {
    match optimizer {
        Optimizer::AdamW(adamw) => dpo::mixed_step(trainable, adamw, pairs, preferences, beta, micro_batch),
        Optimizer::AdaLomo(adalomo) => fused_step(trainable, adalomo, pairs, preferences, beta, KeptGraphs::WithinBudget),
    }
}

/// AdaLomo's step: a fused pass over the pairs, then one over the preferences, with the top
/// `kept` layers' graphs kept from the forward pass (the rest run again, and update, one by one).
pub fn fused_step(
    trainable: Trainable,
    optimizer: &mut AdaLomo,
    pairs: &[Example],
    preferences: &[PreferenceExample],
    beta: f64,
    kept: KeptGraphs,
) -> Result<MixedStats, TrainError> {
    let learning_rate = optimizer.begin_step();
    let vars: Vec<_> = trainable.lora.named_vars().into_iter().map(|(_, v)| v).collect();
    let mut sink = FusedUpdate::new(optimizer);
    let mut loss = 0.0;
    let sft = if pairs.is_empty() {
        None
    } else {
        let (sum, tokens) = trainable.accumulate_gradients(pairs, kept, &vars, &mut sink)?;
        loss += sum / tokens.max(1) as f64;
        Some((sum / tokens.max(1) as f64, tokens))
    };
    let dpo = if preferences.is_empty() {
        None
    } else {
        let policy = dpo::accumulate(trainable, &[preferences], beta, &mut sink)?;
        let reference: Vec<Both> = preferences.iter().map(|p| p.reference).collect();
        let rewards = Rewards::of(&policy, &reference, beta);
        loss += rewards.loss;
        Some(rewards)
    };
    let gradient_bytes = sink.peak_gradient_bytes;
    Ok(MixedStats { loss, sft, dpo, grad_norm: optimizer.gradient_norm(), learning_rate, gradient_bytes })
}
