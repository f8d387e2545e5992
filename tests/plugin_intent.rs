//! The `intent` plugin end to end on the real model over HTTP: banking utterances uploaded in the
//! plugin's own `{text, intent}` format train its adapter in the background; then `model:
//! "intent"` classifies raw held-out utterances (the plugin writes the prompt and maps the answer
//! onto its label set).

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde_json::json;
use tessera::api::{PluginsConfig, TuningConfig};
use tessera::train::job::TuningSettings;
use tessera_plugin_intent::LABELS;
use tessera_tests::{chat_accuracy, clinc, http, install_plugins, real_app_with, wait_for_job};

const TRAIN_PER_INTENT: usize = 16;
const VAL_PER_INTENT: usize = 6;

fn pick(data: &[(String, String)], per: usize) -> Vec<(String, String)> {
    LABELS
        .iter()
        .flat_map(|l| data.iter().filter(move |(_, i)| i == l).take(per).cloned())
        .collect()
}


#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_intent_plugin_trains_on_its_own_records_and_classifies_held_out_utterances() {
    let dir = tempfile::tempdir().unwrap();
    let plugins_dir = install_plugins(&["tessera-plugin-intent"], dir.path());
    let router = real_app_with(
        1024,
        false,
        Some(TuningConfig {
            root: dir.path().join("tuning"),
            state: None, blobs: None,
            settings: TuningSettings {
                train_threads: 2,
                ..Default::default()
            },
        }),
        Some(PluginsConfig { dir: plugins_dir, allow_sha256: None }),
    );
    let train = pick(&clinc("train.jsonl"), TRAIN_PER_INTENT);
    let val = pick(&clinc("val.jsonl"), VAL_PER_INTENT);
    assert_eq!((train.len(), val.len()), (LABELS.len() * TRAIN_PER_INTENT, LABELS.len() * VAL_PER_INTENT));

    let untrained = chat_accuracy(&router, "intent", &val).await;
    eprintln!("untrained adapter (version 0) accuracy: {untrained:.2}");

    let records: Vec<String> = train.iter().map(|(text, intent)| json!({"text": text, "intent": intent}).to_string()).collect();
    let (status, receipt) = http(&router, "POST", "/v1/adapters/intent/feedback", Some(records.join("\n"))).await;
    assert_eq!(status, StatusCode::OK, "{receipt}");
    let job = receipt["job"].as_str().expect("the upload starts a job").to_string();
    let started = Instant::now();
    let finished = wait_for_job(&router, &job, Duration::from_secs(900)).await;
    assert_eq!(finished["status"], "succeeded", "{finished}");
    let (_, info) = http(&router, "GET", "/v1/adapters/intent", None).await;
    assert_eq!(info["version"], 1, "{info}");
    eprintln!("trained and promoted in {:.0} s", started.elapsed().as_secs_f64());

    let tuned = chat_accuracy(&router, "intent", &val).await;
    eprintln!("intent plugin accuracy on {} held-out utterances: {tuned:.2}", val.len());
    assert!(tuned >= 0.8, "the intent plugin scores {tuned}");
    assert!(untrained < 0.5, "the untrained adapter already scores {untrained}");
}
