//! One optimizer step of a job, whichever optimizer it trains with.
//!
//! AdamW sums the gradients of micro-batches and steps after the batch. AdaLomo cannot sum
//! (that is the buffer it exists to avoid): it runs the batch's pairs in one pass and its
//! preferences in another, each tensor moving as soon as its gradient appears. A batch that
//! mixes the two kinds of record therefore moves the adapter twice in one step, the DPO pass
//! seeing what the SFT pass left.

use crate::train::adalomo::{AdaLomo, FusedUpdate};
use crate::train::decoder::{Example, KeptGraphs, Trainable};
use crate::train::dpo::{self, MixedStats, PreferenceExample, PreferenceLoss};
use crate::train::optim::Optimizer;
use crate::train::TrainError;

/// One step on `pairs` (the SFT loss, mean per scored token) and `preferences`
/// (`preference_loss`, mean per pair); AdamW's in micro-batches of `micro_batch` sequences.
pub fn job_step(
    trainable: Trainable,
    optimizer: &mut Optimizer,
    pairs: &[Example],
    preferences: &[PreferenceExample],
    preference_loss: PreferenceLoss,
    micro_batch: usize,
) -> Result<MixedStats, TrainError> {
    match optimizer {
        Optimizer::AdamW(adamw) => dpo::mixed_step(trainable, adamw, pairs, preferences, preference_loss, micro_batch),
        Optimizer::AdaLomo(adalomo) => fused_step(trainable, adalomo, pairs, preferences, preference_loss, KeptGraphs::WithinBudget),
    }
}

/// AdaLomo's step: a fused pass over the pairs, then one over the preferences, with the top
/// `kept` layers' graphs kept from the forward pass (the rest run again, and update, one by one).
pub fn fused_step(
    trainable: Trainable,
    optimizer: &mut AdaLomo,
    pairs: &[Example],
    preferences: &[PreferenceExample],
    preference_loss: PreferenceLoss,
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
        let stats = dpo::preference_pass(trainable, &[preferences], preference_loss, &mut sink)?;
        loss += stats.rewards.loss + preference_loss.rpo_alpha * stats.chosen_nll;
        Some(stats)
    };
    let gradient_bytes = sink.peak_gradient_bytes;
    Ok(MixedStats { loss, sft, dpo, grad_norm: optimizer.gradient_norm(), learning_rate, gradient_bytes })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::synthetic::tiny_gemma3;
    use crate::train::adalomo::AdaLomoConfig;
    use crate::train::lora::{AdapterParams, LoraSpec};
    use crate::train::optim::Schedule;

    fn tiny_model(dir: &std::path::Path) -> Arc<crate::LoadedModel> {
        let path = dir.join("tiny.gguf");
        tiny_gemma3(1).write(&path).expect("writing the tiny model");
        Arc::new(crate::LoadedModel::load(&path).expect("loading the tiny model"))
    }

    /// A loss that is not finite stops the step before the fused update touches anything, even
    /// through the integer output logits (which would read a NaN activation as 0).
    #[test]
    fn a_diverged_loss_fails_the_step_and_leaves_the_adapter_as_it_was() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let model = tiny_model(dir.path());
        let params = AdapterParams::fresh(&model, LoraSpec::default(), 1)?;
        let named = params.named_vars();
        let poisoned = named.last().ok_or("no tensors")?.1;
        poisoned.set(&(poisoned.as_tensor().ones_like()? * f64::NAN)?)?;
        let before: Vec<Vec<f32>> = named.iter().map(|(_, v)| v.as_tensor().flatten_all()?.to_vec1::<f32>()).collect::<Result<_, _>>()?;
        let vars: Vec<_> = named.iter().map(|(_, v)| *v).collect();
        let schedule = Schedule { learning_rate: 0.1, warmup_steps: 0, total_steps: 10 };
        let mut optimizer = AdaLomo::new(AdaLomoConfig::new(schedule), &vars);
        let example = Example { tokens: vec![1, 2, 3, 4], scored: vec![true; 4] };
        let outcome = fused_step(Trainable::new(&model, &params), &mut optimizer, &[example], &[], PreferenceLoss::dpo(0.1), KeptGraphs::Layers(0));
        let error = outcome.err().ok_or("a NaN loss trained")?.to_string();
        assert!(error.contains("diverged"), "{error}");
        for ((name, var), before) in named.iter().zip(&before) {
            let after = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            assert!(after.iter().zip(before).all(|(a, b)| a.to_bits() == b.to_bits()), "{name} moved");
        }
        Ok(())
    }
}
