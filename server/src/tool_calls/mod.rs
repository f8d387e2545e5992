//! Tool calls: function definitions shown to the model, the calls it writes parsed back, and the
//! grammar that makes it write one when the client requires it.
//!
//! Two syntaxes are understood:
//! - **Hermes** (Qwen 2.5/3 and most tool-tuned models, and the fallback for templates without
//!   tools): each call is `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`.
//! - **Llama 3.1 JSON**: the whole answer is `{"name": …, "parameters": {…}}`, optionally
//!   after `<|python_tag|>`.
//!
//! In either, a model may also write a call as plain JSON, in a fenced block or bare at the start
//! of its answer, as code models do whatever their template teaches (see `fenced`); that counts
//! only when it names a tool that was offered.
//!
//! A template that does not render `tools` gets them through the [`fallback_system_prompt`],
//! which asks for the Hermes syntax; earlier calls and tool results are then written into the
//! conversation as that syntax's text (`<tool_call>…</tool_call>`, `<tool_response>…</tool_response>`).

mod fenced;
mod split;

use serde_json::{json, Value};

use crate::grammar::ConstraintSpec;
use split::Splitter;

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolDefinition {
    pub name: String,
    pub description: Option<String>,
    /// A JSON Schema of the arguments object.
    pub parameters: Value,
}

impl ToolDefinition {
    /// OpenAI's shape, which templates render (`{"type": "function", "function": {…}}`).
    pub fn to_openai(&self) -> Value {
        let mut function = json!({"name": self.name});
        if let Some(description) = &self.description {
            function["description"] = json!(description);
        }
        function["parameters"] = self.parameters.clone();
        json!({"type": "function", "function": function})
    }
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// The tools are not shown and no call is parsed.
    None,
    /// The model decides; what it writes in the call syntax is parsed.
    Auto,
    /// The answer is one call, to any of the tools.
    Required,
    /// The answer is one call to this function.
    Function(String),
}

/// How a model writes its calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolSyntax {
    Hermes,
    Llama31Json,
}

impl ToolSyntax {
    /// The syntax a chat template teaches: Llama 3.1's when it speaks of `<|python_tag|>` or
    /// of JSON `"parameters"` calls, else Hermes.
    pub fn of_template(template: &str) -> Self {
        if !template.contains("<tool_call>") && (template.contains("<|python_tag|>") || template.contains("\"parameters\"")) {
            ToolSyntax::Llama31Json
        } else {
            ToolSyntax::Hermes
        }
    }
}

/// A call the model wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    /// The arguments object as JSON text.
    pub arguments: String,
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";

/// The system text that teaches a model without a tool-aware template the Hermes syntax.
pub fn fallback_system_prompt(tools: &[ToolDefinition]) -> String {
    let mut text = String::from(
        "You may call one or more functions to answer the user.\n\nThe functions, one JSON signature per line, within <tools></tools> tags:\n<tools>",
    );
    for tool in tools {
        text.push('\n');
        text.push_str(&tool.to_openai().to_string());
    }
    text.push_str(
        "\n</tools>\n\nTo call a function, answer with a JSON object of its name and arguments within <tool_call></tool_call> tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>\n\
         A function's result comes back within <tool_response></tool_response> tags.",
    );
    text
}

/// A call as conversation text in the Hermes syntax (for templates without tools).
pub fn hermes_call_text(name: &str, arguments: &Value) -> String {
    format!("{OPEN}\n{}\n{CLOSE}", json!({"name": name, "arguments": arguments}))
}

/// A tool's result as conversation text in the Hermes syntax.
pub fn hermes_response_text(content: &str) -> String {
    format!("<tool_response>\n{content}\n</tool_response>")
}

