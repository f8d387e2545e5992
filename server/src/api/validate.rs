//! From HTTP bodies to the engine's validated requests. Every check names the offending field.

use crate::api::error::AppError;
use crate::api::types::{AdapterRef, ChatCompletionRequest, ChatMessage, MessageContent, ResponseFormat, SamplingFields, StopSpec, ToolChoiceSpec};
use crate::grammar::ConstraintSpec;
use crate::sampler::SamplingParams;
use crate::services::inference::{AdapterChoice, CallRecord, ChatTurn, Generation, RequestedConstraint, Tools};
use crate::tool_calls::{ToolChoice, ToolDefinition};

/// The most choices one request may ask for.
pub const MAX_N: u32 = 8;
/// OpenAI's limit on stop sequences.
pub const MAX_STOP: usize = 4;

/// Sampling settings common to both endpoints, checked.
pub struct Sampling {
    pub params: SamplingParams,
    pub constraint: Option<RequestedConstraint>,
    pub n: usize,
    pub stop_strings: Vec<String>,
    pub ignore_eos: bool,
    pub stream: bool,
    pub include_usage: bool,
}

fn check_range(param: &str, value: Option<f32>, lo: f32, hi: f32) -> Result<(), AppError> {
    match value {
        Some(v) if !(lo..=hi).contains(&v) || v.is_nan() => Err(AppError::invalid(
            param,
            format!("`{param}` must be between {lo} and {hi}, got {v}"),
        )),
        _ => Ok(()),
    }
}

pub fn sampling(f: &SamplingFields) -> Result<Sampling, AppError> {
    check_range("temperature", f.temperature, 0.0, 2.0)?;
    check_range("frequency_penalty", f.frequency_penalty, -2.0, 2.0)?;
    check_range("presence_penalty", f.presence_penalty, -2.0, 2.0)?;
    check_range("min_p", f.min_p, 0.0, 1.0)?;
    if let Some(p) = f.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(AppError::invalid("top_p", format!("`top_p` must be in (0, 1], got {p}")));
        }
    }
    if let Some(r) = f.repetition_penalty {
        if !(r > 0.0 && r <= 10.0) {
            return Err(AppError::invalid(
                "repetition_penalty",
                format!("`repetition_penalty` must be in (0, 10], got {r}"),
            ));
        }
    }
    let top_k = match f.top_k {
        None | Some(0) | Some(-1) => None,
        Some(k) if k > 0 => Some(k as usize),
        Some(k) => {
            return Err(AppError::invalid(
                "top_k",
                format!("`top_k` must be positive, or 0 or -1 to turn it off; got {k}"),
            ))
        }
    };
    let n = f.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(AppError::invalid("n", format!("`n` must be between 1 and {MAX_N}, got {n}")));
    }
    let stop_strings = match &f.stop {
        None => Vec::new(),
        Some(StopSpec::One(s)) => vec![s.clone()],
        Some(StopSpec::Many(v)) => v.clone(),
    };
    if stop_strings.len() > MAX_STOP {
        return Err(AppError::invalid(
            "stop",
            format!("at most {MAX_STOP} stop sequences are allowed, got {}", stop_strings.len()),
        ));
    }
    if stop_strings.iter().any(String::is_empty) {
        return Err(AppError::invalid("stop", "stop sequences must not be empty"));
    }
    let stream = f.stream.unwrap_or(false);
    if f.stream_options.is_some() && !stream {
        return Err(AppError::invalid("stream_options", "`stream_options` needs `stream: true`"));
    }
    let seed = match f.seed {
        Some(s) => s as u64,
        None => rand::random(),
    };
    Ok(Sampling {
        constraint: constraint(f)?,
        params: SamplingParams {
            temperature: f.temperature.unwrap_or(1.0),
            top_p: f.top_p.unwrap_or(1.0),
            top_k,
            min_p: f.min_p.unwrap_or(0.0),
            seed,
            frequency_penalty: f.frequency_penalty.unwrap_or(0.0),
            presence_penalty: f.presence_penalty.unwrap_or(0.0),
            repetition_penalty: f.repetition_penalty.unwrap_or(1.0),
        },
        n: n as usize,
        stop_strings,
        ignore_eos: f.ignore_eos.unwrap_or(false),
        stream,
        include_usage: f.stream_options.as_ref().is_some_and(|o| o.include_usage),
    })
}

