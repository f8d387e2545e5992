//! Preference records: a conversation ending with the user's turn, and two answers to it, the
//! one preferred (`chosen`) and the one not (`rejected`). Two shapes are read: OpenAI's DPO
//! line `{input: {messages}, preferred_output: [message], non_preferred_output: [message]}` and
//! TRL's `{prompt | messages, chosen, rejected}`, where the prompt is a string or a list of
//! messages and each answer a string or a list holding one assistant message.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{content_text, message, parse_messages, parse_record, parse_records, validate, Conversation, Message, RecordError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Preference {
    /// The conversation so far, ending with the user's turn.
    pub prompt: Vec<Message>,
    /// The answer preferred.
    pub chosen: String,
    /// The answer not preferred.
    pub rejected: String,
}

impl Preference {
    fn answered(&self, answer: &str) -> Conversation {
        let mut messages = self.prompt.clone();
        messages.push(message("assistant", answer));
        Conversation { messages }
    }

    /// The prompt followed by the chosen answer.
    pub fn chosen_conversation(&self) -> Conversation {
        self.answered(&self.chosen)
    }

    /// The prompt followed by the rejected answer.
    pub fn rejected_conversation(&self) -> Conversation {
        self.answered(&self.rejected)
    }

    /// sha256 of the normalised record: equal content, equal hash, whatever the shape.
    pub fn content_hash(&self) -> String {
        let canonical = serde_json::to_vec(self).unwrap_or_default();
        format!("{:x}", Sha256::digest(canonical))
    }
}

/// One record of a feedback upload: an answer to imitate, or a preference between two.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feedback {
    Pair(Conversation),
    Preference(Preference),
}

/// The keys that make a record a preference.
const PREFERENCE_KEYS: [&str; 4] = ["chosen", "rejected", "preferred_output", "non_preferred_output"];

/// Whether `value` is a preference record (in either shape), by its keys.
pub fn is_preference(value: &serde_json::Value) -> bool {
    value.as_object().is_some_and(|record| PREFERENCE_KEYS.iter().any(|key| record.contains_key(*key)))
}

/// Normalises one preference record of either shape, and checks it.
pub fn parse_preference(value: &serde_json::Value) -> Result<Preference, String> {
    let record = value.as_object().ok_or("a record must be a JSON object")?;
    let (prompt, chosen, rejected) = if record.contains_key("preferred_output") || record.contains_key("non_preferred_output") {
        let input = record.get("input").ok_or("a `preferred_output` record needs an `input` with `messages`")?;
        let messages = input.get("messages").ok_or("`input` has no `messages`")?;
        (parse_messages(messages)?, answer(record, "preferred_output")?, answer(record, "non_preferred_output")?)
    } else {
        let prompt = match (record.get("prompt"), record.get("messages")) {
            (Some(serde_json::Value::String(text)), None) => vec![message("user", text)],
            (Some(messages), None) | (None, Some(messages)) => parse_messages(messages)?,
            (Some(_), Some(_)) => return Err("give the conversation as `prompt` or as `messages`, not both".into()),
            (None, None) => return Err("a `chosen`/`rejected` record needs a `prompt` (or `messages`)".into()),
        };
        (prompt, answer(record, "chosen")?, answer(record, "rejected")?)
    };
    let preference = Preference { prompt, chosen, rejected };
    check(&preference)?;
    Ok(preference)
}

/// An answer: a string, or a list of exactly one assistant message.
fn answer(record: &serde_json::Map<String, serde_json::Value>, key: &str) -> Result<String, String> {
    let text = match record.get(key) {
        None | Some(serde_json::Value::Null) => return Err(format!("`{key}` is missing")),
        Some(serde_json::Value::String(text)) => text.clone(),
        Some(serde_json::Value::Array(messages)) => match messages.as_slice() {
            [only] => {
                let role = only.get("role").and_then(|r| r.as_str()).ok_or(format!("{key}[0] has no `role`"))?;
                if role != "assistant" {
                    return Err(format!("{key}[0]: the answer's role must be `assistant`, not `{role}`"));
                }
                content_text(only.get("content").ok_or(format!("{key}[0] has no `content`"))?).map_err(|e| format!("{key}[0]: {e}"))?
            }
            _ => return Err(format!("`{key}` must hold exactly one assistant message")),
        },
        Some(_) => return Err(format!("`{key}` must be a string or a list of one assistant message")),
    };
    Ok(text.trim().to_string())
}

