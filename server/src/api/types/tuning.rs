//! Request and response shapes of online tuning: feedback, adapter training and access, and
//! OpenAI's files and fine-tuning jobs.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use crate::dataset::Message;
use crate::dataset::preference::Preference;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FeedbackParams {
    /// The kind of adapter created when it does not exist yet: `lora` (default), `dora` or `ia3`.
    pub method: Option<String>,
    /// Rank of the LoRA or DoRA created when the adapter does not exist yet (default 16).
    pub rank: Option<usize>,
    /// Its α (default 2·rank).
    pub alpha: Option<f32>,
    /// Its target modules, comma separated (default all seven: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj).
    pub targets: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FeedbackReceipt {
    pub adapter: String,
    /// New records (pairs and preferences) stored by this upload.
    pub stored: usize,
    /// Records skipped because the adapter already holds the same content.
    pub duplicates: usize,
    pub total_pairs: usize,
    pub total_preferences: usize,
    /// Records (pairs and preferences) gathered since the last job started.
    pub pairs_since_training: usize,
    /// The job this upload started, when it reached the server's `train_after`.
    pub job: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Return pairs after this id.
    pub after: Option<i64>,
    /// At most this many (default 100, at most 1000).
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StoredPairView {
    pub id: i64,
    pub hash: String,
    pub messages: Vec<Message>,
    pub created_at: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PairList {
    pub object: &'static str,
    pub data: Vec<StoredPairView>,
    pub has_more: bool,
    pub last_id: Option<i64>,
}

/// A stored preference: the conversation so far and the answer preferred to another.
#[derive(Debug, Serialize, ToSchema)]
pub struct StoredPreferenceView {
    pub id: i64,
    pub hash: String,
    #[serde(flatten)]
    pub preference: Preference,
    pub created_at: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PreferenceList {
    pub object: &'static str,
    pub data: Vec<StoredPreferenceView>,
    pub has_more: bool,
    pub last_id: Option<i64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteParams {
    /// Comma-separated record ids; without it, every record of the adapter of this kind.
    pub ids: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Deleted {
    pub deleted: usize,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct TrainRequest {
    pub hyperparameters: Option<HyperparametersRequest>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct TuningAccess {
    /// Whether keys of every tuning scope may add feedback to and train the adapter (otherwise
    /// only its creator's scope and the admin).
    pub open: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct RollbackRequest {
    pub version: u32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FileObject {
    pub id: String,
    pub object: &'static str,
    pub bytes: usize,
    pub created_at: i64,
    pub filename: String,
    pub purpose: String,
    pub status: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FileList {
    pub object: &'static str,
    pub data: Vec<FileObject>,
    pub has_more: bool,
}

#[allow(dead_code)] // describes the multipart form in the OpenAPI document only
/// multipart: `purpose` (`fine-tune`) and `file` (JSONL of `{"messages": …}` or any supported
/// instruction format).
#[derive(Debug, ToSchema)]
pub struct FileUpload {
    pub purpose: String,
    #[schema(value_type = String, format = Binary)]
    pub file: Vec<u8>,
}

/// Each value is a number or `"auto"` (the server's default).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct HyperparametersRequest {
    #[schema(value_type = Option<Object>)]
    pub n_epochs: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub batch_size: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub learning_rate_multiplier: Option<Value>,
    /// The kind of adapter a job on the base model makes: `lora` (default), `dora` or `ia3`.
    pub adapter: Option<String>,
    /// `adamw` (default; a stored gradient and two moments) or `adalomo` (each tensor updated
    /// inside the backward pass, no stored gradient, a factored second moment).
    pub optimizer: Option<String>,
}

/// DPO's hyperparameters: each a number or `"auto"`; `beta` in (0, 10] (default 0.1).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct DpoHyperparametersRequest {
    #[schema(value_type = Option<Object>)]
    pub beta: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub n_epochs: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub batch_size: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub learning_rate_multiplier: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct SupervisedMethodRequest {
    pub hyperparameters: Option<HyperparametersRequest>,
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct DpoMethodRequest {
    pub hyperparameters: Option<DpoHyperparametersRequest>,
}

/// How the job trains: `supervised` (pairs; the default) or `dpo` (preference lines).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct MethodRequest {
    /// `supervised` or `dpo`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub supervised: Option<SupervisedMethodRequest>,
    pub dpo: Option<DpoMethodRequest>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateJobRequest {
    /// The base model's id, or an adapter to continue from.
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    /// Its hyperparameters; `method.<type>.hyperparameters` take precedence.
    pub hyperparameters: Option<HyperparametersRequest>,
    pub method: Option<MethodRequest>,
    /// Part of the new adapter's name (`ft-{suffix}-{id}`).
    pub suffix: Option<String>,
    pub seed: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobHyperparameters {
    pub n_epochs: usize,
    pub batch_size: usize,
    pub learning_rate_multiplier: f64,
    /// `adamw` or `adalomo`.
    pub optimizer: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DpoHyperparameters {
    pub beta: f64,
    pub n_epochs: usize,
    pub batch_size: usize,
    pub learning_rate_multiplier: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SupervisedMethod {
    pub hyperparameters: JobHyperparameters,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DpoMethod {
    pub hyperparameters: DpoHyperparameters,
}

/// OpenAI's `method`: its type and that type's hyperparameters.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobMethod {
    /// `supervised` or `dpo`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub supervised: Option<SupervisedMethod>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dpo: Option<DpoMethod>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FineTuningJob {
    pub id: String,
    pub object: &'static str,
    pub created_at: i64,
    pub finished_at: Option<i64>,
    pub model: String,
    /// The adapter the job trains; servable by this name once the job succeeds.
    pub fine_tuned_model: Option<String>,
    pub organization_id: &'static str,
    /// validating_files, queued, running, succeeded, failed or cancelled.
    pub status: String,
    pub training_file: Option<String>,
    pub validation_file: Option<String>,
    pub hyperparameters: JobHyperparameters,
    pub method: JobMethod,
    pub result_files: Vec<String>,
    pub trained_tokens: Option<u64>,
    pub error: Option<JobError>,
    pub seed: u64,
    pub suffix: Option<String>,
    pub estimated_finish: Option<i64>,
    /// The adapter the job trains (for feedback jobs, the one the pairs belong to).
    pub adapter: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    pub object: &'static str,
    pub data: Vec<FineTuningJob>,
    pub has_more: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobEvent {
    pub id: String,
    pub object: &'static str,
    pub created_at: i64,
    pub level: String,
    pub message: String,
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
    /// `metrics` for per-step losses, `message` otherwise.
    pub r#type: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventList {
    pub object: &'static str,
    pub data: Vec<JobEvent>,
    pub has_more: bool,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventParams {
    /// Events before this event id (`ftevent-N`).
    pub after: Option<String>,
    /// At most this many (default 20, at most 1000).
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobCheckpoint {
    pub id: String,
    pub object: &'static str,
    pub created_at: i64,
    pub fine_tuned_model_checkpoint: String,
    pub fine_tuning_job_id: String,
    #[schema(value_type = Object)]
    pub metrics: Value,
    pub step_number: usize,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CheckpointList {
    pub object: &'static str,
    pub data: Vec<JobCheckpoint>,
    pub has_more: bool,
}