/// How each choice generates: the checked sampling settings, with `max_tokens` (`None`: what
/// the context leaves) and the logprobs asked for.
pub fn generation(sampling: &Sampling, max_tokens: Option<usize>, logprobs: Option<usize>, prompt_logprobs: bool) -> Generation {
    Generation {
        max_tokens,
        n: sampling.n,
        sampling: sampling.params.clone(),
        stop_strings: sampling.stop_strings.clone(),
        ignore_eos: sampling.ignore_eos,
        logprobs,
        prompt_logprobs,
        constraint: sampling.constraint.clone(),
    }
}

/// Each message's role, text (content parts joined; only text parts are accepted), calls and
/// the call a tool message answers.
pub fn chat_turns(messages: &[ChatMessage]) -> Result<Vec<ChatTurn>, AppError> {
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let content = match &m.content {
            None => String::new(),
            Some(MessageContent::Text(t)) => t.clone(),
            Some(MessageContent::Parts(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    match (part.r#type.as_str(), &part.text) {
                        ("text", Some(t)) => text.push_str(t),
                        (kind, _) => {
                            return Err(AppError::invalid(
                                &format!("messages[{i}].content[{j}]"),
                                format!("content parts of type `{kind}` are not supported; send text"),
                            ))
                        }
                    }
                }
                text
            }
        };
        if m.role == "tool" && m.tool_call_id.is_none() {
            return Err(AppError::invalid(&format!("messages[{i}].tool_call_id"), "a `tool` message needs the `tool_call_id` of the call it answers"));
        }
        let calls = m.tool_calls.iter().flatten();
        if m.role != "assistant" && calls.clone().next().is_some() {
            return Err(AppError::invalid(&format!("messages[{i}].tool_calls"), "only assistant messages carry `tool_calls`"));
        }
        out.push(ChatTurn {
            role: m.role.clone(),
            content,
            tool_calls: calls.map(|c| CallRecord { id: c.id.clone(), name: c.function.name.clone(), arguments: c.function.arguments.clone() }).collect(),
            tool_call_id: m.tool_call_id.clone(),
        });
    }
    Ok(out)
}

/// The shape asked for by `response_format` or one of the `guided_*` fields (at most one).
fn constraint(f: &SamplingFields) -> Result<Option<RequestedConstraint>, AppError> {
    let mut asked = Vec::new();
    let format = f
        .response_format
        .clone()
        .map(serde_json::from_value::<ResponseFormat>)
        .transpose()
        .map_err(|e| AppError::invalid("response_format", format!("`response_format` is not one OpenAI defines: {e}")))?;
    match &format {
        None | Some(ResponseFormat::Text) => {}
        Some(ResponseFormat::JsonObject) => asked.push(("response_format", ConstraintSpec::JsonObject)),
        Some(ResponseFormat::JsonSchema { json_schema }) => {
            let schema = json_schema.schema.clone().unwrap_or_else(|| serde_json::json!({}));
            asked.push(("response_format", ConstraintSpec::JsonSchema(schema.to_string())));
        }
    }
    if let Some(schema) = &f.guided_json {
        asked.push(("guided_json", ConstraintSpec::JsonSchema(schema.to_string())));
    }
    if let Some(choices) = &f.guided_choice {
        if choices.is_empty() || choices.iter().any(String::is_empty) {
            return Err(AppError::invalid("guided_choice", "`guided_choice` needs at least one choice, and no empty ones"));
        }
        asked.push(("guided_choice", ConstraintSpec::Choice(choices.clone())));
    }
    if let Some(regex) = &f.guided_regex {
        asked.push(("guided_regex", ConstraintSpec::Regex(regex.clone())));
    }
    if let Some(grammar) = &f.guided_grammar {
        asked.push(("guided_grammar", ConstraintSpec::Lark(grammar.clone())));
    }
    match asked.len() {
        0 => Ok(None),
        1 => Ok(asked.pop().map(|(param, spec)| RequestedConstraint { spec, param })),
        _ => Err(AppError::invalid(
            asked[1].0,
            format!("`{}` and `{}` both constrain the answer; send one", asked[0].0, asked[1].0),
        )),
    }
}

