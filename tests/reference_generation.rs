//! The Gemma 3 forward pass against llama.cpp's greedy generations and top-5 logprobs, with the
//! tolerances calibrated in `data/gemma-3-270m/README.md`.

use tessera::generate::{generate, GenerateParams};
use tessera::sampler::SamplingParams;
use tessera_adapters::AdapterMix;
use tessera_tests::{read_json, real_model, teacher_forced_errors, GenerationCase, GenerationCases};

/// Below this top-1/top-2 margin a different quantization path may flip a near-tie.
const GREEDY_MARGIN: f32 = 0.3;
const MAX_LOGPROB_ERROR: f32 = 0.8;
const MAX_MEAN_LOGPROB_ERROR: f32 = 0.2;

fn cases() -> Vec<GenerationCase> {
    let cases: GenerationCases = read_json("generation_cases.json");
    assert!(!cases.cases.is_empty());
    cases.cases
}

#[test]
fn prompt_ids_match_the_reference_tokenization() {
    let tokenizer = &real_model().tokenizer;
    for case in cases() {
        assert_eq!(tokenizer.encode(&case.prompt, true, true).unwrap(), case.prompt_ids);
    }
}

#[test]
fn greedy_decoding_follows_the_reference_where_it_is_decisive() {
    let model = &real_model().model;
    let none = AdapterMix::default();
    let mut report = Vec::new();
    for case in cases() {
        let params = GenerateParams {
            max_tokens: case.greedy.len(),
            sampling: SamplingParams::default(),
            top_logprobs: 0,
            stop_ids: Vec::new(),
        };
        let out = generate(model, &case.prompt_ids, &params, &none, |_| {}).unwrap();
        let first_divergence = out
            .token_ids
            .iter()
            .zip(&case.greedy)
            .position(|(ours, theirs)| ours != theirs);
        if let Some(i) = first_divergence {
            let margin = case.steps[i].margin();
            assert!(
                margin < GREEDY_MARGIN,
                "{:?}: step {i} chose {} but the reference chose {} with a margin of {margin:.3}",
                case.prompt.chars().take(60).collect::<String>(),
                out.token_ids[i],
                case.greedy[i]
            );
        }
        report.push(format!(
            "{} prompt tokens: {}",
            case.prompt_ids.len(),
            first_divergence.map_or("all 24 agree".into(), |i| format!("first divergence at step {i}"))
        ));
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn teacher_forced_logprobs_are_within_tolerance() {
    let none = AdapterMix::default();
    let mut worst_mean = 0f32;
    let mut worst_step = 0f32;
    for case in cases() {
        let n = case.greedy.len();
        let errors = teacher_forced_errors(&case, &none);
        let max = errors.iter().copied().fold(0f32, f32::max);
        let mean = errors.iter().sum::<f32>() / n as f32;
        eprintln!(
            "{:>5} prompt tokens: max |Δlogprob| {max:.4}, mean {mean:.4}",
            case.prompt_ids.len()
        );
        assert!(
            max <= MAX_LOGPROB_ERROR && mean <= MAX_MEAN_LOGPROB_ERROR,
            "{:?}: max error {max:.3} (limit {MAX_LOGPROB_ERROR}), mean {mean:.3} (limit {MAX_MEAN_LOGPROB_ERROR}); per step {errors:?}",
            case.prompt.chars().take(60).collect::<String>()
        );
        worst_mean = worst_mean.max(mean);
        worst_step = worst_step.max(max);
    }
    eprintln!("worst step {worst_step:.4}, worst case mean {worst_mean:.4}");
}
