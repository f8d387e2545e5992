//! A job's training run: its weights and optimizer from the last checkpoint or the starting
//! version, the steps over its items in a seeded order, and a checkpoint every
//! `checkpoint_every` steps.

use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::data::{split_items, Item, TrainingData};
use super::{Hyperparameters, JobSpec, TuneError, Tuner, ADALOMO_EPS_SCALE, MICRO_BATCH};
use crate::store::JobStatus;
use crate::train::adalomo::{AdaLomo, AdaLomoConfig};
use crate::train::decoder::Trainable;
use crate::train::dpo::{MixedStats, PreferenceLoss};
use crate::train::lora::AdapterParams;
use crate::train::optim::{AdamW, AdamWConfig, Optimizer, OptimizerKind, Schedule};
use crate::train::step::job_step;
use crate::train::TrainError;

/// How many steps a job takes.
struct Plan {
    steps_per_epoch: usize,
    total_steps: usize,
}

impl Plan {
    fn of(spec: &JobSpec, items: usize) -> Self {
        let h = spec.hyperparameters;
        let steps_per_epoch = items.div_ceil(h.batch_size.max(1));
        Self { steps_per_epoch, total_steps: steps_per_epoch * h.n_epochs.max(1) }
    }
}

impl Tuner {
    pub(super) fn run_job(&self, job_id: &str) -> Result<(), TuneError> {
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

        let plan = Plan::of(&spec, train.len());
        let (lora, mut optimizer, mut trained_tokens) = self.resume(job_id, &job.adapter, &spec, &plan)?;
        self.store.set_job_status(job_id, JobStatus::Running, None, None, None)?;
        let h = spec.hyperparameters;
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
                plan.steps_per_epoch,
                h.batch_size
            ),
            Some(&mix),
        )?;
        tracing::info!(examples = train.len(), total_steps = plan.total_steps, start = optimizer.step(), "training");
        self.train_steps(job_id, &spec, &plan, &train, &lora, &mut optimizer, &mut trained_tokens)?;
        self.check_cancelled(job_id)?;
        self.finish(&job, &spec, &adapter, &lora, &held_out, trained_tokens)
    }

    /// Weights, optimizer and trained tokens: from the last checkpoint, else from the starting
    /// version.
    fn resume(&self, job_id: &str, adapter: &str, spec: &JobSpec, plan: &Plan) -> Result<(AdapterParams, Optimizer, u64), TuneError> {
        let shape = self.base_shape();
        let mut checkpoint = self.store.checkpoints(job_id)?.into_iter().next();
        if let Some(c) = &mut checkpoint {
            // Written by whichever trainer ran the job before: fetched if it ran elsewhere.
            c.path = self.store.fetch(&c.path)?;
        }
        let lora = match &checkpoint {
            Some(c) => AdapterParams::load_peft(&c.path, &shape)?,
            None => AdapterParams::load_peft(&self.store.fetch_version(adapter, spec.start_version)?, &shape)?,
        };
        let mut optimizer = new_optimizer(&lora, spec.hyperparameters, plan.total_steps)?;
        let mut trained_tokens = 0u64;
        if let Some(c) = &checkpoint {
            optimizer.load(&c.path.join("optimizer.safetensors"), c.step)?;
            trained_tokens = c.metrics["trained_tokens"].as_u64().unwrap_or(0);
            self.store.add_event(job_id, "info", &format!("Resumed from the checkpoint at step {}", c.step), None)?;
        }
        Ok((lora, optimizer, trained_tokens))
    }

    /// The steps from the optimizer's to the last, each reported as a metrics event.
    #[allow(clippy::too_many_arguments)]
    fn train_steps(
        &self,
        job_id: &str,
        spec: &JobSpec,
        plan: &Plan,
        train: &[Item],
        lora: &AdapterParams,
        optimizer: &mut Optimizer,
        trained_tokens: &mut u64,
    ) -> Result<(), TuneError> {
        let (batch_size, total_steps) = (spec.hyperparameters.batch_size, plan.total_steps);
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
            let epoch = step / plan.steps_per_epoch;
            if epoch_order.0 != epoch {
                epoch_order = (epoch, order(epoch));
            }
            let within = (step % plan.steps_per_epoch) * batch_size;
            let batch: Vec<&Item> = epoch_order.1[within..(within + batch_size).min(train.len())].iter().map(|&i| &train[i]).collect();
            let started = std::time::Instant::now();
            let (pairs, preferences) = split_items(&batch);
            // Gradient accumulation: a batch of any size runs as micro-batches, so memory holds
            // one micro-batch's activations (AdaLomo runs it whole: it keeps no gradient to sum).
            let preference_loss = PreferenceLoss::for_jobs(spec.method.beta());
            let stats = job_step(Trainable::new(&self.model, lora), optimizer, &pairs, &preferences, preference_loss, MICRO_BATCH)
                .map_err(|source| TuneError::Step { step: step + 1, source })?;
            let step_tokens = batch.iter().map(|item| item.tokens() as u64).sum::<u64>();
            *trained_tokens += step_tokens;
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
                Some(p) => format!("Step {}/{total_steps}: training loss={:.4}, reward accuracy={:.2}", optimizer.step(), stats.loss, p.rewards.accuracy),
                None => format!("Step {}/{total_steps}: training loss={:.4}", optimizer.step(), stats.loss),
            };
            self.store.add_metrics_event(job_id, &message, &serde_json::Value::Object(data))?;
            if optimizer.step() % self.settings.checkpoint_every.max(1) == 0 && optimizer.step() < total_steps {
                self.checkpoint(job_id, lora, optimizer, &stats, *trained_tokens)?;
            }
        }
        Ok(())
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
        if let Some(p) = stats.dpo {
            metrics.extend(p.to_json("train_"));
        }
        metrics.insert("trained_tokens".into(), trained_tokens.into());
        let metrics = serde_json::Value::Object(metrics);
        // The row is the commit point: a crash before it leaves an unused folder.
        self.store.add_checkpoint(job_id, step, &dir, &metrics)?;
        self.store.add_event(job_id, "info", &format!("Checkpoint written at step {step}"), Some(&metrics))?;
        Ok(())
    }
}

