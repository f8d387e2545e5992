//! Instruction data: the formats users upload (Alpaca, Dolly, ShareGPT, OpenAI `messages`),
//! each normalised to one shape, a conversation of role-tagged turns ending with the
//! assistant's.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::chat_template::Turn;

pub mod preference;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Conversation {
    pub messages: Vec<Message>,
}

impl Conversation {
    /// The messages as chat-template turns.
    pub fn turns(&self) -> Vec<Turn<'_>> {
        self.messages
            .iter()
            .map(|m| Turn {
                role: &m.role,
                text: m.content.clone(),
                ..Default::default()
            })
            .collect()
    }
}

/// Why record `index` of an upload was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("record {index}: {reason}")]
pub struct RecordError {
    pub index: usize,
    pub reason: String,
}

fn message(role: &str, content: &str) -> Message {
    Message {
        role: role.to_string(),
        content: content.trim().to_string(),
    }
}

fn text_field<'a>(record: &'a serde_json::Map<String, serde_json::Value>, key: &str) -> Result<Option<&'a str>, String> {
    match record.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("`{key}` must be a string")),
    }
}

/// An instruction with optional context, and its answer: the Alpaca and Dolly shapes.
fn single_turn(instruction: &str, context: Option<&str>, answer: &str) -> Conversation {
    let prompt = match context.map(str::trim).filter(|c| !c.is_empty()) {
        Some(context) => format!("{}\n\n{context}", instruction.trim()),
        None => instruction.trim().to_string(),
    };
    Conversation {
        messages: vec![message("user", &prompt), message("assistant", answer)],
    }
}

/// OpenAI message content: a string, or an array of `{type: "text", text}` parts.
fn content_text(content: &serde_json::Value) -> Result<String, String> {
    match content {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Array(parts) => parts
            .iter()
            .map(|p| match (p.get("type").and_then(|t| t.as_str()), p.get("text").and_then(|t| t.as_str())) {
                (Some("text"), Some(text)) => Ok(text.to_string()),
                _ => Err("only text content parts are supported".to_string()),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|parts| parts.join("")),
        _ => Err("`content` must be a string or an array of text parts".into()),
    }
}

fn role_of_sharegpt(from: &str) -> Option<&'static str> {
    match from {
        "human" | "user" => Some("user"),
        "gpt" | "assistant" | "model" | "chatgpt" | "bard" => Some("assistant"),
        "system" => Some("system"),
        _ => None,
    }
}

/// OpenAI `messages`: role-tagged turns (`developer` read as `system`), their text trimmed.
fn parse_messages(messages: &serde_json::Value) -> Result<Vec<Message>, String> {
    let messages = messages.as_array().ok_or("`messages` must be an array")?;
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(|r| r.as_str()).ok_or(format!("messages[{i}] has no `role`"))?;
            let content = m.get("content").ok_or(format!("messages[{i}] has no `content`"))?;
            let content = content_text(content).map_err(|e| format!("messages[{i}]: {e}"))?;
            let role = if role == "developer" { "system" } else { role };
            Ok(message(role, &content))
        })
        .collect()
}

/// Normalises one record of any supported format, recognised by its keys.
pub fn parse_record(value: &serde_json::Value) -> Result<Conversation, String> {
    let record = value.as_object().ok_or("a record must be a JSON object")?;
    let conversation = if let Some(messages) = record.get("messages") {
        Conversation { messages: parse_messages(messages)? }
    } else if let Some(turns) = record.get("conversations") {
        let turns = turns.as_array().ok_or("`conversations` must be an array")?;
        let messages = turns
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let from = t.get("from").and_then(|f| f.as_str()).ok_or(format!("conversations[{i}] has no `from`"))?;
                let value = t.get("value").and_then(|v| v.as_str()).ok_or(format!("conversations[{i}] has no string `value`"))?;
                let role = role_of_sharegpt(from).ok_or(format!(
                    "conversations[{i}]: unknown speaker `{from}` (use human, gpt or system)"
                ))?;
                Ok(message(role, value))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Conversation { messages }
    } else if let Some(instruction) = text_field(record, "instruction")? {
        if let Some(response) = text_field(record, "response")? {
            single_turn(instruction, text_field(record, "context")?, response)
        } else if let Some(output) = text_field(record, "output")? {
            single_turn(instruction, text_field(record, "input")?, output)
        } else {
            return Err("an `instruction` record needs an `output` (Alpaca) or a `response` (Dolly)".into());
        }
    } else {
        return Err(
            "unrecognised record: expected Alpaca {instruction, input, output}, Dolly {instruction, context, response}, ShareGPT {conversations} or OpenAI {messages}"
                .into(),
        );
    };
    validate(&conversation)?;
    Ok(conversation)
}

/// A conversation trains only if its roles are ones every chat template knows (a system
/// message first, then user and assistant turns alternating from the user) and it ends with a
/// non-empty assistant turn. The model's own template renders it when it trains.
pub fn validate(conversation: &Conversation) -> Result<(), String> {
    let messages = &conversation.messages;
    let offset = usize::from(messages.first().is_some_and(|m| m.role == "system"));
    for (index, message) in messages.iter().enumerate().skip(offset) {
        let expected = if (index - offset) % 2 == 0 { "user" } else { "assistant" };
        if message.role != expected {
            return Err(match message.role.as_str() {
                "system" => format!("messages[{index}]: a system message may only come first"),
                "user" | "assistant" => format!("messages[{index}]: expected a `{expected}` turn (turns alternate user/assistant, starting with user)"),
                other => format!("messages[{index}]: unknown role `{other}` (use system, user or assistant)"),
            });
        }
    }
    match messages.last() {
        Some(last) if last.role == "assistant" && !last.content.is_empty() => Ok(()),
        Some(last) if last.role == "assistant" => Err("the assistant's answer is empty".into()),
        _ => Err("the last message must be the assistant's answer".into()),
    }
}

