//! The background tuner: one worker thread, on a thread budget of its own, runs fine-tuning jobs
//! one at a time against the served model's weights, checkpoints them, and hot-swaps a better
//! adapter version in through the registry.
//!
//! A job's life: `validating_files → queued → running → succeeded | failed | cancelled`. Every
//! `checkpoint_every` steps it writes the adapter, the optimizer state and its position (the step;
//! the data order is a pure function of the seed and epoch) in a fresh folder, then records it in
//! the store. Jobs are claimed from the store (`train::worker`): after a crash, this server or
//! another that shares the store takes the job over and resumes it from its last recorded
//! checkpoint.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tessera_adapters::peft::BaseShape;

use crate::access::Scope;
use crate::dataset::preference::{parse_preference, Preference};
use crate::dataset::{parse_records, parse_upload, Conversation};
use crate::registry::Registry;
use crate::store::{unix_time, AdapterRow, Adoption, Claim, Inserted, JobRow, JobStatus, NewFeedback, Store, StoreError};
use crate::train::sync::{self, SyncState};
use crate::train::worker;
use crate::train::data::{answer_example, example};
use crate::train::decoder::{Example, Trainable};
use crate::train::dpo::{self, evaluate_preferences, MixedStats, PreferenceExample, Rewards, DEFAULT_BETA};
use crate::train::lora::{AdapterParams, LoraSpec};
use tessera_adapters::AdapterKind;
use crate::train::adalomo::{AdaLomo, AdaLomoConfig};
use crate::train::optim::{AdamW, AdamWConfig, Optimizer, OptimizerKind, Schedule};
use crate::train::step::job_step;
use crate::train::{evaluate, TrainError};
use crate::LoadedModel;

#[derive(Debug, thiserror::Error)]
pub enum TuneError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("{0}")]
    Invalid(String),
    #[error("the job was cancelled")]
    Cancelled,
    /// One job at a time per adapter.
    #[error("`{adapter}` already has a job queued or running: {job}")]
    Busy { adapter: String, job: String },
    /// The resource belongs to another scope.
    #[error("{0}")]
    NotOwner(String),
    /// A training step failed (the loss diverged, say); the adapter's served version is untouched.
    #[error("step {step}: {source}")]
    Step { step: usize, source: TrainError },
}

/// AdaLomo's default peak step, relative to each tensor's RMS.
pub const ADALOMO_LEARNING_RATE: f64 = 5e-2;

/// AdaLomo's floor on the RMS a step is scaled by: LoRA's B starts at zero and would otherwise
/// move by ε₂·η, a thousandth of what A does. About the RMS of a fresh A (U(±1/√in) over
/// in ≈ 1–2k features), so that B starts moving as A does.
pub const ADALOMO_EPS_SCALE: f64 = 1e-2;

/// The optimizer `h` names, over `total_steps` with a tenth of them warming up.
fn new_optimizer(lora: &AdapterParams, h: Hyperparameters, total_steps: usize) -> Result<Optimizer, TuneError> {
    let schedule = Schedule { learning_rate: h.learning_rate, warmup_steps: (total_steps / 10).max(1), total_steps };
    let vars: Vec<_> = lora.named_vars().into_iter().map(|(_, v)| v).collect();
    Ok(match h.optimizer {
        OptimizerKind::Adamw => Optimizer::AdamW(AdamW::new(
            AdamWConfig {
                learning_rate: schedule.learning_rate,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
                max_grad_norm: 1.0,
                warmup_steps: schedule.warmup_steps,
                total_steps,
            },
            &vars,
        )?),
        OptimizerKind::Adalomo => Optimizer::AdaLomo(AdaLomo::new(AdaLomoConfig { eps_scale: ADALOMO_EPS_SCALE, ..AdaLomoConfig::new(schedule) }, &vars)),
    })
}

/// Server-wide tuning settings.
#[derive(Debug, Clone)]
pub struct TuningSettings {
    /// Threads the trainer may use (serving keeps the rest).
    pub train_threads: usize,
    /// New pairs that start a job on their own.
    pub train_after: usize,
    pub max_seq_len: usize,
    pub checkpoint_every: usize,
    /// Whether this server claims and runs jobs (`--role train` or `both`), or only serves.
    pub trains: bool,
    pub default_lora: LoraSpec,
    pub defaults: Hyperparameters,
}

impl Default for TuningSettings {
    fn default() -> Self {
        Self {
            train_threads: 1,
            train_after: 32,
            max_seq_len: 512,
            checkpoint_every: 10,
            trains: true,
            default_lora: LoraSpec::default(),
            defaults: Hyperparameters::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Hyperparameters {
    pub n_epochs: usize,
    pub batch_size: usize,
    /// The peak learning rate: AdamW's step, or AdaLomo's step relative to each tensor's RMS
    /// (the OpenAI multiplier scales the optimizer's default).
    pub learning_rate: f64,
    #[serde(default)]
    pub optimizer: OptimizerKind,
}

impl Default for Hyperparameters {
    fn default() -> Self {
        Self {
            n_epochs: 2,
            batch_size: 4,
            learning_rate: 1e-3,
            optimizer: OptimizerKind::Adamw,
        }
    }
}

/// Where a job's data comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobData {
    /// The adapter's feedback pairs up to `last_pair_id` and preferences up to
    /// `last_preference_id`; a deterministic slice of each is held out and the result is
    /// promoted only if it beats the current version on it.
    Feedback {
        last_pair_id: i64,
        #[serde(default)]
        last_preference_id: i64,
    },
    /// OpenAI files: the result is published as a new adapter.
    Files {
        training_file: String,
        validation_file: Option<String>,
    },
}

/// How a job trains: OpenAI's fine-tuning `method`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Method {
    /// Imitate the answers of pairs (the SFT loss).
    #[default]
    Supervised,
    /// Prefer the chosen answers of preferences (the DPO loss), and imitate those of any pairs.
    Dpo { beta: f64 },
}

impl Method {
    /// β of the DPO loss, for whatever preferences the job trains on.
    pub fn beta(self) -> f64 {
        match self {
            Method::Dpo { beta } => beta,
            Method::Supervised => DEFAULT_BETA,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Supervised => "supervised",
            Method::Dpo { .. } => "dpo",
        }
    }
}

/// Everything a job needs, stored with it (so a resumed job does exactly the same).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub data: JobData,
    #[serde(default)]
    pub method: Method,
    pub hyperparameters: Hyperparameters,
    pub seed: u64,
    pub suffix: Option<String>,
    /// The adapter version the job starts from.
    pub start_version: u32,
}

