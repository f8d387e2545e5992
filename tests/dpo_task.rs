//! Issue 36's targets on Gemma 3 270M: a preference task with a clear signal (the chosen
//! answer says "The answer is N.", the rejected one just "N"), 200 preferences to train on and
//! 20 held out, one epoch of DPO as a job runs it (r16 on all seven projections, AdamW 1e-3,
//! batch 4, β 0.1, the base model as the reference). Reports the held-out reward accuracy, the
//! model's preference between the held-out answers before and after, the share of held-out
//! prompts answered greedily in the chosen form before and after (through the serving path),
//! and the DPO step's cost against an SFT step on the same tokens, measured in the same run.
//! Minutes on two cores, so it runs on request: `cargo test --release -p tessera-tests --test
//! dpo_task -- --ignored --nocapture`.

use std::time::Instant;

use tessera::chat_template::Turn;
use tessera::dataset::preference::Preference;
use tessera::dataset::Message;
use tessera::generate::{generate, GenerateParams};
use tessera::sampler::SamplingParams;
use tessera::train::data::answer_example;
use tessera::train::decoder::{Example, Trainable};
use tessera::train::dpo::{evaluate_preferences, log_probs, mixed_step, with_reference, Both, PreferenceExample};
use tessera::train::lora::{AdapterParams, LoraSpec};
use tessera::train::optim::{AdamW, AdamWConfig};
use tessera_adapters::AdapterMix;
use tessera_tests::real_model;

const BETA: f64 = 0.1;
const BATCH: usize = 4;

fn preference(i: usize) -> Preference {
    let (a, b) = (3 + i % 17, 5 + (i * 7) % 23);
    Preference {
        prompt: vec![Message { role: "user".into(), content: format!("What is {a} plus {b}?") }],
        chosen: format!("The answer is {}.", a + b),
        rejected: format!("{}", a + b),
    }
}

fn in_chosen_form(answer: &str) -> bool {
    answer.trim_start().starts_with("The answer is")
}

fn optimizer(lora: &AdapterParams, total_steps: usize) -> AdamW {
    let vars: Vec<_> = lora.named_vars().into_iter().map(|(_, v)| v).collect();
    let config = AdamWConfig {
        learning_rate: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        max_grad_norm: 1.0,
        warmup_steps: (total_steps / 10).max(1),
        total_steps,
    };
    AdamW::new(config, &vars).unwrap()
}

/// The share of pairs whose chosen answer the policy finds likelier.
fn prefers_chosen(log_probs: &[Both]) -> f64 {
    log_probs.iter().filter(|b| b.chosen > b.rejected).count() as f64 / log_probs.len() as f64
}

/// The share of `prompts` answered greedily in the chosen form with `lora` served as an adapter.
fn greedy_in_chosen_form(lora: &AdapterParams, prompts: &[Preference], show: bool) -> f64 {
    let model = real_model();
    let dir = tempfile::tempdir().unwrap();
    lora.save_peft(dir.path(), "gemma-3-270m").unwrap();
    let adapter = tessera::adapter_files::load(dir.path(), &model.model.config().adapter_shape(), None).unwrap();
    let mix = AdapterMix { parts: vec![(&adapter.weights, 1.0)] };
    let params = GenerateParams { max_tokens: 12, sampling: SamplingParams::default(), top_logprobs: 0, stop_ids: model.tokenizer.stop_ids().to_vec() };
    let mut in_form = 0;
    for p in prompts {
        let turns = [Turn { role: "user", text: p.prompt[0].content.clone(), ..Default::default() }];
        let text = model.chat.render(&turns, true).unwrap();
        let ids: Vec<u32> = model.tokenizer.bos_prefix().into_iter().chain(model.tokenizer.encode(&text, true, false).unwrap()).collect();
        let out = generate(&model.model, &ids, &params, &mix, |_| {}).unwrap();
        let answer = model.tokenizer.decode(&out.token_ids, true).unwrap();
        if show {
            eprintln!("  {:?} → {answer:?}", p.prompt[0].content);
        }
        in_form += usize::from(in_chosen_form(&answer));
    }
    in_form as f64 / prompts.len() as f64
}

