//! Structured outputs on the real model, which never writes valid JSON unprompted: answers under
//! a nested JSON Schema all parse and validate (checked by an independent validator), a batch
//! mixing constrained and free sequences leaves the free ones' tokens as they are alone,
//! `guided_choice` holds the `intent` plugin to its labels, and Qwen's own template shows the
//! model tools whose forced call comes back parsed.

use std::sync::Arc;

use axum::http::StatusCode;
use serde_json::{json, Value};
use tessera::api::{PluginsConfig, TuningConfig};
use tessera::train::job::TuningSettings;
use tessera_plugin_intent::LABELS;
use tessera_tests::{app_on, clinc, data_dir, http, install_plugins, real_app, real_app_with, REAL_MODEL_ID};

/// Objects in objects, an array of objects, enums, bounded integers, booleans, required fields.
fn task_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "title": {"type": "string", "minLength": 1, "maxLength": 40},
            "priority": {"enum": ["low", "medium", "high"]},
            "estimate_hours": {"type": "integer", "minimum": 1, "maximum": 40},
            "done": {"type": "boolean"},
            "assignee": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 30},
                    "team": {"type": "string", "enum": ["web", "data", "ops"]}
                },
                "required": ["name", "team"],
                "additionalProperties": false
            },
            "subtasks": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "step": {"type": "integer", "minimum": 1, "maximum": 9},
                        "label": {"type": "string", "maxLength": 30}
                    },
                    "required": ["step", "label"],
                    "additionalProperties": false
                }
            }
        },
        "required": ["title", "priority", "estimate_hours", "done", "assignee", "subtasks"],
        "additionalProperties": false
    })
}

