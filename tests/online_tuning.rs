//! End to end on the real model over HTTP: CLINC150 intent pairs uploaded as feedback train an
//! adapter in the background; once promoted, it answers held-out utterances of those intents,
//! which the base model cannot.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde_json::json;
use tessera::api::TuningConfig;
use tessera::train::job::TuningSettings;
use tessera_tests::{chat_accuracy, clinc, http, real_app_with, wait_for_job, REAL_MODEL_ID};

const INTENTS: usize = 10;
const TRAIN_PER_INTENT: usize = 20;
const VAL_PER_INTENT: usize = 10;

fn prompt(labels: &[String], text: &str) -> String {
    format!("Classify the intent of the utterance. Answer with one label from: {}.\nUtterance: {text}", labels.join(", "))
}


#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_pairs_train_an_intent_adapter_that_answers_held_out_utterances() {
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
    let router = real_app_with(
        1024,
        false,
        Some(TuningConfig {
            root: dir.path().to_path_buf(),
            state: None, blobs: None,
            // Nothing else runs meanwhile: the trainer may have both cores.
            settings: TuningSettings {
                train_threads: 2,
                ..Default::default()
            },
        }),
        None,
    );
    let prompted: Vec<(String, String)> = val.iter().map(|(text, intent)| (prompt(&labels, text), intent.clone())).collect();
    let base = chat_accuracy(&router, REAL_MODEL_ID, &prompted).await;
    eprintln!("base model accuracy: {base:.2}");

    let records: Vec<String> = train
        .iter()
        .map(|(text, intent)| json!({"instruction": prompt(&labels, text), "output": intent}).to_string())
        .collect();
    let started = Instant::now();
    let (status, receipt) = http(&router, "POST", "/v1/adapters/intents/feedback", Some(records.join("\n"))).await;
    assert_eq!(status, StatusCode::OK, "{receipt}");
    assert_eq!(receipt["stored"], 200);
    let job = receipt["job"].as_str().expect("200 pairs pass train_after and start a job").to_string();

    let finished = wait_for_job(&router, &job, Duration::from_secs(900)).await;
    assert_eq!(finished["status"], "succeeded", "{finished}");
    let (_, info) = http(&router, "GET", "/v1/adapters/intents", None).await;
    assert_eq!(info["version"], 1, "the trained version beat version 0 on the held-out pairs: {info}");
    eprintln!("trained and promoted in {:.0} s: {}", started.elapsed().as_secs_f64(), info["metrics"]);

    let tuned = chat_accuracy(&router, "intents", &prompted).await;
    eprintln!("adapter accuracy on {} held-out utterances: {tuned:.2}", val.len());
    assert!(base <= 0.2, "the base model already scores {base}");
    assert!(tuned >= 0.8, "the tuned adapter scores {tuned}");
}
