//! Running batches: a thread of the server claims unfinished batches from the store (its own,
//! those a crashed server left, or another server's whose claim expired), runs the lines that
//! have no result yet a few at a time as background work, records each result as it finishes,
//! and writes the output and error files at the end.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use serde_json::{json, Value};

use super::{input_lines, OUTPUT_PURPOSE};
use crate::services::{blocking, ServiceError};
use crate::store::batches::{BatchClaim, BatchRow, BatchStatus, LineResult};
use crate::store::{unix_time, FileRow, Store};
use crate::train::job::new_id;

/// Lines of one batch in flight at once: enough to fill idle engine steps, few enough that
/// interactive requests always find room in the queue.
const LINES_IN_FLIGHT: usize = 8;

/// How often an idle runner looks for batches other servers left (a local create wakes it).
const POLL: Duration = Duration::from_secs(1);

/// How often a running batch's claim is renewed and its status (a cancel) looked at.
const HEARTBEAT: Duration = Duration::from_secs(3);

/// One line's request, as it goes to its endpoint.
#[derive(Debug, Clone)]
pub struct LineRequest {
    pub url: String,
    pub body: Value,
}

/// What the endpoint answered.
#[derive(Debug, Clone)]
pub struct LineResponse {
    pub status_code: u16,
    pub body: Value,
}

/// Runs a line's request exactly as its endpoint answers a client, as background work.
pub trait LineRunner: Send + Sync + 'static {
    /// `None` once the server is going away: the line is left for a resumed run.
    fn run(&self, request: LineRequest) -> BoxFuture<'static, Option<LineResponse>>;

    /// Whether the server still serves (the runner stops when not).
    fn is_alive(&self) -> bool;
}

pub(super) fn spawn(store: Arc<Store>, lines: Arc<dyn LineRunner>, wake: Arc<tokio::sync::Notify>) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let server = new_id("server");
    std::thread::Builder::new().name("tessera-batches".into()).spawn(move || {
        runtime.block_on(Runner { store, lines, server, wake }.serve());
    })?;
    Ok(())
}

struct Runner {
    store: Arc<Store>,
    lines: Arc<dyn LineRunner>,
    /// This server's name in batch claims.
    server: String,
    /// Rung by a create or a cancel on this server.
    wake: Arc<tokio::sync::Notify>,
}

/// How a batch's run ended.
enum Outcome {
    /// Every line has its result, or the batch was cancelled: write the files.
    Finished,
    /// The claim went to another server, or this one is stopping: leave the batch as it is.
    Abandoned,
}

