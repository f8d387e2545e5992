//! Batches as a resource (OpenAI's `/v1/batches`): a file of requests, each line naming its own
//! model (the base, an adapter, a composition), run in the background at a lower priority than
//! interactive requests, with per-line results kept durably as they finish. What may be
//! created, read and cancelled lives here; running them lives in `run.rs`.

mod run;

use std::collections::HashMap;
use std::sync::Arc;

use super::tuning::Page;
use super::{blocking, ServiceError};
use crate::access::Scope;
use crate::store::batches::{BatchRow, BatchStatus, BatchTimes};
use crate::store::{unix_time, Store};
use crate::train::job::new_id;

pub use run::{LineRequest, LineResponse, LineRunner};

/// The endpoints a batch may target.
pub const ENDPOINTS: [&str; 4] = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"];

/// The most lines one batch file may hold (OpenAI's limit).
pub const MAX_BATCH_LINES: usize = 50_000;

/// The one completion window there is.
pub const COMPLETION_WINDOW: &str = "24h";

/// How long after its creation a batch is due (the completion window).
pub const WINDOW_SECS: i64 = 24 * 3600;

/// The purpose of the files a batch reads, and of those it writes.
pub const INPUT_PURPOSE: &str = "batch";
pub const OUTPUT_PURPOSE: &str = "batch_output";

/// OpenAI's limits on metadata: pairs, key and value lengths.
const METADATA_PAIRS: usize = 16;
const METADATA_KEY_CHARS: usize = 64;
const METADATA_VALUE_CHARS: usize = 512;

/// A client's new batch.
#[derive(Debug, Clone)]
pub struct BatchRequest {
    pub input_file_id: String,
    pub endpoint: String,
    pub completion_window: String,
    pub metadata: Option<HashMap<String, String>>,
}

/// A batch and its progress: lines finished well and lines that failed so far.
#[derive(Debug, Clone)]
pub struct BatchView {
    pub batch: BatchRow,
    pub completed: usize,
    pub failed: usize,
}

/// The batches service; without a store every call answers that the state store is off.
pub struct Batches {
    store: Option<Arc<Store>>,
    /// Tells the runner a batch was created or cancelled, so it need not wait for its poll.
    wake: Arc<tokio::sync::Notify>,
}

impl Batches {
    pub fn new(store: Option<Arc<Store>>) -> Self {
        Self { store, wake: Arc::new(tokio::sync::Notify::new()) }
    }

    /// Starts running batches (this server's and, on a shared store, any other's left
    /// unclaimed) through `lines`, on a thread of its own, until `lines` says the server is gone.
    pub fn start(&self, lines: Arc<dyn LineRunner>) -> std::io::Result<()> {
        match &self.store {
            Some(store) => run::spawn(store.clone(), lines, self.wake.clone()),
            None => Ok(()),
        }
    }

    fn store(&self) -> Result<Arc<Store>, ServiceError> {
        self.store.clone().ok_or(ServiceError::TuningDisabled)
    }

    /// Checks a batch against its input file and queues it: the file must be a `batch` file
    /// of at most [`MAX_BATCH_LINES`] lines whose `custom_id`s are all different. Malformed
    /// lines do not fail the batch: each fails alone, in the error file.
    pub async fn create(&self, request: BatchRequest, scope: Scope) -> Result<BatchView, ServiceError> {
        let store = self.store()?;
        check_request(&request)?;
        let batch = blocking(move || {
            let file = store.file(&request.input_file_id)?.ok_or_else(|| ServiceError::NotFound(format!("No such file: {}", request.input_file_id)))?;
            if file.purpose != INPUT_PURPOSE {
                return Err(ServiceError::invalid("input_file_id", format!("`{}` has purpose `{}`; a batch reads a file uploaded with purpose `batch`", file.id, file.purpose)));
            }
            let content = store.file_content(&file.id)?.ok_or_else(|| ServiceError::NotFound(format!("No such file: {}", file.id)))?;
            let total = check_input(&content)?;
            let batch = BatchRow {
                id: new_id("batch"),
                endpoint: request.endpoint,
                input_file_id: request.input_file_id,
                completion_window: request.completion_window,
                metadata: request.metadata.map(|m| serde_json::json!(m)),
                status: BatchStatus::Validating,
                total,
                output_file_id: None,
                error_file_id: None,
                errors: None,
                created_by: scope,
                created_at: unix_time(),
                times: BatchTimes::default(),
            };
            store.insert_batch(&batch)?;
            Ok(batch)
        })
        .await?;
        self.wake.notify_one();
        Ok(BatchView { batch, completed: 0, failed: 0 })
    }

    pub async fn get(&self, id: String) -> Result<BatchView, ServiceError> {
        let store = self.store()?;
        blocking(move || view(&store, find(&store, &id)?)).await
    }

    /// Up to `limit` batches, newest first, after the batch `after`.
    pub async fn list(&self, after: Option<String>, limit: usize) -> Result<Page<BatchView>, ServiceError> {
        let store = self.store()?;
        blocking(move || {
            let rows = store.batches(after.as_deref(), limit + 1)?;
            let views = rows.into_iter().map(|row| view(&store, row)).collect::<Result<Vec<_>, _>>()?;
            Ok(Page::of(views, limit))
        })
        .await
    }

