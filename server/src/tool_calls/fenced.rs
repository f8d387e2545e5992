//! Calls written as plain JSON, the way code-tuned models (Qwen2.5-Coder among them) write them
//! when shown tools in `auto` mode: `{"name": …, "arguments": {…}}` in a fenced block
//! (```` ```json ```` or a bare ```` ``` ````), or bare at the start of an answer. A block may
//! hold several such objects, or an array of them. Only an object naming a declared tool is a
//! call: a model that answers with JSON which happens to have a `name` key is answering.

use serde_json::Value;

use super::ParsedCall;

/// The backticks that open and close a fenced block.
const FENCE: &str = "```";

/// What a fence's opening line says its block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FenceKind {
    /// No language, or JSON: it may hold calls.
    Json,
    /// Another language: code, which is text.
    Code,
}

/// Whether `line` (without its newline) may begin a fenced block: after its indentation, backticks.
pub(super) fn starts_fence(line: &str) -> bool {
    line.trim_start_matches([' ', '\t']).starts_with(FENCE)
}

/// What block `line` (without its newline) opens: indentation, three or more backticks, and an
/// info string with no backtick (with one, the backticks are inline code, not a fence).
pub(super) fn opening_fence(line: &str) -> Option<FenceKind> {
    let marker = line.trim_start_matches([' ', '\t']);
    let info = marker.strip_prefix(FENCE)?.trim_start_matches('`').trim();
    if info.contains('`') {
        return None;
    }
    Some(if info.is_empty() || info.eq_ignore_ascii_case("json") { FenceKind::Json } else { FenceKind::Code })
}

/// Whether `line` (without its newline) closes a fenced block: three or more backticks alone.
pub(super) fn is_closing_fence(line: &str) -> bool {
    let marker = line.trim_matches([' ', '\t', '\r']);
    marker.len() >= FENCE.len() && marker.bytes().all(|b| b == b'`')
}

/// Whether an unfinished line may still become a fence, opening or closing: so far it is only
/// indentation and backticks.
pub(super) fn may_become_fence(partial_line: &str) -> bool {
    partial_line.trim_start_matches([' ', '\t']).trim_start_matches('`').trim_matches([' ', '\t', '\r']).is_empty()
}

/// The calls a fenced block's body holds: call objects or arrays of them, and nothing else;
/// `None` when any part is not a call to a declared tool, which leaves the block text.
pub(super) fn calls_in_block(body: &str, declared: &[String]) -> Option<Vec<ParsedCall>> {
    let mut calls = Vec::new();
    for value in serde_json::Deserializer::from_str(body).into_iter::<Value>() {
        calls.extend(calls_in_value(&value.ok()?, declared)?);
    }
    (!calls.is_empty()).then_some(calls)
}

/// The calls of a bare `{…}` at the start of an answer.
pub(super) fn calls_in_bare_object(text: &str, declared: &[String]) -> Option<Vec<ParsedCall>> {
    calls_in_value(&serde_json::from_str(text).ok()?, declared)
}

/// A call object, or a non-empty array of them (all of them calls, or it is not one).
fn calls_in_value(value: &Value, declared: &[String]) -> Option<Vec<ParsedCall>> {
    match value {
        Value::Array(items) if !items.is_empty() => items.iter().map(|item| declared_call(item, declared)).collect(),
        Value::Object(_) => Some(vec![declared_call(value, declared)?]),
        _ => None,
    }
}

/// `{"name": <declared tool>, "arguments" | "parameters": {…}}`; the arguments may also be a
/// JSON string holding the object.
fn declared_call(value: &Value, declared: &[String]) -> Option<ParsedCall> {
    let name = value.get("name")?.as_str()?;
    if !declared.iter().any(|tool| tool == name) {
        return None;
    }
    let arguments = match value.get("arguments").or_else(|| value.get("parameters"))? {
        Value::String(text) => serde_json::from_str(text).ok()?,
        other => other.clone(),
    };
    arguments.is_object().then(|| ParsedCall { name: name.to_string(), arguments: arguments.to_string() })
}

/// The length of the bracketed JSON value `text` begins with, its brackets matched outside
/// strings; `None` while it is unclosed. Whether it is valid JSON is the parser's to say.
pub(super) fn bracketed_len(text: &str) -> Option<usize> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, byte) in text.bytes().enumerate() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declared() -> Vec<String> {
        vec!["get_weather".into(), "get_time".into()]
    }

    #[test]
    fn only_declared_names_with_object_arguments_are_calls() {
        let calls = calls_in_block(r#"{"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}"#, &declared());
        assert_eq!(calls, Some(vec![ParsedCall { name: "get_weather".into(), arguments: r#"{"city":"Oslo"}"#.into() }]));
        let calls = calls_in_block("{\"name\": \"get_time\", \"parameters\": {}}\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lima\"}}", &declared());
        assert_eq!(calls.map(|c| c.len()), Some(2));
        for text in [
            r#"{"name": "launch", "arguments": {}}"#,
            r#"{"name": "get_weather", "arguments": [1]}"#,
            r#"{"name": "get_weather", "arguments": "not json"}"#,
            r#"{"name": "get_weather"}"#,
            r#"[{"name": "get_weather", "arguments": {}}, {"name": "launch", "arguments": {}}]"#,
            r#"{"name": "get_weather", "arguments": {}} trailing"#,
            "[]",
            "",
        ] {
            assert_eq!(calls_in_block(text, &declared()), None, "{text}");
        }
    }

    #[test]
    fn fences_are_told_apart_by_their_lines() {
        assert_eq!(opening_fence("```json"), Some(FenceKind::Json));
        assert_eq!(opening_fence("  ````JSON "), Some(FenceKind::Json));
        assert_eq!(opening_fence("```"), Some(FenceKind::Json));
        assert_eq!(opening_fence("```python"), Some(FenceKind::Code));
        assert_eq!(opening_fence("```inline``` code"), None);
        assert!(is_closing_fence("```\r") && is_closing_fence("  ````") && !is_closing_fence("``` x") && !is_closing_fence("``"));
        assert!(may_become_fence("  ``") && may_become_fence("```\r") && !may_become_fence("``x"));
    }

    #[test]
    fn brackets_are_matched_outside_strings() {
        assert_eq!(bracketed_len(r#"{"a": "}\"{", "b": [1, {}]} rest"#), Some(27));
        assert_eq!(bracketed_len(r#"{"a": "}"#), None);
    }
}
