//! AdaLomo against lomo-optim's: the adapters and the five-step run that
//! `tests/anchors/lomo_adalomo.py` made with lomo-optim, PEFT and torch on `qwen2-tiny.gguf`
//! dequantized to f32 (`data/families/adalomo/`). Tessera trains in f32 over the dequantized
//! weights too, so after the same five steps every tensor must agree to 1e-4 relative, whether
//! the layers update from one backward pass or one by one as checkpointing runs them again.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use tessera::train::adalomo::{AdaLomo, AdaLomoConfig};
use tessera::train::decoder::{Example, KeptGraphs, Trainable};
use tessera::train::dpo::PreferenceLoss;
use tessera::train::lora::AdapterParams;
use tessera::train::optim::Schedule;
use tessera::train::step::fused_step;
use tessera::LoadedModel;
use tessera_tests::data_dir;

const MAX_PARAMETER_ERROR: f64 = 1e-4;
const MAX_LOSS_ERROR: f64 = 1e-3;

#[derive(Deserialize)]
struct Anchors {
    model: String,
    batches: Vec<Vec<Vec<u32>>>,
    learning_rate: f64,
    warmup_steps: usize,
    total_steps: usize,
    eps_scale: f64,
    weight_decay: f64,
    cases: HashMap<String, Case>,
}

#[derive(Deserialize)]
struct Case {
    losses: Vec<f64>,
    tensors: HashMap<String, Trained>,
}

#[derive(Deserialize)]
struct Trained {
    norm: f64,
    numel: usize,
    values: Option<Vec<f64>>,
}

fn anchor_dir() -> PathBuf {
    data_dir("families").join("adalomo")
}

fn every_position_scored(tokens: &[u32]) -> Example {
    Example { tokens: tokens.to_vec(), scored: (0..tokens.len()).map(|i| i + 1 < tokens.len()).collect() }
}

/// Runs the anchor's five steps on `kind`'s starting adapter; returns the adapter and the losses.
fn train(anchors: &Anchors, model: &Arc<LoadedModel>, kind: &str, kept: KeptGraphs) -> (AdapterParams, Vec<f64>) {
    let params = AdapterParams::load_peft(&anchor_dir().join(kind), &model.model.config().adapter_shape()).unwrap();
    let vars: Vec<_> = params.named_vars().into_iter().map(|(_, v)| v).collect();
    let schedule = Schedule { learning_rate: anchors.learning_rate, warmup_steps: anchors.warmup_steps, total_steps: anchors.total_steps };
    let config = AdaLomoConfig { eps_scale: anchors.eps_scale, weight_decay: anchors.weight_decay, ..AdaLomoConfig::new(schedule) };
    let mut optimizer = AdaLomo::new(config, &vars);
    let mut losses = Vec::new();
    for batch in &anchors.batches {
        let examples: Vec<Example> = batch.iter().map(|tokens| every_position_scored(tokens)).collect();
        let stats = fused_step(Trainable::new(model, &params).exact(), &mut optimizer, &examples, &[], PreferenceLoss::dpo(0.1), kept).unwrap();
        losses.push(stats.loss);
    }
    (params, losses)
}

fn check(anchors: &Anchors, kind: &str, params: &AdapterParams, losses: &[f64]) {
    let case = &anchors.cases[kind];
    for (step, (ours, theirs)) in losses.iter().zip(&case.losses).enumerate() {
        let error = (ours - theirs).abs() / theirs.abs();
        assert!(error <= MAX_LOSS_ERROR, "{kind} step {}: loss {ours} against {theirs}", step + 1);
    }
    let named = params.named_vars();
    assert_eq!(named.len(), case.tensors.len(), "{kind}: other trainable tensors than PEFT's");
    let (mut worst, mut compared) = (0f64, 0);
    for (name, var) in &named {
        let reference = case.tensors.get(name).unwrap_or_else(|| panic!("{kind}: the anchor has no `{name}`"));
        let ours: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|&v| f64::from(v)).collect();
        assert_eq!(ours.len(), reference.numel, "{name}");
        let norm = ours.iter().map(|v| v * v).sum::<f64>().sqrt();
        let norm_error = (norm - reference.norm).abs() / reference.norm;
        worst = worst.max(norm_error);
        assert!(norm_error <= MAX_PARAMETER_ERROR, "{kind} {name}: norm {norm} against {}", reference.norm);
        if let Some(values) = &reference.values {
            let difference = ours.iter().zip(values).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
            let error = difference / reference.norm;
            worst = worst.max(error);
            compared += 1;
            assert!(error <= MAX_PARAMETER_ERROR, "{kind} {name}: ‖Δθ‖/‖θ‖ = {error:.2e}");
        }
    }
    assert!(compared >= 6, "{kind}: only {compared} tensors compared in full");
    eprintln!("{kind}: five AdaLomo steps agree with lomo-optim to {worst:.1e} relative (losses {losses:?})");
}

#[test]
fn five_adalomo_steps_match_lomo_optim_from_one_backward_or_layer_by_layer() {
    let anchors: Anchors = tessera_tests::read_json_at(&anchor_dir().join("anchors.json"));
    let model = Arc::new(LoadedModel::load(&data_dir("families").join(&anchors.model)).unwrap());
    for kind in ["lora", "dora"] {
        for kept in [KeptGraphs::Layers(usize::MAX), KeptGraphs::Layers(0)] {
            let (params, losses) = train(&anchors, &model, kind, kept);
            check(&anchors, kind, &params, &losses);
        }
    }
}

/// The anchor's run moves the adapter well past the tolerance: a step that did nothing, or
/// AdamW's, would fail the check above.
#[test]
fn the_anchor_moves_every_tensor_beyond_the_tolerance() {
    let anchors: Anchors = tessera_tests::read_json_at(&anchor_dir().join("anchors.json"));
    let model = Arc::new(LoadedModel::load(&data_dir("families").join(&anchors.model)).unwrap());
    for kind in ["lora", "dora"] {
        let start = AdapterParams::load_peft(&anchor_dir().join(kind), &model.model.config().adapter_shape()).unwrap();
        let moved = start
            .named_vars()
            .iter()
            .filter_map(|(name, var)| {
                let trained = &anchors.cases[kind].tensors[name];
                let values = trained.values.as_ref()?;
                let before = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let distance = before.iter().zip(values).map(|(&a, b)| (f64::from(a) - b).powi(2)).sum::<f64>().sqrt();
                Some(distance / trained.norm)
            })
            .fold(f64::INFINITY, f64::min);
        assert!(moved > 10.0 * MAX_PARAMETER_ERROR, "{kind}: a tensor moved only {moved:.1e}");
    }
}
