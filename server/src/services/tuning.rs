//! Online tuning as a resource: feedback pairs on adapters, training them, their versions, and
//! OpenAI's files and fine-tuning jobs. The invariants (one active job per adapter, who may tune
//! or cancel what, how a job moves through its states) are the tuner's and the store's; this
//! service checks what clients send and runs the rest off the async workers.

use std::sync::Arc;

use super::adapters::{AdapterDescription, Adapters};
use super::feedback::{self, FeedbackOutcome};
use super::plugins::Plugins;
use super::{batches, blocking, ServiceError};
use crate::access::Scope;
use crate::dataset::preference::parse_feedback_upload;
use crate::grammar::Grammars;
use crate::store::preferences::StoredPreference;
use crate::store::{unix_time, CheckpointRow, EventRow, FileRow, JobRow, StoredPair};
use crate::train::dpo::{beta_is_valid, DEFAULT_BETA, MAX_BETA};
use crate::train::job::{new_id, Hyperparameters, JobData, JobSpec, Method, Tuner, ADALOMO_LEARNING_RATE};
use crate::train::optim::OptimizerKind;

/// Hyperparameters as a client chose them; `None` is "auto" (the server's default).
#[derive(Debug, Clone, Default)]
pub struct HyperparameterChoice {
    pub n_epochs: Option<f64>,
    pub batch_size: Option<f64>,
    pub learning_rate_multiplier: Option<f64>,
    /// The kind of adapter a job on the base model makes (`lora`, `dora` or `ia3`).
    pub adapter: Option<String>,
    /// `adamw` or `adalomo`.
    pub optimizer: Option<String>,
}

/// The adapter a first feedback upload creates, as a client chose it (each part optional).
#[derive(Debug, Clone, Default)]
pub struct LoraChoice {
    /// `lora`, `dora` or `ia3`.
    pub method: Option<String>,
    pub rank: Option<usize>,
    pub alpha: Option<f32>,
    /// Comma-separated PEFT module names.
    pub targets: Option<String>,
}

/// OpenAI's `method` as a client chose it: its `type` (`supervised` when absent) and, for
/// `dpo`, β (`None` is "auto": 0.1).
#[derive(Debug, Clone, Default)]
pub struct MethodChoice {
    pub kind: Option<String>,
    pub beta: Option<f64>,
}

/// An OpenAI fine-tuning job request.
#[derive(Debug, Clone)]
pub struct JobRequest {
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub method: MethodChoice,
    pub hyperparameters: HyperparameterChoice,
    pub suffix: Option<String>,
    pub seed: Option<u64>,
}

/// A page of items and whether more follow.
pub struct Page<T> {
    pub items: Vec<T>,
    pub has_more: bool,
}

impl<T> Page<T> {
    /// The first `limit` of `items` (fetched one past the limit, to tell whether more follow).
    pub(crate) fn of(mut items: Vec<T>, limit: usize) -> Self {
        let has_more = items.len() > limit;
        items.truncate(limit);
        Self { items, has_more }
    }
}

/// The tuning service; with no tuner every call answers that tuning is off.
#[derive(Clone)]
pub struct Tuning {
    tuner: Option<Arc<Tuner>>,
    adapters: Arc<Adapters>,
    plugins: Arc<Plugins>,
    /// Checks feedback for a plugin's adapter against the plugin's answer shape.
    grammars: Arc<Grammars>,
    model_id: String,
}

impl Tuning {
    pub fn new(tuner: Option<Arc<Tuner>>, adapters: Arc<Adapters>, plugins: Arc<Plugins>, grammars: Arc<Grammars>, model_id: String) -> Self {
        Self { tuner, adapters, plugins, grammars, model_id }
    }

    /// Whether this server has reconciled its adapters with the store (always, without one).
    pub fn is_ready(&self) -> bool {
        self.tuner.as_ref().is_none_or(|t| t.sync().is_ready())
    }

    fn tuner(&self) -> Result<Arc<Tuner>, ServiceError> {
        self.tuner.clone().ok_or(ServiceError::TuningDisabled)
    }

