//! QLoRA training on the tiny synthetic model: the custom backward through the frozen
//! quantized weights against finite differences, and training driving the loss to zero.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use tessera::dataset::{Conversation, Message};
use tessera::model::synthetic::tiny_gemma3;
use tessera::train::data::example;
use tessera::train::decoder::{Example, KeptGraphs, Trainable};
use tessera::train::lora::{AdapterParams, LoraSpec};
use tessera::train::optim::{AdamW, AdamWConfig};
use tessera::train::{evaluate, gradients, gradients_keeping, train_step};
use tessera::LoadedModel;
use tessera_adapters::{AdapterKind, TargetModule};

fn tiny_model() -> (tempfile::TempDir, Arc<LoadedModel>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    tiny_gemma3(11).write(&path).unwrap();
    (dir, Arc::new(LoadedModel::load(&path).unwrap()))
}

fn pair(user: &str, assistant: &str) -> Conversation {
    let message = |role: &str, content: &str| Message {
        role: role.into(),
        content: content.into(),
    };
    Conversation {
        messages: vec![message("user", user), message("assistant", assistant)],
    }
}

fn examples(model: &LoadedModel, pairs: &[(&str, &str)]) -> Vec<Example> {
    pairs
        .iter()
        .map(|(u, a)| example(&model.tokenizer, &model.chat, &pair(u, a), 64).unwrap().unwrap())
        .collect()
}

/// Copies, not views: `Var::set` writes into the variable's storage in place.
fn all_params(lora: &AdapterParams) -> Vec<Tensor> {
    lora.named_vars().iter().map(|(_, v)| v.as_tensor().copy().unwrap()).collect()
}

fn set_params(lora: &AdapterParams, values: &[Tensor]) {
    for ((_, var), value) in lora.named_vars().iter().zip(values) {
        var.set(value).unwrap();
    }
}

fn dot(a: &[Tensor], b: &[Tensor]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x * y).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64)
        .sum()
}

/// r4 factors on every target with a random B: a fresh B is zero, which would hide every
/// gradient of A.
fn random_lora(model: &LoadedModel, seed: u64) -> AdapterParams {
    let spec = LoraSpec {
        rank: 4,
        alpha: 8.0,
        targets: TargetModule::ALL.to_vec(),
        kind: AdapterKind::Lora,
    };
    let lora = AdapterParams::fresh(&model, spec, seed).unwrap();
    for (name, var) in lora.named_vars() {
        if name.contains("lora_B") {
            var.set(&Tensor::randn(0f32, 0.05, var.as_tensor().dims(), &Device::Cpu).unwrap()).unwrap();
        }
    }
    lora
}

#[test]
fn lora_gradients_through_the_quantized_weights_match_finite_differences() {
    let (_dir, model) = tiny_model();
    let lora = random_lora(&model, 3);
    let batch = examples(&model, &[("abc def", "the cat"), ("hello", "in a thin tin")]);
    let (grads, loss, tokens) = gradients(Trainable::new(&model, &lora).exact(), &[&batch]).unwrap();
    assert!(tokens > 5 && loss.is_finite(), "loss {loss} over {tokens} tokens");

    let theta = all_params(&lora);
    let mean_loss = |params: &[Tensor]| {
        set_params(&lora, params);
        evaluate(Trainable::new(&model, &lora).exact(), &batch, 8).unwrap()
    };
    // Directional derivatives along the gradient, over every factor of every layer, and along
    // single factors' own gradients (early and late layers, local and global, A and B).
    let norm = dot(&grads, &grads).sqrt();
    assert!(norm > 1e-4, "gradient norm {norm}");
    let mut directions = vec![("all factors".to_string(), grads.iter().map(|g| (g / norm).unwrap()).collect::<Vec<_>>())];
    let names: Vec<String> = lora.named_vars().into_iter().map(|(n, _)| n).collect();
    for wanted in [
        "layers.0.self_attn.q_proj.lora_A",
        "layers.2.self_attn.v_proj.lora_B",
        "layers.5.self_attn.o_proj.lora_A",
        "layers.5.self_attn.k_proj.lora_B",
        "layers.6.mlp.down_proj.lora_B",
        "layers.1.mlp.gate_proj.lora_A",
    ] {
        let index = names.iter().position(|n| n.contains(wanted)).unwrap();
        let g_norm = dot(&grads[index..=index], &grads[index..=index]).sqrt();
        let direction = grads
            .iter()
            .enumerate()
            .map(|(i, g)| if i == index { (g / g_norm).unwrap() } else { g.zeros_like().unwrap() })
            .collect();
        directions.push((wanted.to_string(), direction));
    }
    let eps = 1e-2;
    for (i, direction) in &directions {
        let shifted = |sign: f64| -> Vec<Tensor> {
            theta
                .iter()
                .zip(direction)
                .map(|(t, d)| (t + (d * (sign * eps)).unwrap()).unwrap())
                .collect()
        };
        let numeric = (mean_loss(&shifted(1.0)) - mean_loss(&shifted(-1.0))) / (2.0 * eps);
        let analytic = dot(&grads, direction);
        let relative = (numeric - analytic).abs() / analytic.abs().max(numeric.abs());
        eprintln!("{i}: analytic {analytic:.6} numeric {numeric:.6} relative error {relative:.2e}");
        assert!(relative <= 1e-2, "{i}: analytic {analytic} vs numeric {numeric}");
    }
}