impl Runner {
    async fn serve(self) {
        while self.lines.is_alive() {
            let store = self.store.clone();
            let server = self.server.clone();
            match blocking(move || Ok(store.claim_batch(&server)?)).await {
                Ok(Some(claim)) => {
                    tracing::info!(batch = %claim.batch, server = %claim.server, "batch claimed");
                    if let Err(e) = self.run(&claim).await {
                        tracing::error!(batch = %claim.batch, error = %e, "batch run failed; it resumes once its claim expires");
                    }
                }
                Ok(None) => {
                    let _ = tokio::time::timeout(POLL, self.wake.notified()).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "claiming a batch failed");
                    tokio::time::sleep(POLL).await;
                }
            }
        }
    }

    /// Runs a claimed batch from where it stands to its end.
    async fn run(&self, claim: &BatchClaim) -> Result<(), ServiceError> {
        let store = self.store.clone();
        let id = claim.batch.clone();
        let (batch, content) = blocking(move || {
            let batch = store.batch(&id)?.ok_or_else(|| ServiceError::NotFound(format!("No such batch: {id}")))?;
            let content = store.file_content(&batch.input_file_id)?;
            Ok((batch, content))
        })
        .await?;
        let Some(content) = content else {
            let errors = json!([{"code": "file_not_found", "message": format!("the input file {} is gone", batch.input_file_id), "param": "input_file_id", "line": null}]);
            return self.end(&batch, BatchStatus::Failed, Some(errors)).await;
        };
        let store = self.store.clone();
        let id = batch.id.clone();
        let started = blocking(move || Ok(store.set_batch_status(&id, BatchStatus::InProgress, &[BatchStatus::Validating])?)).await?;
        if started {
            tracing::info!(batch = %batch.id, lines = batch.total, endpoint = %batch.endpoint, "batch started");
        }
        match self.run_lines(claim, &batch, &content).await? {
            Outcome::Finished => {
                let store = self.store.clone();
                let id = batch.id.clone();
                let cancelled = blocking(move || Ok(store.batch(&id)?.is_some_and(|b| b.status == BatchStatus::Cancelling))).await?;
                if cancelled {
                    return self.end(&batch, BatchStatus::Cancelled, None).await;
                }
                let store = self.store.clone();
                let id = batch.id.clone();
                blocking(move || Ok(store.set_batch_status(&id, BatchStatus::Finalizing, &[BatchStatus::InProgress])?)).await?;
                self.end(&batch, BatchStatus::Completed, None).await
            }
            Outcome::Abandoned => Ok(()),
        }
    }

    /// Runs the lines without a result, [`LINES_IN_FLIGHT`] at a time, recording each as it
    /// finishes; stops early on a cancel, a lost claim or a server going away.
    async fn run_lines(&self, claim: &BatchClaim, batch: &BatchRow, content: &[u8]) -> Result<Outcome, ServiceError> {
        let store = self.store.clone();
        let id = batch.id.clone();
        let finished: HashSet<usize> = blocking(move || Ok(store.finished_batch_lines(&id)?)).await?;
        let pending: Vec<(usize, Vec<u8>)> = input_lines(content)
            .into_iter()
            .enumerate()
            .filter(|(line, _)| !finished.contains(line))
            .map(|(line, text)| (line, text.to_vec()))
            .collect();
        let mut results = futures::stream::iter(pending)
            .map(|(line, text)| run_line(self.lines.clone(), batch.endpoint.clone(), line, text))
            .buffer_unordered(LINES_IN_FLIGHT);
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                next = results.next() => match next {
                    None => return Ok(Outcome::Finished),
                    Some(None) => return Ok(Outcome::Abandoned),
                    Some(Some(result)) => {
                        let store = self.store.clone();
                        let id = batch.id.clone();
                        blocking(move || Ok(store.record_batch_line(&id, &result)?)).await?;
                    }
                },
                // A cancel here is seen at once; one on another server, at the next heartbeat.
                _ = futures::future::select(Box::pin(heartbeat.tick()), Box::pin(self.wake.notified())) => {
                    let store = self.store.clone();
                    let held = claim.clone();
                    match blocking(move || Ok(store.renew_batch_claim(&held)?)).await? {
                        None => return Ok(Outcome::Abandoned),
                        // Lines in flight are dropped with the stream, which cancels them.
                        Some(BatchStatus::Cancelling) => return Ok(Outcome::Finished),
                        Some(_) => {}
                    }
                }
            }
        }
    }

    /// Writes the output and error files of the lines finished and ends the batch.
    async fn end(&self, batch: &BatchRow, status: BatchStatus, errors: Option<Value>) -> Result<(), ServiceError> {
        let store = self.store.clone();
        let batch = batch.clone();
        blocking(move || {
            let lines = store.batch_lines(&batch.id)?;
            let (succeeded, failed): (Vec<_>, Vec<_>) = lines.into_iter().partition(|l| l.succeeded);
            let output = write_results(&store, &batch.id, "output", &succeeded)?;
            let error = write_results(&store, &batch.id, "error", &failed)?;
            let errors = errors.map(|data| json!({"object": "list", "data": data}));
            store.end_batch(&batch.id, status, (output.as_deref(), error.as_deref()), errors.as_ref())?;
            tracing::info!(batch = %batch.id, %status, succeeded = succeeded.len(), failed = failed.len(), "batch ended");
            Ok(())
        })
        .await
    }
}

/// Stores `lines` as a `batch_output` file (one JSON object a line, in input order) and
/// returns its id; none when there are no lines.
fn write_results(store: &Store, batch: &str, kind: &str, lines: &[LineResult]) -> Result<Option<String>, ServiceError> {
    if lines.is_empty() {
        return Ok(None);
    }
    let mut content = Vec::new();
    for line in lines {
        content.extend_from_slice(line.result.to_string().as_bytes());
        content.push(b'\n');
    }
    let row = FileRow {
        id: new_id("file"),
        filename: format!("{batch}_{kind}.jsonl"),
        purpose: OUTPUT_PURPOSE.into(),
        bytes: content.len(),
        records: lines.len(),
        created_at: unix_time(),
    };
    store.insert_file(&row, &content)?;
    Ok(Some(row.id))
}