/// Examples per forward/backward pass; larger batches accumulate gradients over several.
pub const MICRO_BATCH: usize = 4;

/// One in ten pairs, by content hash, is held out for the eval gate (at least one).
pub fn is_held_out(hash: &str) -> bool {
    u64::from_str_radix(&hash[..hash.len().min(8)], 16).is_ok_and(|h| h % 10 == 0)
}

pub fn new_id(prefix: &str) -> String {
    use rand::Rng;
    let bytes: [u8; 12] = rand::rng().random();
    format!("{prefix}-{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

pub struct Tuner {
    pub store: Arc<Store>,
    model: Arc<LoadedModel>,
    model_id: String,
    registry: Arc<Registry>,
    pub settings: TuningSettings,
    /// This process's name in job claims.
    trainer: String,
    wake: Mutex<mpsc::Sender<()>>,
    /// Stop flags of the jobs this server is running.
    cancelled: Mutex<HashMap<String, Arc<AtomicBool>>>,
    sync: Arc<SyncState>,
}


impl Tuner {
    /// Serves every stored adapter's current version and keeps them in step with the store,
    /// and, where this server trains, starts the worker that claims jobs from the store.
    pub fn start(
        store: Arc<Store>,
        model: Arc<LoadedModel>,
        model_id: String,
        registry: Arc<Registry>,
        settings: TuningSettings,
    ) -> Result<Arc<Self>, TuneError> {
        let source_store = Arc::downgrade(&store);
        registry.fetch_sources_with(Box::new(move |path| match source_store.upgrade() {
            Some(store) => store.fetch(path).map(drop).map_err(|e| e.to_string()),
            None => Ok(()),
        }));
        let sync = Arc::new(SyncState::new().map_err(StoreError::from)?);
        sync::start(&store, &registry, &sync).map_err(|e| TuneError::Invalid(format!("adapter sync not started: {e}")))?;
        let (wake, woken) = mpsc::channel::<()>();
        let tuner = Arc::new(Self {
            store,
            model,
            model_id,
            registry,
            settings,
            trainer: format!("{}-{:08x}", std::process::id(), rand::random::<u32>()),
            wake: Mutex::new(wake),
            cancelled: Mutex::new(HashMap::new()),
            sync,
        });
        if !tuner.settings.trains && !tuner.store.is_shared() {
            tracing::warn!("--role serve on a store of its own: no server will run this server's fine-tuning jobs");
        }
        if tuner.settings.trains {
            worker::start(Arc::downgrade(&tuner), woken, tuner.settings.train_threads.max(1))
                .map_err(|e| TuneError::Invalid(format!("trainer thread not started: {e}")))?;
        }
        Ok(tuner)
    }

    /// Wakes the worker to claim a job now rather than at its next poll.
    fn wake(&self) {
        let _ = self.wake.lock().unwrap_or_else(|p| p.into_inner()).send(());
    }

    /// Whether this server serves what the store says (the last reconcile succeeded).
    pub fn sync(&self) -> &SyncState {
        &self.sync
    }

    pub fn base_shape(&self) -> BaseShape {
        self.model.model.config().adapter_shape()
    }

    /// Whether `adapter` has a job queued or running.
    pub fn is_training(&self, adapter: &str) -> Result<bool, TuneError> {
        Ok(self.store.active_job(adapter)?.is_some())
    }

    /// Stores `feedback` (pairs and preferences) on `name`, first making it a tuned adapter at version
    /// 0 when it is not one yet: a fresh LoRA (`spec`, else the default), or a copy of the
    /// registry's adapter of that name (training continues from it). Creating the adapter and
    /// storing the pairs are one transaction: of concurrent first uploads one creates and the
    /// rest add to its adapter. A failed create leaves nothing.
    ///
    /// `scope` is the caller's: it may tune an adapter it created or one the admin opened; an
    /// adapter the admin installed (uploaded or loaded) only the admin may turn into a tuned one.
    pub fn store_feedback(&self, name: &str, spec: Option<LoraSpec>, scope: Scope, feedback: NewFeedback<'_>) -> Result<Inserted, TuneError> {
        if let Some(row) = self.store.adapter(name)? {
            self.check_tunable(row, scope)?;
            return Ok(self.store.insert_feedback(name, feedback)?);
        }
        self.registry
            .check_new_name(name)
            .map_err(|e| TuneError::Invalid(e.to_string()))?;
        let params = match self.registry.describe(name) {
            Some(_) if scope != Scope::Admin => {
                return Err(TuneError::NotOwner(format!("the adapter `{name}` belongs to the admin; only the admin may tune it")))
            }
            Some((source, _)) => AdapterParams::load_peft(&source, &self.base_shape())?,
            None => AdapterParams::fresh(&self.model, spec.unwrap_or_else(|| self.settings.default_lora.clone()), 0)?,
        };
        self.adopt(name, &params, scope, serde_json::json!({"origin": "created"}), feedback)
    }

    /// Records `params` as `name`'s version 0 with `feedback` as its first records, unless
    /// `name` is already a tuned adapter: then the records go to that one (if `scope` may tune
    /// it) and `params` are dropped. Version 0's files are written to a staging folder first and
    /// moved into place inside the store's transaction.
    fn adopt(&self, name: &str, params: &AdapterParams, scope: Scope, origin: serde_json::Value, feedback: NewFeedback<'_>) -> Result<Inserted, TuneError> {
        let staging = self.store.staging_dir();
        let staged = params.save_peft(&staging, &self.model_id);
        let adopted = staged.map_err(TuneError::from).and_then(|()| {
            let row = version_zero(name, params, scope);
            Ok(self.store.insert_or_get_adapter(&row, &origin, feedback, |v0| move_into_place(&staging, v0))?)
        });
        // What was not moved into place (a lost race, a failure) is nobody's.
        let _ = std::fs::remove_dir_all(&staging);
        match adopted? {
            Adoption::Refused(row) => Err(not_tunable(&row)),
            Adoption::Stored { created, inserted } => {
                if created {
                    self.registry
                        .install(name, &self.store.version_dir(name, 0))
                        .map_err(|e| TuneError::Invalid(e.to_string()))?;
                    tracing::info!(adapter = name, rank = params.spec.rank, "tuned adapter created");
                }
                Ok(inserted)
            }
        }
    }

    /// `row`, if `scope` may tune it.
    fn check_tunable(&self, row: AdapterRow, scope: Scope) -> Result<AdapterRow, TuneError> {
        if row.may_be_tuned_by(scope) {
            Ok(row)
        } else {
            Err(not_tunable(&row))
        }
    }

    /// The tuned adapter `name`, if `scope` may tune it (`None` when it has no tuning record).
    pub fn tunable_adapter(&self, name: &str, scope: Scope) -> Result<Option<AdapterRow>, TuneError> {
        self.store.adapter(name)?.map(|row| self.check_tunable(row, scope)).transpose()
    }

    /// Opens `name` to tuning by every scope, or closes it to all but its creator's (the
    /// admin's call). An adapter the admin installed gets its tuning record first.
    pub fn set_open_to_tuning(&self, name: &str, open: bool) -> Result<AdapterRow, TuneError> {
        self.store_feedback(name, None, Scope::Admin, NewFeedback::default())?;
        self.store.set_open_to_tuning(name, open)?;
        self.store
            .adapter(name)?
            .ok_or_else(|| TuneError::Invalid(format!("the adapter `{name}` vanished")))
    }

    /// Queues a job on `adapter`'s feedback (all pairs and preferences stored so far): DPO
    /// with the default β where there are preferences.
    pub fn start_feedback_job(&self, adapter: &str, hyperparameters: Option<Hyperparameters>, scope: Scope) -> Result<JobRow, TuneError> {
        let row = self
            .tunable_adapter(adapter, scope)?
            .ok_or_else(|| TuneError::Invalid(format!("`{adapter}` has no feedback")))?;
        let last_pair_id = self.store.last_pair_id(adapter)?;
        let last_preference_id = self.store.last_preference_id(adapter)?;
        if last_pair_id == 0 && last_preference_id == 0 {
            return Err(TuneError::Invalid(format!("`{adapter}` has no feedback")));
        }
        let spec = JobSpec {
            data: JobData::Feedback { last_pair_id, last_preference_id },
            method: if last_preference_id > 0 { Method::Dpo { beta: DEFAULT_BETA } } else { Method::Supervised },
            hyperparameters: hyperparameters.unwrap_or(self.settings.defaults),
            seed: 0,
            suffix: None,
            start_version: row.version,
        };
        self.create_job(new_id("ftjob"), adapter, adapter, &spec, JobStatus::Queued, scope)
    }

    /// Queues an OpenAI fine-tuning job; its adapter (`ft-…`) starts from `model` (the base or
    /// an adapter).
    /// A fresh adapter is of `kind` (default LoRA); one continued from an adapter keeps its own.
    pub fn start_file_job(&self, model: &str, spec: JobSpec, kind: Option<AdapterKind>, scope: Scope) -> Result<JobRow, TuneError> {
        let id = new_id("ftjob");
        let short = &id[id.len() - 8..];
        let adapter = match &spec.suffix {
            Some(suffix) => format!("ft-{suffix}-{short}"),
            None => format!("ft-{short}"),
        };
        // A copy of the starting adapter, or a fresh one, becomes the new adapter's version 0.
        let params = if model == self.model_id {
            let lora = LoraSpec { kind: kind.unwrap_or(self.settings.default_lora.kind), ..self.settings.default_lora.clone() };
            AdapterParams::fresh(&self.model, lora, spec.seed)?
        } else {
            let source = match self.store.adapter(model)? {
                Some(row) => self.store.fetch_version(model, row.version)?,
                None => {
                    self.registry
                        .describe(model)
                        .ok_or_else(|| TuneError::Invalid(format!("the model `{model}` does not exist")))?
                        .0
                }
            };
            let params = AdapterParams::load_peft(&source, &self.base_shape())?;
            if let Some(kind) = kind.filter(|k| *k != params.kind()) {
                return Err(TuneError::Invalid(format!("`{model}` is a {} adapter: a job continuing it cannot make a {kind} one", params.kind())));
            }
            params
        };
        self.registry
            .check_new_name(&adapter)
            .map_err(|e| TuneError::Invalid(e.to_string()))?;
        self.adopt(&adapter, &params, scope, serde_json::json!({"origin": model}), NewFeedback::default())?;
        self.create_job(id, &adapter, model, &spec, JobStatus::ValidatingFiles, scope)
    }

    /// Records a job in its first status and queues it for the worker. The store refuses a
    /// second active job of one adapter, whatever raced to create it: the loser gets `Busy`
    /// with the id of the job that holds the adapter.
    fn create_job(&self, id: String, adapter: &str, model: &str, spec: &JobSpec, status: JobStatus, scope: Scope) -> Result<JobRow, TuneError> {
        let job = JobRow {
            id,
            adapter: adapter.to_string(),
            model: model.to_string(),
            spec: serde_json::to_value(spec).map_err(TrainError::from)?,
            status,
            fine_tuned_model: None,
            error: None,
            trained_tokens: None,
            created_at: unix_time(),
            finished_at: None,
            created_by: scope,
        };
        let feedback_job = status == JobStatus::Queued;
        self.store.insert_job(&job, feedback_job).map_err(|e| match e {
            StoreError::ActiveJob { adapter, job } => TuneError::Busy { adapter, job },
            other => other.into(),
        })?;
        let first_event = if status == JobStatus::ValidatingFiles { "Validating training file" } else { "Job queued" };
        self.store.add_event(&job.id, "info", first_event, None)?;
        tracing::info!(job = %job.id, adapter, "fine-tuning job queued");
        self.wake();
        Ok(job)
    }

    /// Cancels a job that has not ended, for its creator's scope or the admin; a running one
    /// stops before its next step.
    pub fn cancel(&self, job: &str, scope: Scope) -> Result<bool, TuneError> {
        let created_by = self.store.job(job)?.map(|j| j.created_by);
        if created_by.is_some_and(|creator| scope != Scope::Admin && scope != creator) {
            return Err(TuneError::NotOwner(format!("the job {job} was started by another scope; only it or the admin may cancel it")));
        }
        let changed = self.store.set_job_status(job, JobStatus::Cancelled, None, None, None)?;
        if changed {
            self.store.add_event(job, "info", "Job cancelled", None)?;
            if let Some(flag) = self.cancelled.lock().unwrap_or_else(|p| p.into_inner()).get(job) {
                flag.store(true, Ordering::SeqCst);
            }
        }
        Ok(changed)
    }

    /// Deletes the tuned adapter `name` (its versions and pairs; refused while it trains) and
    /// stops serving it; the other servers sharing the store follow. False if it has no record.
    pub fn delete_adapter(&self, name: &str) -> Result<bool, TuneError> {
        let deleted = self.store.delete_adapter(name).map_err(|e| match e {
            StoreError::ActiveJob { adapter, job } => TuneError::Busy { adapter, job },
            other => TuneError::Store(other),
        })?;
        if deleted {
            let _ = self.registry.unload(name);
            tracing::info!(adapter = name, "tuned adapter deleted");
        }
        Ok(deleted)
    }

    /// Makes `version` of `adapter` current again and serves it.
    pub fn rollback(&self, adapter: &str, version: u32) -> Result<(), TuneError> {
        let versions = self.store.versions(adapter)?;
        let target = versions
            .iter()
            .find(|v| v.version == version)
            .ok_or_else(|| TuneError::Invalid(format!("`{adapter}` has no version {version}")))?;
        self.registry
            .install(adapter, &target.path)
            .map_err(|e| TuneError::Invalid(e.to_string()))?;
        self.store.set_current_version(adapter, version)?;
        tracing::info!(adapter, version, "adapter rolled back");
        Ok(())
    }

    /// Runs a job this server claimed, renewing the claim while it runs. When the claim
    /// cannot be renewed (the job was cancelled on another server, or another trainer took it
    /// over) the job stops before its next step.
    pub(crate) fn run_claimed(&self, claim: &Claim) {
        let stop = Arc::new(AtomicBool::new(false));
        self.cancelled.lock().unwrap_or_else(|p| p.into_inner()).insert(claim.job.clone(), stop.clone());
        let heartbeat = worker::Heartbeat::start(self.store.clone(), claim.clone(), stop);
        let claimed = serde_json::json!({ "trainer": claim.trainer });
        if let Err(e) = self.store.add_event(&claim.job, "info", &format!("Claimed by trainer {}", claim.trainer), Some(&claimed)) {
            tracing::warn!(job = %claim.job, error = %e, "claim event not recorded");
        }
        self.run(&claim.job);
        drop(heartbeat);
        self.cancelled.lock().unwrap_or_else(|p| p.into_inner()).remove(&claim.job);
    }

    pub(crate) fn trainer(&self) -> &str {
        &self.trainer
    }

    fn run(&self, job_id: &str) {
        let span = tracing::info_span!("fine_tuning_job", job = job_id);
        let _entered = span.enter();
        let outcome = self.run_job(job_id);
        let result = match outcome {
            Ok(()) => Ok(()),
            Err(TuneError::Cancelled) => Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "fine-tuning job failed");
                self.store
                    .add_event(job_id, "error", &format!("Job failed: {e}"), None)
                    .and_then(|_| self.store.set_job_status(job_id, JobStatus::Failed, None, Some(&e.to_string()), None).map(|_| ()))
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "job outcome not recorded");
        }
    }

    fn check_cancelled(&self, job_id: &str) -> Result<(), TuneError> {
        let flagged = self
            .cancelled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(job_id)
            .is_some_and(|f| f.load(Ordering::SeqCst));
        if flagged {
            return Err(TuneError::Cancelled);
        }
        Ok(())
    }

    fn examples(&self, conversations: &[Conversation]) -> Result<(Vec<Example>, usize), TuneError> {
        let mut examples = Vec::with_capacity(conversations.len());
        let mut skipped = 0;
        for conversation in conversations {
            match example(&self.model.tokenizer, &self.model.chat, conversation, self.settings.max_seq_len)? {
                Some(e) => examples.push(e),
                None => skipped += 1,
            }
        }
        Ok((examples, skipped))
    }

    /// Each preference's answers as sequences scored on the answer only, with the reference
    /// policy's log-probabilities of each; and how many were skipped (an answer with no token
    /// left to score after truncation).
    fn preference_examples(&self, preferences: &[Preference], reference: &AdapterParams) -> Result<(Vec<PreferenceExample>, usize), TuneError> {
        let (mut pairs, mut skipped) = (Vec::with_capacity(preferences.len()), 0);
        let max_len = self.settings.max_seq_len;
        for preference in preferences {
            let chosen = answer_example(&self.model.tokenizer, &self.model.chat, &preference.chosen_conversation(), max_len)?;
            let rejected = answer_example(&self.model.tokenizer, &self.model.chat, &preference.rejected_conversation(), max_len)?;
            match (chosen, rejected) {
                (Some(chosen), Some(rejected)) => pairs.push((chosen, rejected)),
                _ => skipped += 1,
            }
        }
        Ok((dpo::with_reference(Trainable::new(&self.model, reference), pairs, MICRO_BATCH / 2)?, skipped))
    }

    fn file_content(&self, id: &str) -> Result<Vec<u8>, TuneError> {
        self.store
            .file_content(id)?
            .ok_or_else(|| TuneError::Invalid(format!("the file `{id}` does not exist")))
    }

    fn file_conversations(&self, id: &str) -> Result<Vec<Conversation>, TuneError> {
        parse_upload(&self.file_content(id)?).map_err(|e| TuneError::Invalid(format!("file `{id}`: {e}")))
    }

    /// A DPO file's lines, each a preference.
    fn file_preferences(&self, id: &str) -> Result<Vec<Preference>, TuneError> {
        let records = parse_records(&self.file_content(id)?).map_err(|e| TuneError::Invalid(format!("file `{id}`: {e}")))?;
        records
            .iter()
            .enumerate()
            .map(|(line, r)| {
                parse_preference(r).map_err(|e| TuneError::Invalid(format!("file `{id}`, line {}: a DPO job needs preference lines: {e}", line + 1)))
            })
            .collect()
    }

    /// A job's records, split into what it trains on and what it holds out.
    fn job_records(&self, adapter: &str, spec: &JobSpec) -> Result<JobRecords, TuneError> {
        match &spec.data {
            JobData::Feedback { last_pair_id, last_preference_id } => {
                let pairs = self.store.pairs_through(adapter, *last_pair_id)?.into_iter().map(|p| (p.hash, p.conversation)).collect();
                let preferences = self.store.preferences_through(adapter, *last_preference_id)?;
                let (pairs, held_pairs) = hold_out(pairs);
                let (preferences, held_preferences) = hold_out(preferences.into_iter().map(|p| (p.hash, p.preference)).collect());
                Ok(JobRecords { pairs, held_pairs, preferences, held_preferences })
            }
            JobData::Files { training_file, validation_file } => {
                let mut records = JobRecords::default();
                match spec.method {
                    Method::Supervised => {
                        records.pairs = self.file_conversations(training_file)?;
                        records.held_pairs = validation_file.as_deref().map(|f| self.file_conversations(f)).transpose()?.unwrap_or_default();
                    }
                    Method::Dpo { .. } => {
                        records.preferences = self.file_preferences(training_file)?;
                        records.held_preferences = validation_file.as_deref().map(|f| self.file_preferences(f)).transpose()?.unwrap_or_default();
                    }
                }
                Ok(records)
            }
        }
    }

    /// The job's training items and held-out examples, tokenized, with the reference policy's
    /// log-probabilities of every preference's answers.
    fn training_data(&self, job_id: &str, job: &JobRow, spec: &JobSpec) -> Result<TrainingData, TuneError> {
        let records = self.job_records(&job.adapter, spec)?;
        let (pairs, skipped_pairs) = self.examples(&records.pairs)?;
        let (held_pairs, _) = self.examples(&records.held_pairs)?;
        let (preferences, held_preferences, skipped_preferences) = if records.preferences.is_empty() && records.held_preferences.is_empty() {
            (Vec::new(), Vec::new(), 0)
        } else {
            // π_ref: the version the job starts from, whose factors the policy starts with.
            let reference = AdapterParams::load_peft(&self.store.fetch_version(&job.adapter, spec.start_version)?, &self.base_shape())?;
            let (train, skipped) = self.preference_examples(&records.preferences, &reference)?;
            let (held, _) = self.preference_examples(&records.held_preferences, &reference)?;
            (train, held, skipped)
        };
        if pairs.is_empty() && preferences.is_empty() {
            return Err(TuneError::Invalid("no training example has a token to learn after truncation".into()));
        }
        for (skipped, what) in [(skipped_pairs, "examples"), (skipped_preferences, "preferences")] {
            if skipped > 0 {
                let message = format!("{skipped} {what} skipped: nothing left to learn after truncation to {} tokens", self.settings.max_seq_len);
                self.store.add_event(job_id, "warn", &message, None)?;
            }
        }
        let mix = serde_json::json!({
            "method": spec.method.name(),
            "beta": spec.method.beta(),
            "pairs": pairs.len(),
            "preferences": preferences.len(),
            "held_out_pairs": held_pairs.len(),
            "held_out_preferences": held_preferences.len(),
        });
        let train = pairs.into_iter().map(Item::Pair).chain(preferences.into_iter().map(Item::Preference)).collect();
        Ok(TrainingData { train, held_out: HeldOut { pairs: held_pairs, preferences: held_preferences }, mix })
    }

    fn run_job(&self, job_id: &str) -> Result<(), TuneError> {
        let Some(job) = self.store.job(job_id)? else { return Ok(()) };
        if job.status.has_ended() {
            return Ok(());
        }
        let spec: JobSpec = serde_json::from_value(job.spec.clone()).map_err(TrainError::from)?;
        let adapter = self
            .store
            .adapter(&job.adapter)?
            .ok_or_else(|| TuneError::Invalid(format!("the adapter `{}` is gone", job.adapter)))?;
        let TrainingData { train, held_out, mix } = self.training_data(job_id, &job, &spec)?;
        if job.status == JobStatus::ValidatingFiles {
            self.store.set_job_status(job_id, JobStatus::Queued, None, None, None)?;
        }
        self.check_cancelled(job_id)?;

        // Weights and optimizer: from the last checkpoint, else from the starting version.
        let shape = self.base_shape();
        let mut checkpoint = self.store.checkpoints(job_id)?.into_iter().next();
        if let Some(c) = &mut checkpoint {
            // Written by whichever trainer ran the job before: fetched if it ran elsewhere.
            c.path = self.store.fetch(&c.path)?;
        }
        let lora = match &checkpoint {
            Some(c) => AdapterParams::load_peft(&c.path, &shape)?,
            None => AdapterParams::load_peft(&self.store.fetch_version(&job.adapter, spec.start_version)?, &shape)?,
        };
        let h = spec.hyperparameters;
        let steps_per_epoch = train.len().div_ceil(h.batch_size.max(1));
        let total_steps = steps_per_epoch * h.n_epochs.max(1);
        let mut optimizer = new_optimizer(&lora, h, total_steps)?;
        let mut trained_tokens = 0u64;
        if let Some(c) = &checkpoint {
            optimizer.load(&c.path.join("optimizer.safetensors"), c.step)?;
            trained_tokens = c.metrics["trained_tokens"].as_u64().unwrap_or(0);
            self.store.add_event(job_id, "info", &format!("Resumed from the checkpoint at step {}", c.step), None)?;
        }
        self.store.set_job_status(job_id, JobStatus::Running, None, None, None)?;
        self.store.add_event(
            job_id,
            "info",
            &format!(
                "Training ({}, {}) on {} pairs and {} preferences ({} and {} held out): {} epochs of {} steps, batch {}",
                spec.method.name(),
                h.optimizer.name(),
                mix["pairs"],
                mix["preferences"],
                held_out.pairs.len(),
                held_out.preferences.len(),
                h.n_epochs,
                steps_per_epoch,
                h.batch_size
            ),
            Some(&mix),
        )?;
        tracing::info!(examples = train.len(), total_steps, start = optimizer.step(), "training");

        // The order of epoch e is a permutation seeded by (seed, e): a resumed job sees the
        // same batches it would have.
        let order = |epoch: usize| {
            let mut order: Vec<usize> = (0..train.len()).collect();
            order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(spec.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64)));
            order
        };
        let mut epoch_order = (usize::MAX, Vec::new());
        while optimizer.step() < total_steps {
            self.check_cancelled(job_id)?;
            let step = optimizer.step();
            let epoch = step / steps_per_epoch;
            if epoch_order.0 != epoch {
                epoch_order = (epoch, order(epoch));
            }
            let within = (step % steps_per_epoch) * h.batch_size;
            let batch: Vec<&Item> = epoch_order.1[within..(within + h.batch_size).min(train.len())].iter().map(|&i| &train[i]).collect();
            let started = std::time::Instant::now();
            let (pairs, preferences) = split_items(&batch);
            // Gradient accumulation: a batch of any size runs as micro-batches, so memory holds
            // one micro-batch's activations.
            let stats = job_step(Trainable::new(&self.model, &lora), &mut optimizer, &pairs, &preferences, spec.method.beta(), MICRO_BATCH)
                .map_err(|source| TuneError::Step { step: step + 1, source })?;
            let step_tokens = batch.iter().map(|item| item.tokens() as u64).sum::<u64>();
            trained_tokens += step_tokens;
            let seconds = started.elapsed().as_secs_f64();
            let mut data = step_metrics(&stats, pairs.len(), preferences.len());
            data.extend([
                ("step".to_string(), optimizer.step().into()),
                ("total_steps".to_string(), total_steps.into()),
                ("seconds".to_string(), seconds.into()),
                ("tokens_per_second".to_string(), (step_tokens as f64 / seconds.max(1e-9)).into()),
                ("gradient_bytes".to_string(), stats.gradient_bytes.into()),
                ("optimizer_state_bytes".to_string(), optimizer.state_bytes().into()),
                ("peak_rss_bytes".to_string(), crate::metrics::process_status_bytes("VmHWM").unwrap_or(0).into()),
            ]);
            let message = match stats.dpo {
                Some(r) => format!("Step {}/{total_steps}: training loss={:.4}, reward accuracy={:.2}", optimizer.step(), stats.loss, r.accuracy),
                None => format!("Step {}/{total_steps}: training loss={:.4}", optimizer.step(), stats.loss),
            };
            self.store.add_metrics_event(job_id, &message, &serde_json::Value::Object(data))?;
            if optimizer.step() % self.settings.checkpoint_every.max(1) == 0 && optimizer.step() < total_steps {
                self.checkpoint(job_id, &lora, &optimizer, &stats, trained_tokens)?;
            }
        }
        self.check_cancelled(job_id)?;
        self.finish(&job, &spec, &adapter, &lora, &held_out, trained_tokens)
    }

    fn checkpoint(&self, job_id: &str, lora: &AdapterParams, optimizer: &Optimizer, stats: &MixedStats, trained_tokens: u64) -> Result<(), TuneError> {
        let step = optimizer.step();
        let dir = self.store.job_dir(job_id).join(format!("step-{step:06}"));
        lora.save_peft(&dir, &self.model_id)?;
        optimizer.save(&dir.join("optimizer.safetensors"))?;
        crate::train::durable::sync_dir(&dir)?;
        let mut metrics = serde_json::Map::new();
        metrics.insert("step".into(), step.into());
        metrics.insert("train_loss".into(), stats.loss.into());
        if let Some(r) = stats.dpo {
            metrics.extend(r.to_json("train_"));
        }
        metrics.insert("trained_tokens".into(), trained_tokens.into());
        let metrics = serde_json::Value::Object(metrics);
        // The row is the commit point: a crash before it leaves an unused folder.
        self.store.add_checkpoint(job_id, step, &dir, &metrics)?;
        self.store.add_event(job_id, "info", &format!("Checkpoint written at step {step}"), Some(&metrics))?;
        Ok(())
    }

    /// How `lora` does on the held-out examples: the mean token loss on pairs, the DPO
    /// rewards on preferences.
    fn held_out_scores(&self, lora: &AdapterParams, held_out: &HeldOut, beta: f64, batch: usize) -> Result<HeldOutScores, TuneError> {
        let trainable = Trainable::new(&self.model, lora);
        Ok(HeldOutScores {
            loss: (!held_out.pairs.is_empty()).then(|| evaluate(trainable, &held_out.pairs, batch)).transpose()?,
            rewards: (!held_out.preferences.is_empty())
                .then(|| evaluate_preferences(trainable, &held_out.preferences, beta, (batch / 2).max(1)))
                .transpose()?,
        })
    }

    /// The eval gate, then promotion.
    fn finish(&self, job: &JobRow, spec: &JobSpec, adapter: &AdapterRow, lora: &AdapterParams, held_out: &HeldOut, trained_tokens: u64) -> Result<(), TuneError> {
        let (batch, beta) = (spec.hyperparameters.batch_size, spec.method.beta());
        let new = self.held_out_scores(lora, held_out, beta, batch)?;
        let current = self.store.adapter(&adapter.name)?.map_or(adapter.version, |a| a.version);
        let promote = match &spec.data {
            JobData::Files { .. } => true,
            JobData::Feedback { .. } if new.is_empty() => true,
            JobData::Feedback { .. } => {
                let current_params = AdapterParams::load_peft(&self.store.fetch_version(&adapter.name, current)?, &self.base_shape())?;
                let old = self.held_out_scores(&current_params, held_out, beta, batch)?;
                let better = new.beats(&old);
                let verdict = if better { "promoting" } else { "keeping the current version" };
                let mut data = serde_json::Map::from_iter([("current_version".to_string(), serde_json::json!(current))]);
                data.extend(new.to_json(""));
                data.extend(old.to_json("current_"));
                let message = format!("Held-out {} of version {current}: {verdict}", new.compared_with(&old));
                self.store.add_event(&job.id, "info", &message, Some(&serde_json::Value::Object(data)))?;
                better
            }
        };
        if promote {
            let version = self
                .store
                .versions(&adapter.name)?
                .iter()
                .map(|v| v.version)
                .max()
                .unwrap_or(0)
                + 1;
            let dir = self.store.version_dir(&adapter.name, version);
            lora.save_peft(&dir, &self.model_id)?;
            let mut metrics = new.to_json("");
            metrics.insert("held_out_loss".into(), serde_json::json!(new.loss));
            metrics.insert("trained_tokens".into(), trained_tokens.into());
            metrics.insert("examples_held_out".into(), held_out.pairs.len().into());
            metrics.insert("preferences_held_out".into(), held_out.preferences.len().into());
            let metrics = serde_json::Value::Object(metrics);
            self.store.promote(&adapter.name, version, &job.id, &metrics)?;
            self.registry
                .install(&adapter.name, &dir)
                .map_err(|e| TuneError::Invalid(e.to_string()))?;
            self.store.add_event(&job.id, "info", &format!("Version {version} of {} is now served", adapter.name), Some(&metrics))?;
        }
        self.store
            .set_job_status(&job.id, JobStatus::Succeeded, Some(&adapter.name), None, Some(trained_tokens))?;
        self.store.add_event(&job.id, "info", "The job has successfully completed", None)?;
        tracing::info!(adapter = %adapter.name, promoted = promote, "fine-tuning job succeeded");
        Ok(())
    }
}

