//! Chat templates: the model's own `tokenizer.chat_template` (Jinja), rendered with `minijinja`
//! the way Hugging Face `transformers` renders it (`trim_blocks`, `lstrip_blocks`, Python string
//! methods, `raise_exception`, `tojson`), with `messages`, `add_generation_prompt`, `bos_token`
//! and `eos_token`.
//!
//! Where it comes from, first match wins: `--chat-template FILE`; the file's own template; for
//! a Gemma file without one, Gemma's template (below); otherwise ChatML, with a warning.
//!
//! A leading BOS text is removed from the rendered prompt: tokenization adds the BOS token
//! itself, as llama.cpp does.

use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;

/// Gemma's turns: `<start_of_turn>user\n{system}\n\n{user}<end_of_turn>\n<start_of_turn>model\n…`.
/// A system message may only come first and joins the first user turn; turns then alternate
/// user/assistant from the user; contents are trimmed.
const GEMMA: &str = r#"{{ bos_token }}
{%- if messages | length == 0 %}{{ raise_exception("messages is empty") }}{% endif %}
{%- if messages[0].role == 'system' %}
    {%- set first_user_prefix = (messages[0].content | trim) ~ '\n\n' %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set first_user_prefix = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message.role not in ['user', 'assistant'] %}
        {{- raise_exception('messages[' ~ (loop.index0 + messages|length - loop_messages|length) ~ ']: role `' ~ message.role ~ '` may not appear here (a system message may only come first; then user and assistant turns)') }}
    {%- endif %}
    {%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('messages[' ~ (loop.index0 + messages|length - loop_messages|length) ~ ']: turns alternate user/assistant, starting with user') }}
    {%- endif %}
    {{- '<start_of_turn>' ~ ('model' if message.role == 'assistant' else 'user') ~ '\n' ~ (first_user_prefix if loop.first else '') ~ (message.content | trim) ~ '<end_of_turn>\n' }}
{%- endfor %}
{%- if loop_messages | length == 0 %}{{ '<start_of_turn>user\n' ~ (messages[0].content | trim) ~ '<end_of_turn>\n' }}{% endif %}
{%- if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"#;

/// ChatML (`<|im_start|>role\n…<|im_end|>\n`), for models that bring no template.
const CHATML: &str = r#"{%- for message in messages %}
    {{- '<|im_start|>' ~ message.role ~ '\n' ~ message.content ~ '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"#;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("messages is empty")]
    Empty,
    #[error("the chat template ({source_name}) does not compile: {reason}")]
    Compile { source_name: String, reason: String },
    #[error("the chat template could not render these messages: {0}")]
    Render(String),
}

/// Where a model's template came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateSource {
    /// `--chat-template FILE`.
    Override(String),
    /// The file's `tokenizer.chat_template`.
    Model,
    /// Gemma's, for a Gemma file without one.
    BuiltInGemma,
    /// ChatML, for a model without one.
    ChatMl,
}

impl std::fmt::Display for TemplateSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TemplateSource::Override(path) => write!(f, "{path}"),
            TemplateSource::Model => write!(f, "the model's tokenizer.chat_template"),
            TemplateSource::BuiltInGemma => write!(f, "the built-in Gemma template"),
            TemplateSource::ChatMl => write!(f, "the built-in ChatML template"),
        }
    }
}

/// One message as the template sees it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Turn<'a> {
    pub role: &'a str,
    #[serde(rename = "content")]
    pub text: String,
    /// An assistant turn's calls, in OpenAI's shape with `function.arguments` as an object
    /// (templates write it with `tojson`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<serde_json::Value>,
    /// A `tool` turn: the call it answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    source: TemplateSource,
    bos_token: String,
    eos_token: String,
    /// Whether the template renders `tools` (otherwise they are shown by a fallback prompt).
    renders_tools: bool,
    tool_syntax: crate::tool_calls::ToolSyntax,
}

const NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles `text` from `source`; `bos_token` and `eos_token` are the model's.
    pub fn new(text: String, source: TemplateSource, bos_token: String, eos_token: String) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TemplateError::Compile {
                source_name: source.to_string(),
                reason: describe(&e),
            })?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        let renders_tools = text.contains("tools");
        let tool_syntax = crate::tool_calls::ToolSyntax::of_template(&text);
        env.add_template_owned(NAME, text).map_err(|e| TemplateError::Compile {
            source_name: source.to_string(),
            reason: describe(&e),
        })?;
        Ok(Self {
            env,
            source,
            bos_token,
            eos_token,
            renders_tools,
            tool_syntax,
        })
    }

    /// The template a model uses: `override_text` (with its path), else the file's, else the
    /// family's default.
    pub fn select(model_template: Option<&str>, override_file: Option<(String, String)>, gemma: bool, bos_token: String, eos_token: String) -> Result<Self, TemplateError> {
        let (text, source) = match (override_file, model_template) {
            (Some((path, text)), _) => (text, TemplateSource::Override(path)),
            (None, Some(text)) => (text.to_string(), TemplateSource::Model),
            (None, None) if gemma => (GEMMA.to_string(), TemplateSource::BuiltInGemma),
            (None, None) => {
                tracing::warn!("the model has no chat template and none was given (--chat-template): chat uses ChatML");
                (CHATML.to_string(), TemplateSource::ChatMl)
            }
        };
        Self::new(text, source, bos_token, eos_token)
    }

    pub fn source(&self) -> &TemplateSource {
        &self.source
    }

    /// Whether the template itself shows the model `tools`.
    pub fn renders_tools(&self) -> bool {
        self.renders_tools
    }

    /// The call syntax the template teaches (Hermes where it teaches none).
    pub fn tool_syntax(&self) -> crate::tool_calls::ToolSyntax {
        if self.renders_tools { self.tool_syntax } else { crate::tool_calls::ToolSyntax::Hermes }
    }

    /// The prompt text of `turns`; with `add_generation_prompt`, ending with the opening of the
    /// assistant's turn. A `developer` message is a `system` one. Without the leading BOS text.
    pub fn render(&self, turns: &[Turn], add_generation_prompt: bool) -> Result<String, TemplateError> {
        self.render_with_tools(turns, add_generation_prompt, &[])
    }

    /// [`render`](Self::render) with `tools` (OpenAI's tool objects) for templates that show
    /// them; an empty list is no tools.
    pub fn render_with_tools(&self, turns: &[Turn], add_generation_prompt: bool, tools: &[serde_json::Value]) -> Result<String, TemplateError> {
        if turns.is_empty() {
            return Err(TemplateError::Empty);
        }
        let messages: Vec<Turn> = turns
            .iter()
            .map(|t| Turn {
                role: if t.role == "developer" { "system" } else { t.role },
                ..t.clone()
            })
            .collect();
        let tools = (!tools.is_empty()).then(|| Value::from(minijinja::value::Serde(tools)));
        let template = self.env.get_template(NAME).map_err(|e| TemplateError::Render(describe(&e)))?;
        let text = template
            .render(minijinja::context! {
                messages => Value::from(minijinja::value::Serde(&messages)),
                add_generation_prompt => add_generation_prompt,
                tools => tools,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| TemplateError::Render(describe(&e)))?;
        Ok(match text.strip_prefix(self.bos_token.as_str()) {
            Some(rest) if !self.bos_token.is_empty() => rest.to_string(),
            _ => text,
        })
    }
}

