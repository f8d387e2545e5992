//! The HTTP request and response bodies, in OpenAI's shapes. They are kept apart from the
//! engine's validated types (see `validate.rs`). Online tuning's are in `tuning.rs`, embeddings'
//! in `embeddings.rs`, the Responses API's in `responses.rs`.

pub mod batches;
pub mod embeddings;
pub mod responses;
pub mod tuning;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send a last chunk with the token usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// Extension: one adapter of a composition, Δ = Σ scale·(α/r)·B·A.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct AdapterRef {
    pub name: String,
    /// Defaults to 1.
    pub scale: Option<f32>,
}

/// Fields shared by both completion endpoints, OpenAI's and the extensions.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct SamplingFields {
    /// Extension: adapters composed on top of `model` (which may itself name an adapter).
    pub adapters: Option<Vec<AdapterRef>>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<u32>,
    pub seed: Option<i64>,
    pub stop: Option<StopSpec>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Extension: keep only the k most likely tokens (0 or −1: off).
    pub top_k: Option<i32>,
    /// Extension: drop tokens less likely than `min_p` times the most likely one.
    pub min_p: Option<f32>,
    /// Extension: CTRL-style penalty on every token already seen (1: off).
    pub repetition_penalty: Option<f32>,
    /// Extension: keep generating past end-of-sequence tokens.
    pub ignore_eos: Option<bool>,
    /// The answer's shape: `{"type": "text"}` (free), `{"type": "json_object"}` or
    /// `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`, enforced while
    /// decoding. (Read as JSON first, so that a malformed one is reported as this field's.)
    #[schema(value_type = Option<ResponseFormat>)]
    pub response_format: Option<serde_json::Value>,
    /// Extension (vLLM's): the answer is exactly one of these strings.
    pub guided_choice: Option<Vec<String>>,
    /// Extension (vLLM's): the whole answer matches this regular expression.
    pub guided_regex: Option<String>,
    /// Extension (vLLM's): the answer follows this grammar, in llguidance's Lark dialect
    /// (which may embed JSON Schemas with `%json {…}`).
    pub guided_grammar: Option<String>,
    /// Extension (vLLM's): the answer is JSON valid under this schema.
    #[schema(value_type = Option<Object>)]
    pub guided_json: Option<serde_json::Value>,
}

/// `response_format`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct JsonSchemaFormat {
    pub name: String,
    pub description: Option<String>,
    /// The JSON Schema; absent means any JSON value.
    #[schema(value_type = Option<Object>)]
    pub schema: Option<serde_json::Value>,
    /// Accepted for compatibility: the schema is always enforced.
    pub strict: Option<bool>,
}

/// A function the model may call (`tools[i]`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ToolSpec {
    /// `function`.
    pub r#type: String,
    pub function: FunctionSpec,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct FunctionSpec {
    /// `[A-Za-z0-9_-]{1,64}`.
    pub name: String,
    pub description: Option<String>,
    /// A JSON Schema of the arguments object (default: any object).
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<serde_json::Value>,
    /// Accepted for compatibility: forced calls always follow the schema.
    pub strict: Option<bool>,
}

/// `tool_choice`: `none`, `auto`, `required`, or `{"type": "function", "function": {"name"}}`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ToolChoiceSpec {
    Mode(String),
    Named(NamedToolChoice),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct NamedToolChoice {
    pub r#type: String,
    pub function: FunctionName,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FunctionName {
    pub name: String,
}

/// A call in a message: what the model returned, sent back in the conversation.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ToolCall {
    pub id: String,
    /// `function`.
    pub r#type: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments object as JSON text.
    pub arguments: String,
}

