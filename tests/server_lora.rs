//! `lora_cases.json` through the HTTP API on the real model: `model` names the adapter, the
//! `adapters` field composes several. Tolerances from the reference README.

use serde_json::{json, Value};
use tessera_tests::{first_choice, read_json, real_app, GenerationCase, GenerationCases, REAL_MODEL_ID as MODEL};

const GREEDY_MARGIN: f32 = 0.6;
const MAX_LOGPROB_ERROR: f32 = 1.2;
const MAX_MEAN_LOGPROB_ERROR: f32 = 0.2;

fn app() -> axum::Router {
    real_app(1024, true)
}

/// The request for a case: one adapter at weight 1 is `model`; anything else is a composition.
fn request(case: &GenerationCase) -> Value {
    let (model, adapters) = match case.adapters.iter().collect::<Vec<_>>().as_slice() {
        [(name, &scale)] if scale == 1.0 => (name.to_string(), Value::Null),
        parts => (
            MODEL.to_string(),
            parts.iter().map(|(name, scale)| json!({"name": name, "scale": scale})).collect(),
        ),
    };
    json!({"model": model, "adapters": adapters, "prompt": case.prompt_ids, "max_tokens": case.greedy.len(),
           "temperature": 0, "ignore_eos": true, "logprobs": 1, "return_token_ids": true})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_cases_through_http() {
    let r = app();
    let cases: GenerationCases = read_json("lora_cases.json");
    for case in &cases.cases {
        let choice = first_choice(&r, request(case)).await;
        let ids: Vec<u32> = choice["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let logprobs: Vec<f32> = choice["logprobs"]["token_logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let label = format!("{:?} with {:?}", case.prompt.chars().take(30).collect::<String>(), case.adapters);
        let agree = ids.iter().zip(&case.greedy).take_while(|(a, b)| a == b).count();
        if agree < case.greedy.len() {
            let margin = case.steps[agree].margin();
            assert!(margin < GREEDY_MARGIN, "{label}: step {agree} differs with reference margin {margin:.3}");
        }
        // Up to the first divergence the sampled token is the reference's: compare its logprob.
        let errors: Vec<f32> = (0..agree).map(|i| (logprobs[i] - case.steps[i].logprob).abs()).collect();
        let max = errors.iter().copied().fold(0f32, f32::max);
        let mean = if errors.is_empty() { 0.0 } else { errors.iter().sum::<f32>() / errors.len() as f32 };
        eprintln!("{label}: {agree}/{} tokens agree, max |Δlogprob| {max:.4}, mean {mean:.4}", case.greedy.len());
        assert!(max <= MAX_LOGPROB_ERROR && mean <= MAX_MEAN_LOGPROB_ERROR, "{label}: max {max}, mean {mean}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_adapter_batch_matches_each_request_alone() {
    let r = app();
    let prompt = "The capital of France is";
    let body = |model: &str, adapters: Value| {
        json!({"model": model, "adapters": adapters, "prompt": prompt, "max_tokens": 16, "temperature": 0,
               "ignore_eos": true, "return_token_ids": true})
    };
    let requests = [
        body("alpha-r8", Value::Null),
        body("beta-r16", Value::Null),
        body("gamma-r4", Value::Null),
        body(MODEL, Value::Null),
        body(MODEL, json!([{"name": "alpha-r8", "scale": 0.5}, {"name": "gamma-r4", "scale": 1.0}])),
    ];
    let mut alone = Vec::new();
    for request in &requests {
        alone.push(first_choice(&r, request.clone()).await["token_ids"].clone());
    }
    let together = futures::future::join_all(requests.iter().map(|b| first_choice(&r, b.clone()))).await;
    for (i, choice) in together.iter().enumerate() {
        assert_eq!(choice["token_ids"], alone[i], "request {i} changed in the mixed batch");
    }
    let distinct: std::collections::HashSet<String> = alone.iter().map(|v| v.to_string()).collect();
    assert!(distinct.len() >= 4, "adapters should change the output: {alone:?}");
}