    /// Stores an upload of records for `name` (an adapter, or a plugin whose tuned adapter takes
    /// them), all or nothing, as `scope`; past `train_after` new pairs a job starts.
    pub async fn upload_feedback(&self, name: String, body: Vec<u8>, lora: LoraChoice, scope: Scope) -> Result<FeedbackOutcome, ServiceError> {
        let tuner = self.tuner()?;
        let spec = feedback::lora_spec(lora.method.as_deref(), lora.rank, lora.alpha, lora.targets.as_deref())?;
        let (plugins, grammars) = (self.plugins.clone(), self.grammars.clone());
        blocking(move || feedback::upload(&tuner, &plugins, &grammars, name, &body, spec, scope)).await
    }

    /// Up to `limit` of the adapter's pairs with ids above `after`, oldest first.
    pub async fn list_feedback(&self, name: String, scope: Scope, after: i64, limit: usize) -> Result<Page<StoredPair>, ServiceError> {
        let tuner = self.tuner()?;
        blocking(move || {
            tuner
                .tunable_adapter(&name, scope)?
                .ok_or_else(|| ServiceError::NotFound(format!("the adapter `{name}` has no feedback")))?;
            Ok(Page::of(tuner.store.pairs(&name, after, limit + 1)?, limit))
        })
        .await
    }

    /// Deletes some (`ids`) or all of an adapter's pairs; versions already trained stay.
    pub async fn delete_feedback(&self, name: String, scope: Scope, ids: Option<Vec<i64>>) -> Result<usize, ServiceError> {
        let tuner = self.tuner()?;
        blocking(move || {
            tuner.tunable_adapter(&name, scope)?;
            Ok(tuner.store.delete_pairs(&name, ids.as_deref())?)
        })
        .await
    }

    /// Up to `limit` of the adapter's preferences with ids above `after`, oldest first.
    pub async fn list_preferences(&self, name: String, scope: Scope, after: i64, limit: usize) -> Result<Page<StoredPreference>, ServiceError> {
        let tuner = self.tuner()?;
        blocking(move || {
            tuner
                .tunable_adapter(&name, scope)?
                .ok_or_else(|| ServiceError::NotFound(format!("the adapter `{name}` has no feedback")))?;
            Ok(Page::of(tuner.store.preferences(&name, after, limit + 1)?, limit))
        })
        .await
    }

    /// Deletes some (`ids`) or all of an adapter's preferences; versions already trained stay.
    pub async fn delete_preferences(&self, name: String, scope: Scope, ids: Option<Vec<i64>>) -> Result<usize, ServiceError> {
        let tuner = self.tuner()?;
        blocking(move || {
            tuner.tunable_adapter(&name, scope)?;
            Ok(tuner.store.delete_preferences(&name, ids.as_deref())?)
        })
        .await
    }

    /// Starts a job on the adapter's pairs now, continuing from its current version.
    pub async fn train(&self, name: String, hyperparameters: Option<HyperparameterChoice>, scope: Scope) -> Result<JobRow, ServiceError> {
        let tuner = self.tuner()?;
        let hyperparameters = hyperparameters.map(|h| resolve(h, tuner.settings.defaults)).transpose()?;
        blocking(move || Ok(tuner.start_feedback_job(&name, hyperparameters, scope)?)).await
    }

    /// Opens an adapter to tuning by every scope, or closes it again (the admin's call). An
    /// adapter the admin installed becomes a tuned adapter at version 0 first.
    pub async fn set_open_to_tuning(&self, name: String, open: bool) -> Result<AdapterDescription, ServiceError> {
        let (tuner, adapters) = (self.tuner()?, self.adapters.clone());
        blocking(move || {
            tuner.set_open_to_tuning(&name, open)?;
            adapters.describe_existing(&name)
        })
        .await
    }

    /// Serves an earlier version of the adapter again.
    pub async fn rollback(&self, name: String, version: u32) -> Result<AdapterDescription, ServiceError> {
        let (tuner, adapters) = (self.tuner()?, self.adapters.clone());
        blocking(move || {
            tuner.rollback(&name, version)?;
            adapters.describe_existing(&name)
        })
        .await
    }

