//! LoRA adapters, as PEFT folders and as llama.cpp GGUF-LoRA files, against llama.cpp's
//! generations with the same adapters (`lora_cases.json`), with the LoRA tolerances calibrated in
//! the reference README; and conversions between the two formats, which change no output.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tessera::adapter_files;
use tessera::generate::{generate, prefill, GenerateParams};
use tessera::model::KvCache;
use tessera::sampler::SamplingParams;
use tessera_adapters::peft::PeftAdapter;
use tessera_adapters::AdapterMix;
use tessera_tests::{read_json, real_model, teacher_forced_errors, testdata_dir, GenerationCases};

/// Random adapters amplify small differences: PEFT on f32 itself diverges below this margin.
const GREEDY_MARGIN: f32 = 0.6;
const MAX_LOGPROB_ERROR: f32 = 1.2;
const MAX_MEAN_LOGPROB_ERROR: f32 = 0.2;

/// Every case of `lora_cases.json` with the adapters as `path_of` names their files.
fn check_every_case(path_of: impl Fn(&str) -> PathBuf) {
    let model = &real_model().model;
    let shape = model.config().adapter_shape();
    let cases: GenerationCases = read_json("lora_cases.json");
    assert!(!cases.cases.is_empty());
    let mut adapters: HashMap<String, PeftAdapter> = HashMap::new();
    for name in cases.cases.iter().flat_map(|c| c.adapters.keys()) {
        if !adapters.contains_key(name) {
            let path = path_of(name);
            let adapter = adapter_files::load(&path, &shape, None).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
            adapters.insert(name.clone(), adapter);
        }
    }
    let (mut worst_step, mut worst_mean) = (0f32, 0f32);
    for case in &cases.cases {
        let mix = AdapterMix {
            parts: case
                .adapters
                .iter()
                .map(|(name, &scale)| (&adapters[name].weights, scale))
                .collect(),
        };
        let label = format!("{:?} with {:?}", case.prompt.chars().take(30).collect::<String>(), case.adapters);
        assert_eq!(real_model().tokenizer.encode(&case.prompt, true, true).unwrap(), case.prompt_ids);

        let n = case.greedy.len();
        let errors = teacher_forced_errors(case, &mix);
        let max = errors.iter().copied().fold(0f32, f32::max);
        let mean = errors.iter().sum::<f32>() / n as f32;
        eprintln!("{label}: max |Δlogprob| {max:.4}, mean {mean:.4}");
        assert!(
            max <= MAX_LOGPROB_ERROR && mean <= MAX_MEAN_LOGPROB_ERROR,
            "{label}: max {max:.3}, mean {mean:.3}; per step {errors:?}"
        );
        worst_step = worst_step.max(max);
        worst_mean = worst_mean.max(mean);

        // Greedy decoding follows the reference wherever the reference is decisive.
        let params = GenerateParams {
            max_tokens: n,
            sampling: SamplingParams::default(),
            top_logprobs: 0,
            stop_ids: Vec::new(),
        };
        let out = generate(model, &case.prompt_ids, &params, &mix, |_| {}).unwrap();
        if let Some(i) = out.token_ids.iter().zip(&case.greedy).position(|(a, b)| a != b) {
            let margin = case.steps[i].margin();
            assert!(
                margin < GREEDY_MARGIN,
                "{label}: step {i} chose {} but the reference chose {} with margin {margin:.3}",
                out.token_ids[i],
                case.greedy[i]
            );
            eprintln!("{label}: first divergence at step {i} (margin {margin:.3})");
        }
    }
    eprintln!("worst step {worst_step:.4}, worst case mean {worst_mean:.4}");
}

#[test]
fn every_lora_case_matches_the_reference() {
    check_every_case(|name| testdata_dir().join("adapters").join(name));
}

#[test]
fn every_lora_case_matches_the_reference_with_gguf_lora_files() {
    check_every_case(|name| testdata_dir().join("adapters-gguf").join(format!("{name}.gguf")));
}

