//! Adapters from both non-tuned sources, for the tiny synthetic model of the tests: one embedded
//! in the library (served through `adapter_file`), one shipped as PEFT files beside it.
//! `adapter/` holds a random rank-2 q_proj LoRA shaped for that model.

use tessera_plugin_api::{export_plugin, AdapterSource, AdapterSpec, Conversation, DomainPlugin, PluginInfo};

pub struct Embedded;

impl DomainPlugin for Embedded {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: "embedded".into(),
            version: "0.1.0".into(),
            description: "Adapters embedded in the library and shipped beside it (test)".into(),
            system_prompt: Some("Answer briefly.".into()),
            adapters: vec![
                AdapterSpec { name: "embedded-q".into(), scale: 0.5, source: AdapterSource::Embedded },
                AdapterSpec {
                    name: "shipped-q".into(),
                    scale: 1.0,
                    source: AdapterSource::Files { dir: "shipped-q".into() },
                },
            ],
            answer: None,
        }
    }

    fn convert_feedback(&self, _record: &serde_json::Value) -> Result<Vec<Conversation>, String> {
        Err("this plugin takes no feedback".into())
    }

    fn adapter_file(&self, adapter: &str, file: &str) -> Option<&'static [u8]> {
        match (adapter, file) {
            ("embedded-q", "adapter_config.json") => Some(include_bytes!("../adapter/adapter_config.json")),
            ("embedded-q", "adapter_model.safetensors") => Some(include_bytes!("../adapter/adapter_model.safetensors")),
            _ => None,
        }
    }
}

export_plugin!(Embedded, Embedded);