/// A job's records: pairs and preferences to train on and to hold out.
#[derive(Default)]
struct JobRecords {
    pairs: Vec<Conversation>,
    held_pairs: Vec<Conversation>,
    preferences: Vec<Preference>,
    held_preferences: Vec<Preference>,
}

/// One in ten records by content hash held out (at least one where there are two or more),
/// the rest to train on, in their stored order.
fn hold_out<T>(records: Vec<(String, T)>) -> (Vec<T>, Vec<T>) {
    let (mut held, mut train): (Vec<_>, Vec<_>) = records.into_iter().partition(|(hash, _)| is_held_out(hash));
    if held.is_empty() && train.len() >= 2 {
        // At least one held out: the one with the smallest hash.
        let i = train.iter().enumerate().min_by(|a, b| a.1 .0.cmp(&b.1 .0)).map_or(0, |(i, _)| i);
        held.push(train.remove(i));
    }
    (train.into_iter().map(|(_, r)| r).collect(), held.into_iter().map(|(_, r)| r).collect())
}

/// What a job steps through: a pair to imitate or a preference to learn.
enum Item {
    Pair(Example),
    Preference(PreferenceExample),
}

impl Item {
    fn tokens(&self) -> usize {
        match self {
            Item::Pair(e) => e.tokens.len(),
            Item::Preference(p) => p.tokens(),
        }
    }
}