/// The optimizer `h` names, over `total_steps` with a tenth of them warming up.
pub(crate) fn new_optimizer(lora: &AdapterParams, h: Hyperparameters, total_steps: usize) -> Result<Optimizer, TuneError> {
    let schedule = Schedule { learning_rate: h.peak_rate(lora.spec.kind), warmup_steps: (total_steps / 10).max(1), total_steps };
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
    if let Some(p) = stats.dpo {
        data.extend(p.to_json("train_"));
    }
    data
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::synthetic::tiny_gemma3;
    use crate::train::lora::LoraSpec;
    use tessera_adapters::AdapterKind;

    /// A job of the server's default hyperparameters steps an IA³ adapter at ten times a LoRA
    /// adapter's AdamW rate, and AdaLomo (whose step is relative to each tensor) at its own.
    #[test]
    fn ia3_takes_a_larger_adamw_step_than_lora_under_the_same_hyperparameters() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("tiny.gguf");
        tiny_gemma3(1).write(&path)?;
        let model = Arc::new(crate::LoadedModel::load(&path)?);
        let peak = |kind: AdapterKind, h: Hyperparameters| -> Result<f64, Box<dyn std::error::Error>> {
            let params = AdapterParams::fresh(&model, LoraSpec { kind, ..LoraSpec::default() }, 1)?;
            Ok(match new_optimizer(&params, h, 100)? {
                Optimizer::AdamW(o) => o.config.learning_rate,
                Optimizer::AdaLomo(o) => o.config.schedule.learning_rate,
            })
        };
        let adamw = Hyperparameters::default();
        assert_eq!(peak(AdapterKind::Lora, adamw)?, adamw.learning_rate);
        assert_eq!(peak(AdapterKind::Dora, adamw)?, adamw.learning_rate);
        assert_eq!(peak(AdapterKind::Ia3, adamw)?, adamw.learning_rate * super::super::IA3_ADAMW_RATE_SCALE);
        let adalomo = Hyperparameters { optimizer: OptimizerKind::Adalomo, learning_rate: 0.05, ..adamw };
        assert_eq!(peak(AdapterKind::Ia3, adalomo)?, peak(AdapterKind::Lora, adalomo)?);
        Ok(())
    }
}
