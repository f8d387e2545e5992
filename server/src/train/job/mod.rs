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

mod data;
mod eval_gate;
mod run;
mod spec;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use tessera_adapters::peft::BaseShape;
use tessera_adapters::AdapterKind;

use crate::access::Scope;
use crate::registry::Registry;
use crate::store::{unix_time, AdapterRow, Adoption, Claim, Inserted, JobRow, JobStatus, NewFeedback, Store, StoreError};
use crate::train::dpo::DEFAULT_BETA;
use crate::train::lora::{AdapterParams, LoraSpec};
use crate::train::sync::{self, SyncState};
use crate::train::worker;
use crate::train::TrainError;
use crate::LoadedModel;

pub(crate) use run::new_optimizer;
pub use spec::{Hyperparameters, JobData, JobSpec, Method, TuningSettings, ADALOMO_EPS_SCALE, ADALOMO_LEARNING_RATE, IA3_ADAMW_RATE_SCALE};

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
