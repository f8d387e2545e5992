//! Information extraction to JSON: the prompt names the fields, and the answer is validated and
//! repaired into an object with exactly those keys (strings or null). `{text, fields}` records
//! become pairs.
//!
//! The fields come from a system message `fields: a, b, c`, else the defaults.

use serde_json::{Map, Value};
use tessera_plugin_api::{export_plugin, last_user_text, AdapterSource, AnswerConstraint, AdapterSpec, CheckResponse, Conversation, DomainPlugin, Message, PluginInfo};

pub const DEFAULT_FIELDS: [&str; 4] = ["person", "organization", "location", "date"];
const FIELDS_PREFIX: &str = "Fields: ";

pub struct Extraction;

pub fn prompt(fields: &[String], text: &str) -> String {
    format!(
        "Extract the fields below from the text as one JSON object with exactly these keys (null when absent).\n{FIELDS_PREFIX}{}\nText: {}",
        fields.join(", "),
        text.trim()
    )
}

fn fields_of_prompt(prompt: &str) -> Option<Vec<String>> {
    let line = prompt.lines().find_map(|l| l.strip_prefix(FIELDS_PREFIX))?;
    Some(line.split(',').map(|f| f.trim().to_string()).filter(|f| !f.is_empty()).collect())
}

/// An object with exactly `fields`, each a string or null.
pub fn fields_schema(fields: &[String]) -> Value {
    let properties: Map<String, Value> = fields.iter().map(|f| (f.clone(), serde_json::json!({"type": ["string", "null"], "maxLength": 200}))).collect();
    serde_json::json!({"type": "object", "properties": properties, "required": fields, "additionalProperties": false})
}

/// The answer's first JSON object, reduced to `fields` (missing ones null, values as strings).
/// Returns the object and whether the answer was already exactly that.
pub fn repair(answer: &str, fields: &[String]) -> (Value, bool) {
    let parsed = match (answer.find('{'), answer.rfind('}')) {
        (Some(start), Some(end)) if start < end => serde_json::from_str::<Map<String, Value>>(&answer[start..=end]).ok(),
        _ => None,
    };
    let mut exact = parsed.as_ref().is_some_and(|o| o.len() == fields.len()) && answer.trim().starts_with('{');
    let mut object = Map::new();
    for field in fields {
        let value = match parsed.as_ref().and_then(|o| o.get(field)) {
            None => {
                exact = false;
                Value::Null
            }
            Some(Value::Null) => Value::Null,
            Some(Value::String(s)) => Value::String(s.trim().to_string()),
            Some(other) => {
                exact = false;
                Value::String(other.to_string())
            }
        };
        object.insert(field.clone(), value);
    }
    (Value::Object(object), exact)
}

impl DomainPlugin for Extraction {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: "extraction".into(),
            version: "1.0.0".into(),
            description: "Information extraction to a JSON object over a field list".into(),
            system_prompt: None,
            adapters: vec![AdapterSpec {
                name: "extraction".into(),
                scale: 1.0,
                source: AdapterSource::Tuned,
            }],
            // Any field list: an object of strings and nulls. Each request narrows it to its
            // own fields (`answer_shape`).
            answer: Some(AnswerConstraint::JsonSchema {
                schema: serde_json::json!({"type": "object", "additionalProperties": {"type": ["string", "null"]}}),
            }),
        }
    }

    fn rewrite_request(&self, messages: Vec<Message>) -> Result<Vec<Message>, String> {
        let fields: Vec<String> = messages
            .iter()
            .filter(|m| m.role == "system")
            .find_map(|m| m.content.trim().strip_prefix("fields:").map(str::to_string))
            .map(|list| list.split(',').map(|f| f.trim().to_string()).filter(|f| !f.is_empty()).collect())
            .unwrap_or_else(|| DEFAULT_FIELDS.iter().map(|f| f.to_string()).collect());
        let text = last_user_text(&messages).ok_or("no user message with a text")?;
        Ok(vec![Message { role: "user".into(), content: prompt(&fields, text) }])
    }

    fn answer_shape(&self, messages: &[Message]) -> Option<AnswerConstraint> {
        let fields = last_user_text(messages).and_then(fields_of_prompt)?;
        Some(AnswerConstraint::JsonSchema { schema: fields_schema(&fields) })
    }

    fn check_response(&self, messages: &[Message], answer: &str) -> Result<CheckResponse, String> {
        let fields = last_user_text(messages).and_then(fields_of_prompt).ok_or("no field list in the prompt")?;
        let (object, valid) = repair(answer, &fields);
        Ok(CheckResponse {
            answer: object.to_string(),
            valid,
            note: (!valid).then(|| "repaired into the field list".to_string()),
        })
    }

    fn convert_feedback(&self, record: &serde_json::Value) -> Result<Vec<Conversation>, String> {
        let text = record["text"].as_str().ok_or("an extraction record needs a string `text`")?;
        let values = record["fields"].as_object().ok_or("an extraction record needs a `fields` object")?;
        if values.is_empty() {
            return Err("`fields` is empty".into());
        }
        let fields: Vec<String> = values.keys().cloned().collect();
        let (object, _) = repair(&Value::Object(values.clone()).to_string(), &fields);
        Ok(vec![Conversation {
            messages: vec![
                Message { role: "user".into(), content: prompt(&fields, text) },
                Message { role: "assistant".into(), content: object.to_string() },
            ],
        }])
    }
}

export_plugin!(Extraction, Extraction);

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> Vec<String> {
        vec!["person".into(), "date".into()]
    }

    #[test]
    fn answers_are_repaired_onto_the_fields() {
        let (object, valid) = repair(r#"{"person": "Ada", "date": null}"#, &fields());
        assert!(valid);
        assert_eq!(object, serde_json::json!({"person": "Ada", "date": null}));
        let (object, valid) = repair(r#"Sure! {"person": "Ada", "city": "London", "date": 1843} done"#, &fields());
        assert!(!valid);
        assert_eq!(object, serde_json::json!({"person": "Ada", "date": "1843"}));
        let (object, valid) = repair("no json here", &fields());
        assert!(!valid);
        assert_eq!(object, serde_json::json!({"person": null, "date": null}));
    }

    #[test]
    fn the_field_list_travels_in_the_prompt() {
        let rewritten = Extraction
            .rewrite_request(vec![
                Message { role: "system".into(), content: "fields: person, date".into() },
                Message { role: "user".into(), content: "Ada wrote it in 1843.".into() },
            ])
            .unwrap();
        let checked = Extraction.check_response(&rewritten, "{\"person\": \"Ada\"}").unwrap();
        assert_eq!(checked.answer, r#"{"person":"Ada","date":null}"#);
    }
}
