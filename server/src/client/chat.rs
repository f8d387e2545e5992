//! `tessera chat`: an interactive conversation, each answer streamed as it is generated.

use std::io::{BufRead, Write};

use futures::StreamExt;
use serde_json::{json, Value};

use super::{Client, ClientError};

/// Settings of a chat session.
pub struct ChatOptions {
    /// The model id (the base, an adapter or a plugin); `None`: the server's first model.
    pub model: Option<String>,
    pub system: Option<String>,
    pub temperature: f32,
    pub max_tokens: Option<u32>,
}

/// Reads a line at a time from standard input and streams each answer; the conversation is
/// kept, so later turns see earlier ones. An empty line or end of input ends the session.
pub async fn run(client: &Client, options: ChatOptions) -> Result<(), ClientError> {
    let model = match options.model {
        Some(model) => model,
        None => {
            let models = client.get("/v1/models").await?;
            models["data"][0]["id"].as_str().map(str::to_string).ok_or_else(|| ClientError::Invalid("the server lists no model".into()))?
        }
    };
    let mut messages: Vec<Value> = options.system.iter().map(|s| json!({"role": "system", "content": s})).collect();
    eprintln!("chatting with {model}; an empty line ends the session");
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        messages.push(json!({"role": "user", "content": line.trim_end()}));
        let body = json!({"model": model, "messages": messages, "stream": true, "temperature": options.temperature, "max_tokens": options.max_tokens});
        let answer = stream_answer(client, &body).await?;
        messages.push(json!({"role": "assistant", "content": answer}));
    }
}

/// Prints the answer's content deltas as they arrive and returns the whole answer.
async fn stream_answer(client: &Client, body: &Value) -> Result<String, ClientError> {
    let response = client.post_stream("/v1/chat/completions", body).await?;
    let mut stream = response.bytes_stream();
    let (mut pending, mut answer) = (Vec::<u8>::new(), String::new());
    let mut stdout = std::io::stdout();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ClientError::Invalid(format!("the stream broke: {e}")))?;
        pending.extend_from_slice(&chunk);
        // Server-sent events end with a blank line; a chunk may hold several, or part of one
        // (even part of a character).
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event = String::from_utf8_lossy(&pending.drain(..end + 2).collect::<Vec<u8>>()).into_owned();
            for data in event.lines().filter_map(|l| l.strip_prefix("data: ")) {
                if data == "[DONE]" {
                    continue;
                }
                let chunk: Value = serde_json::from_str(data).map_err(|e| ClientError::Invalid(format!("a stream event is not JSON: {e}")))?;
                if let Some(message) = chunk["error"]["message"].as_str() {
                    return Err(ClientError::Invalid(message.to_string()));
                }
                if let Some(text) = chunk["choices"][0]["delta"]["content"].as_str() {
                    answer.push_str(text);
                    print!("{text}");
                    stdout.flush()?;
                }
            }
        }
    }
    println!();
    Ok(answer)
}
