//! The end of a job: how the new weights and the current version do on the held-out records,
//! and promotion of the new weights to a served version when they are better (always, for a
//! job on files).

use super::data::HeldOut;
use super::{JobData, JobSpec, TuneError, Tuner};
use crate::store::{AdapterRow, JobRow, JobStatus};
use crate::train::decoder::Trainable;
use crate::train::dpo::{evaluate_preferences, Rewards};
use crate::train::evaluate;
use crate::train::lora::AdapterParams;

impl Tuner {
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
    pub(super) fn finish(&self, job: &JobRow, spec: &JobSpec, adapter: &AdapterRow, lora: &AdapterParams, held_out: &HeldOut, trained_tokens: u64) -> Result<(), TuneError> {
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