/// Parses an upload: a JSON record, a JSON list of records, or JSON Lines. All or nothing: the
/// first invalid record fails the whole upload.
pub fn parse_upload(body: &[u8]) -> Result<Vec<Conversation>, RecordError> {
    parse_records(body)?
        .iter()
        .enumerate()
        .map(|(index, r)| parse_record(r).map_err(|reason| RecordError { index, reason }))
        .collect()
}

/// The raw JSON records of an upload (one record, a list, or JSON Lines), not yet interpreted.
pub fn parse_records(body: &[u8]) -> Result<Vec<serde_json::Value>, RecordError> {
    let text = std::str::from_utf8(body).map_err(|e| RecordError {
        index: 0,
        reason: format!("the body is not UTF-8: {e}"),
    })?;
    let records: Vec<serde_json::Value> = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Array(records)) => records,
        Ok(record) => vec![record],
        Err(_) => text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(index, line)| {
                serde_json::from_str(line).map_err(|e| RecordError {
                    index,
                    reason: format!("not JSON: {e}"),
                })
            })
            .collect::<Result<_, _>>()?,
    };
    if records.is_empty() {
        return Err(RecordError {
            index: 0,
            reason: "the upload holds no records".into(),
        });
    }
    Ok(records)
}

/// sha256 of the normalised conversation: equal content, equal hash, whatever the format.
pub fn content_hash(conversation: &Conversation) -> String {
    let canonical = serde_json::to_vec(conversation).unwrap_or_default();
    format!("{:x}", Sha256::digest(canonical))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pair(user: &str, assistant: &str) -> Conversation {
        Conversation {
            messages: vec![message("user", user), message("assistant", assistant)],
        }
    }

    #[test]
    fn every_format_normalises_to_the_same_conversation() {
        let expected = pair("Add the numbers\n\n2 and 3", "5");
        let records = [
            json!({"instruction": "Add the numbers", "input": "2 and 3", "output": "5"}),
            json!({"instruction": "Add the numbers", "context": "2 and 3", "response": "5"}),
            json!({"conversations": [{"from": "human", "value": "Add the numbers\n\n2 and 3"}, {"from": "gpt", "value": "5"}]}),
            json!({"messages": [{"role": "user", "content": "Add the numbers\n\n2 and 3"}, {"role": "assistant", "content": [{"type": "text", "text": "5"}]}]}),
        ];
        for record in records {
            assert_eq!(parse_record(&record).unwrap(), expected, "{record}");
        }
        assert_eq!(
            parse_record(&json!({"instruction": "Say hi", "input": "", "output": "hi"})).unwrap(),
            pair("Say hi", "hi")
        );
    }

    #[test]
    fn a_system_message_and_several_turns_are_kept() {
        let record = json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]});
        assert_eq!(parse_record(&record).unwrap().messages.len(), 5);
    }

    #[test]
    fn invalid_records_say_why() {
        for (record, reason) in [
            (json!({"instruction": "x"}), "needs an `output`"),
            (json!({"messages": [{"role": "user", "content": "x"}]}), "last message must be the assistant"),
            (json!({"messages": [{"role": "assistant", "content": "x"}]}), "expected a `user` turn"),
            (json!({"conversations": [{"from": "robot", "value": "x"}]}), "unknown speaker"),
            (json!({"prompt": "x"}), "unrecognised record"),
            (json!([1]), "must be a JSON object"),
        ] {
            let error = parse_record(&record).unwrap_err();
            assert!(error.contains(reason), "{record}: {error}");
        }
    }

    #[test]
    fn uploads_are_json_lists_or_lines_and_fail_whole() {
        let line = r#"{"instruction": "a", "output": "b"}"#;
        assert_eq!(parse_upload(line.as_bytes()).unwrap().len(), 1);
        assert_eq!(parse_upload(format!("[{line},{line}]").as_bytes()).unwrap().len(), 2);
        assert_eq!(parse_upload(format!("{line}\n\n{line}\n").as_bytes()).unwrap().len(), 2);
        let error = parse_upload(format!("{line}\n{{\"instruction\": \"a\"}}\n").as_bytes()).unwrap_err();
        assert_eq!(error.index, 1);
        assert_eq!(parse_upload(format!("{line}\nnot json").as_bytes()).unwrap_err().index, 1);
    }

    #[test]
    fn the_hash_ignores_the_format() {
        let alpaca = parse_record(&json!({"instruction": "q", "output": "a"})).unwrap();
        let openai = parse_record(&json!({"messages": [{"role": "user", "content": "q "}, {"role": "assistant", "content": "a"}]})).unwrap();
        assert_eq!(content_hash(&alpaca), content_hash(&openai));
        assert_ne!(content_hash(&alpaca), content_hash(&pair("q", "b")));
    }
}