/// A preference trains only if both answers are non-empty and differ, and its conversation ends
/// with the user (so that each answer completes a conversation every chat template renders).
fn check(preference: &Preference) -> Result<(), String> {
    if preference.prompt.last().is_none_or(|m| m.role != "user") {
        return Err("the conversation must end with the user's turn".into());
    }
    if preference.chosen.is_empty() {
        return Err("the chosen answer is empty".into());
    }
    if preference.rejected.is_empty() {
        return Err("the rejected answer is empty".into());
    }
    if preference.chosen == preference.rejected {
        return Err("the chosen and rejected answers are identical".into());
    }
    validate(&preference.chosen_conversation())
}

/// Normalises one record of a feedback upload: a preference if it has a preference's keys,
/// else a pair in any supported format.
pub fn parse_feedback(value: &serde_json::Value) -> Result<Feedback, String> {
    if is_preference(value) {
        parse_preference(value).map(Feedback::Preference)
    } else {
        parse_record(value).map(Feedback::Pair)
    }
}

/// Parses a feedback upload of pairs and preferences, all or nothing.
pub fn parse_feedback_upload(body: &[u8]) -> Result<Vec<Feedback>, RecordError> {
    parse_records(body)?
        .iter()
        .enumerate()
        .map(|(index, r)| parse_feedback(r).map_err(|reason| RecordError { index, reason }))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn expected() -> Preference {
        Preference {
            prompt: vec![message("system", "Be brief."), message("user", "Capital of France?")],
            chosen: "Paris.".into(),
            rejected: "It is Lyon.".into(),
        }
    }

    #[test]
    fn both_shapes_normalise_to_the_same_preference() {
        let prompt = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]);
        let records = [
            json!({"input": {"messages": prompt}, "preferred_output": [{"role": "assistant", "content": "Paris."}],
                   "non_preferred_output": [{"role": "assistant", "content": "It is Lyon."}]}),
            json!({"prompt": prompt, "chosen": "Paris.", "rejected": "It is Lyon."}),
            json!({"messages": prompt, "chosen": [{"role": "assistant", "content": "Paris."}], "rejected": " It is Lyon. "}),
        ];
        for record in records {
            assert_eq!(parse_feedback(&record).unwrap(), Feedback::Preference(expected()), "{record}");
        }
        let plain = parse_preference(&json!({"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."})).unwrap();
        assert_eq!(plain.prompt, vec![message("user", "Capital of France?")]);
        assert_eq!(plain.chosen_conversation().messages.last().unwrap(), &message("assistant", "Paris."));
        assert_eq!(plain.rejected_conversation().messages.last().unwrap(), &message("assistant", "Lyon."));
    }

    #[test]
    fn invalid_preferences_say_why() {
        for (record, reason) in [
            (json!({"prompt": "q", "chosen": "a", "rejected": "a"}), "identical"),
            (json!({"prompt": "q", "chosen": "  ", "rejected": "b"}), "chosen answer is empty"),
            (json!({"prompt": "q", "chosen": "a", "rejected": ""}), "rejected answer is empty"),
            (json!({"prompt": "q", "chosen": "a"}), "`rejected` is missing"),
            (json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}),
             "must end with the user's turn"),
            (json!({"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": [{"role": "user", "content": "a"}],
                    "non_preferred_output": [{"role": "assistant", "content": "b"}]}), "must be `assistant`"),
            (json!({"preferred_output": [], "non_preferred_output": []}), "needs an `input`"),
            (json!({"chosen": "a", "rejected": "b"}), "needs a `prompt`"),
        ] {
            let error = parse_feedback(&record).unwrap_err();
            assert!(error.contains(reason), "{record}: {error}");
        }
    }

    #[test]
    fn an_upload_mixes_pairs_and_preferences_and_fails_whole() {
        let pair = r#"{"instruction": "a", "output": "b"}"#;
        let preference = r#"{"prompt": "a", "chosen": "b", "rejected": "c"}"#;
        let parsed = parse_feedback_upload(format!("{pair}\n{preference}\n").as_bytes()).unwrap();
        assert!(matches!(parsed.as_slice(), [Feedback::Pair(_), Feedback::Preference(_)]));
        let error = parse_feedback_upload(format!("{pair}\n{preference}\n{{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"b\"}}").as_bytes()).unwrap_err();
        assert_eq!(error.index, 2);
    }

    #[test]
    fn the_hash_ignores_the_shape() {
        let openai = parse_preference(&json!({"input": {"messages": [{"role": "user", "content": "q"}]},
            "preferred_output": [{"role": "assistant", "content": "a"}], "non_preferred_output": [{"role": "assistant", "content": "b"}]})).unwrap();
        let trl = parse_preference(&json!({"prompt": "q", "chosen": "a", "rejected": "b"})).unwrap();
        assert_eq!(openai.content_hash(), trl.content_hash());
        let swapped = parse_preference(&json!({"prompt": "q", "chosen": "b", "rejected": "a"})).unwrap();
        assert_ne!(trl.content_hash(), swapped.content_hash());
    }
}
