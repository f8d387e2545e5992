//! Tessera's DPO against TRL's `DPOTrainer` (`anchors/trl_dpo.py`, its output checked in under
//! `data/dpo_anchor/`): on the Qwen2 family model, with the adapter a job starts from as the
//! reference and the same adapter moved on as the policy, the loss, the implicit rewards and the
//! gradients of every LoRA factor agree within 1e-3 relative. Both sides compute in f32 over
//! the same dequantized weights, so the anchor computes its reference with the trainer's exact
//! forward; a job computes it through the serving forward, which the second test holds to the
//! trainer's log-probabilities.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;
use tessera::train::decoder::{Example, Trainable};
use tessera::train::dpo::{dpo_gradients, log_probs, with_reference, PreferenceLoss};
use tessera::train::reference::serving_log_probs;
use tessera_adapters::AdapterMix;
use tessera::train::lora::AdapterParams;
use tessera::LoadedModel;
use tessera_tests::{data_dir, read_json_at};

const TOLERANCE: f64 = 1e-3;

#[derive(Deserialize)]
struct Case {
    prompt: Vec<u32>,
    chosen: Vec<u32>,
    rejected: Vec<u32>,
}

/// A gradient tensor as the anchor samples it.
#[derive(Deserialize)]
struct Sampled {
    norm: f64,
    indices: Vec<usize>,
    values: Vec<f64>,
}

#[derive(Deserialize)]
struct Anchor {
    beta: f64,
    pairs: Vec<Case>,
    loss: f64,
    metrics: HashMap<String, f64>,
    gradients: HashMap<String, Sampled>,
}

/// The prompt then the answer, each answer token scored.
fn answered(prompt: &[u32], answer: &[u32]) -> Example {
    let tokens: Vec<u32> = prompt.iter().chain(answer).copied().collect();
    let scored = (0..tokens.len()).map(|i| i + 1 >= prompt.len() && i + 1 < tokens.len()).collect();
    Example { tokens, scored }
}

fn assert_close(what: &str, ours: f64, theirs: f64, scale: f64) {
    let error = (ours - theirs).abs() / scale.abs().max(f64::MIN_POSITIVE);
    assert!(error <= TOLERANCE, "{what}: Tessera {ours} against TRL {theirs} (relative error {error:.2e})");
}

