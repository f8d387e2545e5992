//! The paged KV cache and the prefix cache on the real model: a cached prefix gives the same
//! logits as computing it, sharing happens only between requests whose keys and values are the
//! same, a tiny pool preempts without changing any answer, and sliding-window layers hold only
//! their window.

use std::sync::Arc;

use serde_json::{json, Value};
use tessera::model::decoder::SequenceChunk;
use tessera::model::kv::prefix::PrefixCache;
use tessera::model::kv::BLOCK_TOKENS;
use tessera::model::{KvCache, KvPool, LogitsFor};
use tessera_adapters::peft::PeftAdapter;
use tessera_adapters::AdapterMix;
use tessera_tests::{http, real_model, testdata_dir, REAL_MODEL_ID};

/// An instruction shared by every request of a domain, as the CLINC prompts in this project
/// repeat one before each utterance.
const SHARED: &str = "You are an intent classifier for a banking assistant. Read the customer's message and answer with exactly one intent label from this list: balance, transfer, card_lost, card_declined, pin_change, exchange_rate, interest_rate, bill_payment, direct_deposit, spending_history, account_blocked, freeze_account, report_fraud, credit_limit, loan_application, mortgage_rate. Answer with the label only.\n\nCustomer: ";

fn tokens(text: &str) -> Vec<u32> {
    real_model().tokenizer.encode(text, true, true).unwrap()
}

/// Runs `tokens` through `cache` in one chunk and returns every position's logits.
fn forward_all(cache: &mut KvCache, tokens: &[u32], adapters: &AdapterMix) -> Vec<Vec<f32>> {
    let logits = real_model()
        .model
        .forward(&mut [SequenceChunk { tokens, cache, logits: LogitsFor::All, adapters }])
        .unwrap();
    (0..logits.rows(0)).map(|i| logits.row(0, i).to_vec()).collect()
}

#[test]
fn a_cached_prefix_gives_the_logits_computed_without_it() {
    let model = &real_model().model;
    let config = model.config();
    // alpha-r8 has deltas on k and v: its cached keys and values are its own.
    let alpha = PeftAdapter::load(&testdata_dir().join("adapters/alpha-r8"), &config.adapter_shape(), None).unwrap();
    let first = tokens(&format!("{SHARED}what is my balance"));
    let second = tokens(&format!("{SHARED}i lost my card yesterday"));
    let shared_blocks = first.iter().zip(&second).take_while(|(a, b)| a == b).count() / BLOCK_TOKENS;
    assert!(shared_blocks >= 6, "the prompts share {shared_blocks} blocks");
    for (salt, mix) in [(0, AdapterMix::default()), (1, AdapterMix { parts: vec![(&alpha.weights, 1.0)] })] {
        let pool = KvPool::new(config, 64 << 20);
        let mut prefix = PrefixCache::new();
        let mut one = KvCache::in_pool(&pool, config, first.len());
        forward_all(&mut one, &first, &mix);
        let registered = prefix.register(prefix.root(salt), &first, &one);
        assert_eq!(registered.tokens(), first.len() / BLOCK_TOKENS * BLOCK_TOKENS);

        let mut two = KvCache::in_pool(&pool, config, second.len());
        let found = prefix.adopt_longest_prefix(prefix.root(salt), &second, &mut two).tokens();
        assert_eq!(found, shared_blocks * BLOCK_TOKENS, "the whole shared run of blocks is found");
        let warm = forward_all(&mut two, &second[found..], &mix);

        let mut cold_cache = KvCache::new(config, second.len()).unwrap();
        let cold = forward_all(&mut cold_cache, &second, &mix);
        assert_eq!(warm, cold[found..], "salt {salt}: a cached prefix changed the logits");

        // Another salt (other adapters) finds nothing.
        let mut other = KvCache::in_pool(&pool, config, second.len());
        assert_eq!(prefix.adopt_longest_prefix(prefix.root(salt + 7), &second, &mut other).tokens(), 0);
    }
}

#[test]
fn sliding_window_layers_hold_only_their_window() {
    let model = &real_model().model;
    let config = model.config();
    let window = config.sliding_window.expect("Gemma 3 has local layers");
    let total = 4000;
    let pool = KvPool::new(config, 1 << 30);
    let mut cache = KvCache::in_pool(&pool, config, total);
    let ids: Vec<u32> = (0..total as u32).map(|i| 1000 + (i * 7919) % 20000).collect();
    let none = AdapterMix::default();
    let prompt = total - 8;
    let mut fed = 0;
    while fed < total {
        let n = if fed < prompt { 256.min(prompt - fed) } else { 1 };
        let chunk = &ids[fed..fed + n];
        model.forward(&mut [SequenceChunk { tokens: chunk, cache: &mut cache, logits: LogitsFor::Last, adapters: &none }]).unwrap();
        fed += n;
    }
    let window_blocks = window.div_ceil(BLOCK_TOKENS) + 1;
    let mut held = 0;
    for layer in 0..config.n_layers {
        let blocks = cache.blocks_held(layer);
        match config.window(layer) {
            Some(_) => assert!(blocks <= window_blocks, "local layer {layer} holds {blocks} blocks"),
            None => assert_eq!(blocks, total.div_ceil(BLOCK_TOKENS), "global layer {layer}"),
        }
        held += blocks;
    }
    assert_eq!(pool.allocated_blocks(), held, "the pool counts exactly the blocks held");
    let all_layers = config.n_layers * total.div_ceil(BLOCK_TOKENS);
    assert!(held * 3 < all_layers, "{held} blocks held of {all_layers} without windows");
    drop(cache);
    assert_eq!(pool.allocated_blocks(), 0, "dropping the sequence gives every block back");
}

