//! Intent classification for the banking domain (CLINC150's banking intents): the prompt lists
//! the label set, answers are normalised onto it, and `{text, intent}` records become pairs.

use tessera_plugin_api::{export_plugin, last_user_text, AdapterSource, AnswerConstraint, AdapterSpec, CheckResponse, Conversation, DomainPlugin, Message, PluginInfo};

pub const LABELS: [&str; 15] = [
    "freeze_account",
    "routing",
    "pin_change",
    "bill_due",
    "pay_bill",
    "account_blocked",
    "interest_rate",
    "min_payment",
    "bill_balance",
    "transfer",
    "order_checks",
    "balance",
    "spending_history",
    "transactions",
    "report_fraud",
];

pub struct Intent;

/// The instruction the model is tuned on and prompted with.
pub fn prompt(utterance: &str) -> String {
    format!(
        "Classify the intent of the utterance. Answer with one label from: {}.\nUtterance: {}",
        LABELS.join(", "),
        utterance.trim()
    )
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let current = row[j + 1];
            row[j + 1] = (previous + usize::from(ca != cb)).min(row[j] + 1).min(row[j + 1] + 1);
            previous = current;
        }
    }
    row[b.len()]
}

/// The label an answer means, and whether it was exactly that label: itself, itself once cased
/// and spaced like the labels, a label it contains, else the nearest by edit distance.
pub fn normalise(answer: &str) -> (&'static str, bool) {
    let cleaned: String = answer
        .trim()
        .to_lowercase()
        .chars()
        .map(|c| if c.is_whitespace() || c == '-' { '_' } else { c })
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    if let Some(label) = LABELS.iter().find(|l| **l == answer.trim()) {
        return (label, true);
    }
    if let Some(label) = LABELS.iter().find(|l| **l == cleaned) {
        return (label, false);
    }
    if let Some(label) = LABELS.iter().filter(|l| cleaned.contains(**l)).max_by_key(|l| l.len()) {
        return (label, false);
    }
    let nearest = LABELS.iter().min_by_key(|l| levenshtein(&cleaned, l)).copied().unwrap_or(LABELS[0]);
    (nearest, false)
}

impl DomainPlugin for Intent {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: "intent".into(),
            version: format!("1.0.0+build.{}", option_env!("TESSERA_PLUGIN_BUILD").unwrap_or("0")),
            description: "Banking intent classification onto CLINC150's 15 banking labels".into(),
            system_prompt: None,
            adapters: vec![AdapterSpec {
                name: "intent".into(),
                scale: 1.0,
                source: AdapterSource::Tuned,
            }],
            // Answers are decoded onto the label set; the check hook still guards what
            // older servers, which do not enforce this, return.
            answer: Some(AnswerConstraint::Choice { choices: LABELS.iter().map(|l| l.to_string()).collect() }),
        }
    }

    fn rewrite_request(&self, messages: Vec<Message>) -> Result<Vec<Message>, String> {
        let utterance = last_user_text(&messages).ok_or("no user message to classify")?;
        Ok(vec![Message {
            role: "user".into(),
            content: prompt(utterance),
        }])
    }

    fn check_response(&self, _messages: &[Message], answer: &str) -> Result<CheckResponse, String> {
        let (label, valid) = normalise(answer);
        Ok(CheckResponse {
            answer: label.to_string(),
            valid,
            note: (!valid).then(|| format!("`{}` mapped onto the label set", answer.trim())),
        })
    }

    fn convert_feedback(&self, record: &serde_json::Value) -> Result<Vec<Conversation>, String> {
        let text = record["text"].as_str().ok_or("an intent record needs a string `text`")?;
        let intent = record["intent"].as_str().ok_or("an intent record needs a string `intent`")?;
        if !LABELS.contains(&intent) {
            return Err(format!("`{intent}` is not one of the plugin's labels: {}", LABELS.join(", ")));
        }
        Ok(vec![Conversation {
            messages: vec![
                Message { role: "user".into(), content: prompt(text) },
                Message { role: "assistant".into(), content: intent.into() },
            ],
        }])
    }
}

export_plugin!(Intent, Intent);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_land_on_the_label_set() {
        assert_eq!(normalise("transfer"), ("transfer", true));
        assert_eq!(normalise(" Pay bill."), ("pay_bill", false));
        assert_eq!(normalise("the intent is report_fraud"), ("report_fraud", false));
        assert_eq!(normalise("balanse"), ("balance", false));
    }

    #[test]
    fn records_convert_and_unknown_intents_are_refused() {
        let pairs = Intent.convert_feedback(&serde_json::json!({"text": "what's my balance", "intent": "balance"})).unwrap();
        assert_eq!(pairs[0].messages[1].content, "balance");
        assert!(pairs[0].messages[0].content.ends_with("Utterance: what's my balance"));
        assert!(Intent.convert_feedback(&serde_json::json!({"text": "x", "intent": "weather"})).is_err());
    }
}
