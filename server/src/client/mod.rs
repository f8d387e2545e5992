//! The command line's client side: subcommands that drive a running server through its HTTP API
//! (adapters, feedback, training and jobs, chat). Errors carry the server's own message, so the
//! command exits non-zero saying what the server said.

pub mod adapters;
pub mod chat;
pub mod commands;
pub mod jobs;
pub mod progress;

use reqwest::StatusCode;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error (OpenAI's shape: its message is shown).
    #[error("{message} (HTTP {status})")]
    Server { status: StatusCode, message: String },
    #[error("cannot reach {url}: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Invalid(String),
}

/// A connection to one server, with the key its requests present.
pub struct Client {
    http: reqwest::Client,
    url: String,
    key: Option<String>,
}

impl Client {
    /// `url` is the server's root (`http://127.0.0.1:8080`); a trailing `/v1` is dropped.
    pub fn new(url: &str, key: Option<String>) -> Self {
        let url = url.trim_end_matches('/').trim_end_matches("/v1").to_string();
        Self { http: reqwest::Client::new(), url, key }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.url));
        match &self.key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    /// Sends `request`; an error status becomes [`ClientError::Server`] with the server's message.
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let response = request.send().await.map_err(|source| ClientError::Unreachable { url: self.url.clone(), source })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(body);
        Err(ClientError::Server { status, message })
    }

    async fn json(&self, request: reqwest::RequestBuilder) -> Result<Value, ClientError> {
        let response = self.send(request).await?;
        response.json().await.map_err(|e| ClientError::Invalid(format!("the server's answer is not JSON: {e}")))
    }

    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.json(self.request(reqwest::Method::GET, path)).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.json(self.request(reqwest::Method::POST, path).json(body)).await
    }

    pub async fn post_bytes(&self, path: &str, content_type: &str, body: Vec<u8>) -> Result<Value, ClientError> {
        self.json(self.request(reqwest::Method::POST, path).header(reqwest::header::CONTENT_TYPE, content_type).body(body)).await
    }

    pub async fn post_form(&self, path: &str, form: reqwest::multipart::Form) -> Result<Value, ClientError> {
        self.json(self.request(reqwest::Method::POST, path).multipart(form)).await
    }

    pub async fn delete(&self, path: &str) -> Result<Value, ClientError> {
        self.json(self.request(reqwest::Method::DELETE, path)).await
    }

    /// The body of `GET path` as bytes.
    pub async fn download(&self, path: &str) -> Result<Vec<u8>, ClientError> {
        let response = self.send(self.request(reqwest::Method::GET, path)).await?;
        let bytes = response.bytes().await.map_err(|source| ClientError::Unreachable { url: self.url.clone(), source })?;
        Ok(bytes.to_vec())
    }

    /// A streaming `POST path`: the response, to read as server-sent events.
    pub async fn post_stream(&self, path: &str, body: &Value) -> Result<reqwest::Response, ClientError> {
        self.send(self.request(reqwest::Method::POST, path).json(body)).await
    }
}

/// How a command prints what it got: for people, or one JSON document for scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Human,
    Json,
}

impl Output {
    pub fn new(json: bool) -> Self {
        if json {
            Self::Json
        } else {
            Self::Human
        }
    }

    /// Prints `value` as JSON, or `human` of it.
    pub fn print(self, value: &Value, human: impl FnOnce(&Value) -> String) {
        match self {
            Self::Json => println!("{}", serde_json::to_string_pretty(value).unwrap_or_default()),
            Self::Human => println!("{}", human(value)),
        }
    }
}

/// A path segment, percent-encoded.
pub fn segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
