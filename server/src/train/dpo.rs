//! Direct preference optimisation (Rafailov et al. 2023): for a prompt x with a chosen answer
//! y_w and a rejected one y_l,
//!
//!   L = −log σ(β·[(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])
//!
//! where log π(y|x) sums the log-probabilities of the answer's tokens (through the token that
//! ends its turn) under the adapter being trained, and π_ref is the adapter version the job
//! starts from. A job computes π_ref's log-probabilities once per pair before the first step,
//! through the serving forward with that version (`train::reference`); no second model is
//! kept. β·(log π − log π_ref) is each answer's implicit reward; TRL reports their mean, their
//! margin and how often the chosen one's is higher ("reward accuracy").
//!
//! Jobs add an SFT term on the chosen answers (RPO, Pang et al. 2024; TRL's `rpo_alpha`):
//! α·(mean −log π per chosen token). DPO alone only widens the margin, and on a task with a
//! clear signal it does so within a few steps by making both answers unlikely: the greedy
//! answers of Gemma 3 270M after one such job were "The answer is  or or ." — the right form
//! with the number gone. The SFT term keeps the chosen answer itself likely.

use candle_core::{Device, Tensor};

use crate::train::decoder::{Example, GradientSink, KeptGraphs, Trainable};
use crate::train::optim::AdamW;
use crate::train::TrainError;

/// β when a job does not choose one (OpenAI's and TRL's default).
pub const DEFAULT_BETA: f64 = 0.1;
/// The largest β a job may choose.
pub const MAX_BETA: f64 = 10.0;
/// The weight of the SFT term on the chosen answers in a job's loss (the RPO paper's α and
/// the value it recommends).
pub const DEFAULT_RPO_ALPHA: f64 = 1.0;

/// The loss on preferences: DPO with `beta`, plus `rpo_alpha` times the mean token loss on the
/// chosen answers (0 for DPO alone, as TRL computes it by default).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PreferenceLoss {
    pub beta: f64,
    pub rpo_alpha: f64,
}

impl PreferenceLoss {
    /// DPO alone.
    pub fn dpo(beta: f64) -> Self {
        Self { beta, rpo_alpha: 0.0 }
    }

    /// What a job trains with: DPO and the SFT term on the chosen answers.
    pub fn for_jobs(beta: f64) -> Self {
        Self { beta, rpo_alpha: DEFAULT_RPO_ALPHA }
    }
}

/// β must lie in (0, 10].
pub fn beta_is_valid(beta: f64) -> bool {
    beta.is_finite() && beta > 0.0 && beta <= MAX_BETA
}

/// A value for each answer of a preference.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Both {
    pub chosen: f64,
    pub rejected: f64,
}

/// A preference ready to train: both answers after the same prompt, each scored on its answer
/// only, and the reference policy's log-probabilities of each.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceExample {
    pub chosen: Example,
    pub rejected: Example,
    pub reference: Both,
}

impl PreferenceExample {
    pub fn tokens(&self) -> usize {
        self.chosen.tokens.len() + self.rejected.tokens.len()
    }
}

/// How a policy does on a set of preferences: the mean loss and TRL's reward statistics.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Rewards {
    pub pairs: usize,
    /// Mean −log σ(β·margin).
    pub loss: f64,
    /// Mean β·(log π(y_w|x) − log π_ref(y_w|x)).
    pub chosen: f64,
    /// Mean β·(log π(y_l|x) − log π_ref(y_l|x)).
    pub rejected: f64,
    /// The share of pairs whose chosen answer has the higher reward.
    pub accuracy: f64,
    /// Mean chosen − rejected reward.
    pub margin: f64,
}

/// log σ(z), without overflow for large |z|.
fn log_sigmoid(z: f64) -> f64 {
    z.min(0.0) - (-z.abs()).exp().ln_1p()
}