/// A piece of a streamed call: the first names it (`id`, `type`, `function.name`), the rest
/// carry pieces of `function.arguments`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub r#type: Option<&'static str>,
    pub function: FunctionCallDelta,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FunctionCallDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ContentPart {
    pub r#type: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatMessage {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    pub content: Option<MessageContent>,
    /// An assistant message's calls.
    pub tool_calls: Option<Vec<ToolCall>>,
    /// A `tool` message: the id of the call it answers.
    pub tool_call_id: Option<String>,
    /// Accepted for compatibility (a participant's or function's name).
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    /// Return the sampled tokens' logprobs.
    pub logprobs: Option<bool>,
    /// With `logprobs`: how many alternatives per position (0–20).
    pub top_logprobs: Option<u32>,
    /// Functions the model may call.
    pub tools: Option<Vec<ToolSpec>>,
    /// `auto` (the default with tools), `none`, `required`, or a named function.
    pub tool_choice: Option<ToolChoiceSpec>,
    /// Accepted for compatibility; several calls may always come back under `auto`.
    pub parallel_tool_calls: Option<bool>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// `prompt`: a string, a list of strings, token ids, or a list of token-id lists.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptInput,
    /// Defaults to 16, as in OpenAI's API.
    pub max_tokens: Option<u32>,
    /// Report this many (0–5) most likely tokens at each position.
    pub logprobs: Option<u32>,
    /// Return the prompt before the completion.
    pub echo: Option<bool>,
    /// Extension: add `prompt_token_ids` and `token_ids` to each choice.
    pub return_token_ids: Option<bool>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose keys and values were found in the prefix cache, so not prefilled.
    pub cached_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AssistantMessage {
    pub role: &'static str,
    /// `null` when the answer is only calls.
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenLogprobEntry {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprobEntry>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    /// `stop`, `length` or `tool_calls`.
    pub finish_reason: &'static str,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    /// For plugin models: the plugin generation that answered (`name version (generation N)`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// One server-sent event of a streamed chat completion.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    /// Only in the last chunk, with `stream_options.include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// For plugin models: the plugin generation that answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
}

/// OpenAI's legacy completion logprobs.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<std::collections::BTreeMap<String, f32>>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Completion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Model {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: String,
    /// The base model an adapter applies to (`null` for the base itself).
    pub parent: Option<String>,
    pub max_model_len: usize,
    /// For an adapter: `lora`, `dora` or `ia3`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter_kind: Option<&'static str>,
    /// What `/v1/embeddings` returns for this model.
    pub embeddings: embeddings::EmbeddingInfo,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<Model>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    /// Text to tokenize (or give `messages`).
    pub prompt: Option<String>,
    /// Chat messages, rendered through the model's chat template first.
    pub messages: Option<Vec<ChatMessage>>,
    /// With `messages`: end the prompt with the opening of the assistant's turn (default true).
    pub add_generation_prompt: Option<bool>,
    /// Prepend the model's BOS token (where its tokenizer adds one) and parse special-token
    /// strings (default true).
    pub add_special_tokens: Option<bool>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenizeResponse {
    pub tokens: Vec<u32>,
    pub count: usize,
    pub max_model_len: usize,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ScopeInfo {
    /// `inference`, `tune` or `admin`; `null` when the key (or its absence) opens nothing.
    pub scope: Option<&'static str>,
    /// Whether the server was started with any key.
    pub keys_required: bool,
}

/// One version of an adapter tuned online.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct VersionInfo {
    pub version: u32,
    /// Held-out loss, trained tokens, … as its job recorded them.
    #[schema(value_type = Object)]
    pub metrics: serde_json::Value,
    /// The job that made it (none for an upload).
    pub job_id: Option<String>,
    pub created_at: i64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, or `unavailable` while the server is warming up or has not reconciled with its
    /// tuning store (a load balancer should send it nothing then; the code is 503).
    pub status: &'static str,
    /// Whether this server is warm and serves what the store says: every adapter at its current
    /// version.
    pub ready: bool,
    pub model: String,
    pub queue_depth: usize,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct LoadAdapterRequest {
    /// `[A-Za-z0-9._-]{1,64}`; loading an existing name replaces it with a new generation.
    pub lora_name: String,
    /// A PEFT adapter folder, or a llama.cpp GGUF-LoRA file, under one of the server's allowed adapter roots.
    pub lora_path: String,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct UnloadAdapterRequest {
    pub lora_name: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AdapterStatus {
    pub name: String,
    /// Increases with every load of any adapter; requests keep the generation they started on.
    pub generation: Option<u64>,
    pub status: &'static str,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AdapterInfo {
    pub name: String,
    /// Where its files are.
    pub path: String,
    /// Whether its weights are in memory (they load on first use).
    pub loaded: bool,
    pub generation: Option<u64>,
    /// `lora`, `dora` or `ia3`.
    pub kind: Option<&'static str>,
    /// The rank and α of LoRA and DoRA adapters (IA³ has neither).
    pub rank: Option<usize>,
    pub alpha: Option<f32>,
    pub size_bytes: Option<usize>,
    /// For adapters tuned online: the served version (0 until a first promotion).
    pub version: Option<u32>,
    /// Whether a fine-tuning job is queued or running for it.
    pub training: Option<bool>,
    /// Feedback pairs stored for it.
    pub pairs: Option<usize>,
    /// The served version's metrics (held-out loss, trained tokens) and the versions on disk.
    #[schema(value_type = Option<Object>)]
    pub metrics: Option<serde_json::Value>,
    pub versions: Option<Vec<u32>>,
    /// Each version on disk with its metrics, oldest first.
    pub history: Option<Vec<VersionInfo>>,
    /// For adapters tuned online: the scope that created it (`inference`, `tune` or `admin`).
    pub created_by: Option<&'static str>,
    /// Whether every tuning scope may tune it (`PUT /v1/adapters/{name}/tuning`).
    pub open_to_tuning: Option<bool>,
}

impl From<crate::services::adapters::AdapterDescription> for AdapterInfo {
    fn from(d: crate::services::adapters::AdapterDescription) -> Self {
        let tuning = d.tuning;
        let low_rank = d.kind != Some(tessera_adapters::AdapterKind::Ia3);
        Self {
            name: d.name,
            path: d.path.display().to_string(),
            loaded: d.generation.is_some(),
            generation: d.generation,
            kind: d.kind.map(|k| k.name()),
            rank: low_rank.then(|| d.rank.or(tuning.as_ref().map(|t| t.rank))).flatten(),
            alpha: low_rank.then(|| d.alpha.or(tuning.as_ref().map(|t| t.alpha))).flatten(),
            size_bytes: d.size_bytes,
            version: tuning.as_ref().map(|t| t.version),
            training: tuning.as_ref().and_then(|t| t.training),
            pairs: tuning.as_ref().and_then(|t| t.pairs),
            metrics: tuning.as_ref().and_then(|t| t.metrics.clone()),
            versions: tuning.as_ref().map(|t| t.versions.iter().map(|v| v.version).collect()),
            history: tuning.as_ref().map(|t| {
                t.versions
                    .iter()
                    .map(|v| VersionInfo { version: v.version, metrics: v.metrics.clone(), job_id: v.job_id.clone(), created_at: v.created_at })
                    .collect()
            }),
            created_by: tuning.as_ref().map(|t| t.created_by.as_str()),
            open_to_tuning: tuning.as_ref().map(|t| t.open_to_tuning),
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AdapterList {
    pub object: &'static str,
    pub data: Vec<AdapterInfo>,
}

/// `POST /v1/adapters` form: `name`, and either both PEFT files, one zip or tar archive holding
/// them, or one llama.cpp GGUF-LoRA file (`gguf`).
#[derive(Debug, Default, ToSchema)]
pub struct AdapterUpload {
    pub name: String,
    #[schema(value_type = Option<String>, format = Binary)]
    pub adapter_config: Option<Vec<u8>>,
    #[schema(value_type = Option<String>, format = Binary)]
    pub adapter_model: Option<Vec<u8>>,
    #[schema(value_type = Option<String>, format = Binary)]
    pub archive: Option<Vec<u8>>,
    #[schema(value_type = Option<String>, format = Binary)]
    pub gguf: Option<Vec<u8>>,
}

/// The format of a downloaded adapter.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DownloadFormat {
    /// A zip of `adapter_config.json` and `adapter_model.safetensors` (Hugging Face PEFT).
    Peft,
    /// One GGUF-LoRA file, as llama.cpp's `--lora` loads it.
    Gguf,
}

/// `GET /v1/adapters/{name}/download` parameters.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DownloadParams {
    /// `peft` (default) or `gguf`.
    #[param(inline)]
    pub format: Option<DownloadFormat>,
    /// A version of an adapter tuned online (default: the one served).
    pub version: Option<u32>,
}

/// One event of a streamed response as an event-stream parser reads it. Each `data` is a JSON
/// chunk: `text_completion` for completions, `chat.completion.chunk` (the response's shape, with
/// `delta` for `message`) for chat; the last event's `data` is `[DONE]`. The server names no
/// event type, so a parser reads each as `message`, and sends no `id`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServerSentEvent {
    pub data: String,
    /// `message` where given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
}