/// An error's message without minijinja's source excerpt; `raise_exception`'s own text as is.
fn describe(e: &Error) -> String {
    match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(detail)) => detail.to_string(),
        _ => e.to_string(),
    }
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)` (Llama 3.1's templates date their system prompt): the UTC date, with
/// `%d`, `%m`, `%Y`, `%b` and `%B`.
fn strftime_now(format: String) -> String {
    const MONTHS: [&str; 12] = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    let (year, month, day) = civil_from_days(days);
    let month_name = MONTHS[(month - 1) as usize];
    format
        .replace("%d", &format!("{day:02}"))
        .replace("%m", &format!("{month:02}"))
        .replace("%Y", &year.to_string())
        .replace("%B", month_name)
        .replace("%b", &month_name[..3])
}

/// (year, month, day) of a count of days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// `tojson` as Python's `json.dumps(value, ensure_ascii=False)` writes it: keys in their order,
/// `", "` and `": "` separators, which templates rely on for tool definitions; `indent` is
/// honoured.
fn tojson(value: Value, indent: Option<usize>, kwargs: minijinja::value::Kwargs) -> Result<Value, Error> {
    // Llama 3.1's template writes `tojson(indent=4)`.
    let indent = match indent {
        Some(indent) => Some(indent),
        None => kwargs.get::<Option<usize>>("indent")?,
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&value, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(value: &Value, indent: Option<usize>, depth: usize, out: &mut String) -> Result<(), Error> {
    use minijinja::value::ValueKind;
    let newline = |out: &mut String, depth: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * depth));
        }
    };
    let separator = if indent.is_some() { "," } else { ", " };
    let quoted = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&value.to_string()),
        ValueKind::String => out.push_str(&quoted(value.as_str().unwrap_or_default())),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(separator);
                }
                newline(out, depth + 1);
                write_json(item, indent, depth + 1, out)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = value.try_iter()?.collect();
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(separator);
                }
                newline(out, depth + 1);
                out.push_str(&quoted(&key.to_string()));
                out.push_str(": ");
                write_json(&value.get_item(key)?, indent, depth + 1, out)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => out.push_str(&quoted(&value.to_string())),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn<'a>(role: &'a str, text: &str) -> Turn<'a> {
        Turn {
            role,
            text: text.to_string(),
            ..Default::default()
        }
    }

    fn gemma() -> ChatTemplate {
        ChatTemplate::select(None, None, true, "<bos>".into(), "<eos>".into()).unwrap()
    }

    #[test]
    fn system_text_joins_the_first_user_turn() {
        let prompt = gemma()
            .render(
                &[
                    turn("system", "Be brief."),
                    turn("user", " Hi "),
                    turn("assistant", "Hello."),
                    turn("user", "Bye"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(
            prompt,
            "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n\
             <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
        let only_system = gemma().render(&[turn("developer", "Be brief.")], false).unwrap();
        assert_eq!(only_system, "<start_of_turn>user\nBe brief.<end_of_turn>\n");
    }

    #[test]
    fn roles_must_alternate_from_the_user() {
        let error = |turns: &[Turn]| gemma().render(turns, true).unwrap_err().to_string();
        assert!(error(&[turn("assistant", "x")]).contains("messages[0]: turns alternate"), "{}", error(&[turn("assistant", "x")]));
        assert!(error(&[turn("user", "a"), turn("system", "b")]).contains("messages[1]: role `system` may not appear here"));
        assert!(error(&[turn("system", "s"), turn("user", "a"), turn("user", "b")]).contains("messages[2]"));
        assert!(error(&[turn("tool", "a")]).contains("role `tool`"));
        assert!(matches!(gemma().render(&[], true), Err(TemplateError::Empty)));
    }

    #[test]
    fn templates_get_python_string_methods_and_their_errors_are_reported() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m.content.strip().upper() }}{% if m.content.startswith(' h') %}!{% endif %}{% endfor %}{{ messages | tojson }}".into(),
            TemplateSource::Model,
            String::new(),
            String::new(),
        )
        .unwrap();
        assert_eq!(t.render(&[turn("user", " hi ")], false).unwrap(), r#"HI![{"role": "user", "content": " hi "}]"#);
        let indented = ChatTemplate::new("{{ messages[0] | tojson(indent=2) }}|{{ messages[0] | tojson(2) }}".into(), TemplateSource::Model, String::new(), String::new()).unwrap();
        let block = "{\n  \"role\": \"user\",\n  \"content\": \"x\"\n}";
        assert_eq!(indented.render(&[turn("user", "x")], false).unwrap(), format!("{block}|{block}"));
        let failing = ChatTemplate::new("{{ raise_exception('no tools here') }}".into(), TemplateSource::Model, String::new(), String::new()).unwrap();
        assert_eq!(failing.render(&[turn("user", "x")], true).unwrap_err().to_string(), "the chat template could not render these messages: no tools here");
        assert!(matches!(
            ChatTemplate::new("{% for %}".into(), TemplateSource::Model, String::new(), String::new()),
            Err(TemplateError::Compile { .. })
        ));
    }

    #[test]
    fn the_leading_bos_text_is_left_to_the_tokenizer() {
        let t = ChatTemplate::new("{{ bos_token }}[{{ messages[0].content }}]".into(), TemplateSource::Model, "<s>".into(), "</s>".into()).unwrap();
        assert_eq!(t.render(&[turn("user", "x")], true).unwrap(), "[x]");
    }

    #[test]
    fn dates_are_civil() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_790), (2026, 12, 3));
    }
}
