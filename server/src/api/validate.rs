//! From HTTP bodies to the engine's validated requests. Every check names the offending field.

use crate::api::error::AppError;
use crate::api::types::{ChatMessage, MessageContent, SamplingFields, StopSpec};
use crate::sampler::SamplingParams;
use crate::services::inference::{AdapterChoice, Generation};

/// The most choices one request may ask for.
pub const MAX_N: u32 = 8;
/// OpenAI's limit on stop sequences.
pub const MAX_STOP: usize = 4;

/// Sampling settings common to both endpoints, checked.
pub struct Sampling {
    pub params: SamplingParams,
    pub n: usize,
    pub stop_strings: Vec<String>,
    pub ignore_eos: bool,
    pub stream: bool,
    pub include_usage: bool,
}

fn check_range(param: &str, value: Option<f32>, lo: f32, hi: f32) -> Result<(), AppError> {
    match value {
        Some(v) if !(lo..=hi).contains(&v) || v.is_nan() => Err(AppError::invalid(
            param,
            format!("`{param}` must be between {lo} and {hi}, got {v}"),
        )),
        _ => Ok(()),
    }
}

pub fn sampling(f: &SamplingFields) -> Result<Sampling, AppError> {
    check_range("temperature", f.temperature, 0.0, 2.0)?;
    check_range("frequency_penalty", f.frequency_penalty, -2.0, 2.0)?;
    check_range("presence_penalty", f.presence_penalty, -2.0, 2.0)?;
    check_range("min_p", f.min_p, 0.0, 1.0)?;
    if let Some(p) = f.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(AppError::invalid("top_p", format!("`top_p` must be in (0, 1], got {p}")));
        }
    }
    if let Some(r) = f.repetition_penalty {
        if !(r > 0.0 && r <= 10.0) {
            return Err(AppError::invalid(
                "repetition_penalty",
                format!("`repetition_penalty` must be in (0, 10], got {r}"),
            ));
        }
    }
    let top_k = match f.top_k {
        None | Some(0) | Some(-1) => None,
        Some(k) if k > 0 => Some(k as usize),
        Some(k) => {
            return Err(AppError::invalid(
                "top_k",
                format!("`top_k` must be positive, or 0 or -1 to turn it off; got {k}"),
            ))
        }
    };
    let n = f.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(AppError::invalid("n", format!("`n` must be between 1 and {MAX_N}, got {n}")));
    }
    let stop_strings = match &f.stop {
        None => Vec::new(),
        Some(StopSpec::One(s)) => vec![s.clone()],
        Some(StopSpec::Many(v)) => v.clone(),
    };
    if stop_strings.len() > MAX_STOP {
        return Err(AppError::invalid(
            "stop",
            format!("at most {MAX_STOP} stop sequences are allowed, got {}", stop_strings.len()),
        ));
    }
    if stop_strings.iter().any(String::is_empty) {
        return Err(AppError::invalid("stop", "stop sequences must not be empty"));
    }
    let stream = f.stream.unwrap_or(false);
    if f.stream_options.is_some() && !stream {
        return Err(AppError::invalid("stream_options", "`stream_options` needs `stream: true`"));
    }
    let seed = match f.seed {
        Some(s) => s as u64,
        None => rand::random(),
    };
    Ok(Sampling {
        params: SamplingParams {
            temperature: f.temperature.unwrap_or(1.0),
            top_p: f.top_p.unwrap_or(1.0),
            top_k,
            min_p: f.min_p.unwrap_or(0.0),
            seed,
            frequency_penalty: f.frequency_penalty.unwrap_or(0.0),
            presence_penalty: f.presence_penalty.unwrap_or(0.0),
            repetition_penalty: f.repetition_penalty.unwrap_or(1.0),
        },
        n: n as usize,
        stop_strings,
        ignore_eos: f.ignore_eos.unwrap_or(false),
        stream,
        include_usage: f.stream_options.as_ref().is_some_and(|o| o.include_usage),
    })
}

/// How each choice generates: the checked sampling settings, with `max_tokens` (`None`: what
/// the context leaves) and the logprobs asked for.
pub fn generation(sampling: &Sampling, max_tokens: Option<usize>, logprobs: Option<usize>, prompt_logprobs: bool) -> Generation {
    Generation {
        max_tokens,
        n: sampling.n,
        sampling: sampling.params.clone(),
        stop_strings: sampling.stop_strings.clone(),
        ignore_eos: sampling.ignore_eos,
        logprobs,
        prompt_logprobs,
    }
}

/// Each message's role and text (content parts joined; only text parts are accepted).
pub fn message_texts(messages: &[ChatMessage]) -> Result<Vec<(String, String)>, AppError> {
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let text = match &m.content {
            None => String::new(),
            Some(MessageContent::Text(t)) => t.clone(),
            Some(MessageContent::Parts(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    match (part.r#type.as_str(), &part.text) {
                        ("text", Some(t)) => text.push_str(t),
                        (kind, _) => {
                            return Err(AppError::invalid(
                                &format!("messages[{i}].content[{j}]"),
                                format!("content parts of type `{kind}` are not supported; send text"),
                            ))
                        }
                    }
                }
                text
            }
        };
        out.push((m.role.clone(), text));
    }
    Ok(out)
}

/// The request's own adapter composition (`adapters`), each scale defaulting to 1.
pub fn adapters(f: &SamplingFields) -> Vec<AdapterChoice> {
    f.adapters.iter().flatten().map(|a| AdapterChoice { name: a.name.clone(), scale: a.scale.unwrap_or(1.0) }).collect()
}
