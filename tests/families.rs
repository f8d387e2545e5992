//! Every supported family against llama.cpp, on the small random-weight models of
//! `data/families/` (real tokenizers and chat templates, quantized by llama.cpp;
//! tolerances calibrated in that folder's README), and the engine's features on each of them:
//! batching, LoRA and its composition, and QLoRA training.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use tessera::chat_template::Turn;
use tessera::dataset::{Conversation, Message};
use tessera::generate::prefill;
use tessera::model::decoder::SequenceChunk;
use tessera::model::{KvCache, LogitsFor};
use tessera::train::data::example;
use tessera::train::decoder::{Example, Trainable};
use tessera::train::lora::{AdapterParams, LoraSpec};
use tessera::train::optim::{AdamW, AdamWConfig};
use tessera::train::{evaluate, gradients, train_step};
use tessera::LoadedModel;
use tessera_adapters::peft::PeftAdapter;
use tessera_adapters::{AdapterKind, AdapterMix, TargetModule};
use tessera::train::job::{Hyperparameters, TuningSettings};
use tessera_tests::{data_dir, http, wait_for_job, LlamaCppReferences};

const FAMILIES: [&str; 4] = ["llama3-tiny", "qwen2-tiny", "qwen3-tiny", "llama-spm-tiny"];

fn families_dir() -> PathBuf {
    data_dir("families")
}

fn load(name: &str) -> Arc<LoadedModel> {
    let path = families_dir().join(format!("{name}.gguf"));
    Arc::new(LoadedModel::load(&path).unwrap_or_else(|e| panic!("loading {}: {e}", path.display())))
}

fn references(name: &str) -> LlamaCppReferences {
    LlamaCppReferences::load(&families_dir().join(format!("{name}.refs.json")))
}

#[test]
fn tokenization_is_exactly_llama_cpps() {
    for name in FAMILIES {
        references(name).check_tokenizer(name, &load(name));
    }
    // Every token that ends a turn stops chat generation.
    for (name, ends) in [("llama3-tiny", &["<|eot_id|>", "<|end_of_text|>"][..]), ("qwen2-tiny", &["<|im_end|>", "<|endoftext|>"]), ("llama-spm-tiny", &["</s>"])] {
        let model = load(name);
        for end in ends {
            let id = model.tokenizer.piece_to_id(end).unwrap_or_else(|| panic!("{name}: no {end}"));
            assert!(model.tokenizer.stop_ids().contains(&id), "{name}: {end} does not stop generation");
        }
    }
}

#[test]
fn a_template_file_overrides_the_models_and_a_model_without_one_gets_chatml() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain.jinja");
    std::fs::write(&file, "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}").unwrap();
    let options = tessera::LoadOptions { chat_template: Some(file.clone()), ..Default::default() };
    let model = LoadedModel::load_with(&families_dir().join("qwen2-tiny.gguf"), &options).unwrap();
    let turns = [Turn { role: "user", text: "hi".into(), ..Default::default() }];
    assert_eq!(model.chat.render(&turns, true).unwrap(), "[user] hi\n[assistant] ");
    assert_eq!(model.chat.source(), &tessera::chat_template::TemplateSource::Override(file.display().to_string()));

    let spm = load("llama-spm-tiny");
    assert_eq!(spm.chat.source(), &tessera::chat_template::TemplateSource::ChatMl);
    assert_eq!(spm.chat.render(&turns, true).unwrap(), "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
}

#[test]
fn greedy_decoding_follows_llama_cpp_where_it_is_decisive() {
    for name in FAMILIES {
        references(name).check_greedy(name, &load(name));
    }
}

#[test]
fn teacher_forced_logprobs_are_within_tolerance() {
    for name in FAMILIES {
        references(name).check_teacher_forced(name, &load(name));
    }
}

/// An in-process server on `model`, with online tuning under `tuning` when given.
fn app(model: Arc<LoadedModel>, tuning: Option<&std::path::Path>) -> axum::Router {
    app_with_plugins(model, tuning, None)
}

/// [`app`], with the plugins of `plugins` loaded.
fn app_with_plugins(model: Arc<LoadedModel>, tuning: Option<&std::path::Path>, plugins: Option<&std::path::Path>) -> axum::Router {
    let tuning = tuning.map(|root| tessera::api::TuningConfig {
        root: root.to_path_buf(),
        state: None, blobs: None,
        settings: TuningSettings {
            train_after: 24,
            checkpoint_every: 4,
            defaults: Hyperparameters { n_epochs: 3, batch_size: 4, learning_rate: 5e-3, ..Default::default() },
            ..Default::default()
        },
    });
    let plugins = plugins.map(|dir| tessera::api::PluginsConfig { dir: dir.to_path_buf(), allow_sha256: None });
    tessera_tests::app_on(model, "family", 512, None, tuning, plugins)
}

