//! Gemma's chat template:
//!   <bos><start_of_turn>user\n{system}\n\n{user}<end_of_turn>\n
//!   <start_of_turn>model\n{assistant}<end_of_turn>\n … <start_of_turn>model\n
//! A system (or developer) message may only come first; it is prepended to the first user turn.
//! Turns then alternate user/assistant, starting with the user. Contents are trimmed.

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TemplateError {
    #[error("messages is empty")]
    Empty,
    #[error("messages[{0}]: a system message may only come first")]
    MisplacedSystem(usize),
    #[error("messages[{index}]: expected a `{expected}` turn (turns alternate user/assistant, starting with user)")]
    Alternation { index: usize, expected: &'static str },
    #[error("messages[{index}]: unknown role `{role}` (use system, developer, user or assistant)")]
    UnknownRole { index: usize, role: String },
}

/// A message reduced to its role and text.
pub struct Turn<'a> {
    pub role: &'a str,
    pub text: String,
}

/// The prompt text for `turns`, ending with the opening of the model's turn. `<bos>` is added by
/// the tokenizer, not here.
pub fn render(turns: &[Turn]) -> Result<String, TemplateError> {
    let mut turns = turns.iter().enumerate().peekable();
    let Some(&(_, first)) = turns.peek() else {
        return Err(TemplateError::Empty);
    };
    let mut system_prefix = String::new();
    let mut offset = 0;
    if matches!(first.role, "system" | "developer") {
        system_prefix = format!("{}\n\n", first.text.trim());
        turns.next();
        offset = 1;
    }
    let mut out = String::new();
    for (index, turn) in turns {
        let expected = if (index - offset) % 2 == 0 { "user" } else { "assistant" };
        match turn.role {
            "system" | "developer" => return Err(TemplateError::MisplacedSystem(index)),
            "user" | "assistant" if turn.role != expected => {
                return Err(TemplateError::Alternation { index, expected })
            }
            "user" | "assistant" => {}
            other => {
                return Err(TemplateError::UnknownRole {
                    index,
                    role: other.to_string(),
                })
            }
        }
        let role = if turn.role == "assistant" { "model" } else { "user" };
        let prefix = if index == offset { system_prefix.as_str() } else { "" };
        out.push_str(&format!(
            "<start_of_turn>{role}\n{prefix}{}<end_of_turn>\n",
            turn.text.trim()
        ));
    }
    if offset == 1 && out.is_empty() {
        // Only a system message: it still opens a user turn.
        out.push_str(&format!("<start_of_turn>user\n{}<end_of_turn>\n", system_prefix.trim_end()));
    }
    out.push_str("<start_of_turn>model\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn<'a>(role: &'a str, text: &str) -> Turn<'a> {
        Turn {
            role,
            text: text.to_string(),
        }
    }

    #[test]
    fn system_text_joins_the_first_user_turn() {
        let prompt = render(&[
            turn("system", "Be brief."),
            turn("user", " Hi "),
            turn("assistant", "Hello."),
            turn("user", "Bye"),
        ])
        .unwrap();
        assert_eq!(
            prompt,
            "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n\
             <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn roles_must_alternate_from_the_user() {
        assert_eq!(
            render(&[turn("assistant", "x")]),
            Err(TemplateError::Alternation {
                index: 0,
                expected: "user"
            })
        );
        assert_eq!(
            render(&[turn("user", "a"), turn("system", "b")]),
            Err(TemplateError::MisplacedSystem(1))
        );
        assert!(matches!(
            render(&[turn("tool", "a")]),
            Err(TemplateError::Alternation { .. }) | Err(TemplateError::UnknownRole { .. })
        ));
        assert_eq!(render(&[]), Err(TemplateError::Empty));
    }
}