/// The longest function name OpenAI accepts.
const MAX_FUNCTION_NAME: usize = 64;

/// `tools` and `tool_choice`, checked: function names valid and unique, parameters a JSON
/// Schema object, a named choice one of the tools, and no forced call together with another
/// constraint on the answer.
pub fn tools(req: &ChatCompletionRequest, constraint: Option<&RequestedConstraint>) -> Result<Option<Tools>, AppError> {
    tool_set(req.tools.as_deref(), req.tool_choice.as_ref(), constraint)
}

/// [`tools`] of any endpoint: the offered functions and the choice among them.
pub fn tool_set(tools: Option<&[crate::api::types::ToolSpec]>, tool_choice: Option<&ToolChoiceSpec>, constraint: Option<&RequestedConstraint>) -> Result<Option<Tools>, AppError> {
    let definitions = match tools {
        None => Vec::new(),
        Some(tools) => tool_definitions(tools)?,
    };
    let choice = match tool_choice {
        None if definitions.is_empty() => return Ok(None),
        None => ToolChoice::Auto,
        Some(ToolChoiceSpec::Mode(mode)) => match mode.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => return Err(AppError::invalid("tool_choice", format!("`tool_choice` must be `none`, `auto`, `required` or a named function, got `{other}`"))),
        },
        Some(ToolChoiceSpec::Named(named)) => {
            if named.r#type != "function" || !definitions.iter().any(|d| d.name == named.function.name) {
                return Err(AppError::invalid("tool_choice", format!("`tool_choice` names `{}`, which is not one of `tools`", named.function.name)));
            }
            ToolChoice::Function(named.function.name.clone())
        }
    };
    if definitions.is_empty() {
        return match choice {
            ToolChoice::None => Ok(None),
            _ => Err(AppError::invalid("tool_choice", "`tool_choice` needs `tools`")),
        };
    }
    if let (Some(c), ToolChoice::Required | ToolChoice::Function(_)) = (constraint, &choice) {
        return Err(AppError::invalid("tool_choice", format!("a required tool call and `{}` both constrain the answer; send one", c.param)));
    }
    Ok(Some(Tools { definitions, choice }))
}

fn tool_definitions(tools: &[crate::api::types::ToolSpec]) -> Result<Vec<ToolDefinition>, AppError> {
    let mut definitions: Vec<ToolDefinition> = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let name = &tool.function.name;
        if tool.r#type != "function" {
            return Err(AppError::invalid(&format!("tools[{i}].type"), format!("only `function` tools are supported, got `{}`", tool.r#type)));
        }
        let valid_name = !name.is_empty() && name.len() <= MAX_FUNCTION_NAME && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid_name {
            return Err(AppError::invalid(&format!("tools[{i}].function.name"), format!("a function name is 1 to {MAX_FUNCTION_NAME} of a-z, A-Z, 0-9, _ and -, got `{name}`")));
        }
        if definitions.iter().any(|d| &d.name == name) {
            return Err(AppError::invalid(&format!("tools[{i}].function.name"), format!("the function `{name}` is defined twice")));
        }
        let parameters = tool.function.parameters.clone().unwrap_or_else(|| serde_json::json!({"type": "object"}));
        if !parameters.is_object() {
            return Err(AppError::invalid(&format!("tools[{i}].function.parameters"), "`parameters` must be a JSON Schema object"));
        }
        definitions.push(ToolDefinition { name: name.clone(), description: tool.function.description.clone(), parameters });
    }
    Ok(definitions)
}

/// The request's own adapter composition (`adapters`), each scale defaulting to 1.
pub fn adapters(f: &SamplingFields) -> Vec<AdapterChoice> {
    adapter_choices(f.adapters.as_deref().unwrap_or_default())
}

pub fn adapter_choices(refs: &[AdapterRef]) -> Vec<AdapterChoice> {
    refs.iter().map(|a| AdapterChoice { name: a.name.clone(), scale: a.scale.unwrap_or(1.0) }).collect()
}