/// Checkpointed layers (run again in the backward pass) and layers that keep their forward
/// graphs give the same gradients, whatever the split between them.
#[test]
fn checkpointed_and_kept_layers_give_the_same_gradients() {
    let (_dir, model) = tiny_model();
    let lora = random_lora(&model, 5);
    let batch = examples(&model, &[("abc def", "the cat"), ("hello", "in a thin tin")]);
    let layers = model.model.config().n_layers;
    let (reference, loss, tokens) = gradients_keeping(Trainable::new(&model, &lora).exact(), &[&batch], KeptGraphs::Layers(0)).unwrap();
    let reference_norm = dot(&reference, &reference).sqrt();
    assert!(reference_norm > 1e-4, "gradient norm {reference_norm}");
    for kept in [KeptGraphs::Layers(1), KeptGraphs::Layers(layers / 2), KeptGraphs::Layers(layers), KeptGraphs::WithinBudget] {
        let (grads, kept_loss, kept_tokens) = gradients_keeping(Trainable::new(&model, &lora).exact(), &[&batch], kept).unwrap();
        assert_eq!(kept_tokens, tokens);
        assert!((kept_loss - loss).abs() <= 1e-6 * loss.abs(), "{kept:?}: loss {kept_loss} vs {loss}");
        let difference: Vec<Tensor> = grads.iter().zip(&reference).map(|(g, r)| (g - r).unwrap()).collect();
        let relative = dot(&difference, &difference).sqrt() / reference_norm;
        assert!(relative <= 1e-5, "{kept:?}: gradients differ by {relative:.2e} (relative)");
    }
}

#[test]
fn training_on_a_few_pairs_drives_the_loss_near_zero() {
    let (_dir, model) = tiny_model();
    let spec = LoraSpec {
        rank: 8,
        alpha: 16.0,
        targets: TargetModule::ALL.to_vec(),
        kind: AdapterKind::Lora,
    };
    let lora = AdapterParams::fresh(&model, spec, 5).unwrap();
    let batch = examples(&model, &[("abc", "the"), ("xyz", "in a tin"), ("hello", "hat")]);
    let before = evaluate(Trainable::new(&model, &lora), &batch, 8).unwrap();
    let vars: Vec<_> = lora.named_vars().into_iter().map(|(_, v)| v).collect();
    let steps = 40;
    let mut optimizer = AdamW::new(
        AdamWConfig {
            learning_rate: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            warmup_steps: 4,
            total_steps: steps,
        },
        &vars,
    )
    .unwrap();
    for _ in 0..steps {
        train_step(Trainable::new(&model, &lora), &mut optimizer, &[&batch]).unwrap();
    }
    let after = evaluate(Trainable::new(&model, &lora), &batch, 8).unwrap();
    eprintln!("loss {before:.3} → {after:.4}");
    assert!(before > 3.0, "the untrained loss is {before}");
    assert!(after < 0.05, "the loss after training is {after}");
}