#[test]
fn the_dpo_loss_rewards_and_lora_gradients_are_trls() {
    let anchor: Anchor = read_json_at(&data_dir("dpo_anchor").join("trl_dpo.json"));
    let model = Arc::new(LoadedModel::load(&data_dir("families").join("qwen2-tiny.gguf")).unwrap());
    let shape = model.model.config().adapter_shape();
    let policy = AdapterParams::load_peft(&data_dir("dpo_anchor").join("policy"), &shape).unwrap();
    let reference = AdapterParams::load_peft(&data_dir("dpo_anchor").join("reference"), &shape).unwrap();
    let pairs: Vec<(Example, Example)> = anchor.pairs.iter().map(|c| (answered(&c.prompt, &c.chosen), answered(&c.prompt, &c.rejected))).collect();
    let reference_log_probs = log_probs(Trainable::new(&model, &reference).exact(), &pairs, 4).unwrap();
    let preferences = with_reference(pairs.clone(), reference_log_probs);

    let (gradients, stats) = dpo_gradients(Trainable::new(&model, &policy).exact(), &[&preferences], PreferenceLoss::dpo(anchor.beta)).unwrap();
    let rewards = stats.rewards;
    eprintln!("loss {} (TRL {}), rewards {rewards:?}, TRL {:?}", rewards.loss, anchor.loss, anchor.metrics);
    assert_close("loss", rewards.loss, anchor.loss, anchor.loss);
    assert_close("rewards/chosen", rewards.chosen, anchor.metrics["rewards/chosen"], anchor.metrics["rewards/chosen"]);
    assert_close("rewards/rejected", rewards.rejected, anchor.metrics["rewards/rejected"], anchor.metrics["rewards/rejected"]);
    assert_close("rewards/margins", rewards.margin, anchor.metrics["rewards/margins"], anchor.metrics["rewards/margins"]);
    // A share of three pairs (TRL's in f32).
    assert!((rewards.accuracy - anchor.metrics["rewards/accuracies"]).abs() < 1e-6, "reward accuracy {} against TRL's {}", rewards.accuracy, anchor.metrics["rewards/accuracies"]);
    let policy_log_probs = log_probs(Trainable::new(&model, &policy).exact(), &pairs, 4).unwrap();
    let mean = |f: fn(&tessera::train::dpo::Both) -> f64| policy_log_probs.iter().map(f).sum::<f64>() / pairs.len() as f64;
    assert_close("logps/chosen", mean(|b| b.chosen), anchor.metrics["logps/chosen"], anchor.metrics["logps/chosen"]);
    assert_close("logps/rejected", mean(|b| b.rejected), anchor.metrics["logps/rejected"], anchor.metrics["logps/rejected"]);

    let names: Vec<String> = policy.named_vars().into_iter().map(|(name, _)| name).collect();
    assert_eq!(names.len(), anchor.gradients.len(), "one gradient per LoRA factor");
    for (name, gradient) in names.iter().zip(&gradients) {
        let theirs = &anchor.gradients[name];
        let ours = gradient.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let norm = ours.iter().map(|&g| (g as f64).powi(2)).sum::<f64>().sqrt();
        assert_close(&format!("‖∂L/∂{name}‖"), norm, theirs.norm, theirs.norm);
        // Each sampled entry within 1e-3 of its own size, or of the tensor's typical entry
        // (‖g‖/√n) where it is near zero.
        let typical = theirs.norm / (ours.len() as f64).sqrt();
        for (&i, &value) in theirs.indices.iter().zip(&theirs.values) {
            assert_close(&format!("∂L/∂{name}[{i}]"), ours[i] as f64, value, value.abs().max(typical));
        }
    }
}

/// The reference pass a job runs (the serving forward with the reference adapter, integer
/// kernels) gives the trainer's exact log-probabilities of the anchor's answers, up to the
/// serving kernels' rounding: within 1% of each answer's log-probability, and the same
/// preferred answer in every pair whose two answers are not a near tie.
#[test]
fn the_serving_reference_pass_gives_the_trainers_log_probabilities() {
    let anchor: Anchor = read_json_at(&data_dir("dpo_anchor").join("trl_dpo.json"));
    let model = Arc::new(LoadedModel::load(&data_dir("families").join("qwen2-tiny.gguf")).unwrap());
    let shape = model.model.config().adapter_shape();
    let dir = data_dir("dpo_anchor").join("reference");
    let reference = AdapterParams::load_peft(&dir, &shape).unwrap();
    let served = tessera::adapter_files::load(&dir, &shape, Some(&*model)).unwrap();
    let pairs: Vec<(Example, Example)> = anchor.pairs.iter().map(|c| (answered(&c.prompt, &c.chosen), answered(&c.prompt, &c.rejected))).collect();

    let exact = log_probs(Trainable::new(&model, &reference).exact(), &pairs, 4).unwrap();
    let serving = serving_log_probs(&model.model, &AdapterMix { parts: vec![(&served.weights, 1.0)] }, &pairs).unwrap();
    for (i, (e, s)) in exact.iter().zip(&serving).enumerate() {
        eprintln!("pair {i}: trainer {e:?}, serving {s:?}");
        for (what, ours, theirs) in [("chosen", s.chosen, e.chosen), ("rejected", s.rejected, e.rejected)] {
            let error = (ours - theirs).abs() / theirs.abs();
            assert!(error <= 1e-2, "pair {i} {what}: serving {ours} against the trainer's {theirs} (relative error {error:.2e})");
        }
        if (e.chosen - e.rejected).abs() > 0.05 * e.chosen.abs() {
            assert_eq!(s.chosen > s.rejected, e.chosen > e.rejected, "pair {i}");
        }
    }
}
