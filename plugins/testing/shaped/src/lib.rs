//! A plugin whose answers are `yes` or `no`, declared (ABI 2) and never repaired: whatever the
//! model is, the server must decode onto the shape. Its converter passes `{text, answer}`
//! records through unchecked, so the server's own check of feedback shows.

use tessera_plugin_api::{export_plugin, AdapterSource, AdapterSpec, AnswerConstraint, Conversation, DomainPlugin, Message, PluginInfo};

pub struct Shaped;

impl DomainPlugin for Shaped {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: "shaped".into(),
            version: "0.1.0".into(),
            description: "Answers yes or no (constrained-decoding test)".into(),
            system_prompt: Some("Answer yes or no.".into()),
            adapters: vec![AdapterSpec { name: "shaped-answers".into(), scale: 1.0, source: AdapterSource::Tuned }],
            answer: Some(AnswerConstraint::Choice { choices: vec!["yes".into(), "no".into()] }),
        }
    }

    fn convert_feedback(&self, record: &serde_json::Value) -> Result<Vec<Conversation>, String> {
        let field = |key: &str| record[key].as_str().map(str::to_string).ok_or(format!("a record needs a string `{key}`"));
        Ok(vec![Conversation {
            messages: vec![Message { role: "user".into(), content: field("text")? }, Message { role: "assistant".into(), content: field("answer")? }],
        }])
    }
}

export_plugin!(Shaped, Shaped);
