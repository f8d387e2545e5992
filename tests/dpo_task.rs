//! Issue 36's targets on Gemma 3 270M: a preference task with a clear signal (the chosen
//! answer says "The answer is N.", the rejected one just "N"), 200 preferences to train on and
//! 20 held out, one epoch as a job runs it (r16 on all seven projections, the job's default
//! learning rate, batch 4, β 0.1, DPO with the job's SFT term on the chosen answers, the base
//! model as the reference, its log-probabilities from the serving forward). Asserts the
//! held-out reward accuracy (≥ 0.9), the share of held-out prompts answered greedily through
//! the serving path in exactly the chosen form, the whole answer "The answer is N." for a
//! number N (≥ 0.8), and the DPO step's cost with the reference pass spread over the epoch's steps
//! against an SFT step on the same tokens, measured in the same run (≤ 1.6×); reports the
//! model's preference between the held-out answers before and after, and how many of the
//! greedy answers carry the right sum. The sum is not part of the form: each pair's answers
//! share it, so the preferences say nothing about arithmetic, which a 270M base model gets
//! partly wrong either way.
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
use tessera::train::dpo::{evaluate_preferences, log_probs, mixed_step, with_reference, Both, PreferenceExample, PreferenceLoss};
use tessera::train::job::Hyperparameters;
use tessera::train::lora::{AdapterParams, LoraSpec};
use tessera::train::reference::serving_log_probs;
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