#[tokio::test]
async fn chat_templates_render_llama_cpps_prompts() {
    for name in FAMILIES {
        let model = load(name);
        let refs = references(name);
        refs.check_chat_templates(name, &model);
        // The server renders and tokenizes conversations the same way.
        let router = app(model, None);
        for case in &refs.chat {
            let body = serde_json::json!({"model": "family", "messages": case.messages, "add_generation_prompt": case.add_generation_prompt});
            let (status, answer) = http(&router, "POST", "/tokenize", Some(body.to_string())).await;
            assert_eq!(status, axum::http::StatusCode::OK, "{name}: {answer}");
            let ids: Vec<u32> = serde_json::from_value(answer["tokens"].clone()).unwrap();
            assert_eq!(ids, case.prompt_ids, "{name}: POST /tokenize with {:?}", case.messages);
        }
    }
}

/// The logits of each prompt's last position, each sequence alone.
fn last_logits_alone(model: &LoadedModel, prompts: &[Vec<u32>], mix: &AdapterMix) -> Vec<Vec<f32>> {
    prompts
        .iter()
        .map(|ids| {
            let mut cache = KvCache::new(model.model.config(), ids.len()).unwrap();
            prefill(&model.model, &mut cache, ids, mix).unwrap()
        })
        .collect()
}

fn mean_difference(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32
}

fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

#[test]
fn a_mixed_batch_equals_each_sequence_alone() {
    let none = AdapterMix::default();
    for name in FAMILIES {
        let model = load(name);
        let c = model.model.config();
        let prompts: Vec<Vec<u32>> = ["The capital of France is", "Once upon a time, in a land far away", "x"]
            .iter()
            .map(|p| model.tokenizer.encode(p, true, true).unwrap())
            .collect();
        // Alone: the first two prompts but their last token, then that token (as they decode
        // in the batch); the third at once (as it prefills in the batch).
        let alone: Vec<Vec<f32>> = prompts
            .iter()
            .enumerate()
            .map(|(i, prompt)| {
                let mut cache = KvCache::new(c, prompt.len()).unwrap();
                if i == 2 {
                    return prefill(&model.model, &mut cache, prompt, &none).unwrap();
                }
                prefill(&model.model, &mut cache, &prompt[..prompt.len() - 1], &none).unwrap();
                prefill(&model.model, &mut cache, &prompt[prompt.len() - 1..], &none).unwrap()
            })
            .collect();
        // Together: the first two are decoding (their prefixes cached), the third prefills.
        let mut caches: Vec<KvCache> = prompts.iter().map(|p| KvCache::new(c, p.len() + 1).unwrap()).collect();
        for (cache, prompt) in caches.iter_mut().zip(&prompts).take(2) {
            prefill(&model.model, cache, &prompt[..prompt.len() - 1], &none).unwrap();
        }
        let mut chunks: Vec<SequenceChunk> = caches
            .iter_mut()
            .zip(&prompts)
            .enumerate()
            .map(|(i, (cache, prompt))| SequenceChunk {
                tokens: if i < 2 { &prompt[prompt.len() - 1..] } else { &prompt[..] },
                cache,
                logits: LogitsFor::Last,
                adapters: &none,
            })
            .collect();
        let batched = model.model.forward(&mut chunks).unwrap();
        for (i, alone) in alone.iter().enumerate() {
            assert_eq!(batched.row(i, 0), &alone[..], "{name}: sequence {i} changes in a mixed batch");
        }
    }
}

/// r8 factors on every target with a random B (a fresh B is zero and changes nothing), the same
/// for the same seed so that a test sees the same adapter on every run.
fn random_lora(model: &LoadedModel, rank: usize, seed: u64) -> AdapterParams {
    let spec = LoraSpec {
        rank,
        alpha: 2.0 * rank as f32,
        targets: TargetModule::ALL.to_vec(),
        kind: AdapterKind::Lora,
    };
    let lora = AdapterParams::fresh(&model, spec, seed).unwrap();
    // SplitMix64 → uniform on (−0.35, 0.35): a standard deviation of 0.2.
    let mut state = seed;
    let mut uniform = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 * 0.7 - 0.35
    };
    for (name, var) in lora.named_vars() {
        if name.contains("lora_B") {
            let dims = var.as_tensor().dims().to_vec();
            let values: Vec<f32> = (0..dims.iter().product::<usize>()).map(|_| uniform()).collect();
            var.set(&Tensor::from_vec(values, dims, &Device::Cpu).unwrap()).unwrap();
        }
    }
    lora
}

