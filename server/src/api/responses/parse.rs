//! From a `POST /v1/responses` body to the responses service's request. Every check names the
//! offending field; input items are named by their place (`input[i]`).

use serde_json::Value;

use crate::api::types::responses::*;
use crate::api::types::{FunctionName, FunctionSpec, NamedToolChoice, SamplingFields, ToolChoiceSpec, ToolSpec};
use crate::api::validate;
use crate::api::AppError;
use crate::grammar::ConstraintSpec;
use crate::services::inference::{RequestedConstraint, Tools};
use crate::services::responses::{Item, NewResponse};

/// OpenAI's limits on `metadata`.
const MAX_METADATA: usize = 16;
const MAX_METADATA_KEY: usize = 64;
const MAX_METADATA_VALUE: usize = 512;

/// The request, checked; and whether it asked for a stream.
pub fn new_response(req: &CreateResponseRequest) -> Result<(NewResponse, bool), AppError> {
    let fields = SamplingFields { adapters: req.adapters.clone(), temperature: req.temperature, top_p: req.top_p, stream: req.stream, seed: req.seed, ..SamplingFields::default() };
    let mut sampling = validate::sampling(&fields)?;
    sampling.constraint = text_format(req.text.as_ref())?;
    let max_tokens = match req.max_output_tokens {
        Some(0) => return Err(AppError::invalid("max_output_tokens", "`max_output_tokens` must be at least 1")),
        m => m.map(|m| m as usize),
    };
    check_metadata(req)?;
    let tools = tools(req, sampling.constraint.as_ref())?;
    let input = match &req.input {
        Value::String(text) => vec![Item::Message { role: "user".into(), text: text.clone() }],
        Value::Array(items) => items.iter().enumerate().map(|(i, item)| input_item(i, item)).collect::<Result<_, _>>()?,
        _ => return Err(AppError::invalid("input", "`input` is a string or a list of items")),
    };
    if input.is_empty() && req.previous_response_id.is_none() {
        return Err(AppError::invalid("input", "`input` must hold at least one item"));
    }
    let new = NewResponse {
        model: req.model.clone(),
        adapters: validate::adapters(&fields),
        instructions: req.instructions.clone(),
        input,
        previous_response_id: req.previous_response_id.clone(),
        tools,
        generation: validate::generation(&sampling, max_tokens, None, false),
        store: req.store.unwrap_or(true),
    };
    Ok((new, sampling.stream))
}

/// `text.format` as a constraint on the answer.
fn text_format(text: Option<&TextConfig>) -> Result<Option<RequestedConstraint>, AppError> {
    let Some(format) = text.and_then(|t| t.format.clone()) else { return Ok(None) };
    let format: TextFormat = serde_json::from_value(format).map_err(|e| AppError::invalid("text.format", format!("`text.format` is not one OpenAI defines: {e}")))?;
    let spec = match format {
        TextFormat::Text => return Ok(None),
        TextFormat::JsonObject => ConstraintSpec::JsonObject,
        TextFormat::JsonSchema { schema, .. } => ConstraintSpec::JsonSchema(schema.unwrap_or_else(|| serde_json::json!({})).to_string()),
    };
    Ok(Some(RequestedConstraint { spec, param: "text.format" }))
}

fn check_metadata(req: &CreateResponseRequest) -> Result<(), AppError> {
    let Some(metadata) = &req.metadata else { return Ok(()) };
    if metadata.len() > MAX_METADATA {
        return Err(AppError::invalid("metadata", format!("`metadata` holds at most {MAX_METADATA} pairs, got {}", metadata.len())));
    }
    if metadata.iter().any(|(k, v)| k.chars().count() > MAX_METADATA_KEY || v.chars().count() > MAX_METADATA_VALUE) {
        return Err(AppError::invalid("metadata", format!("`metadata` keys are at most {MAX_METADATA_KEY} characters and values at most {MAX_METADATA_VALUE}")));
    }
    Ok(())
}

/// `tools` and `tool_choice` in the Responses API's flat shapes, checked as chat's are (and
/// their errors named as this API names the fields).
fn tools(req: &CreateResponseRequest, constraint: Option<&RequestedConstraint>) -> Result<Option<Tools>, AppError> {
    let specs: Option<Vec<ToolSpec>> = req.tools.as_ref().map(|tools| {
        tools
            .iter()
            .map(|t| ToolSpec {
                r#type: t.r#type.clone(),
                function: FunctionSpec { name: t.name.clone(), description: t.description.clone(), parameters: t.parameters.clone(), strict: t.strict },
            })
            .collect()
    });
    let choice = req.tool_choice.as_ref().map(|choice| match choice {
        ResponseToolChoice::Mode(mode) => ToolChoiceSpec::Mode(mode.clone()),
        ResponseToolChoice::Named(named) => ToolChoiceSpec::Named(NamedToolChoice { r#type: named.r#type.clone(), function: FunctionName { name: named.name.clone() } }),
    });
    validate::tool_set(specs.as_deref(), choice.as_ref(), constraint).map_err(|e| match e {
        AppError::InvalidParameter { message, param, code } => AppError::InvalidParameter { message, param: param.map(|p| p.replace(".function.", ".")), code },
        other => other,
    })
}

/// Input item `i`: a message, a function call or a call's output; any other type is refused
/// by name.
fn input_item(i: usize, item: &Value) -> Result<Item, AppError> {
    let param = format!("input[{i}]");
    let kind = item.get("type").and_then(Value::as_str).or_else(|| item.get("role").map(|_| "message"));
    let read = |what: &str, e: serde_json::Error| AppError::invalid(&param, format!("`{param}` is not a {what} item: {e}"));
    match kind {
        Some("message") => {
            let message: InputMessage = serde_json::from_value(item.clone()).map_err(|e| read("message", e))?;
            message_item(i, message)
        }
        Some("function_call") => {
            let call: FunctionCallItem = serde_json::from_value(item.clone()).map_err(|e| read("function_call", e))?;
            Ok(Item::FunctionCall { call_id: call.call_id, name: call.name, arguments: call.arguments })
        }
        Some("function_call_output") => {
            let output: FunctionCallOutputItem = serde_json::from_value(item.clone()).map_err(|e| read("function_call_output", e))?;
            Ok(Item::FunctionCallOutput { call_id: output.call_id, output: output.output })
        }
        Some(other) => Err(AppError::invalid(&param, format!("input items of type `{other}` are not supported; send `message`, `function_call` or `function_call_output` items"))),
        None => Err(AppError::invalid(&param, format!("`{param}` has no `type` (nor a `role`, as a message would)"))),
    }
}

fn message_item(i: usize, message: InputMessage) -> Result<Item, AppError> {
    if !["system", "developer", "user", "assistant"].contains(&message.role.as_str()) {
        return Err(AppError::invalid(&format!("input[{i}].role"), format!("a message's role is `system`, `developer`, `user` or `assistant`, got `{}`", message.role)));
    }
    let text = match message.content {
        InputContent::Text(text) => text,
        InputContent::Parts(parts) => {
            let mut text = String::new();
            for (j, part) in parts.into_iter().enumerate() {
                match (part.r#type.as_str(), part.text) {
                    ("input_text" | "output_text", Some(t)) => text.push_str(&t),
                    (kind, _) => {
                        return Err(AppError::invalid(&format!("input[{i}].content[{j}]"), format!("content parts of type `{kind}` are not supported; send `input_text`")));
                    }
                }
            }
            text
        }
    };
    Ok(Item::Message { role: message.role, text })
}