/// An in-process server on the real model with the reference adapters and this KV budget.
fn app_with_kv_bytes(kv_cache_bytes: usize) -> axum::Router {
    app_with(kv_cache_bytes, true)
}

fn app_with(kv_cache_bytes: usize, prefix_cache: bool) -> axum::Router {
    let app = tessera::api::App::start(
        real_model().clone(),
        REAL_MODEL_ID.into(),
        tessera::api::ApiSettings {
            ctx_len: 8192,
            keys: Default::default(),
            request_timeout: std::time::Duration::from_secs(300),
            max_body_bytes: 1 << 20,
            adapters_dir: Some(testdata_dir().join("adapters")),
            adapter_roots: Vec::new(),
            max_adapter_memory: None,
            tuning: None,
            plugins: None,
        },
        tessera::engine::EngineConfig { kv_cache_bytes, prefix_cache, ..Default::default() },
    )
    .unwrap();
    tessera::api::router(app)
}

async fn complete(router: &axum::Router, body: Value) -> Value {
    let (status, response) = http(router, "POST", "/v1/completions", Some(body.to_string())).await;
    assert_eq!(status, 200, "{response}");
    response
}

fn cached_tokens(response: &Value) -> u64 {
    response["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().expect("cached_tokens is reported")
}

async fn metric(router: &axum::Router, name: &str) -> f64 {
    use tower::ServiceExt;
    let request = axum::http::Request::get("/metrics").body(axum::body::Body::empty()).unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let text = String::from_utf8(axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap().to_vec()).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} is not in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_share_a_prefix_only_with_the_same_adapters_and_scales() {
    let router = app_with_kv_bytes(256 << 20);
    let request = |model: &str, adapters: Value, question: &str| {
        json!({"model": model, "adapters": adapters, "prompt": format!("{SHARED}{question}"), "max_tokens": 2, "temperature": 0})
    };
    let base = REAL_MODEL_ID;
    let first = complete(&router, request(base, Value::Null, "what is my balance")).await;
    assert_eq!(cached_tokens(&first), 0, "nothing is cached yet");
    let again = complete(&router, request(base, Value::Null, "i lost my card")).await;
    let shared = cached_tokens(&again);
    assert!(shared >= 96 && shared % BLOCK_TOKENS as u64 == 0, "the shared instruction is found: {shared}");

    // alpha-r8 changes k and v; gamma-r4 only o and the MLP, which still feed later layers.
    for model in ["alpha-r8", "gamma-r4"] {
        let other = complete(&router, request(model, Value::Null, "i lost my card")).await;
        assert_eq!(cached_tokens(&other), 0, "{model} must not reuse the base model's blocks");
        let same = complete(&router, request(model, Value::Null, "freeze my account")).await;
        assert_eq!(cached_tokens(&same), shared, "{model} reuses its own blocks");
    }
    let half = json!([{"name": "alpha-r8", "scale": 0.5}]);
    let scaled = complete(&router, request(base, half.clone(), "i lost my card")).await;
    assert_eq!(cached_tokens(&scaled), 0, "a composition scale is part of the key");
    let scaled_again = complete(&router, request(base, half, "freeze my account")).await;
    assert_eq!(cached_tokens(&scaled_again), shared);

    assert!(metric(&router, "tessera_prefix_cache_hit_tokens_total").await >= 4.0 * shared as f64);
    assert!(metric(&router, "tessera_prefix_cache_query_tokens_total").await > 0.0);
    assert_eq!(metric(&router, "tessera_kv_cache_capacity_bytes").await as usize / (16 << 10), (256 << 20) / (16 << 10));

    // --no-prefix-cache: nothing is shared.
    let unshared = app_with(256 << 20, false);
    complete(&unshared, request(base, Value::Null, "what is my balance")).await;
    assert_eq!(cached_tokens(&complete(&unshared, request(base, Value::Null, "i lost my card")).await), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_pool_preempts_and_every_request_still_gets_its_solo_tokens() {
    // 160 blocks of 16 KiB: one 64-token sequence takes 18 layers × 4 blocks = 72, so four at
    // once do not fit.
    let tiny = Arc::new(app_with_kv_bytes(160 * (16 << 10)));
    let roomy = app_with_kv_bytes(256 << 20);
    let prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,", "1, 2, 3, 5, 8, 13,"];
    let body = |prompt: &str| {
        json!({"model": REAL_MODEL_ID, "prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": true, "return_token_ids": true})
    };
    let mut solo = Vec::new();
    for prompt in prompts {
        solo.push(complete(&roomy, body(prompt)).await["choices"][0]["token_ids"].clone());
    }
    let together = futures::future::join_all(prompts.iter().map(|p| {
        let router = tiny.clone();
        let request = body(p);
        async move { complete(&router, request).await }
    }))
    .await;
    for ((prompt, alone), response) in prompts.iter().zip(&solo).zip(&together) {
        assert_eq!(&response["choices"][0]["token_ids"], alone, "{prompt:?}: preemption changed the answer");
    }
    assert!(metric(&tiny, "tessera_preemptions_total").await >= 1.0, "the pool was meant to run out");

    // A request that could never fit is refused up front.
    let (status, error) = http(&tiny, "POST", "/v1/completions", Some(json!({"model": REAL_MODEL_ID, "prompt": "Hi", "max_tokens": 4000}).to_string())).await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["error"]["code"], "context_length_exceeded");
}