impl Rewards {
    /// The statistics of the policy's log-probabilities `policy` against the reference's.
    pub fn of(policy: &[Both], reference: &[Both], beta: f64) -> Self {
        let pairs = policy.len();
        let mut sums = Self { pairs, ..Self::default() };
        for (p, r) in policy.iter().zip(reference) {
            let (chosen, rejected) = (beta * (p.chosen - r.chosen), beta * (p.rejected - r.rejected));
            sums.loss -= log_sigmoid(chosen - rejected);
            sums.chosen += chosen;
            sums.rejected += rejected;
            sums.accuracy += f64::from(u8::from(chosen > rejected));
            sums.margin += chosen - rejected;
        }
        let n = pairs.max(1) as f64;
        Self {
            pairs,
            loss: sums.loss / n,
            chosen: sums.chosen / n,
            rejected: sums.rejected / n,
            accuracy: sums.accuracy / n,
            margin: sums.margin / n,
        }
    }

    /// TRL's metric names, as events and checkpoints report them.
    pub fn to_json(&self, prefix: &str) -> serde_json::Map<String, serde_json::Value> {
        [
            ("dpo_loss", self.loss),
            ("rewards_chosen", self.chosen),
            ("rewards_rejected", self.rejected),
            ("reward_accuracy", self.accuracy),
            ("reward_margin", self.margin),
        ]
        .into_iter()
        .map(|(name, value)| (format!("{prefix}{name}"), serde_json::json!(value)))
        .collect()
    }
}

/// The sequences of `preferences` laid out chosen, rejected, chosen, rejected, ….
fn interleaved(preferences: &[PreferenceExample]) -> Vec<Example> {
    preferences.iter().flat_map(|p| [p.chosen.clone(), p.rejected.clone()]).collect()
}

/// log π(y|x) of both answers of each of `pairs` under `trainable`, in batches of `batch_size`
/// pairs, without gradients.
pub fn log_probs(trainable: Trainable, pairs: &[(Example, Example)], batch_size: usize) -> Result<Vec<Both>, TrainError> {
    let mut out = Vec::with_capacity(pairs.len());
    for batch in pairs.chunks(batch_size.max(1)) {
        let sequences: Vec<Example> = batch.iter().flat_map(|(c, r)| [c.clone(), r.clone()]).collect();
        let losses = trainable.sequence_losses(&sequences)?;
        out.extend(losses.chunks_exact(2).map(|l| Both { chosen: -l[0], rejected: -l[1] }));
    }
    Ok(out)
}

/// The preferences with the reference policy's log-probabilities of their answers, in the
/// same order.
pub fn with_reference(pairs: Vec<(Example, Example)>, reference: Vec<Both>) -> Vec<PreferenceExample> {
    pairs
        .into_iter()
        .zip(reference)
        .map(|((chosen, rejected), reference)| PreferenceExample { chosen, rejected, reference })
        .collect()
}

/// How the policy `trainable` does on `preferences`, in batches of `batch_size` pairs.
pub fn evaluate_preferences(trainable: Trainable, preferences: &[PreferenceExample], beta: f64, batch_size: usize) -> Result<Rewards, TrainError> {
    if preferences.is_empty() {
        return Err(TrainError::Data("no preferences to evaluate".into()));
    }
    let pairs: Vec<(Example, Example)> = preferences.iter().map(|p| (p.chosen.clone(), p.rejected.clone())).collect();
    let policy = log_probs(trainable, &pairs, batch_size)?;
    let reference: Vec<Both> = preferences.iter().map(|p| p.reference).collect();
    Ok(Rewards::of(&policy, &reference, beta))
}