    /// Stores a file durably after checking it whole: a training file's every record (pairs for
    /// supervised jobs, preferences for DPO jobs; which kind a job needs, the job checks), or a
    /// batch file's size and custom_ids (its lines are checked one by one when the batch runs).
    pub async fn upload_file(&self, filename: String, purpose: String, bytes: Vec<u8>) -> Result<FileRow, ServiceError> {
        let tuner = self.tuner()?;
        if purpose != "fine-tune" && purpose != batches::INPUT_PURPOSE {
            return Err(ServiceError::invalid("purpose", format!("only `fine-tune` and `batch` files are accepted, not `{purpose}`")));
        }
        blocking(move || {
            let records = match purpose.as_str() {
                batches::INPUT_PURPOSE => batches::check_input(&bytes)?,
                _ => parse_feedback_upload(&bytes)
                    .map_err(|e| ServiceError::Invalid { message: format!("{filename}: {e}"), param: Some("file".into()), code: Some("invalid_record") })?
                    .len(),
            };
            let row = FileRow { id: new_id("file"), filename, purpose, bytes: bytes.len(), records, created_at: unix_time() };
            tuner.store.insert_file(&row, &bytes)?;
            Ok(row)
        })
        .await
    }

    /// A file's content, as uploaded or as a batch wrote it.
    pub async fn file_content(&self, id: String) -> Result<Vec<u8>, ServiceError> {
        let tuner = self.tuner()?;
        blocking(move || tuner.store.file_content(&id)?.ok_or_else(|| ServiceError::NotFound(format!("No such file: {id}")))).await
    }

    /// Uploaded files, newest first.
    pub async fn list_files(&self) -> Result<Vec<FileRow>, ServiceError> {
        let tuner = self.tuner()?;
        blocking(move || Ok(tuner.store.files()?)).await
    }

    pub async fn get_file(&self, id: String) -> Result<FileRow, ServiceError> {
        let tuner = self.tuner()?;
        blocking(move || tuner.store.file(&id)?.ok_or_else(|| ServiceError::NotFound(format!("No such file: {id}")))).await
    }

    /// Queues a fine-tuning job on uploaded files; its adapter (`ft-…`) starts from `model`.
    pub async fn create_job(&self, request: JobRequest, scope: Scope) -> Result<JobRow, ServiceError> {
        let tuner = self.tuner()?;
        if request.model != self.model_id && !self.adapters.registry().contains(&request.model) {
            return Err(ServiceError::ModelNotFound(request.model));
        }
        let hyperparameters = resolve(request.hyperparameters.clone(), tuner.settings.defaults)?;
        let kind = request.hyperparameters.adapter.as_deref().map(|name| feedback::adapter_kind(name, "hyperparameters.adapter")).transpose()?;
        let method = resolve_method(&request.method)?;
        if let Some(suffix) = &request.suffix {
            if suffix.is_empty() || suffix.len() > 40 || !crate::registry::valid_name(suffix) {
                return Err(ServiceError::invalid("suffix", "the suffix must be 1 to 40 characters of A-Z, a-z, 0-9, '.', '_' or '-'"));
            }
        }
        blocking(move || {
            for (param, file) in [("training_file", Some(&request.training_file)), ("validation_file", request.validation_file.as_ref())] {
                if let Some(file) = file {
                    if tuner.store.file(file)?.is_none() {
                        return Err(ServiceError::Invalid { message: format!("No such file: {file}"), param: Some(param.into()), code: Some("file_not_found") });
                    }
                }
            }
            let spec = JobSpec {
                data: JobData::Files { training_file: request.training_file, validation_file: request.validation_file },
                method,
                hyperparameters,
                seed: request.seed.unwrap_or(42),
                suffix: request.suffix,
                start_version: 0,
            };
            Ok(tuner.start_file_job(&request.model, spec, kind, scope)?)
        })
        .await
    }

    /// Every job (file jobs and feedback jobs), newest first.
    pub async fn list_jobs(&self) -> Result<Vec<JobRow>, ServiceError> {
        let tuner = self.tuner()?;
        blocking(move || Ok(tuner.store.jobs(None)?)).await
    }

    pub async fn get_job(&self, id: String) -> Result<JobRow, ServiceError> {
        let tuner = self.tuner()?;
        blocking(move || find_job(&tuner, &id)).await
    }

    /// Cancels a job that has not ended, for its creator's scope or the admin; a running one
    /// stops before its next step.
    pub async fn cancel_job(&self, id: String, scope: Scope) -> Result<JobRow, ServiceError> {
        let tuner = self.tuner()?;
        blocking(move || {
            let job = find_job(&tuner, &id)?;
            if !tuner.cancel(&id, scope)? {
                return Err(ServiceError::invalid("job_id", format!("the job has already ended ({})", job.status)));
            }
            find_job(&tuner, &id)
        })
        .await
    }