/// One input line: `{custom_id, method: "POST", url, body}`.
#[derive(serde::Deserialize)]
struct InputLine {
    custom_id: String,
    method: String,
    url: String,
    body: serde_json::Map<String, Value>,
}

/// Runs one line and shapes its result as OpenAI's output and error files do; `None` when the
/// server went away before it answered.
async fn run_line(lines: Arc<dyn LineRunner>, endpoint: String, line: usize, text: Vec<u8>) -> Option<LineResult> {
    let (custom_id, request) = match parse_line(&text, &endpoint, line) {
        Ok(parsed) => parsed,
        Err((custom_id, code, message)) => {
            let result = json!({
                "id": new_id("batch_req"),
                "custom_id": custom_id,
                "response": null,
                "error": {"code": code, "message": message},
            });
            return Some(LineResult { line, custom_id, succeeded: false, result });
        }
    };
    let response = lines.run(request).await?;
    let result = json!({
        "id": new_id("batch_req"),
        "custom_id": custom_id,
        "response": {"status_code": response.status_code, "request_id": new_id("req"), "body": response.body},
        "error": null,
    });
    let succeeded = (200..300).contains(&response.status_code);
    Some(LineResult { line, custom_id: Some(custom_id), succeeded, result })
}

/// A line's custom_id and request, or why it cannot run: (its custom_id if it has one, a code,
/// a message).
fn parse_line(text: &[u8], endpoint: &str, line: usize) -> Result<(String, LineRequest), (Option<String>, &'static str, String)> {
    let number = line + 1;
    let value: Value = serde_json::from_slice(text).map_err(|e| (None, "invalid_json", format!("line {number} is not JSON: {e}")))?;
    let custom_id = value.get("custom_id").and_then(Value::as_str).map(str::to_string);
    let fail = |code, message: String| (custom_id.clone(), code, message);
    let input: InputLine = serde_json::from_value(value.clone())
        .map_err(|e| fail("invalid_request", format!("line {number} is not a batch request ({{custom_id, method, url, body}}): {e}")))?;
    if input.method != "POST" {
        return Err(fail("invalid_method", format!("line {number}: the method must be POST, not `{}`", input.method)));
    }
    if input.url != endpoint {
        return Err(fail("mismatched_url", format!("line {number}: the url `{}` is not the batch's endpoint `{endpoint}`", input.url)));
    }
    if input.body.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err(fail("invalid_request", format!("line {number}: a batch line cannot stream; leave `stream` out")));
    }
    Ok((input.custom_id, LineRequest { url: input.url, body: Value::Object(input.body) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT: &str = "/v1/chat/completions";

    fn code(text: &str) -> (Option<String>, &'static str) {
        let (custom_id, code, _) = parse_line(text.as_bytes(), CHAT, 0).err().expect("refused");
        (custom_id, code)
    }

    #[test]
    fn a_line_runs_only_as_a_post_to_the_batch_endpoint() {
        let good = r#"{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}"#;
        let (custom_id, request) = parse_line(good.as_bytes(), CHAT, 0).unwrap();
        assert_eq!((custom_id.as_str(), request.body["model"].as_str()), ("a", Some("m")));
        assert_eq!(code("{oops"), (None, "invalid_json"));
        assert_eq!(code(r#"{"custom_id": "b", "method": "POST", "url": "/v1/chat/completions"}"#), (Some("b".into()), "invalid_request"));
        assert_eq!(code(r#"{"custom_id": "c", "method": "GET", "url": "/v1/chat/completions", "body": {}}"#), (Some("c".into()), "invalid_method"));
        assert_eq!(code(r#"{"custom_id": "d", "method": "POST", "url": "/v1/completions", "body": {}}"#), (Some("d".into()), "mismatched_url"));
        assert_eq!(code(r#"{"custom_id": "e", "method": "POST", "url": "/v1/chat/completions", "body": {"stream": true}}"#), (Some("e".into()), "invalid_request"));
    }
}