async fn post(router: &axum::Router, uri: &str, body: Value) -> (StatusCode, Value) {
    http(router, "POST", uri, Some(body.to_string())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_answers_under_a_nested_schema_all_parse_and_validate() {
    let router = real_app(2048, false);
    let schema = task_schema();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let requests = (0..20).map(|seed| {
        let body = json!({
            "model": REAL_MODEL_ID,
            "messages": [{"role": "user", "content": "Plan the task of moving the office to a new building."}],
            "max_tokens": 500,
            "temperature": 1.0,
            "seed": seed,
            "response_format": {"type": "json_schema", "json_schema": {"name": "task", "schema": schema.clone(), "strict": true}},
        });
        let router = router.clone();
        async move { post(&router, "/v1/chat/completions", body).await }
    });
    let answers = futures::future::join_all(requests).await;
    for (seed, (status, body)) in answers.iter().enumerate() {
        assert_eq!(*status, StatusCode::OK, "{body}");
        let choice = &body["choices"][0];
        assert_eq!(choice["finish_reason"], "stop", "seed {seed}: {body}");
        let text = choice["message"]["content"].as_str().unwrap();
        let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("seed {seed}: not JSON ({e}): {text}"));
        let errors: Vec<String> = validator.iter_errors(&value).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "seed {seed}: {text} breaks the schema: {errors:?}");
    }
    // Unconstrained, the same model answers in prose.
    let (_, free) = post(&router, "/v1/chat/completions", json!({
        "model": REAL_MODEL_ID, "max_tokens": 40, "temperature": 0,
        "messages": [{"role": "user", "content": "Plan the task of moving the office to a new building."}],
    })).await;
    let text = free["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(serde_json::from_str::<Value>(text).is_err(), "the base model wrote JSON unprompted: {text}");
}

/// Greedy completion token ids of `prompt`, with an optional extra field.
async fn completion_ids(router: &axum::Router, prompt: &str, extra: Option<(&str, Value)>) -> Vec<u64> {
    let mut body = json!({"model": REAL_MODEL_ID, "prompt": prompt, "max_tokens": 24, "temperature": 0, "return_token_ids": true});
    if let Some((key, value)) = extra {
        body[key] = value;
    }
    let (status, body) = post(router, "/v1/completions", body).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["choices"][0]["token_ids"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_sequences_in_a_batch_with_constrained_ones_keep_their_solo_tokens() {
    let router = real_app(1024, false);
    let free = ["The capital of France is", "Once upon a time, in a quiet village,", "def fibonacci(n):"];
    let mut solo = Vec::new();
    for prompt in free {
        solo.push(completion_ids(&router, prompt, None).await);
    }
    let constrained = [
        ("response_format", json!({"type": "json_object"})),
        ("guided_regex", json!("[A-Z][a-z]{2,8} [0-9]{4}")),
        ("guided_choice", json!(["alpha", "beta", "gamma"])),
    ];
    let free_runs = free.iter().map(|prompt| completion_ids(&router, prompt, None));
    let constrained_runs = constrained.iter().map(|(key, value)| completion_ids(&router, "Answer:", Some((key, value.clone()))));
    let (batched, shaped) = futures::join!(futures::future::join_all(free_runs), futures::future::join_all(constrained_runs));
    assert_eq!(batched, solo, "a constrained neighbour changed a free sequence's tokens");
    assert!(shaped.iter().all(|ids| !ids.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guided_choice_holds_the_intent_plugin_to_its_labels() {
    let dir = tempfile::tempdir().unwrap();
    let plugins_dir = install_plugins(&["tessera-plugin-intent"], dir.path());
    let router = real_app_with(
        1024,
        false,
        Some(TuningConfig { root: dir.path().join("tuning"), state: None, blobs: None, settings: TuningSettings { train_after: 100_000, ..Default::default() } }),
        Some(PluginsConfig { dir: plugins_dir, allow_sha256: None }),
    );
    let utterances: Vec<String> = clinc("val.jsonl").into_iter().map(|(text, _)| text).take(12).collect();
    for (i, utterance) in utterances.iter().enumerate() {
        // Through the plugin, and on the base model with the plugin's prompt: the raw answer is
        // a label (the plugin's check hook is not what makes it one).
        let (status, body) = post(&router, "/v1/chat/completions", json!({
            "model": "intent", "max_tokens": 12, "temperature": 1.0, "seed": i,
            "messages": [{"role": "user", "content": utterance}], "guided_choice": LABELS,
        })).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let label = body["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(LABELS.contains(&label), "{utterance}: {label}");
        let (status, body) = post(&router, "/v1/chat/completions", json!({
            "model": REAL_MODEL_ID, "max_tokens": 12, "temperature": 1.0, "seed": i,
            "messages": [{"role": "user", "content": tessera_plugin_intent::prompt(utterance)}], "guided_choice": LABELS,
        })).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let raw = body["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(LABELS.contains(&raw), "{utterance}: the base model answered {raw}");
    }
    // Feedback for the plugin's adapter keeps its shape.
    let pair = json!({"messages": [{"role": "user", "content": "freeze it"}, {"role": "assistant", "content": "it is frozen"}]});
    let (status, body) = post(&router, "/v1/adapters/intent/feedback", json!([json!({"text": "freeze my card", "intent": "freeze_account"}), pair])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"]["message"].as_str().is_some(), "{body}");
}

fn families_model(name: &str) -> Arc<tessera::LoadedModel> {
    let path = data_dir("families").join(format!("{name}.gguf"));
    Arc::new(tessera::LoadedModel::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen_templates_show_the_tools_and_a_forced_call_comes_back_parsed() {
    for name in ["qwen2-tiny", "qwen3-tiny"] {
        let model = families_model(name);
        assert!(model.chat.renders_tools(), "{name}'s template renders tools");
        let router = app_on(model, name, 1024, None, None, None);
        let tools = json!([{"type": "function", "function": {"name": "lookup", "description": "Find a word",
            "parameters": {"type": "object", "properties": {"word": {"type": "string", "maxLength": 12}}, "required": ["word"], "additionalProperties": false}}}]);
        let (status, body) = post(&router, "/v1/chat/completions", json!({
            "model": name, "max_tokens": 60, "temperature": 0, "tools": tools,
            "tool_choice": {"type": "function", "function": {"name": "lookup"}},
            "messages": [{"role": "user", "content": "Look up 'tessera'."}],
        })).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let choice = &body["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{name}: {body}");
        let call = &choice["message"]["tool_calls"][0];
        assert_eq!(call["function"]["name"], "lookup");
        let arguments: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert!(arguments["word"].is_string(), "{name}: {arguments}");
        // The conversation goes on with the call and its result, through the template's own
        // `tool_calls` and `tool` rendering.
        let (status, tokens) = post(&router, "/tokenize", json!({"model": name, "messages": [
            {"role": "user", "content": "Look up 'tessera'."},
            {"role": "assistant", "content": null, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "a small tile"},
        ]})).await;
        assert_eq!(status, StatusCode::OK, "{tokens}");
        let (_, text) = post(&router, "/detokenize", json!({"model": name, "tokens": tokens["tokens"]})).await;
        let text = text["prompt"].as_str().unwrap();
        assert!(text.contains("<tool_call>\n{\"name\": \"lookup\", \"arguments\": {\"word\": ") && text.contains("<tool_response>\na small tile\n</tool_response>"), "{name}: {text}");
    }
}

/// A template with Llama 3.1's tool contract (written for this test): the functions as JSON in
/// the first user turn, calls answered as `{"name": …, "parameters": …}`, results in `ipython`
/// turns.
const LLAMA_31_STYLE: &str = r#"{{- bos_token }}
{%- for message in messages %}
    {%- if loop.first and tools is not none %}
        {{- '<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, respond with a JSON for a function call. Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\n\n' }}
        {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\n\n" }}{%- endfor %}
        {{- message.content | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "' + message.tool_calls[0].function.name + '", "parameters": ' + message.tool_calls[0].function.arguments | tojson + '}<|eot_id|>' }}
    {%- elif message.role == 'tool' %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\n\n' + message.content + '<|eot_id|>' }}
    {%- else %}
        {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' + message.content | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_llama_31_style_template_gets_json_calls_with_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("llama-3.1-style.jinja");
    std::fs::write(&template, LLAMA_31_STYLE).unwrap();
    let path = data_dir("families").join("llama3-tiny.gguf");
    let options = tessera::LoadOptions { chat_template: Some(template), ..Default::default() };
    let model = Arc::new(tessera::LoadedModel::load_with(&path, &options).unwrap());
    assert!(model.chat.renders_tools());
    assert_eq!(model.chat.tool_syntax(), tessera::tool_calls::ToolSyntax::Llama31Json);
    let router = app_on(model, "llama", 1024, None, None, None);
    let tools = json!([{"type": "function", "function": {"name": "convert", "parameters": {"type": "object",
        "properties": {"amount": {"type": "integer", "minimum": 0, "maximum": 999}, "to": {"enum": ["EUR", "USD"]}}, "required": ["amount", "to"], "additionalProperties": false}}}]);
    let (status, body) = post(&router, "/v1/chat/completions", json!({
        "model": "llama", "max_tokens": 60, "temperature": 0, "tools": tools, "tool_choice": "required",
        "messages": [{"role": "user", "content": "10 dollars in euros?"}],
    })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "tool_calls", "{body}");
    let call = &body["choices"][0]["message"]["tool_calls"][0];
    let arguments: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(call["function"]["name"], "convert");
    assert!(arguments["amount"].as_u64().is_some_and(|a| a <= 999) && (arguments["to"] == "EUR" || arguments["to"] == "USD"), "{arguments}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_family_vocabulary_spells_the_choices_exactly() {
    // SentencePiece vocabularies hold "▁port" beside "port": a forced "port" must never be
    // spelled with the space (as the tokenizer would spell it at the start of a text).
    let labels = ["report_fraud", "routing", "freeze_account", "pin change"];
    for name in ["llama-spm-tiny", "llama3-tiny", "qwen2-tiny", "qwen3-tiny"] {
        let router = app_on(families_model(name), name, 512, None, None, None);
        for seed in 0..8 {
            let (status, body) = post(&router, "/v1/chat/completions", json!({
                "model": name, "max_tokens": 16, "temperature": 1.0, "seed": seed, "guided_choice": labels,
                "messages": [{"role": "user", "content": "Which intent?"}],
            })).await;
            assert_eq!(status, StatusCode::OK, "{name}: {body}");
            let answer = body["choices"][0]["message"]["content"].as_str().unwrap();
            assert!(labels.contains(&answer), "{name}, seed {seed}: {answer}");
        }
    }
}