#[test]
#[ignore = "a measurement: minutes on two cores; run with --ignored"]
fn dpo_learns_the_chosen_form_and_costs_about_an_sft_step() {
    let model = real_model();
    let records: Vec<Preference> = (0..220).map(preference).collect();
    let (held, train): (Vec<_>, Vec<_>) = records.into_iter().enumerate().partition(|(i, _)| i % 11 == 0);
    let (held, train): (Vec<Preference>, Vec<Preference>) = (held.into_iter().map(|(_, p)| p).collect(), train.into_iter().map(|(_, p)| p).collect());
    let pairs = |records: &[Preference]| -> Vec<(Example, Example)> {
        records
            .iter()
            .map(|p| {
                let answer = |c| answer_example(&model.tokenizer, &model.chat, &c, 128).unwrap().unwrap();
                (answer(p.chosen_conversation()), answer(p.rejected_conversation()))
            })
            .collect()
    };
    let (train_pairs, held_pairs) = (pairs(&train), pairs(&held));
    let base = AdapterParams::fresh(model, LoraSpec::default(), 0).unwrap();

    let before = prefers_chosen(&log_probs(Trainable::new(model, &base), &held_pairs, 2).unwrap());
    let greedy_before = greedy_in_chosen_form(&base, &held, false);
    let started = Instant::now();
    let train_set = with_reference(Trainable::new(model, &base), train_pairs, 2).unwrap();
    let reference_seconds = started.elapsed().as_secs_f64();
    let held_set = with_reference(Trainable::new(model, &base), held_pairs.clone(), 2).unwrap();

    // One epoch, batch 4, as a job steps; every fifth batch also runs as an SFT step on the same
    // eight sequences (on a copy of the adapter), for the cost ratio.
    let policy = AdapterParams::fresh(model, LoraSpec::default(), 0).unwrap();
    let batches: Vec<&[PreferenceExample]> = train_set.chunks(BATCH).collect();
    let mut dpo_optimizer = optimizer(&policy, batches.len());
    let sft_lora = AdapterParams::fresh(model, LoraSpec::default(), 0).unwrap();
    let mut sft_optimizer = optimizer(&sft_lora, batches.len());
    let (mut dpo_seconds, mut sft_seconds) = (Vec::new(), Vec::new());
    for (step, batch) in batches.iter().enumerate() {
        let started = Instant::now();
        let stats = mixed_step(Trainable::new(model, &policy), &mut dpo_optimizer, &[], batch, BETA, 4).unwrap();
        let dpo = started.elapsed().as_secs_f64();
        if step % 5 == 0 {
            let sequences: Vec<Example> = batch.iter().flat_map(|p| [p.chosen.clone(), p.rejected.clone()]).collect();
            let started = Instant::now();
            mixed_step(Trainable::new(model, &sft_lora), &mut sft_optimizer, &sequences, &[], BETA, 4).unwrap();
            sft_seconds.push(started.elapsed().as_secs_f64());
            dpo_seconds.push(dpo);
            let r = stats.dpo.unwrap();
            eprintln!("step {step}: DPO loss {:.4}, reward accuracy {:.2}, margin {:.3}; DPO {dpo:.2} s, SFT {:.2} s", r.loss, r.accuracy, r.margin, sft_seconds.last().unwrap());
        }
    }

    let rewards = evaluate_preferences(Trainable::new(model, &policy), &held_set, BETA, 2).unwrap();
    let after = prefers_chosen(&log_probs(Trainable::new(model, &policy), &held_pairs, 2).unwrap());
    let greedy_after = greedy_in_chosen_form(&policy, &held, true);
    let (dpo, sft) = (dpo_seconds.iter().sum::<f64>(), sft_seconds.iter().sum::<f64>());
    let per_step_reference = reference_seconds / batches.len() as f64;
    eprintln!("held-out reward accuracy {:.3}, margin {:.3}, DPO loss {:.4}", rewards.accuracy, rewards.margin, rewards.loss);
    eprintln!("the model prefers the chosen answer on {before:.2} of held-out pairs before, {after:.2} after");
    eprintln!("greedy answers in the chosen form: {greedy_before:.2} of held-out prompts before, {greedy_after:.2} after");
    eprintln!(
        "DPO step {:.2} s, SFT step on the same tokens {:.2} s ({} same-run pairs): {:.2}×; with the reference pass ({reference_seconds:.1} s for {} pairs, once per job) spread over the epoch's steps: {:.2}×",
        dpo / dpo_seconds.len() as f64,
        sft / sft_seconds.len() as f64,
        sft_seconds.len(),
        dpo / sft,
        train_set.len(),
        (dpo / dpo_seconds.len() as f64 + per_step_reference) / (sft / sft_seconds.len() as f64)
    );
    assert!(rewards.accuracy >= 0.9, "held-out reward accuracy {}", rewards.accuracy);
    assert!(greedy_after >= 0.8, "greedy answers in the chosen form: {greedy_after}");
    assert!(dpo / sft <= 1.6, "DPO step {dpo} s against SFT {sft} s");
}
