//! The reference policy's log-probabilities of preference answers, through the serving forward:
//! the model's batched prefill with the reference adapter version served as any adapter is
//! (integer kernels, no autograd graph), once per pair before a job's first step.
//!
//! These are not bit-for-bit the trainer's f32 log-probabilities of the same factors, so a
//! policy that starts from the reference has margins near 0 at step 0, not exactly 0 (the
//! trainer's activations and output logits round differently). DPO needs π_ref only as a
//! fixed baseline per pair, which this is; the TRL anchor, which compares to the last digit,
//! computes its reference with the trainer's exact forward instead.

use rayon::prelude::*;
use tessera_adapters::AdapterMix;

use crate::model::decoder::SequenceChunk;
use crate::model::{Decoder, KvCache, LogitsFor};
use crate::train::decoder::Example;
use crate::train::dpo::Both;
use crate::train::TrainError;

/// Pairs per serving forward: sixteen sequences, enough rows for the integer kernels to run at
/// their batched speed while the logits of the answers stay small.
pub const PAIRS_PER_FORWARD: usize = 8;

/// log π(y|x) of both answers of each of `pairs` with `adapters` served on `model`.
pub fn serving_log_probs(model: &Decoder, adapters: &AdapterMix, pairs: &[(Example, Example)]) -> Result<Vec<Both>, TrainError> {
    let mut out = Vec::with_capacity(pairs.len());
    for batch in pairs.chunks(PAIRS_PER_FORWARD) {
        let sequences: Vec<&Example> = batch.iter().flat_map(|(c, r)| [c, r]).collect();
        let log_probs = sequence_log_probs(model, adapters, &sequences)?;
        out.extend(log_probs.chunks_exact(2).map(|l| Both { chosen: l[0], rejected: l[1] }));
    }
    Ok(out)
}

/// Where the scored part of a sequence starts: the first position whose next token is scored.
fn first_scored(e: &Example) -> Result<usize, TrainError> {
    e.scored
        .iter()
        .position(|&s| s)
        .ok_or_else(|| TrainError::Data("a preference answer has no token to score".into()))
}

/// Σ log p of each sequence's scored tokens, all sequences in two batched forwards: the part
/// before the first scored position without logits, then the rest with logits for every row.
fn sequence_log_probs(model: &Decoder, adapters: &AdapterMix, sequences: &[&Example]) -> Result<Vec<f64>, TrainError> {
    let starts: Vec<usize> = sequences.iter().map(|e| first_scored(e)).collect::<Result<_, _>>()?;
    let mut caches = sequences
        .iter()
        .map(|e| {
            let mut cache = KvCache::new(model.config(), e.tokens.len())?;
            // The whole sequence is read as a prompt is (attention folds it in f32).
            cache.set_prompt_len(e.tokens.len());
            Ok(cache)
        })
        .collect::<Result<Vec<_>, TrainError>>()?;
    let mut prefixes: Vec<SequenceChunk> = sequences
        .iter()
        .zip(&starts)
        .zip(caches.iter_mut())
        .filter(|((_, &start), _)| start > 0)
        .map(|((e, &start), cache)| SequenceChunk { tokens: &e.tokens[..start], cache, logits: LogitsFor::None, adapters })
        .collect();
    if !prefixes.is_empty() {
        model.forward(&mut prefixes)?;
    }
    drop(prefixes);
    let mut answers: Vec<SequenceChunk> = sequences
        .iter()
        .zip(&starts)
        .zip(caches.iter_mut())
        .map(|((e, &start), cache)| SequenceChunk { tokens: &e.tokens[start..], cache, logits: LogitsFor::All, adapters })
        .collect();
    let logits = model.forward(&mut answers)?;
    let scores = sequences.iter().zip(&starts).enumerate().flat_map(|(seq, (e, &start))| {
        (start..e.tokens.len() - 1).filter(|&i| e.scored[i]).map(move |i| (seq, i - start, e.tokens[i + 1]))
    });
    let scores: Vec<(usize, usize, u32)> = scores.collect();
    let row_log_probs: Vec<f64> = scores.par_iter().map(|&(seq, row, target)| log_prob(logits.row(seq, row), target)).collect();
    let mut sums = vec![0.0; sequences.len()];
    for (&(seq, _, _), lp) in scores.iter().zip(row_log_probs) {
        sums[seq] += lp;
    }
    Ok(sums)
}

/// log softmax(logits)[target].
fn log_prob(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    f64::from(logits[target as usize] - max) - sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_prob_is_the_log_softmax_at_the_target() {
        let logits = [1.0f32, 2.0, 3.0];
        let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        assert!((log_prob(&logits, 1) - (2.0 - z.ln())).abs() < 1e-12);
    }
}