/// A batch's pairs and preferences.
fn split_items(batch: &[&Item]) -> (Vec<Example>, Vec<PreferenceExample>) {
    let (mut pairs, mut preferences) = (Vec::new(), Vec::new());
    for item in batch {
        match item {
            Item::Pair(e) => pairs.push(e.clone()),
            Item::Preference(p) => preferences.push(p.clone()),
        }
    }
    (pairs, preferences)
}

/// A step's metrics event: OpenAI's `train_loss`, the mix of the batch, the SFT loss on its
/// pairs and TRL's reward statistics on its preferences.
fn step_metrics(stats: &MixedStats, pairs: usize, preferences: usize) -> serde_json::Map<String, serde_json::Value> {
    let mut data = serde_json::Map::new();
    data.insert("train_loss".into(), stats.loss.into());
    data.insert("learning_rate".into(), stats.learning_rate.into());
    data.insert("grad_norm".into(), stats.grad_norm.into());
    data.insert("pairs".into(), pairs.into());
    data.insert("preferences".into(), preferences.into());
    if let Some((loss, tokens)) = stats.sft {
        data.insert("sft_loss".into(), loss.into());
        data.insert("sft_tokens".into(), tokens.into());
    }
    if let Some(r) = stats.dpo {
        data.extend(r.to_json("train_"));
    }
    data
}

