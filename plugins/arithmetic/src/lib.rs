//! Goat-style arithmetic: "What is a op b?" answered as "a op b = c". The response hook checks
//! the model's result by computing it, and corrects it when wrong; `{a, op, b}` records become
//! pairs.

use tessera_plugin_api::{export_plugin, last_user_text, AdapterSource, AnswerConstraint, AdapterSpec, CheckResponse, Conversation, DomainPlugin, Message, PluginInfo};

pub struct Arithmetic;

/// An integer result, with " R r" for the remainder of an inexact division.
const RESULT: &str = "-?[0-9]{1,40}( R -?[0-9]{1,40})?";

/// `text` as a regular expression that matches only itself.
fn regex_literal(text: &str) -> String {
    text.chars().map(|c| if "\\.+*?()|[]{}^$".contains(c) { format!("\\{c}") } else { c.to_string() }).collect()
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Problem {
    pub a: i128,
    pub op: char,
    pub b: i128,
}

impl Problem {
    /// The first `a op b` in the text (integers; op one of + − × ÷ as `+ - * /`).
    pub fn find(text: &str) -> Option<Self> {
        let tokens: Vec<String> = text
            .replace(['?', '=', ','], " ")
            .replace('x', " * ")
            .split_whitespace()
            .map(str::to_string)
            .collect();
        tokens.windows(3).find_map(|w| {
            let a = w[0].parse().ok()?;
            let op = match w[1].as_str() {
                "+" | "plus" => '+',
                "-" | "minus" => '-',
                "*" | "×" | "times" => '*',
                "/" | "÷" => '/',
                _ => return None,
            };
            let b = w[2].parse().ok()?;
            Some(Self { a, op, b })
        })
    }

    /// The exact result: an integer, or for a division that does not come out whole,
    /// "q R r" (quotient and remainder, as Goat writes it).
    pub fn solve(&self) -> Result<String, String> {
        let overflow = || "the result overflows".to_string();
        Ok(match self.op {
            '+' => self.a.checked_add(self.b).ok_or_else(overflow)?.to_string(),
            '-' => self.a.checked_sub(self.b).ok_or_else(overflow)?.to_string(),
            '*' => self.a.checked_mul(self.b).ok_or_else(overflow)?.to_string(),
            _ if self.b == 0 => return Err("division by zero".into()),
            _ if self.a % self.b == 0 => (self.a / self.b).to_string(),
            _ => format!("{} R {}", self.a / self.b, self.a % self.b),
        })
    }

    pub fn question(&self) -> String {
        format!("What is {} {} {}?", self.a, self.op, self.b)
    }

    pub fn answer(&self) -> Result<String, String> {
        Ok(format!("{} {} {} = {}", self.a, self.op, self.b, self.solve()?))
    }
}

impl DomainPlugin for Arithmetic {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: "arithmetic".into(),
            version: "1.0.0".into(),
            description: "Integer arithmetic (+ - * /), answers checked by computing them".into(),
            system_prompt: None,
            adapters: vec![AdapterSpec {
                name: "arithmetic".into(),
                scale: 1.0,
                source: AdapterSource::Tuned,
            }],
            // "a op b = c": the problem, then an integer (with its remainder for an inexact
            // division). Each request narrows it to its own problem (`answer_shape`).
            answer: Some(AnswerConstraint::Regex { pattern: format!(r"-?[0-9]+ [-+*/] -?[0-9]+ = {RESULT}") }),
        }
    }

    fn rewrite_request(&self, messages: Vec<Message>) -> Result<Vec<Message>, String> {
        let text = last_user_text(&messages).ok_or("no user message with a problem")?;
        let problem = Problem::find(text).ok_or("no `a op b` problem (integers, + - * /) in the message")?;
        Ok(vec![Message { role: "user".into(), content: problem.question() }])
    }

    fn answer_shape(&self, messages: &[Message]) -> Option<AnswerConstraint> {
        let problem = last_user_text(messages).and_then(Problem::find)?;
        let stated = format!("{} {} {} = ", problem.a, problem.op, problem.b);
        Some(AnswerConstraint::Regex { pattern: format!("{}{RESULT}", regex_literal(&stated)) })
    }

    fn check_response(&self, messages: &[Message], answer: &str) -> Result<CheckResponse, String> {
        let problem = last_user_text(messages).and_then(Problem::find).ok_or("no problem to check")?;
        let expected = problem.solve()?;
        let given = answer.rsplit('=').next().unwrap_or(answer).trim().trim_end_matches('.').to_string();
        let valid = given == expected;
        Ok(CheckResponse {
            answer: problem.answer()?,
            valid,
            note: (!valid).then(|| format!("corrected: the model answered `{}`", answer.trim())),
        })
    }

    fn convert_feedback(&self, record: &serde_json::Value) -> Result<Vec<Conversation>, String> {
        let number = |key: &str| {
            record[key]
                .as_i64()
                .map(i128::from)
                .ok_or_else(|| format!("an arithmetic record needs an integer `{key}`"))
        };
        let op = match record["op"].as_str() {
            Some(op @ ("+" | "-" | "*" | "/")) => op.chars().next().unwrap_or('+'),
            _ => return Err("`op` must be one of + - * /".into()),
        };
        let problem = Problem { a: number("a")?, op, b: number("b")? };
        Ok(vec![Conversation {
            messages: vec![
                Message { role: "user".into(), content: problem.question() },
                Message { role: "assistant".into(), content: problem.answer()? },
            ],
        }])
    }
}

export_plugin!(Arithmetic, Arithmetic);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_are_found_solved_and_checked() {
        let p = Problem::find("Please compute 1234 * 56?").unwrap();
        assert_eq!(p.answer().unwrap(), "1234 * 56 = 69104");
        assert_eq!(Problem::find("17 / 5").unwrap().solve().unwrap(), "3 R 2");
        let messages = vec![Message { role: "user".into(), content: p.question() }];
        assert!(Arithmetic.check_response(&messages, "1234 * 56 = 69104").unwrap().valid);
        let wrong = Arithmetic.check_response(&messages, "1234 * 56 = 69000").unwrap();
        assert_eq!((wrong.valid, wrong.answer.as_str()), (false, "1234 * 56 = 69104"));
        assert!(Problem::find("8 / 0").unwrap().solve().is_err());
    }

    #[test]
    fn records_convert() {
        let pairs = Arithmetic.convert_feedback(&serde_json::json!({"a": 12, "op": "-", "b": 30})).unwrap();
        assert_eq!(pairs[0].messages[1].content, "12 - 30 = -18");
        assert!(Arithmetic.convert_feedback(&serde_json::json!({"a": 1, "op": "^", "b": 2})).is_err());
    }
}