    /// Up to `limit` of a job's events older than `before`, newest first.
    pub async fn events(&self, id: String, before: Option<i64>, limit: usize) -> Result<Page<EventRow>, ServiceError> {
        let tuner = self.tuner()?;
        blocking(move || {
            find_job(&tuner, &id)?;
            Ok(Page::of(tuner.store.events(&id, before, limit + 1)?, limit))
        })
        .await
    }

    /// A job's checkpoints, newest first.
    pub async fn checkpoints(&self, id: String) -> Result<Vec<CheckpointRow>, ServiceError> {
        let tuner = self.tuner()?;
        blocking(move || {
            find_job(&tuner, &id)?;
            Ok(tuner.store.checkpoints(&id)?)
        })
        .await
    }
}

fn find_job(tuner: &Tuner, id: &str) -> Result<JobRow, ServiceError> {
    tuner.store.job(id)?.ok_or_else(|| ServiceError::NotFound(format!("No such fine-tuning job: {id}")))
}

/// A client's method: `supervised`, or `dpo` with β in (0, 10] (0.1 when "auto").
fn resolve_method(choice: &MethodChoice) -> Result<Method, ServiceError> {
    match choice.kind.as_deref() {
        None | Some("supervised") if choice.beta.is_none() => Ok(Method::Supervised),
        None | Some("supervised") => Err(ServiceError::invalid("method.dpo.hyperparameters.beta", "beta applies to `dpo` jobs only")),
        Some("dpo") => {
            let beta = choice.beta.unwrap_or(DEFAULT_BETA);
            if !beta_is_valid(beta) {
                return Err(ServiceError::invalid("method.dpo.hyperparameters.beta", format!("beta must be above 0 and at most {MAX_BETA}, not {beta}")));
            }
            Ok(Method::Dpo { beta })
        }
        Some(other) => Err(ServiceError::invalid("method.type", format!("unknown method `{other}`: use `supervised` or `dpo`"))),
    }
}

/// A client's hyperparameters over the server's `defaults`: whole epochs (1–50) and batch sizes
/// (1–64), an optimizer, and a learning-rate multiplier in (0, 100] of that optimizer's default
/// rate.
fn resolve(choice: HyperparameterChoice, defaults: Hyperparameters) -> Result<Hyperparameters, ServiceError> {
    let whole = |v: Option<f64>, param: &str, max: f64| match v {
        Some(v) if v.fract() != 0.0 || !(1.0..=max).contains(&v) => Err(ServiceError::invalid(param, format!("must be a whole number from 1 to {max}"))),
        Some(v) => Ok(Some(v as usize)),
        None => Ok(None),
    };
    let n_epochs = whole(choice.n_epochs, "hyperparameters.n_epochs", 50.0)?.unwrap_or(defaults.n_epochs);
    let batch_size = whole(choice.batch_size, "hyperparameters.batch_size", 64.0)?.unwrap_or(defaults.batch_size);
    let multiplier = choice.learning_rate_multiplier.unwrap_or(1.0);
    if !(multiplier > 0.0 && multiplier <= 100.0) {
        return Err(ServiceError::invalid("hyperparameters.learning_rate_multiplier", "must be in (0, 100]"));
    }
    let optimizer = match choice.optimizer.as_deref() {
        None => defaults.optimizer,
        Some(name) => OptimizerKind::parse(name)
            .ok_or_else(|| ServiceError::invalid("hyperparameters.optimizer", format!("unknown optimizer `{name}`: use {}", OptimizerKind::NAMES)))?,
    };
    let learning_rate = default_learning_rate(optimizer, defaults) * multiplier;
    Ok(Hyperparameters { n_epochs, batch_size, learning_rate, optimizer })
}

/// The rate a multiplier of 1 gives: the server's for AdamW, AdaLomo's own relative step.
pub fn default_learning_rate(optimizer: OptimizerKind, defaults: Hyperparameters) -> f64 {
    match optimizer {
        OptimizerKind::Adamw => defaults.learning_rate,
        OptimizerKind::Adalomo => ADALOMO_LEARNING_RATE,
    }
}