    /// Cancels a batch that has not ended, for its creator's scope or the admin: it goes to
    /// `cancelling`, its lines in flight stop, and it ends `cancelled` with the results so far.
    pub async fn cancel(&self, id: String, scope: Scope) -> Result<BatchView, ServiceError> {
        let store = self.store()?;
        let view = blocking(move || {
            let batch = find(&store, &id)?;
            if scope != Scope::Admin && scope != batch.created_by {
                return Err(ServiceError::NotOwner(format!("the batch was created by a {} key; only that scope or the admin may cancel it", batch.created_by)));
            }
            if batch.status.has_ended() {
                return Err(ServiceError::invalid("batch_id", format!("the batch has already ended ({})", batch.status)));
            }
            let running = [BatchStatus::Validating, BatchStatus::InProgress, BatchStatus::Finalizing];
            store.set_batch_status(&id, BatchStatus::Cancelling, &running)?;
            view(&store, find(&store, &id)?)
        })
        .await?;
        self.wake.notify_one();
        Ok(view)
    }
}

fn find(store: &Store, id: &str) -> Result<BatchRow, ServiceError> {
    store.batch(id)?.ok_or_else(|| ServiceError::NotFound(format!("No such batch: {id}")))
}

fn view(store: &Store, batch: BatchRow) -> Result<BatchView, ServiceError> {
    let (completed, failed) = store.batch_progress(&batch.id)?;
    Ok(BatchView { batch, completed, failed })
}

/// The request's own fields: a known endpoint, the 24h window, and metadata within limits.
fn check_request(request: &BatchRequest) -> Result<(), ServiceError> {
    if !ENDPOINTS.contains(&request.endpoint.as_str()) {
        return Err(ServiceError::invalid("endpoint", format!("unknown endpoint `{}`: use one of {}", request.endpoint, ENDPOINTS.join(", "))));
    }
    if request.completion_window != COMPLETION_WINDOW {
        return Err(ServiceError::invalid("completion_window", format!("the completion window must be `{COMPLETION_WINDOW}`")));
    }
    let Some(metadata) = &request.metadata else { return Ok(()) };
    if metadata.len() > METADATA_PAIRS {
        return Err(ServiceError::invalid("metadata", format!("metadata holds at most {METADATA_PAIRS} pairs")));
    }
    if metadata.iter().any(|(k, v)| k.chars().count() > METADATA_KEY_CHARS || v.chars().count() > METADATA_VALUE_CHARS) {
        return Err(ServiceError::invalid("metadata", format!("metadata keys have at most {METADATA_KEY_CHARS} characters and values {METADATA_VALUE_CHARS}")));
    }
    Ok(())
}

/// The lines of a batch file that hold something, in order: what a batch counts and runs.
pub fn input_lines(content: &[u8]) -> Vec<&[u8]> {
    content.split(|&b| b == b'\n').filter(|line| !line.trim_ascii().is_empty()).collect()
}

/// Checks a batch file as a whole and returns its number of lines: at most
/// [`MAX_BATCH_LINES`], each `custom_id` once. A line that is not a request is left to fail
/// on its own when the batch runs.
pub fn check_input(content: &[u8]) -> Result<usize, ServiceError> {
    let lines = input_lines(content);
    if lines.len() > MAX_BATCH_LINES {
        return Err(ServiceError::TooLarge(format!("the batch file has {} lines; a batch holds at most {MAX_BATCH_LINES}", lines.len())));
    }
    if lines.is_empty() {
        return Err(ServiceError::invalid("input_file_id", "the batch file holds no requests"));
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (number, line) in lines.iter().enumerate() {
        let custom_id = serde_json::from_slice::<serde_json::Value>(line).ok().and_then(|v| v.get("custom_id").and_then(|c| c.as_str()).map(str::to_string));
        let Some(custom_id) = custom_id else { continue };
        if let Some(first) = seen.insert(custom_id.clone(), number + 1) {
            return Err(ServiceError::Invalid {
                param: Some("input_file_id".into()),
                message: format!("the custom_id `{custom_id}` appears on lines {first} and {}; each request needs its own", number + 1),
                code: Some("duplicate_custom_id"),
            });
        }
    }
    Ok(lines.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(endpoint: &str, window: &str) -> BatchRequest {
        BatchRequest { input_file_id: "file-1".into(), endpoint: endpoint.into(), completion_window: window.into(), metadata: None }
    }

    #[test]
    fn a_batch_file_is_counted_by_its_lines_and_refuses_a_repeated_custom_id() {
        let good = b"{\"custom_id\": \"a\"}\n\nnot json\n{\"custom_id\": \"b\"}\n";
        assert_eq!(check_input(good).unwrap(), 3, "blank lines are not requests; a malformed one is, and fails alone");
        let repeated = b"{\"custom_id\": \"a\"}\n{\"custom_id\": \"b\"}\n{\"custom_id\": \"a\"}";
        let error = check_input(repeated).unwrap_err();
        assert_eq!(error.to_string(), "the custom_id `a` appears on lines 1 and 3; each request needs its own");
        let huge = "{}\n".repeat(MAX_BATCH_LINES + 1);
        assert!(matches!(check_input(huge.as_bytes()), Err(ServiceError::TooLarge(_))));
    }

    #[test]
    fn only_known_endpoints_and_the_24h_window_are_accepted() {
        assert!(check_request(&request("/v1/chat/completions", "24h")).is_ok());
        assert!(check_request(&request("/v1/responses", "24h")).is_ok());
        assert!(check_request(&request("/v1/models", "24h")).is_err());
        assert!(check_request(&request("/v1/embeddings", "1h")).is_err());
    }
}