struct TrainingData {
    train: Vec<Item>,
    held_out: HeldOut,
    /// The method and how many of each kind of record the job trains on and holds out.
    mix: serde_json::Value,
}

struct HeldOut {
    pairs: Vec<Example>,
    preferences: Vec<PreferenceExample>,
}

/// How an adapter does on the held-out records of each kind a job has.
struct HeldOutScores {
    loss: Option<f64>,
    rewards: Option<Rewards>,
}

impl HeldOutScores {
    fn is_empty(&self) -> bool {
        self.loss.is_none() && self.rewards.is_none()
    }

    /// Better on every kind held out: a lower token loss on pairs; on preferences a higher
    /// reward accuracy, or the same with a wider mean margin.
    fn beats(&self, other: &Self) -> bool {
        let loss = match (self.loss, other.loss) {
            (Some(new), Some(old)) => new < old,
            _ => true,
        };
        let rewards = match (self.rewards, other.rewards) {
            (Some(new), Some(old)) => new.accuracy > old.accuracy || (new.accuracy == old.accuracy && new.margin > old.margin),
            _ => true,
        };
        loss && rewards
    }

    /// OpenAI's `full_valid_loss` for pairs, TRL's reward statistics for preferences.
    fn to_json(&self, prefix: &str) -> serde_json::Map<String, serde_json::Value> {
        let mut data = serde_json::Map::new();
        if let Some(loss) = self.loss {
            data.insert(format!("{prefix}full_valid_loss"), loss.into());
        }
        if let Some(r) = self.rewards {
            data.extend(r.to_json(&format!("{prefix}valid_")));
        }
        data
    }

