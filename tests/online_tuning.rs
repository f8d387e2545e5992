//! End to end on real models over HTTP: CLINC150 intent pairs uploaded as feedback train an
//! adapter in the background; once promoted, it answers held-out utterances of those intents
//! better than the base model. Run on Gemma 3 270M (a base model, which cannot do it at all) and
//! on the default instruct model, Qwen2.5-Coder 0.5B (the README's example).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde_json::json;
use tessera::api::TuningConfig;
use tessera::model_store::catalog::{CatalogEntry, QWEN2_5_CODER_0_5B};
use tessera::train::job::{Hyperparameters, TuningSettings, ADALOMO_LEARNING_RATE};
use tessera::train::optim::OptimizerKind;
use tessera::LoadedModel;
use tessera_tests::{app_on, chat_accuracy, clinc, http, real_model, wait_for_job, REAL_MODEL_ID};

const INTENTS: usize = 10;
const TRAIN_PER_INTENT: usize = 20;
const VAL_PER_INTENT: usize = 10;

fn prompt(labels: &[String], text: &str) -> String {
    format!("Classify the intent of the utterance. Answer with one label from: {}.\nUtterance: {text}", labels.join(", "))
}

/// What one run of the loop measured.
struct Outcome {
    base: f64,
    tuned: f64,
    /// From the upload to the promotion.
    seconds: f64,
    /// The adapter's version after the job: 1 when the trained version beat the untrained one.
    version: u64,
    /// The job's schedule: epochs, batch size and tokens trained, which fix its optimizer steps.
    schedule: String,
}

/// One test, so the two trainers do not share the two cores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_pairs_train_an_intent_adapter_that_answers_held_out_utterances() {
    let gemma = clinc_loop(real_model().clone(), REAL_MODEL_ID, "", Hyperparameters::default()).await;
    let qwen = clinc_loop(load(&QWEN2_5_CODER_0_5B), QWEN2_5_CODER_0_5B.name, "", Hyperparameters::default()).await;
    for outcome in [&gemma, &qwen] {
        assert_eq!(outcome.version, 1, "the trained version beat version 0 on the held-out pairs");
    }
    assert!(gemma.base <= 0.2, "the base model already scores {}", gemma.base);
    assert!(gemma.tuned >= 0.8, "the tuned Gemma adapter scores {}", gemma.tuned);
    // An instruct model reads the label list and gets some right untaught; feedback must still
    // carry it well past that.
    assert!(qwen.tuned >= 0.8 && qwen.tuned >= qwen.base + 0.2, "the tuned Qwen adapter scores {}, its base {}", qwen.tuned, qwen.base);
}

/// Issue 34's target: AdaLomo, with no stored gradient and a tenth of AdamW's gradient and
/// optimizer bytes, learns the same intents in the same steps to within 0.02 of AdamW's
/// accuracy. A measurement (two trainings of Gemma 3 270M), run by hand:
/// `cargo test --release -p tessera-tests --test online_tuning adalomo -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: two CLINC-10 trainings, several minutes each"]
async fn adalomo_learns_the_intents_within_two_points_of_adamw_in_the_same_steps() {
    let adamw = clinc_loop(real_model().clone(), REAL_MODEL_ID, "", Hyperparameters::default()).await;
    let adalomo = Hyperparameters { optimizer: OptimizerKind::Adalomo, learning_rate: ADALOMO_LEARNING_RATE, ..Hyperparameters::default() };
    let adalomo = clinc_loop(real_model().clone(), REAL_MODEL_ID, "", adalomo).await;
    eprintln!("| optimizer | schedule | accuracy | seconds |\n| --- | --- | --- | --- |");
    for (name, outcome) in [("adamw", &adamw), ("adalomo", &adalomo)] {
        eprintln!("| {name} | {} | {:.2} | {:.0} |", outcome.schedule, outcome.tuned, outcome.seconds);
    }
    assert_eq!(adamw.schedule, adalomo.schedule, "both train the same steps");
    assert!(adalomo.tuned >= adamw.tuned - 0.02, "AdaLomo {} against AdamW {}", adalomo.tuned, adamw.tuned);
}