/// Whether `answer` is, whole, in the chosen side's form: "The answer is N." for a number N.
fn is_in_chosen_form(answer: &str) -> bool {
    let number = answer.trim().strip_prefix("The answer is ").and_then(|rest| rest.strip_suffix('.'));
    number.is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Of greedy answers to held-out prompts: the share in the chosen form, and the share that are
/// exactly the chosen answer (the form with the right sum).
struct GreedyAnswers {
    in_form: f64,
    right_sum: f64,
}

fn optimizer(lora: &AdapterParams, total_steps: usize, learning_rate: f64) -> AdamW {
    let vars: Vec<_> = lora.named_vars().into_iter().map(|(_, v)| v).collect();
    let config = AdamWConfig {
        learning_rate,
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

/// `lora` as the server serves it.
fn served(lora: &AdapterParams) -> tessera_adapters::peft::PeftAdapter {
    let model = real_model();
    let dir = tempfile::tempdir().unwrap();
    lora.save_peft(dir.path(), "gemma-3-270m").unwrap();
    tessera::adapter_files::load(dir.path(), &model.model.config().adapter_shape(), Some(&**model)).unwrap()
}

/// The reference pass of a job: log π_ref of each pair's answers through the serving forward.
fn reference_pass(reference: &AdapterParams, pairs: &[(Example, Example)]) -> Vec<Both> {
    let adapter = served(reference);
    serving_log_probs(&real_model().model, &AdapterMix { parts: vec![(&adapter.weights, 1.0)] }, pairs).unwrap()
}

/// How `prompts` are answered greedily, `lora` served as an adapter.
fn greedy_answers(lora: &AdapterParams, prompts: &[Preference], show: bool) -> GreedyAnswers {
    let model = real_model();
    let adapter = served(lora);
    let mix = AdapterMix { parts: vec![(&adapter.weights, 1.0)] };
    let params = GenerateParams { max_tokens: 12, sampling: SamplingParams::default(), top_logprobs: 0, stop_ids: model.tokenizer.stop_ids().to_vec() };
    let (mut in_form, mut right_sum) = (0, 0);
    for p in prompts {
        let turns = [Turn { role: "user", text: p.prompt[0].content.clone(), ..Default::default() }];
        let text = model.chat.render(&turns, true).unwrap();
        let ids: Vec<u32> = model.tokenizer.bos_prefix().into_iter().chain(model.tokenizer.encode(&text, true, false).unwrap()).collect();
        let out = generate(&model.model, &ids, &params, &mix, |_| {}).unwrap();
        let answer = model.tokenizer.decode(&out.token_ids, true).unwrap();
        if show {
            eprintln!("  {:?} → {answer:?}", p.prompt[0].content);
        }
        in_form += usize::from(is_in_chosen_form(&answer));
        right_sum += usize::from(answer.trim() == p.chosen);
    }
    let share = |n: usize| n as f64 / prompts.len() as f64;
    GreedyAnswers { in_form: share(in_form), right_sum: share(right_sum) }
}

#[test]
fn the_chosen_form_is_the_whole_answer_with_a_number() {
    for answer in ["The answer is 29.", " The answer is 8.\n"] {
        assert!(is_in_chosen_form(answer), "{answer:?}");
    }
    for answer in ["29", "The answer is .", "The answer is 1. answers. The answer is", "The answer is twenty.", "The answer is 29"] {
        assert!(!is_in_chosen_form(answer), "{answer:?}");
    }
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
    let greedy_before = greedy_answers(&base, &held, true);
    let started = Instant::now();
    let train_reference = reference_pass(&base, &train_pairs);
    let reference_seconds = started.elapsed().as_secs_f64();
    let train_set = with_reference(train_pairs, train_reference);
    let held_set = with_reference(held_pairs.clone(), reference_pass(&base, &held_pairs));
    let start_rewards = evaluate_preferences(Trainable::new(model, &base), &held_set, BETA, 2).unwrap();
    // The reference pass's serving kernels round differently from the trainer's: the margins
    // of the policy that starts at the reference are near 0, not 0.
    eprintln!("step 0: held-out margin {:.4} (the serving reference against the trainer), reward accuracy {:.2}", start_rewards.margin, start_rewards.accuracy);

    // One epoch, batch 4, as a job steps; every fifth batch also runs as an SFT step on the same
    // eight sequences (on a copy of the adapter), for the cost ratio.
    let learning_rate = Hyperparameters::default().learning_rate;
    let policy = AdapterParams::fresh(model, LoraSpec::default(), 0).unwrap();
    let batches: Vec<&[PreferenceExample]> = train_set.chunks(BATCH).collect();
    let mut dpo_optimizer = optimizer(&policy, batches.len(), learning_rate);
    let sft_lora = AdapterParams::fresh(model, LoraSpec::default(), 0).unwrap();
    let mut sft_optimizer = optimizer(&sft_lora, batches.len(), learning_rate);
    let loss = PreferenceLoss::for_jobs(BETA);
    let (mut dpo_seconds, mut sft_seconds) = (Vec::new(), Vec::new());
    for (step, batch) in batches.iter().enumerate() {
        let started = Instant::now();
        let stats = mixed_step(Trainable::new(model, &policy), &mut dpo_optimizer, &[], batch, loss, 4).unwrap();
        let dpo = started.elapsed().as_secs_f64();
        if step % 5 == 0 {
            let sequences: Vec<Example> = batch.iter().flat_map(|p| [p.chosen.clone(), p.rejected.clone()]).collect();
            let started = Instant::now();
            mixed_step(Trainable::new(model, &sft_lora), &mut sft_optimizer, &sequences, &[], loss, 4).unwrap();
            sft_seconds.push(started.elapsed().as_secs_f64());
            dpo_seconds.push(dpo);
            let p = stats.dpo.unwrap();
            let r = p.rewards;
            eprintln!(
                "step {step}: DPO loss {:.4}, chosen NLL {:.4}, reward accuracy {:.2}, margin {:.3}; DPO {dpo:.2} s, SFT {:.2} s",
                r.loss,
                p.chosen_nll,
                r.accuracy,
                r.margin,
                sft_seconds.last().unwrap()
            );
        }
    }

    let rewards = evaluate_preferences(Trainable::new(model, &policy), &held_set, BETA, 2).unwrap();
    let after = prefers_chosen(&log_probs(Trainable::new(model, &policy), &held_pairs, 2).unwrap());
    let greedy_after = greedy_answers(&policy, &held, true);
    let (dpo_step, sft_step) = (dpo_seconds.iter().sum::<f64>() / dpo_seconds.len() as f64, sft_seconds.iter().sum::<f64>() / sft_seconds.len() as f64);
    let per_step_reference = reference_seconds / batches.len() as f64;
    let ratio = (dpo_step + per_step_reference) / sft_step;
    eprintln!("learning rate {learning_rate:e}, β {BETA}, RPO α {}", loss.rpo_alpha);
    eprintln!("held-out reward accuracy {:.3}, margin {:.3}, DPO loss {:.4}", rewards.accuracy, rewards.margin, rewards.loss);
    eprintln!("the model prefers the chosen answer on {before:.2} of held-out pairs before, {after:.2} after");
    eprintln!(
        "greedy answers in the chosen form: {:.2} of held-out prompts before, {:.2} after; with the right sum: {:.2} before, {:.2} after",
        greedy_before.in_form, greedy_after.in_form, greedy_before.right_sum, greedy_after.right_sum
    );
    eprintln!(
        "DPO step {dpo_step:.2} s, SFT step on the same tokens {sft_step:.2} s ({} same-run pairs): {:.2}×; the reference pass {reference_seconds:.1} s for {} pairs ({per_step_reference:.2} s a step): {ratio:.2}× with it",
        sft_seconds.len(),
        dpo_step / sft_step,
        train_set.len(),
    );
    assert!(rewards.accuracy >= 0.9, "held-out reward accuracy {}", rewards.accuracy);
    assert!(greedy_after.in_form >= 0.8, "greedy answers in the chosen form: {}", greedy_after.in_form);
    assert!(ratio <= 1.6, "DPO step with the reference pass {ratio:.2}× the SFT step");
}

/// The reference pass as a job runs it (the serving forward) against the trainer's no-grad
/// forward it replaced, on the task's 200 training pairs in one run: the serving pass must be
/// the cheaper. Minutes on two cores: `-- --ignored --nocapture`.
#[test]
#[ignore = "a measurement: minutes on two cores; run with --ignored"]
fn the_serving_reference_pass_is_cheaper_than_the_trainers_forward() {
    let model = real_model();
    let pairs: Vec<(Example, Example)> = (0..220)
        .filter(|i| i % 11 != 0)
        .map(|i| {
            let p = preference(i);
            let answer = |c| answer_example(&model.tokenizer, &model.chat, &c, 128).unwrap().unwrap();
            (answer(p.chosen_conversation()), answer(p.rejected_conversation()))
        })
        .collect();
    let base = AdapterParams::fresh(model, LoraSpec::default(), 0).unwrap();
    let started = Instant::now();
    let serving = reference_pass(&base, &pairs);
    let serving_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let trainer = log_probs(Trainable::new(model, &base), &pairs, 2).unwrap();
    let trainer_seconds = started.elapsed().as_secs_f64();
    let largest_gap = serving.iter().zip(&trainer).map(|(s, t)| (s.chosen - t.chosen).abs().max((s.rejected - t.rejected).abs())).fold(0.0, f64::max);
    eprintln!(
        "reference pass over {} pairs: serving forward {serving_seconds:.1} s, trainer forward {trainer_seconds:.1} s ({:.1}× cheaper); largest log-probability gap {largest_gap:.3}",
        pairs.len(),
        trainer_seconds / serving_seconds
    );
    assert!(serving_seconds < trainer_seconds, "serving {serving_seconds} s against the trainer's {trainer_seconds} s");
}