    /// "loss 1.2 against 1.3, reward accuracy …": each kind's score beside `other`'s.
    fn compared_with(&self, other: &Self) -> String {
        let mut parts = Vec::new();
        if let (Some(new), Some(old)) = (self.loss, other.loss) {
            parts.push(format!("loss {new:.4} against {old:.4}"));
        }
        if let (Some(new), Some(old)) = (self.rewards, other.rewards) {
            parts.push(format!("reward accuracy {:.3} (margin {:.4}) against {:.3} (margin {:.4})", new.accuracy, new.margin, old.accuracy, old.margin));
        }
        parts.join(", ")
    }
}

/// The store's row for a new adapter whose version 0 is `params`.
fn not_tunable(row: &AdapterRow) -> TuneError {
    TuneError::NotOwner(format!(
        "the adapter `{}` was created by the {} scope and is not open to tuning by others",
        row.name, row.created_by
    ))
}

/// Moves the durable folder `staged` to `v0` and makes the rename durable. A folder already at
/// `v0` is what a create that never committed left behind (the caller's transaction found no
/// adapter of that name), so it goes first.
fn move_into_place(staged: &std::path::Path, v0: &std::path::Path) -> std::io::Result<()> {
    if v0.exists() {
        std::fs::remove_dir_all(v0)?;
    }
    let folder = v0.parent().ok_or_else(|| std::io::Error::other("version folder without a parent"))?;
    std::fs::create_dir_all(folder)?;
    std::fs::rename(staged, v0)?;
    std::fs::File::open(folder)?.sync_all()
}

fn version_zero(name: &str, params: &AdapterParams, created_by: Scope) -> AdapterRow {
    AdapterRow {
        created_by,
        open_to_tuning: false,
        name: name.to_string(),
        rank: params.spec.rank,
        alpha: params.spec.alpha,
        targets: params.spec.targets.iter().map(|t| t.peft_name().to_string()).collect(),
        version: 0,
        pairs_since_training: 0,
    }
}