/// Σ over pairs of −log σ(β·margin), plus `chosen_weight`·Σ −log π(y_w|x), from the
/// interleaved sequences' −log π `[2·pairs]` and the reference's log π, as a differentiable
/// function of the former.
fn summed_loss(sequence_losses: &Tensor, reference: &[f64], beta: f64, chosen_weight: f64) -> candle_core::Result<Tensor> {
    let reference = Tensor::from_vec(reference.iter().map(|&r| r as f32).collect::<Vec<_>>(), reference.len(), &Device::Cpu)?;
    let by_pair = sequence_losses.reshape((reference.dim(0)? / 2, 2))?;
    // log π − log π_ref, as [pairs, 2]: the chosen answer's, then the rejected one's.
    let log_ratios = by_pair.neg()?.sub(&reference.reshape(by_pair.shape())?)?;
    let margins = (log_ratios.narrow(1, 0, 1)? - log_ratios.narrow(1, 1, 1)?)?;
    // −log σ(z) = softplus(−z) = max(−z, 0) + log(1 + e^−|z|).
    let z = (margins * beta)?;
    let softplus = (z.neg()?.relu()? + (z.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    if chosen_weight == 0.0 {
        return softplus.sum_all();
    }
    softplus.sum_all()? + (by_pair.narrow(1, 0, 1)?.sum_all()? * chosen_weight)?
}

/// Gives the gradients of the summed loss over `micro_batches` to `sink` and returns the
/// policy's log-probabilities of every pair's answers. `chosen_weight` weighs the summed token
/// loss of the chosen answers.
fn accumulate<S: GradientSink + ?Sized>(
    trainable: Trainable,
    micro_batches: &[&[PreferenceExample]],
    beta: f64,
    chosen_weight: f64,
    sink: &mut S,
) -> Result<Vec<Both>, TrainError> {
    let vars: Vec<_> = trainable.lora.named_vars().into_iter().map(|(_, v)| v).collect();
    let mut policy = Vec::new();
    for batch in micro_batches {
        let reference: Vec<f64> = batch.iter().flat_map(|p| [p.reference.chosen, p.reference.rejected]).collect();
        let (_, losses) = trainable.accumulate_sequence_gradients(&interleaved(batch), KeptGraphs::WithinBudget, &vars, sink, |sequences| {
            summed_loss(sequences, &reference, beta, chosen_weight)
        })?;
        policy.extend(losses.chunks_exact(2).map(|l| Both { chosen: -l[0], rejected: -l[1] }));
    }
    Ok(policy)
}

/// How the policy did on a step's preferences: TRL's reward statistics, and the mean token
/// loss on the chosen answers (TRL's `nll_loss`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PreferenceStats {
    pub rewards: Rewards,
    pub chosen_nll: f64,
}

impl PreferenceStats {
    /// TRL's metric names, as events and checkpoints report them.
    pub fn to_json(&self, prefix: &str) -> serde_json::Map<String, serde_json::Value> {
        let mut data = self.rewards.to_json(prefix);
        data.insert(format!("{prefix}nll_loss"), serde_json::json!(self.chosen_nll));
        data
    }
}

/// Gradients of the mean loss over the pairs of `micro_batches` — DPO plus α times the mean
/// token loss on all their chosen answers, as TRL's `rpo_alpha` weighs it — and how the policy
/// did.
pub fn dpo_gradients(trainable: Trainable, micro_batches: &[&[PreferenceExample]], loss: PreferenceLoss) -> Result<(Vec<Tensor>, PreferenceStats), TrainError> {
    let vars: Vec<_> = trainable.lora.named_vars().into_iter().map(|(_, v)| v).collect();
    let mut sums = vec![None; vars.len()];
    let stats = preference_pass(trainable, micro_batches, loss, sums.as_mut_slice())?;
    let grads = mean_gradients(sums, &vars, stats.rewards.pairs)?;
    Ok((grads, stats))
}

/// Gives `sink` the gradients of the loss over the pairs of `micro_batches` (summed over the
/// pairs: DPO plus α times the chosen answers' token loss, as [`dpo_gradients`] averages it),
/// and returns how the policy did.
pub(crate) fn preference_pass<S: GradientSink + ?Sized>(
    trainable: Trainable,
    micro_batches: &[&[PreferenceExample]],
    loss: PreferenceLoss,
    sink: &mut S,
) -> Result<PreferenceStats, TrainError> {
    let pairs: usize = micro_batches.iter().map(|b| b.len()).sum();
    let chosen_tokens: usize = micro_batches.iter().flat_map(|b| b.iter().map(|p| p.chosen.scored_tokens())).sum();
    // Summed over micro-batches then divided by the pairs, this weight makes the term
    // α·Σ(−log π(y_w|x))/(chosen tokens).
    let chosen_weight = loss.rpo_alpha * pairs as f64 / chosen_tokens.max(1) as f64;
    let policy = accumulate(trainable, micro_batches, loss.beta, chosen_weight, sink)?;
    let reference: Vec<Both> = micro_batches.iter().flat_map(|b| b.iter().map(|p| p.reference)).collect();
    let rewards = Rewards::of(&policy, &reference, loss.beta);
    let chosen_nll = -policy.iter().map(|p| p.chosen).sum::<f64>() / chosen_tokens.max(1) as f64;
    Ok(PreferenceStats { rewards, chosen_nll })
}

/// Σ/n for each variable's summed gradient (zeros where it had none).
fn mean_gradients(sums: Vec<Option<Tensor>>, vars: &[&candle_core::Var], n: usize) -> Result<Vec<Tensor>, TrainError> {
    if n == 0 {
        return Err(TrainError::Data("nothing to train on in the batch".into()));
    }
    sums.into_iter()
        .zip(vars)
        .map(|(g, v)| match g {
            Some(g) => Ok((g / n as f64)?),
            None => Ok(v.as_tensor().zeros_like()?),
        })
        .collect()
}

/// What one step of a job that trains on pairs, preferences or both saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MixedStats {
    /// The step's objective: the mean token loss on its pairs plus the loss on its
    /// preferences (DPO and the weighted token loss on their chosen answers).
    pub loss: f64,
    /// The mean token loss and token count of its pairs.
    pub sft: Option<(f64, usize)>,
    pub dpo: Option<PreferenceStats>,
    pub grad_norm: f64,
    pub learning_rate: f64,
    /// The most gradient bytes alive at once in the step.
    pub gradient_bytes: usize,
}

