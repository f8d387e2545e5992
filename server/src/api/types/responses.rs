//! The Responses API's bodies (`/v1/responses`), in OpenAI's shapes.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AdapterRef;

/// `input`: text (one user message) or a list of items. (The body holds it as JSON, so that
/// each item is read on its own and one of an unknown type is named by its place.)
#[derive(Debug, Clone, ToSchema)]
#[serde(untagged)]
pub enum ResponseInput {
    Text(String),
    Items(Vec<InputItem>),
}

/// One input item: a message, a call the model made (sent back as it came), or a call's result.
#[derive(Debug, Clone, ToSchema)]
#[serde(untagged)]
pub enum InputItem {
    Message(InputMessage),
    FunctionCall(FunctionCallItem),
    FunctionCallOutput(FunctionCallOutputItem),
}

/// A message (`type` may be left out).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct InputMessage {
    /// `message`.
    pub r#type: Option<String>,
    /// `system`, `developer`, `user` or `assistant`.
    pub role: String,
    pub content: InputContent,
}

/// A message's content: text, or text parts.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum InputContent {
    Text(String),
    Parts(Vec<InputPart>),
}

/// A content part: `input_text` (or `output_text`, when sending an answer back).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct InputPart {
    pub r#type: String,
    pub text: Option<String>,
}

/// `{"type": "function_call"}`: a call the model made.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct FunctionCallItem {
    /// `function_call`.
    pub r#type: String,
    pub call_id: String,
    pub name: String,
    /// The arguments object as JSON text.
    pub arguments: String,
}

/// `{"type": "function_call_output"}`: the result of the call `call_id`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct FunctionCallOutputItem {
    /// `function_call_output`.
    pub r#type: String,
    pub call_id: String,
    pub output: String,
}

/// A function the model may call (the Responses API's flat shape).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ResponseTool {
    /// `function`.
    pub r#type: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON Schema of the arguments object (default: any object).
    #[schema(value_type = Option<Object>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Value>,
    /// Accepted for compatibility: forced calls always follow the schema.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `tool_choice`: `none`, `auto`, `required`, or `{"type": "function", "name"}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ResponseToolChoice {
    Mode(String),
    Named(NamedFunction),
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NamedFunction {
    /// `function`.
    pub r#type: String,
    pub name: String,
}

/// `text`: the answer's format.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TextConfig {
    /// `{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema", "name",
    /// "schema", "strict"}`, enforced while decoding. (Read as JSON first, so that a malformed
    /// one is reported as this field's.)
    #[schema(value_type = Option<TextFormat>)]
    pub format: Option<serde_json::Value>,
}

/// `text.format`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TextFormat {
    Text,
    JsonObject,
    JsonSchema {
        name: String,
        description: Option<String>,
        /// The JSON Schema; absent means any JSON value.
        #[schema(value_type = Option<Object>)]
        schema: Option<serde_json::Value>,
        /// Accepted for compatibility: the schema is always enforced.
        strict: Option<bool>,
    },
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CreateResponseRequest {
    /// The base, an adapter, or a plugin model.
    pub model: String,
    #[schema(value_type = ResponseInput)]
    pub input: serde_json::Value,
    /// A system message for this response (not carried into a continuation).
    pub instructions: Option<String>,
    /// At least 1.
    pub max_output_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Send typed server-sent events (`response.created` … `response.completed`).
    pub stream: Option<bool>,
    pub text: Option<TextConfig>,
    /// Functions the model may call.
    pub tools: Option<Vec<ResponseTool>>,
    /// `auto` (the default with tools), `none`, `required`, or a named function.
    pub tool_choice: Option<ResponseToolChoice>,
    /// Accepted for compatibility; several calls may always come back under `auto`.
    pub parallel_tool_calls: Option<bool>,
    /// A stored response this one continues: its conversation comes before `input`.
    pub previous_response_id: Option<String>,
    /// Keep the response for `GET /v1/responses/{id}` and continuations (default true).
    pub store: Option<bool>,
    /// Up to 16 string pairs, returned with the response.
    pub metadata: Option<HashMap<String, String>>,
    /// Extension: adapters composed on top of `model` (which may itself name an adapter).
    pub adapters: Option<Vec<AdapterRef>>,
    /// Extension: a seed for sampling.
    pub seed: Option<i64>,
}

/// A response: the model's output items and what produced them.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ResponseObject {
    pub id: String,
    /// `response`.
    pub object: String,
    pub created_at: u64,
    /// `in_progress` (in the first stream events), `completed`, or `incomplete` (the output
    /// reached `max_output_tokens` or the context).
    pub status: String,
    #[schema(value_type = Option<Object>)]
    pub error: Option<serde_json::Value>,
    pub incomplete_details: Option<IncompleteDetails>,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u32>,
    pub model: String,
    pub output: Vec<OutputItem>,
    pub parallel_tool_calls: bool,
    pub previous_response_id: Option<String>,
    pub temperature: f32,
    pub top_p: f32,
    pub text: TextSettings,
    /// As requested (`auto` by default).
    pub tool_choice: ResponseToolChoice,
    pub tools: Vec<ResponseTool>,
    /// `disabled`: a conversation over the context is refused, not cut.
    pub truncation: String,
    /// Absent until the response is done.
    pub usage: Option<ResponseUsage>,
    pub store: bool,
    pub metadata: HashMap<String, String>,
}

/// The format the response was asked for.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TextSettings {
    #[schema(value_type = Object)]
    pub format: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct IncompleteDetails {
    /// `max_output_tokens`.
    pub reason: String,
}

/// An output item: the assistant's message, or a call it made.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputItem {
    Message {
        id: String,
        /// `in_progress` or `completed`.
        status: String,
        /// `assistant`.
        role: String,
        content: Vec<OutputText>,
    },
    FunctionCall {
        id: String,
        call_id: String,
        name: String,
        /// The arguments object as JSON text.
        arguments: String,
        /// `in_progress` or `completed`.
        status: String,
    },
}

/// `{"type": "output_text"}`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OutputText {
    /// `output_text`.
    pub r#type: String,
    pub text: String,
    /// Always empty.
    #[schema(value_type = Vec<Object>)]
    pub annotations: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ResponseUsage {
    pub input_tokens: usize,
    pub input_tokens_details: InputTokensDetails,
    pub output_tokens: usize,
    pub output_tokens_details: OutputTokensDetails,
    pub total_tokens: usize,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct InputTokensDetails {
    /// Input tokens whose keys and values were found in the prefix cache, so not prefilled.
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OutputTokensDetails {
    /// Always 0: the models here do not reason apart from their answer.
    pub reasoning_tokens: usize,
}

/// `DELETE /v1/responses/{id}`'s answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ResponseDeleted {
    pub id: String,
    /// `response.deleted`.
    pub object: String,
    pub deleted: bool,
}

/// One event of a streamed response as an event-stream parser reads it: `event` is the type
/// (`response.created`, `response.in_progress`, `response.output_item.added`,
/// `response.content_part.added`, `response.output_text.delta`, `response.output_text.done`,
/// `response.content_part.done`, `response.function_call_arguments.delta`,
/// `response.function_call_arguments.done`, `response.output_item.done`, `response.completed`
/// or `error`) and `data` the JSON event, which repeats it as `type` and carries
/// `sequence_number`. No `[DONE]` follows.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ResponseStreamEvent {
    pub event: String,
    pub data: String,
}
