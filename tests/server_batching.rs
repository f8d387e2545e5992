//! Continuous batching on the real model: requests sent together return exactly what each
//! returns alone.

use std::time::Instant;

use serde_json::json;
use tessera_tests::{first_choice, real_app, REAL_MODEL_ID as MODEL};

async fn complete(router: &axum::Router, prompt: &str, max_tokens: u32) -> Vec<u64> {
    let body = json!({
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": true, "return_token_ids": true,
    });
    first_choice(router, body).await["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_simultaneous_greedy_requests_return_what_they_return_alone() {
    let r = real_app(2048, false);
    let prompts = [
        "The capital of France is",
        "Once upon a time, in a small village,",
        "def fibonacci(n):",
        "The three primary colors are",
        "Instruction tuning is a technique that",
        "Water boils at a temperature of",
        "My favourite recipe for pancakes starts with",
        "In 1969, the first humans",
    ];
    let tokens = 32;
    let mut alone = Vec::new();
    let started = Instant::now();
    for p in prompts {
        alone.push(complete(&r, p, tokens).await);
    }
    let sequential = started.elapsed();
    let started = Instant::now();
    let together = futures::future::join_all(prompts.iter().map(|p| complete(&r, p, tokens))).await;
    let concurrent = started.elapsed();
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.len(), tokens as usize);
        assert_eq!(a, t, "prompt {i} ({:?}) changed when batched", prompts[i]);
    }
    eprintln!(
        "8×{tokens} tokens: one at a time {:.2}s, together {:.2}s",
        sequential.as_secs_f64(),
        concurrent.as_secs_f64()
    );
}
