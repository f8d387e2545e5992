//! Request and response shapes of OpenAI's batches.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateBatchRequest {
    /// A file uploaded with purpose `batch`: one request a line, `{custom_id, method: "POST", url, body}`,
    /// each body naming its own `model` (the base, an adapter or a composition).
    pub input_file_id: String,
    /// `/v1/chat/completions`, `/v1/completions` or `/v1/embeddings`; every line's `url` must be it.
    pub endpoint: String,
    /// `24h`.
    pub completion_window: String,
    /// Up to 16 pairs of strings (keys up to 64 characters, values up to 512).
    pub metadata: Option<HashMap<String, String>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RequestCounts {
    /// Lines in the input file.
    pub total: usize,
    /// Lines answered with a 2xx status, in the output file.
    pub completed: usize,
    /// Lines that failed (malformed, or answered with an error), in the error file.
    pub failed: usize,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BatchErrors {
    pub object: &'static str,
    /// `{code, message, param, line}` objects: why the batch as a whole failed.
    pub data: Value,
}

/// A batch. Its status goes `validating → in_progress → finalizing → completed`, or `failed`,
/// or `cancelling → cancelled`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Batch {
    pub id: String,
    pub object: &'static str,
    pub endpoint: String,
    pub errors: Option<BatchErrors>,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: &'static str,
    /// The answered lines: `{id, custom_id, response: {status_code, request_id, body}, error: null}`.
    pub output_file_id: Option<String>,
    /// The failed lines: with `response` for an error status, or `error: {code, message}` for a malformed line.
    pub error_file_id: Option<String>,
    pub created_at: i64,
    pub in_progress_at: Option<i64>,
    pub expires_at: i64,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    pub request_counts: RequestCounts,
    pub metadata: Option<Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BatchList {
    pub object: &'static str,
    pub data: Vec<Batch>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BatchListParams {
    /// Batches after this batch id, newest first.
    pub after: Option<String>,
    /// At most this many (default 20, 1 to 100).
    pub limit: Option<usize>,
}