/// The last position's logits of a fixed prompt with the adapter at `path` at weight 1.
fn logits_with(path: &Path) -> Vec<f32> {
    let model = &real_model().model;
    let adapter = adapter_files::load(path, &model.config().adapter_shape(), None).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let ids = real_model().tokenizer.encode("Name three primary colours:", true, true).unwrap();
    let mut cache = KvCache::new(model.config(), ids.len()).unwrap();
    prefill(model, &mut cache, &ids, &AdapterMix { parts: vec![(&adapter.weights, 1.0)] }).unwrap()
}

/// Writes `factors` in both formats under `dir` and returns the two paths.
fn write_both(factors: &adapter_files::AdapterFactors, dir: &Path) -> (PathBuf, PathBuf) {
    let shape = real_model().model.config().adapter_shape();
    let gguf = dir.join("adapter.gguf");
    std::fs::write(&gguf, adapter_files::to_gguf(factors, &shape)).unwrap();
    let peft = dir.join("peft");
    let (config, weights) = adapter_files::to_peft(factors, "gemma-3-270m").unwrap();
    std::fs::create_dir_all(&peft).unwrap();
    std::fs::write(peft.join(tessera_adapters::peft::CONFIG_FILE), config).unwrap();
    std::fs::write(peft.join(tessera_adapters::peft::WEIGHTS_FILE), weights).unwrap();
    (gguf, peft)
}

#[test]
fn converting_between_peft_and_gguf_changes_no_output() {
    let shape = real_model().model.config().adapter_shape();
    for name in ["alpha-r8", "beta-r16", "gamma-r4"] {
        let dir = tempfile::tempdir().unwrap();
        let peft = testdata_dir().join("adapters").join(name);
        let reference = logits_with(&peft);
        // PEFT → GGUF and PEFT → PEFT, then GGUF → both again: the same bits at every step.
        let factors = adapter_files::read(&peft, &shape).unwrap();
        let (gguf, peft_again) = write_both(&factors, dir.path());
        assert_eq!(adapter_files::read(&gguf, &shape).unwrap(), factors, "{name}: the GGUF form holds other factors");
        for path in [&gguf, &peft_again] {
            assert_eq!(logits_with(path), reference, "{name}: {} answers differently", path.display());
        }
        let from_gguf = tempfile::tempdir().unwrap();
        let (gguf_twice, peft_from_gguf) = write_both(&adapter_files::read(&gguf, &shape).unwrap(), from_gguf.path());
        assert_eq!(std::fs::read(&gguf_twice).unwrap(), std::fs::read(&gguf).unwrap(), "{name}: GGUF → GGUF is not byte-identical");
        assert_eq!(logits_with(&peft_from_gguf), reference, "{name}: GGUF → PEFT answers differently");
        // llama.cpp's own conversion of the same adapter holds the same numbers.
        let theirs = testdata_dir().join("adapters-gguf").join(format!("{name}.gguf"));
        assert_eq!(logits_with(&theirs), reference, "{name}: llama.cpp's GGUF file answers differently");
    }
}

#[test]
fn adapters_change_the_output_and_a_zero_weight_does_not() {
    let model = &real_model().model;
    let shape = model.config().adapter_shape();
    let alpha = PeftAdapter::load(&testdata_dir().join("adapters/alpha-r8"), &shape, None).unwrap();
    let ids = real_model().tokenizer.encode("The capital of France is", true, true).unwrap();
    let run = |mix: &AdapterMix| {
        let mut cache = KvCache::new(model.config(), ids.len()).unwrap();
        prefill(model, &mut cache, &ids, mix).unwrap()
    };
    let base = run(&AdapterMix::default());
    let adapted = run(&AdapterMix { parts: vec![(&alpha.weights, 1.0)] });
    let off = run(&AdapterMix { parts: vec![(&alpha.weights, 0.0)] });
    let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(diff(&base, &adapted) > 0.1, "the adapter changed nothing");
    assert!(diff(&base, &off) < 1e-4);
}