/// The grammar of an answer that must be a call: for `Required` to any tool, for a named
/// function to it alone; `None` when the choice does not force a call.
pub fn forced_call(syntax: ToolSyntax, tools: &[ToolDefinition], choice: &ToolChoice) -> Option<ConstraintSpec> {
    let targets: Vec<&ToolDefinition> = match choice {
        ToolChoice::None | ToolChoice::Auto => return None,
        ToolChoice::Required => tools.iter().collect(),
        ToolChoice::Function(name) => tools.iter().filter(|t| &t.name == name).collect(),
    };
    let arguments_key = match syntax {
        ToolSyntax::Hermes => "arguments",
        ToolSyntax::Llama31Json => "parameters",
    };
    let calls: Vec<Value> = targets
        .iter()
        .map(|tool| {
            json!({
                "type": "object",
                "properties": {"name": {"const": tool.name}, arguments_key: tool.parameters},
                "required": ["name", arguments_key],
                "additionalProperties": false,
            })
        })
        .collect();
    let schema = json!({
        "anyOf": calls,
        "x-guidance": {"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "},
    });
    Some(ConstraintSpec::Lark(match syntax {
        ToolSyntax::Hermes => format!("start: \"{OPEN}\\n\" call \"\\n{CLOSE}\"\ncall: %json {schema}"),
        ToolSyntax::Llama31Json => format!("start: call\ncall: %json {schema}"),
    }))
}

/// The text of an answer apart from its calls, and the calls, in order. Text that looks like
/// a call but does not parse, or calls a tool that was not offered, stays text; with calls
/// found, the text around them is trimmed.
pub fn parse(syntax: ToolSyntax, declared: &[String], text: &str) -> (String, Vec<ParsedCall>) {
    let mut stream = CallStream::new(syntax, declared.to_vec());
    let mut pieces = stream.feed(text);
    pieces.extend(stream.finish());
    let (mut content, mut calls) = (String::new(), Vec::new());
    for piece in pieces {
        match piece {
            StreamPiece::Content(text) => content.push_str(&text),
            StreamPiece::Call(call) => calls.push(call),
        }
    }
    let content = if calls.is_empty() { content } else { content.trim().to_string() };
    (content, calls)
}

/// `{"name": …, <arguments_key>: {…}}` as a call; the arguments may also be a JSON string
/// holding the object.
fn call_from_json(text: &str, arguments_key: &str) -> Option<ParsedCall> {
    let value: Value = serde_json::from_str(text).ok()?;
    let name = value.get("name")?.as_str()?.to_string();
    let arguments = match value.get(arguments_key).or_else(|| value.get("arguments")) {
        None => "{}".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    Some(ParsedCall { name, arguments })
}

/// Llama 3.1: an answer that is one `{"name": …, "parameters": {…}}`, after `<|python_tag|>` or not.
fn llama_call(answer: &str) -> Option<ParsedCall> {
    let body = answer.trim_start().strip_prefix(PYTHON_TAG).unwrap_or(answer);
    call_from_json(body.trim(), "parameters")
}

/// Whether a Llama 3.1 answer so far may still be one call: it begins with `{` or `<|python_tag|>`.
fn may_be_llama_call(answer: &str) -> bool {
    let start = answer.trim_start();
    start.starts_with('{') || PYTHON_TAG.starts_with(start) || start.starts_with(PYTHON_TAG)
}

/// What a streamed answer becomes, piece by piece.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamPiece {
    Content(String),
    Call(ParsedCall),
}

/// Splits a streamed answer into text and calls as it arrives: text is passed on at once,
/// except what may be the start of a call, which is held until the call closes (and is parsed)
/// or turns out to be text.
#[derive(Debug, Clone)]
pub struct CallStream {
    /// Llama 3.1: the answer, held whole while it may be one call in that syntax.
    llama_answer: Option<String>,
    /// Calls in the answer's text: Hermes tags, fenced and bare JSON.
    text: Splitter,
}

impl CallStream {
    /// `declared`: the names of the tools offered.
    pub fn new(syntax: ToolSyntax, declared: Vec<String>) -> Self {
        let llama_answer = (syntax == ToolSyntax::Llama31Json).then(String::new);
        Self { llama_answer, text: Splitter::new(syntax == ToolSyntax::Hermes, declared) }
    }

