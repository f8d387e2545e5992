//! QLoRA over the served model: the frozen quantized weights are shared with serving, only the
//! adapter factors train.

pub mod adalomo;
pub mod data;
pub mod durable;
pub mod fused;
pub mod decoder;
pub mod dpo;
pub mod job;
pub mod local;
pub mod lora;
pub mod ops;
pub mod optim;
pub mod reference;
pub mod step;
pub mod sync;
pub mod worker;

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// The serving forward (the reference pass of DPO).
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("adapter: {0}")]
    Adapter(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("data: {0}")]
    Data(String),
}

impl TrainError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

use candle_core::Tensor;

use crate::train::decoder::{Example, KeptGraphs, Trainable};
use crate::train::optim::AdamW;

/// What one optimizer step saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean loss per scored token over the accumulated batch.
    pub loss: f64,
    pub tokens: usize,
    pub grad_norm: f64,
    pub learning_rate: f64,
}

/// Gradients of the mean token loss over `micro_batches` (accumulated one micro-batch at a
/// time, so memory holds one micro-batch's activations), with the mean loss and token count.
pub fn gradients(trainable: Trainable, micro_batches: &[&[Example]]) -> Result<(Vec<Tensor>, f64, usize), TrainError> {
    gradients_keeping(trainable, micro_batches, KeptGraphs::WithinBudget)
}

/// [`gradients`] with the top `kept` layers' forward graphs kept instead of checkpointed.
pub fn gradients_keeping(
    trainable: Trainable,
    micro_batches: &[&[Example]],
    kept: KeptGraphs,
) -> Result<(Vec<Tensor>, f64, usize), TrainError> {
    let vars: Vec<_> = trainable.lora.named_vars().into_iter().map(|(_, v)| v).collect();
    let mut sums: Vec<Option<Tensor>> = vec![None; vars.len()];
    let (mut loss, mut tokens) = (0f64, 0usize);
    for batch in micro_batches {
        let (sum, n) = trainable.accumulate_gradients(batch, kept, &vars, sums.as_mut_slice())?;
        loss += sum;
        tokens += n;
    }
    if tokens == 0 {
        return Err(TrainError::Data("no scored tokens in the batch".into()));
    }
    let grads = sums
        .into_iter()
        .zip(&vars)
        .map(|(g, v)| match g {
            Some(g) => Ok((g / tokens as f64)?),
            None => Ok(v.as_tensor().zeros_like()?),
        })
        .collect::<Result<Vec<_>, TrainError>>()?;
    Ok((grads, loss / tokens as f64, tokens))
}

/// One optimizer step over the accumulated micro-batches.
pub fn train_step(trainable: Trainable, optimizer: &mut AdamW, micro_batches: &[&[Example]]) -> Result<StepStats, TrainError> {
    let (grads, loss, tokens) = gradients(trainable, micro_batches)?;
    let vars: Vec<_> = trainable.lora.named_vars().into_iter().map(|(_, v)| v).collect();
    let (grad_norm, learning_rate) = optimizer.step(&vars, &grads)?;
    Ok(StepStats {
        loss,
        tokens,
        grad_norm,
        learning_rate,
    })
}

/// Mean loss per scored token of `examples`, in batches of `batch_size`, without gradients.
pub fn evaluate(trainable: Trainable, examples: &[Example], batch_size: usize) -> Result<f64, TrainError> {
    let (mut loss, mut tokens) = (0f64, 0usize);
    for batch in examples.chunks(batch_size.max(1)) {
        let (sum, n) = trainable.loss(batch)?;
        loss += sum;
        tokens += n;
    }
    if tokens == 0 {
        return Err(TrainError::Data("nothing to evaluate".into()));
    }
    Ok(loss / tokens as f64)
}