/// DoRA against LoRA at r16 and IA³, each trained by the same job (same data, same steps, the
/// default hyperparameters) on Gemma 3 270M, with their held-out accuracies as a table:
/// `cargo test --release -p tessera-tests --test online_tuning dora -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "trains three adapters on a real model: minutes"]
async fn dora_lora_and_ia3_on_the_same_intents_and_steps() {
    let mut rows = Vec::new();
    for (kind, query) in [("LoRA r16", "?method=lora&rank=16"), ("DoRA r16", "?method=dora&rank=16"), ("IA³", "?method=ia3")] {
        rows.push((kind, clinc_loop(real_model().clone(), REAL_MODEL_ID, query, Hyperparameters::default()).await));
    }
    println!("\n{REAL_MODEL_ID}, {INTENTS} CLINC intents, {TRAIN_PER_INTENT} pairs each, {VAL_PER_INTENT} held out each");
    println!("| kind | schedule | base accuracy | adapter accuracy | promoted version |\n|---|---|---:|---:|---:|");
    for (kind, o) in &rows {
        println!("| {kind} | {} | {:.2} | {:.2} | {} |", o.schedule, o.base, o.tuned, o.version);
    }
    let schedules: BTreeSet<&String> = rows.iter().map(|(_, o)| &o.schedule).collect();
    assert_eq!(schedules.len(), 1, "every kind trains the same steps: {schedules:?}");
    let (lora, dora, ia3) = (&rows[0].1, &rows[1].1, &rows[2].1);
    assert!(dora.tuned >= lora.tuned - 0.02, "DoRA {} against LoRA {}", dora.tuned, lora.tuned);
    // IA³ learns the task at the job's default rate (its own, ten times LoRA's under AdamW).
    assert!(ia3.tuned >= 0.8, "IA³ scores {}", ia3.tuned);
}

fn load(entry: &CatalogEntry) -> Arc<LoadedModel> {
    let path = tessera::model_store::ensure_model(entry).unwrap_or_else(|e| panic!("fetching {}: {e}", entry.name));
    Arc::new(LoadedModel::load(&path).unwrap_or_else(|e| panic!("loading {}: {e}", path.display())))
}

/// 20 pairs of each of 10 intents posted to a new adapter (`query` on the first upload:
/// `?method=…`), trained with `hyperparameters`; its accuracy on 10 held-out utterances of each,
/// against the base model's.
async fn clinc_loop(model: Arc<LoadedModel>, model_id: &str, query: &str, hyperparameters: Hyperparameters) -> Outcome {
    let train = clinc("train.jsonl");
    let val = clinc("val.jsonl");
    let mut labels: Vec<String> = Vec::new();
    for (_, intent) in &train {
        if !labels.contains(intent) && labels.len() < INTENTS {
            labels.push(intent.clone());
        }
    }
    let wanted: BTreeSet<&String> = labels.iter().collect();
    let pick = |data: &[(String, String)], per: usize| -> Vec<(String, String)> {
        labels
            .iter()
            .flat_map(|l| data.iter().filter(move |(_, i)| i == l).take(per).cloned())
            .collect()
    };
    let train = pick(&train, TRAIN_PER_INTENT);
    let val = pick(&val, VAL_PER_INTENT);
    assert_eq!((train.len(), val.len()), (INTENTS * TRAIN_PER_INTENT, INTENTS * VAL_PER_INTENT));
    assert!(val.iter().all(|(_, i)| wanted.contains(i)));

    let dir = tempfile::tempdir().unwrap();
    let router = app_on(
        model,
        model_id,
        1024,
        None,
        Some(TuningConfig {
            root: dir.path().to_path_buf(),
            state: None, blobs: None,
            // Nothing else runs meanwhile: the trainer may have both cores.
            settings: TuningSettings {
                train_threads: 2,
                defaults: hyperparameters,
                ..Default::default()
            },
        }),
        None,
    );
    let prompted: Vec<(String, String)> = val.iter().map(|(text, intent)| (prompt(&labels, text), intent.clone())).collect();
    let base = chat_accuracy(&router, model_id, &prompted).await;
    eprintln!("{model_id}: base model accuracy {base:.2}");

    let records: Vec<String> = train
        .iter()
        .map(|(text, intent)| json!({"instruction": prompt(&labels, text), "output": intent}).to_string())
        .collect();
    let started = Instant::now();
    let (status, receipt) = http(&router, "POST", &format!("/v1/adapters/intents/feedback{query}"), Some(records.join("\n"))).await;
    assert_eq!(status, StatusCode::OK, "{receipt}");
    assert_eq!(receipt["stored"], 200);
    let job = receipt["job"].as_str().expect("200 pairs pass train_after and start a job").to_string();

    let finished = wait_for_job(&router, &job, Duration::from_secs(900)).await;
    assert_eq!(finished["status"], "succeeded", "{finished}");
    let (_, info) = http(&router, "GET", "/v1/adapters/intents", None).await;
    let seconds = started.elapsed().as_secs_f64();
    eprintln!("{model_id}: trained ({}) and promoted in {seconds:.0} s: {}", hyperparameters.optimizer.name(), info["metrics"]);

    let tuned = chat_accuracy(&router, "intents", &prompted).await;
    eprintln!("{model_id}: adapter accuracy on {} held-out utterances {tuned:.2}", val.len());
    let version = info["version"].as_u64().unwrap_or_else(|| panic!("no version: {info}"));
    let hyperparameters = &finished["hyperparameters"];
    let schedule = format!("{} epochs × batch {}, {} tokens", hyperparameters["n_epochs"], hyperparameters["batch_size"], finished["trained_tokens"]);
    Outcome { base, tuned, seconds, version, schedule }
}
