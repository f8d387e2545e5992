//! Training's differentiable forward pass and its 262k-vocabulary loss on the real model,
//! against llama.cpp's logprobs: the summed cross-entropy of a reference generation's tokens
//! (teacher-forced after the prompt) is Σ −logprob of those tokens in the reference. Both forms
//! of the output logits are held to it: f32, and int8 (Q8_0-rounded activations, as llama.cpp
//! computes that layer) where the CPU has AVX-512 VNNI.

use candle_core::{Device, Tensor};
use tessera::train::decoder::{Example, Trainable};
use tessera::train::lora::{AdapterParams, LoraSpec};
use tessera::train::{evaluate, gradients};
use tessera_adapters::{AdapterKind, TargetModule};
use tessera_tests::{read_json, real_model, GenerationCase, GenerationCases};

/// The per-token tolerance of `reference_generation`, averaged over a case's 24 steps.
const MAX_MEAN_ERROR: f64 = 0.2;
/// How far the int8 logits may move a case's mean token loss from the f32 one.
const MAX_INT8_SHIFT: f64 = 0.05;

/// The prompt then the reference's greedy tokens, each of those scored.
fn teacher_forced(case: &GenerationCase) -> Example {
    let tokens: Vec<u32> = case.prompt_ids.iter().chain(&case.greedy).copied().collect();
    let first_scored = case.prompt_ids.len() - 1;
    let scored = (0..tokens.len()).map(|i| i >= first_scored && i + 1 < tokens.len()).collect();
    Example { tokens, scored }
}

fn untrained(rank: usize, seed: u64) -> AdapterParams {
    let spec = LoraSpec {
        rank,
        alpha: 2.0 * rank as f32,
        targets: TargetModule::ALL.to_vec(),
        kind: AdapterKind::Lora,
    };
    AdapterParams::fresh(real_model(), spec, seed).unwrap()
}

#[test]
fn the_training_loss_is_the_reference_cross_entropy_in_f32_and_int8() {
    let model = real_model();
    let cases: GenerationCases = read_json("generation_cases.json");
    // A fresh adapter (B = 0) is the base model.
    let lora = untrained(16, 0);
    for case in cases.cases.iter().filter(|c| c.prompt_ids.len() <= 64) {
        let example = teacher_forced(case);
        let reference = case.steps.iter().map(|s| -s.logprob as f64).sum::<f64>() / case.steps.len() as f64;
        let exact = evaluate(Trainable::new(model, &lora).exact(), std::slice::from_ref(&example), 1).unwrap();
        let fastest = evaluate(Trainable::new(model, &lora), std::slice::from_ref(&example), 1).unwrap();
        eprintln!(
            "{:>3} prompt tokens: reference {reference:.4}, f32 {exact:.4}, int8 where available {fastest:.4}",
            case.prompt_ids.len()
        );
        assert!((exact - reference).abs() <= MAX_MEAN_ERROR, "f32 loss {exact:.4} against the reference {reference:.4}");
        assert!((fastest - reference).abs() <= MAX_MEAN_ERROR, "loss {fastest:.4} against the reference {reference:.4}");
        assert!((fastest - exact).abs() <= MAX_INT8_SHIFT, "int8 loss {fastest:.4} against f32 {exact:.4}");
    }
}

#[test]
fn int8_logits_give_the_f32_gradients_to_within_their_rounding() {
    let model = real_model();
    let cases: GenerationCases = read_json("generation_cases.json");
    let batch: Vec<Example> = cases.cases.iter().filter(|c| c.prompt_ids.len() <= 64).take(4).map(teacher_forced).collect();
    // A random B, so that every factor has a gradient.
    let lora = untrained(4, 1);
    for (name, var) in lora.named_vars() {
        if name.contains("lora_B") {
            var.set(&Tensor::randn(0f32, 0.02, var.as_tensor().dims(), &Device::Cpu).unwrap()).unwrap();
        }
    }
    let (exact, exact_loss, tokens) = gradients(Trainable::new(model, &lora).exact(), &[&batch]).unwrap();
    let (fastest, fastest_loss, _) = gradients(Trainable::new(model, &lora), &[&batch]).unwrap();
    let dot = |a: &[Tensor], b: &[Tensor]| -> f64 {
        a.iter().zip(b).map(|(x, y)| (x * y).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64).sum()
    };
    let cosine = dot(&exact, &fastest) / (dot(&exact, &exact) * dot(&fastest, &fastest)).sqrt();
    let norms = (dot(&exact, &exact).sqrt(), dot(&fastest, &fastest).sqrt());
    eprintln!("{tokens} tokens: loss {exact_loss:.4} / {fastest_loss:.4}, gradient norms {norms:.4?}, cosine {cosine:.5}");
    assert!((exact_loss - fastest_loss).abs() <= MAX_INT8_SHIFT);
    assert!(cosine >= 0.99, "gradient cosine {cosine}");
    assert!((norms.0 - norms.1).abs() <= 0.05 * norms.0, "gradient norms {norms:?}");
}
