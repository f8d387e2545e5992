//! A job's data: its records (feedback or files) split into what it trains on and what it
//! holds out, tokenized, with the reference policy's log-probabilities of every preference's
//! answers computed once, through the serving forward.

use tessera_adapters::peft::PeftAdapter;
use tessera_adapters::AdapterMix;

use super::{is_held_out, JobData, JobSpec, Method, TuneError, Tuner};
use crate::dataset::preference::{parse_preference, Preference};
use crate::dataset::{parse_records, parse_upload, Conversation};
use crate::store::JobRow;
use crate::train::data::{answer_example, example};
use crate::train::decoder::Example;
use crate::train::dpo::{self, PreferenceExample};
use crate::train::reference::serving_log_probs;

impl Tuner {
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
    /// policy's log-probabilities of each (the serving forward with `reference`); and how many
    /// were skipped (an answer with no token left to score after truncation).
    fn preference_examples(&self, preferences: &[Preference], reference: &AdapterMix) -> Result<(Vec<PreferenceExample>, usize), TuneError> {
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
        let log_probs = serving_log_probs(&self.model.model, reference, &pairs)?;
        Ok((dpo::with_reference(pairs, log_probs), skipped))
    }

    /// The adapter version a job starts from, as the server serves it: π_ref of its preferences.
    fn reference_adapter(&self, adapter: &str, version: u32) -> Result<PeftAdapter, TuneError> {
        let dir = self.store.fetch_version(adapter, version)?;
        crate::adapter_files::load(&dir, &self.base_shape(), Some(&*self.model))
            .map_err(|e| TuneError::Invalid(format!("version {version} of `{adapter}`: {}", e.reason())))
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
    pub(super) fn training_data(&self, job_id: &str, job: &JobRow, spec: &JobSpec) -> Result<TrainingData, TuneError> {
        let records = self.job_records(&job.adapter, spec)?;
        let (pairs, skipped_pairs) = self.examples(&records.pairs)?;
        let (held_pairs, _) = self.examples(&records.held_pairs)?;
        let (preferences, held_preferences, skipped_preferences) = if records.preferences.is_empty() && records.held_preferences.is_empty() {
            (Vec::new(), Vec::new(), 0)
        } else {
            // π_ref: the version the job starts from, whose factors the policy starts with.
            let reference = self.reference_adapter(&job.adapter, spec.start_version)?;
            let reference = AdapterMix { parts: vec![(&reference.weights, 1.0)] };
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
pub(super) enum Item {
    Pair(Example),
    Preference(PreferenceExample),
}

impl Item {
    pub(super) fn tokens(&self) -> usize {
        match self {
            Item::Pair(e) => e.tokens.len(),
            Item::Preference(p) => p.tokens(),
        }
    }
}

/// A batch's pairs and preferences.
pub(super) fn split_items(batch: &[&Item]) -> (Vec<Example>, Vec<PreferenceExample>) {
    let (mut pairs, mut preferences) = (Vec::new(), Vec::new());
    for item in batch {
        match item {
            Item::Pair(e) => pairs.push(e.clone()),
            Item::Preference(p) => preferences.push(p.clone()),
        }
    }
    (pairs, preferences)
}

pub(super) struct TrainingData {
    pub(super) train: Vec<Item>,
    pub(super) held_out: HeldOut,
    /// The method and how many of each kind of record the job trains on and holds out.
    pub(super) mix: serde_json::Value,
}

pub(super) struct HeldOut {
    pub(super) pairs: Vec<Example>,
    pub(super) preferences: Vec<PreferenceExample>,
}