#[test]
fn a_peft_adapter_changes_the_output_and_scale_zero_is_the_base() {
    for name in FAMILIES {
        let model = load(name);
        let dir = tempfile::tempdir().unwrap();
        random_lora(&model, 8, 1).save_peft(dir.path(), name).unwrap();
        let adapter = PeftAdapter::load(dir.path(), &model.model.config().adapter_shape(), None).unwrap();
        let prompts = vec![model.tokenizer.encode("Instruction tuning is", true, true).unwrap()];
        let base = &last_logits_alone(&model, &prompts, &AdapterMix::default())[0];
        let adapted = &last_logits_alone(&model, &prompts, &AdapterMix { parts: vec![(&adapter.weights, 1.0)] })[0];
        let off = &last_logits_alone(&model, &prompts, &AdapterMix { parts: vec![(&adapter.weights, 0.0)] })[0];
        let doubled = &last_logits_alone(&model, &prompts, &AdapterMix { parts: vec![(&adapter.weights, 1.0), (&adapter.weights, 1.0)] })[0];
        let twice = &last_logits_alone(&model, &prompts, &AdapterMix { parts: vec![(&adapter.weights, 2.0)] })[0];
        assert!(max_difference(base, adapted) > 0.05, "{name}: the adapter changed nothing");
        assert!(max_difference(base, off) < 1e-4, "{name}: scale 0 is not the base");
        // Summed in another order, the two mixes' activations differ in their last bits, which
        // can move single 8-bit roundings in the next layer (the random adapter makes that
        // happen in some runs): a bounded maximum, and a mean far below the adapter's effect.
        let (largest, mean) = (max_difference(doubled, twice), mean_difference(doubled, twice));
        let effect = mean_difference(base, twice);
        assert!(largest < 0.5 && mean < 0.02 * effect, "{name}: composing an adapter with itself is not scale 2 ({largest}, mean {mean} against {effect})");
    }
}

fn conversation(user: &str, assistant: &str) -> Conversation {
    let message = |role: &str, content: &str| Message { role: role.into(), content: content.into() };
    Conversation { messages: vec![message("user", user), message("assistant", assistant)] }
}

fn training_batch(model: &LoadedModel) -> Vec<Example> {
    [("What is LoRA?", "A low-rank adapter."), ("Name a color.", "Blue."), ("Say hi", "Hello there!")]
        .iter()
        .map(|(u, a)| example(&model.tokenizer, &model.chat, &conversation(u, a), 128).unwrap().unwrap())
        .collect()
}

#[test]
fn qlora_steps_lower_the_loss() {
    for name in FAMILIES {
        let model = load(name);
        let lora = AdapterParams::fresh(
            &model,
            LoraSpec { rank: 8, alpha: 16.0, targets: TargetModule::ALL.to_vec(), kind: AdapterKind::Lora },
            3,
        )
        .unwrap();
        let batch = training_batch(&model);
        let before = evaluate(Trainable::new(&model, &lora), &batch, 8).unwrap();
        let vars: Vec<_> = lora.named_vars().into_iter().map(|(_, v)| v).collect();
        let steps = 8;
        let config = AdamWConfig {
            learning_rate: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            warmup_steps: 1,
            total_steps: steps,
        };
        let mut optimizer = AdamW::new(config, &vars).unwrap();
        for _ in 0..steps {
            train_step(Trainable::new(&model, &lora), &mut optimizer, &[&batch]).unwrap();
        }
        let after = evaluate(Trainable::new(&model, &lora), &batch, 8).unwrap();
        eprintln!("{name}: loss {before:.3} → {after:.3} after {steps} steps");
        assert!(after < before - 0.5, "{name}: the loss went from {before} to {after}");
    }
}

