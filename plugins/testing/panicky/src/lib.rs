//! A plugin that loads fine, then panics in every hook (and returns garbage from the converter):
//! the server must contain it.

use tessera_plugin_api::{export_plugin, AdapterSource, AdapterSpec, CheckResponse, Conversation, DomainPlugin, Message, PluginInfo};

pub struct Panicky;

impl DomainPlugin for Panicky {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: "panicky".into(),
            version: "0.0.1".into(),
            description: "Panics on every request (containment test)".into(),
            system_prompt: None,
            adapters: vec![AdapterSpec { name: "panicky".into(), scale: 1.0, source: AdapterSource::Tuned }],
            answer: None,
        }
    }

    fn rewrite_request(&self, _messages: Vec<Message>) -> Result<Vec<Message>, String> {
        panic!("deliberate panic in rewrite_request")
    }

    fn check_response(&self, _messages: &[Message], _answer: &str) -> Result<CheckResponse, String> {
        panic!("deliberate panic in check_response")
    }

    fn convert_feedback(&self, _record: &serde_json::Value) -> Result<Vec<Conversation>, String> {
        panic!("deliberate panic in convert_feedback")
    }
}

export_plugin!(Panicky, Panicky);
