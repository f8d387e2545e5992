//! Training an adapter without a server: the background tuner's own fine-tuning job, on a
//! private store in a scratch folder, with the same data handling, checkpoints and held-out
//! evaluation; the trained adapter is written as a PEFT folder and as a GGUF-LoRA file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::access::Scope;
use crate::adapter_files;
use crate::dataset::{content_hash, parse_upload, Conversation};
use crate::registry::Registry;
use crate::store::{unix_time, EventRow, FileRow, JobRow, JobStatus, Store};
use crate::train::job::{is_held_out, new_id, Hyperparameters, JobData, JobSpec, TuneError, Tuner, TuningSettings};
use crate::train::lora::LoraSpec;
use crate::LoadedModel;

/// What to train and how.
#[derive(Debug, Clone)]
pub struct LocalTraining {
    pub lora: LoraSpec,
    pub hyperparameters: Hyperparameters,
    pub seed: u64,
    pub max_seq_len: usize,
    pub threads: usize,
}

/// Where the trained adapter went.
#[derive(Debug, Clone)]
pub struct Trained {
    pub peft_dir: PathBuf,
    pub gguf: PathBuf,
    pub examples: usize,
    pub held_out: usize,
}

/// The scratch folder under `out` holding the private store while the job runs.
const SCRATCH: &str = ".train-local";

/// Trains a fresh LoRA on `data` (any upload format) over `model`, holding out `validation`, or
/// else one record in ten by content hash, for the evaluation. Reports each job event to
/// `on_event` as it happens; writes `out/peft/` and `out/adapter.gguf`.
pub fn train_local(
    model: Arc<LoadedModel>,
    model_id: &str,
    data: &[u8],
    validation: Option<&[u8]>,
    out: &Path,
    options: &LocalTraining,
    mut on_event: impl FnMut(&EventRow),
) -> Result<Trained, TuneError> {
    let (train, held_out) = split(data, validation)?;
    let scratch = out.join(SCRATCH);
    let _ = std::fs::remove_dir_all(&scratch);
    let store = Arc::new(Store::open(&scratch)?);
    let shape = model.model.config().adapter_shape();
    let registry = Arc::new(Registry::new(shape.clone(), model_id, &[], None));
    registry.measure_against(model.clone());
    let settings = TuningSettings {
        train_threads: options.threads,
        train_after: usize::MAX,
        max_seq_len: options.max_seq_len,
        default_lora: options.lora.clone(),
        defaults: options.hyperparameters,
        ..TuningSettings::default()
    };
    let tuner = Tuner::start(store.clone(), model, model_id.to_string(), registry, settings)?;
    let spec = JobSpec {
        data: JobData::Files { training_file: stored_file(&store, "train.jsonl", &train)?, validation_file: Some(stored_file(&store, "validation.jsonl", &held_out)?) },
        method: crate::train::job::Method::Supervised,
        hyperparameters: options.hyperparameters,
        seed: options.seed,
        suffix: Some("local".into()),
        start_version: 0,
    };
    let job = tuner.start_file_job(model_id, spec, Some(options.lora.kind), Scope::Admin)?;
    let finished = follow(&store, &job.id, &mut on_event)?;
    if finished.status != JobStatus::Succeeded {
        return Err(TuneError::Invalid(finished.error.unwrap_or_else(|| format!("the job ended {}", finished.status))));
    }
    let adapter = store.adapter(&job.adapter)?.ok_or_else(|| TuneError::Invalid("the trained adapter is gone".into()))?;
    let (peft_dir, gguf) = write_out(&store.version_dir(&adapter.name, adapter.version), out, &shape)?;
    drop(tuner);
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(Trained { peft_dir, gguf, examples: train.len(), held_out: held_out.len() })
}

/// The training and held-out conversations: `validation`'s, or one record in ten of `data`
/// by content hash (at least one when there are two or more).
fn split(data: &[u8], validation: Option<&[u8]>) -> Result<(Vec<Conversation>, Vec<Conversation>), TuneError> {
    let records = parse_upload(data).map_err(|e| TuneError::Invalid(format!("the data: {e}")))?;
    if let Some(validation) = validation {
        let held = parse_upload(validation).map_err(|e| TuneError::Invalid(format!("the validation data: {e}")))?;
        return Ok((records, held));
    }
    let (mut held, mut train): (Vec<_>, Vec<_>) = records.into_iter().partition(|c| is_held_out(&content_hash(c)));
    if held.is_empty() && train.len() >= 2 {
        held.push(train.remove(0));
    }
    Ok((train, held))
}

/// Stores `conversations` as a JSON Lines file in the OpenAI `messages` format; its id.
fn stored_file(store: &Store, filename: &str, conversations: &[Conversation]) -> Result<String, TuneError> {
    let mut content = Vec::new();
    for conversation in conversations {
        content.extend(serde_json::to_vec(conversation).map_err(|e| TuneError::Invalid(e.to_string()))?);
        content.push(b'\n');
    }
    let row = FileRow { id: new_id("file"), filename: filename.into(), purpose: "fine-tune".into(), bytes: content.len(), records: conversations.len(), created_at: unix_time() };
    store.insert_file(&row, &content)?;
    Ok(row.id)
}

/// Reports the job's events in order until it ends; the job as it ended.
fn follow(store: &Store, job: &str, on_event: &mut impl FnMut(&EventRow)) -> Result<JobRow, TuneError> {
    let mut last = 0;
    loop {
        let row = store.job(job)?.ok_or_else(|| TuneError::Invalid(format!("the job {job} is gone")))?;
        let mut events = store.events(job, None, 1000)?;
        events.retain(|e| e.id > last);
        events.sort_by_key(|e| e.id);
        for event in &events {
            on_event(event);
            last = event.id;
        }
        if row.status.has_ended() {
            return Ok(row);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Copies the trained version's PEFT files to `out/peft/` and writes `out/adapter.gguf`.
fn write_out(version: &Path, out: &Path, shape: &tessera_adapters::peft::BaseShape) -> Result<(PathBuf, PathBuf), TuneError> {
    let io = |path: &Path, e: std::io::Error| TuneError::Invalid(format!("{}: {e}", path.display()));
    let peft_dir = out.join("peft");
    std::fs::create_dir_all(&peft_dir).map_err(|e| io(&peft_dir, e))?;
    for file in [tessera_adapters::peft::CONFIG_FILE, tessera_adapters::peft::WEIGHTS_FILE] {
        std::fs::copy(version.join(file), peft_dir.join(file)).map_err(|e| io(&peft_dir.join(file), e))?;
    }
    let factors = adapter_files::read(&peft_dir, shape).map_err(|e| TuneError::Invalid(e.to_string()))?;
    let gguf = out.join("adapter.gguf");
    std::fs::write(&gguf, adapter_files::to_gguf(&factors, shape)).map_err(|e| io(&gguf, e))?;
    Ok((peft_dir, gguf))
}