    pub fn feed(&mut self, delta: &str) -> Vec<StreamPiece> {
        let Some(answer) = self.llama_answer.as_mut() else { return self.text.feed(delta) };
        answer.push_str(delta);
        if may_be_llama_call(answer) {
            return Vec::new();
        }
        let answer = std::mem::take(answer);
        self.llama_answer = None;
        self.text.feed(&answer)
    }

    /// Whatever is left once the answer ends.
    pub fn finish(&mut self) -> Vec<StreamPiece> {
        let mut pieces = Vec::new();
        if let Some(answer) = self.llama_answer.take() {
            if let Some(call) = llama_call(&answer) {
                return vec![StreamPiece::Call(call)];
            }
            pieces = self.text.feed(&answer);
        }
        pieces.extend(self.text.finish());
        pieces
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declared() -> Vec<String> {
        vec!["get_weather".into()]
    }

    fn weather() -> ToolDefinition {
        ToolDefinition {
            name: "get_weather".into(),
            description: Some("Weather in a city".into()),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
        }
    }

    #[test]
    fn hermes_calls_are_parsed_out_of_the_text() {
        let text = "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>";
        let (content, calls) = parse(ToolSyntax::Hermes, &declared(), text);
        assert_eq!(content, "Let me look.");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0], ParsedCall { name: "get_weather".into(), arguments: r#"{"city":"Paris"}"#.into() });
        assert_eq!(calls[1].arguments, r#"{"city":"Oslo"}"#);
        let (content, calls) = parse(ToolSyntax::Hermes, &declared(), "<tool_call>\nnot json\n</tool_call> and text");
        assert!(calls.is_empty());
        assert_eq!(content, "<tool_call>\nnot json\n</tool_call> and text");
    }

    #[test]
    fn llama_calls_are_the_whole_answer() {
        let (content, calls) = parse(ToolSyntax::Llama31Json, &declared(), "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Rome\"}}");
        assert_eq!(content, "");
        assert_eq!(calls, vec![ParsedCall { name: "get_weather".into(), arguments: r#"{"city":"Rome"}"#.into() }]);
        assert_eq!(parse(ToolSyntax::Llama31Json, &declared(), "It is sunny.").0, "It is sunny.");
        assert_eq!(ToolSyntax::of_template("{{ '<|python_tag|>' }}"), ToolSyntax::Llama31Json);
        assert_eq!(ToolSyntax::of_template("<tool_call>\n{\"name\": ..., \"parameters\"}"), ToolSyntax::Hermes);
    }

    #[test]
    fn a_stream_holds_back_only_what_may_be_a_call() {
        let mut stream = CallStream::new(ToolSyntax::Hermes, declared());
        let mut pieces = Vec::new();
        let answer = "Sure. <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lima\"}}\n</tool_call> done <tool";
        for chunk in answer.as_bytes().chunks(3) {
            pieces.extend(stream.feed(std::str::from_utf8(chunk).unwrap()));
        }
        pieces.extend(stream.finish());
        let text: String = pieces.iter().filter_map(|p| match p { StreamPiece::Content(t) => Some(t.as_str()), _ => None }).collect();
        assert_eq!(text, "Sure.  done <tool");
        let calls: Vec<_> = pieces.iter().filter(|p| matches!(p, StreamPiece::Call(_))).collect();
        assert_eq!(calls, vec![&StreamPiece::Call(ParsedCall { name: "get_weather".into(), arguments: r#"{"city":"Lima"}"#.into() })]);
    }

    #[test]
    fn a_forced_call_names_only_the_chosen_function() {
        let other = ToolDefinition { name: "other".into(), description: None, parameters: json!({"type": "object"}) };
        let tools = [weather(), other];
        let Some(ConstraintSpec::Lark(grammar)) = forced_call(ToolSyntax::Hermes, &tools, &ToolChoice::Function("get_weather".into())) else { panic!() };
        assert!(grammar.contains("\"const\":\"get_weather\"") && !grammar.contains("\"other\""), "{grammar}");
        assert!(forced_call(ToolSyntax::Hermes, &tools, &ToolChoice::Auto).is_none());
        assert!(fallback_system_prompt(&tools).contains(r#""name":"get_weather""#));
    }
}