/// One optimizer step on `pairs` (the SFT loss, mean per scored token) and `preferences`
/// (`preference_loss`, mean per pair), the two losses added, in micro-batches of `micro_batch`
/// sequences.
pub fn mixed_step(
    trainable: Trainable,
    optimizer: &mut AdamW,
    pairs: &[Example],
    preferences: &[PreferenceExample],
    preference_loss: PreferenceLoss,
    micro_batch: usize,
) -> Result<MixedStats, TrainError> {
    let vars: Vec<_> = trainable.lora.named_vars().into_iter().map(|(_, v)| v).collect();
    let mut grads: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().zeros_like()).collect::<Result<_, _>>()?;
    let add = |grads: &mut Vec<Tensor>, more: Vec<Tensor>| -> Result<(), TrainError> {
        for (g, m) in grads.iter_mut().zip(more) {
            *g = (&*g + m)?;
        }
        Ok(())
    };
    let mut loss = 0.0;
    let sft = if pairs.is_empty() {
        None
    } else {
        let micro_batches: Vec<&[Example]> = pairs.chunks(micro_batch.max(1)).collect();
        let (sft_grads, sft_loss, tokens) = crate::train::gradients(trainable, &micro_batches)?;
        add(&mut grads, sft_grads)?;
        loss += sft_loss;
        Some((sft_loss, tokens))
    };
    let dpo = if preferences.is_empty() {
        None
    } else {
        // Each pair is two sequences.
        let micro_batches: Vec<&[PreferenceExample]> = preferences.chunks((micro_batch / 2).max(1)).collect();
        let (dpo_grads, stats) = dpo_gradients(trainable, &micro_batches, preference_loss)?;
        add(&mut grads, dpo_grads)?;
        loss += stats.rewards.loss + preference_loss.rpo_alpha * stats.chosen_nll;
        Some(stats)
    };
    let (grad_norm, learning_rate) = optimizer.step(&vars, &grads)?;
    // The whole adapter's gradient, and the micro-batch's sum beside it.
    let gradient_bytes = 2 * grads.iter().map(|g| 4 * g.elem_count()).sum::<usize>();
    Ok(MixedStats { loss, sft, dpo, grad_norm, learning_rate, gradient_bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beta_lies_in_zero_to_ten() {
        for beta in [1e-6, 0.1, 10.0] {
            assert!(beta_is_valid(beta), "{beta}");
        }
        for beta in [0.0, -0.1, 10.000001, f64::NAN, f64::INFINITY] {
            assert!(!beta_is_valid(beta), "{beta}");
        }
    }

    #[test]
    fn the_summed_loss_is_softplus_of_minus_beta_margin_with_its_gradient() {
        // Two pairs: −log π of (c0, r0, c1, r1) and the reference's log π.
        let losses = [3.0f32, 5.0, 4.0, 2.5];
        let reference = [-3.5, -4.5, -4.0, -3.0];
        let beta = 0.5;
        let var = candle_core::Var::from_slice(&losses, 4, &Device::Cpu).unwrap();
        let loss = summed_loss(var.as_tensor(), &reference, beta, 0.0).unwrap();
        let policy = [Both { chosen: -3.0, rejected: -5.0 }, Both { chosen: -4.0, rejected: -2.5 }];
        let refs = [Both { chosen: -3.5, rejected: -4.5 }, Both { chosen: -4.0, rejected: -3.0 }];
        let rewards = Rewards::of(&policy, &refs, beta);
        let value = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((value - 2.0 * rewards.loss).abs() < 1e-6, "{value} against {}", 2.0 * rewards.loss);
        // Margins: pair 0 (0.5 − (−0.5)) = 1, pair 1 (0 − 0.5) = −0.5; rewards ×β.
        assert!((rewards.margin - 0.5 * (0.5 * 1.0 + 0.5 * -0.5)).abs() < 1e-12);
        assert_eq!(rewards.accuracy, 0.5);
        // ∂L/∂(−log π_w) = β·σ(−β·m) and ∂L/∂(−log π_l) = −β·σ(−β·m).
        let grads = loss.backward().unwrap();
        let g = grads.get(var.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let sigma = |x: f64| 1.0 / (1.0 + (-x).exp());
        let expected = [beta * sigma(-beta * 1.0), -beta * sigma(-beta * 1.0), beta * sigma(beta * 0.5), -beta * sigma(beta * 0.5)];
        for (got, want) in g.iter().zip(expected) {
            assert!((*got as f64 - want).abs() < 1e-6, "{g:?} against {expected:?}");
        }
    }

    #[test]
    fn the_chosen_answers_token_loss_adds_its_weight_to_their_gradient_only() {
        let losses = [3.0f32, 5.0, 4.0, 2.5];
        let reference = [-3.5, -4.5, -4.0, -3.0];
        let (beta, weight) = (0.5, 0.25);
        let gradient = |weight: f64| {
            let var = candle_core::Var::from_slice(&losses, 4, &Device::Cpu).unwrap();
            let loss = summed_loss(var.as_tensor(), &reference, beta, weight).unwrap();
            let value = loss.to_scalar::<f32>().unwrap() as f64;
            (value, loss.backward().unwrap().get(var.as_tensor()).unwrap().to_vec1::<f32>().unwrap())
        };
        let ((without, plain), (with, weighted)) = (gradient(0.0), gradient(weight));
        assert!((with - without - weight * (3.0 + 4.0)).abs() < 1e-5, "{with} against {without}");
        for (i, (p, w)) in plain.iter().zip(&weighted).enumerate() {
            let added = if i % 2 == 0 { weight } else { 0.0 };
            assert!((*w as f64 - *p as f64 - added).abs() < 1e-6, "{weighted:?} against {plain:?}");
        }
    }

    #[test]
    fn log_sigmoid_does_not_overflow() {
        assert!((log_sigmoid(0.0) + std::f64::consts::LN_2).abs() < 1e-12);
        assert!((log_sigmoid(-800.0) + 800.0).abs() < 1e-9);
        assert!(log_sigmoid(800.0).abs() < 1e-12);
    }
}
