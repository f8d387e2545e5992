//! What a job is asked to do, stored with it: where its data comes from, how it trains, and
//! the server's defaults.

use serde::{Deserialize, Serialize};

use crate::train::dpo::DEFAULT_BETA;
use crate::train::lora::LoraSpec;
use tessera_adapters::AdapterKind;
use crate::train::optim::OptimizerKind;

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
    /// The peak learning rate: AdamW's step for a low-rank adapter (IA³ steps at
    /// [`IA3_ADAMW_RATE_SCALE`] times it), or AdaLomo's step relative to each tensor's RMS (the
    /// OpenAI multiplier scales the optimizer's default).
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

impl Hyperparameters {
    /// The peak rate an adapter of `kind` steps at. AdaLomo's step is relative to each tensor's
    /// RMS, so it means the same for every kind; AdamW's is absolute, and IA³'s takes a larger one.
    pub fn peak_rate(&self, kind: AdapterKind) -> f64 {
        match (self.optimizer, kind) {
            (OptimizerKind::Adamw, AdapterKind::Ia3) => self.learning_rate * IA3_ADAMW_RATE_SCALE,
            _ => self.learning_rate,
        }
    }
}

/// How many times a low-rank adapter's AdamW rate IA³ steps at. An IA³ vector starts at one and
/// each of its entries scales a whole channel of every token, so AdamW's fixed-size steps
/// (about η each) move it a thousandth of its size per step at LoRA's 1e-3: in the 90 steps of
/// the CLINC-10 job it learned nothing (0.00 held out), and at ten times the rate it scored 0.99
/// where LoRA r16 scored 0.97.
pub const IA3_ADAMW_RATE_SCALE: f64 = 10.0;

/// AdaLomo's default peak step, relative to each tensor's RMS.
pub const ADALOMO_LEARNING_RATE: f64 = 5e-2;

/// AdaLomo's floor on the RMS a step is scaled by: LoRA's B starts at zero and would otherwise
/// move by ε₂·η, a thousandth of what A does. About the RMS of a fresh A (U(±1/√in) over
/// in ≈ 1–2k features), so that B starts moving as A does.
pub const ADALOMO_EPS_SCALE: f64 = 1e-2;

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
