//! DoRA and IA³ against PEFT: the adapters and outputs that `tests/anchors/peft_delta.py` made with
//! PEFT on `qwen2-tiny.gguf` dequantized to f32 (`data/families/delta/`). Tessera serves them over
//! the quantized weights, so its forward is held to the family tolerances that the LoRA and
//! base-model tests use (`data/families/README.md`); training runs in f32 over the dequantized
//! weights, so its loss and gradients must match PEFT's to 1e-3 relative.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use tessera::adapter_files;
use tessera::model::decoder::SequenceChunk;
use tessera::model::{KvCache, LogitsFor};
use tessera::sampler::log_softmax_at;
use tessera::train::decoder::{Example, Trainable};
use tessera::train::gradients;
use tessera::train::lora::AdapterParams;
use tessera::LoadedModel;
use tessera_adapters::{AdapterKind, AdapterMix};
use tessera_tests::data_dir;

/// The family bounds: every position's logprob within 0.8 of the reference, 0.2 on average.
const MAX_LOGPROB_ERROR: f32 = 0.8;
const MAX_MEAN_LOGPROB_ERROR: f32 = 0.2;
const MAX_GRADIENT_ERROR: f64 = 1e-3;

#[derive(Deserialize)]
struct Anchors {
    model: String,
    prompt_ids: Vec<u32>,
    cases: HashMap<String, Case>,
}

#[derive(Deserialize)]
struct Case {
    positions: Vec<Position>,
    loss: f64,
    grads: HashMap<String, Gradient>,
}

#[derive(Deserialize)]
struct Position {
    next: Option<u32>,
    next_logprob: Option<f32>,
    top: Vec<(u32, f32)>,
}

#[derive(Deserialize)]
struct Gradient {
    norm: f64,
    numel: usize,
    values: Option<Vec<f64>>,
}

fn delta_dir() -> PathBuf {
    data_dir("families").join("delta")
}

fn anchors() -> (Anchors, Arc<LoadedModel>) {
    let anchors: Anchors = tessera_tests::read_json_at(&delta_dir().join("anchors.json"));
    let model = Arc::new(LoadedModel::load(&data_dir("families").join(&anchors.model)).unwrap());
    (anchors, model)
}

/// Logits at every position of `ids` with `mix`.
fn all_logits(model: &LoadedModel, ids: &[u32], mix: &AdapterMix) -> Vec<Vec<f32>> {
    let mut cache = KvCache::new(model.model.config(), ids.len()).unwrap();
    let logits = model
        .model
        .forward(&mut [SequenceChunk { tokens: ids, cache: &mut cache, logits: LogitsFor::All, adapters: mix }])
        .unwrap();
    (0..ids.len()).map(|i| logits.row(0, i).to_vec()).collect()
}

#[test]
fn dora_and_ia3_forward_match_peft_within_the_family_bounds() {
    let (anchors, model) = anchors();
    let shape = model.model.config().adapter_shape();
    for (kind, expected) in [("dora", AdapterKind::Dora), ("ia3", AdapterKind::Ia3)] {
        let case = &anchors.cases[kind];
        let adapter = adapter_files::load(&delta_dir().join(kind), &shape, Some(model.as_ref())).unwrap();
        assert_eq!(adapter.kind(), expected);
        let mix = AdapterMix { parts: vec![(&adapter.weights, 1.0)] };
        let logits = all_logits(&model, &anchors.prompt_ids, &mix);
        let base = all_logits(&model, &anchors.prompt_ids, &AdapterMix::default());
        let (mut worst, mut sum, mut n, mut base_moved) = (0f32, 0f32, 0usize, 0f32);
        for (position, (ours, base)) in case.positions.iter().zip(logits.iter().zip(&base)) {
            let ids: Vec<u32> = position.top.iter().map(|(id, _)| *id).chain(position.next).collect();
            let wanted: Vec<f32> = position.top.iter().map(|(_, lp)| *lp).chain(position.next_logprob).collect();
            let got = log_softmax_at(ours, ids.iter().copied());
            let without = log_softmax_at(base, ids.iter().copied());
            for ((got, wanted), without) in got.iter().zip(&wanted).zip(&without) {
                let error = (got - wanted).abs();
                worst = worst.max(error);
                sum += error;
                n += 1;
                base_moved = base_moved.max((without - wanted).abs());
            }
        }
        let mean = sum / n as f32;
        eprintln!("{kind}: max |Δlogprob| {worst:.4}, mean {mean:.4} over {n} (the base alone is off by up to {base_moved:.3})");
        assert!(worst <= MAX_LOGPROB_ERROR && mean <= MAX_MEAN_LOGPROB_ERROR, "{kind}: max {worst}, mean {mean}");
        // The adapter matters: without it, the reference is out of reach.
        assert!(base_moved > 4.0 * mean, "{kind}: the base alone is off by only {base_moved}");
    }
}

#[test]
fn dora_and_ia3_gradients_match_peft() {
    let (anchors, model) = anchors();
    let shape = model.model.config().adapter_shape();
    let ids = &anchors.prompt_ids;
    let example = Example { tokens: ids.clone(), scored: (0..ids.len()).map(|i| i + 1 < ids.len()).collect() };
    for kind in ["dora", "ia3"] {
        let case = &anchors.cases[kind];
        let params = AdapterParams::load_peft(&delta_dir().join(kind), &shape).unwrap();
        let (grads, loss, _) = gradients(Trainable::new(&model, &params).exact(), &[&[example.clone()]]).unwrap();
        let loss_error = (loss - case.loss).abs() / case.loss.abs();
        eprintln!("{kind}: loss {loss:.6} against PEFT's {:.6} (relative {loss_error:.1e})", case.loss);
        assert!(loss_error <= MAX_GRADIENT_ERROR, "{kind}: loss {loss} against {}", case.loss);
        let named = params.named_vars();
        assert_eq!(named.len(), case.grads.len(), "{kind}: other trainable tensors than PEFT's");
        let (mut worst_norm, mut worst_values, mut compared) = (0f64, 0f64, 0);
        for ((name, _), grad) in named.iter().zip(&grads) {
            let reference = case.grads.get(name).unwrap_or_else(|| panic!("{kind}: PEFT has no `{name}`"));
            let ours: Vec<f64> = grad.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|&v| f64::from(v)).collect();
            assert_eq!(ours.len(), reference.numel, "{name}");
            let norm = ours.iter().map(|v| v * v).sum::<f64>().sqrt();
            let norm_error = (norm - reference.norm).abs() / reference.norm.max(1e-12);
            worst_norm = worst_norm.max(norm_error);
            assert!(norm_error <= MAX_GRADIENT_ERROR, "{kind} {name}: gradient norm {norm} against {}", reference.norm);
            if let Some(values) = &reference.values {
                let difference = ours.iter().zip(values).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
                let error = difference / reference.norm.max(1e-12);
                worst_values = worst_values.max(error);
                compared += 1;
                assert!(error <= MAX_GRADIENT_ERROR, "{kind} {name}: ‖Δgrad‖/‖grad‖ = {error:.2e}");
            }
        }
        eprintln!("{kind}: worst norm error {worst_norm:.1e}; worst ‖Δgrad‖/‖grad‖ {worst_values:.1e} over {compared} tensors in full");
        assert!(compared >= 3, "{kind}: only {compared} tensors compared in full");
    }
}