#[test]
fn lora_gradients_match_finite_differences() {
    let dot = |a: &[Tensor], b: &[Tensor]| -> f64 { a.iter().zip(b).map(|(x, y)| (x * y).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64).sum() };
    for name in FAMILIES {
        let model = load(name);
        let lora = random_lora(&model, 4, 7);
        let batch = training_batch(&model);
        let (grads, _, _) = gradients(Trainable::new(&model, &lora).exact(), &[&batch]).unwrap();
        let norm = dot(&grads, &grads).sqrt();
        assert!(norm > 1e-4, "{name}: gradient norm {norm}");
        let theta: Vec<Tensor> = lora.named_vars().iter().map(|(_, v)| v.as_tensor().copy().unwrap()).collect();
        let loss_at = |sign: f64, eps: f64| {
            for ((_, var), (t, g)) in lora.named_vars().iter().zip(theta.iter().zip(&grads)) {
                var.set(&(t + (g * (sign * eps / norm)).unwrap()).unwrap()).unwrap();
            }
            evaluate(Trainable::new(&model, &lora).exact(), &batch, 8).unwrap()
        };
        let eps = 1e-2;
        let numeric = (loss_at(1.0, eps) - loss_at(-1.0, eps)) / (2.0 * eps);
        // Along the normalised gradient, the directional derivative is the gradient's norm.
        let relative = (numeric - norm).abs() / norm;
        eprintln!("{name}: analytic {norm:.6} numeric {numeric:.6} relative error {relative:.2e}");
        assert!(relative <= 2e-2, "{name}: analytic {norm} vs numeric {numeric}");
    }
}

/// The fine-tuning API end to end on each family: feedback past `train_after` starts a job, the
/// job trains through the eval gate and promotes a version, and the adapter serves by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tuning_api_trains_and_serves_an_adapter_on_every_family() {
    for name in FAMILIES {
        let dir = tempfile::tempdir().unwrap();
        let router = app(load(name), Some(dir.path()));
        let pairs: Vec<serde_json::Value> = (0..24)
            .map(|i| serde_json::json!({"instruction": format!("name item {i}"), "input": "", "output": "the hat"}))
            .collect();
        let body = serde_json::Value::Array(pairs).to_string();
        let (status, body) = http(&router, "POST", "/v1/adapters/hats/feedback?rank=4", Some(body)).await;
        assert_eq!(status, axum::http::StatusCode::OK, "{name}: {body}");
        let job = body["job"].as_str().unwrap_or_else(|| panic!("{name}: no job started: {body}")).to_string();
        let finished = wait_for_job(&router, &job, std::time::Duration::from_secs(300)).await;
        assert_eq!(finished["status"], "succeeded", "{name}: {finished}");
        let (_, info) = http(&router, "GET", "/v1/adapters/hats", None).await;
        assert_eq!(info["version"].as_u64(), Some(1), "{name}: the trained version was not promoted: {info}");
        let request = serde_json::json!({"model": "hats", "messages": [{"role": "user", "content": "name item 99"}], "max_tokens": 4, "temperature": 0});
        let (status, body) = http(&router, "POST", "/v1/chat/completions", Some(request.to_string())).await;
        assert_eq!(status, axum::http::StatusCode::OK, "{name}: {body}");
        eprintln!("{name}: job {job} promoted version 1, held-out loss {}", info["metrics"]["held_out_loss"]);
    }
}

/// The workspace's domain plugins serve on every family: their prompts go through the model's
/// own chat template.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_plugins_serve_on_every_family() {
    const PLUGINS: [&str; 3] = ["tessera-plugin-intent", "tessera-plugin-arithmetic", "tessera-plugin-extraction"];
    let profile_dir = tessera_tests::build_plugins(&PLUGINS, &[]);
    for name in FAMILIES {
        let dir = tempfile::tempdir().unwrap();
        let plugins_dir = dir.path().join("plugins");
        std::fs::create_dir_all(&plugins_dir).unwrap();
        for package in PLUGINS {
            let file = tessera_tests::library_file(package);
            std::fs::copy(profile_dir.join(&file), plugins_dir.join(&file)).unwrap();
        }
        let router = app_with_plugins(load(name), Some(&dir.path().join("tuning")), Some(&plugins_dir));
        for plugin in ["intent", "arithmetic", "extraction"] {
            let request = serde_json::json!({"model": plugin, "messages": [{"role": "user", "content": "what is 2 plus 3"}], "max_tokens": 4, "temperature": 0});
            let (status, body) = http(&router, "POST", "/v1/chat/completions", Some(request.to_string())).await;
            assert_eq!(status, axum::http::StatusCode::OK, "{name} with plugin {plugin}: {body}");
            assert!(body["choices"][0]["message"]["content"].is_string(), "{name} with plugin {plugin}: {body}");
        }
    }
}
