//! A fine-tuning job's progress as a bar: steps, training and held-out loss, ETA, and at the end
//! the promotion decision. Fed by the job's events, whether they come over HTTP or from a local
//! store.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use super::Output;

/// What a job's events have said so far, drawn as a progress bar.
pub struct JobProgress {
    bar: ProgressBar,
    pub step: u64,
    total_steps: u64,
    train_loss: Option<f64>,
    held_out_loss: Option<f64>,
    /// The promotion decision and its reason, once made (or why the job failed).
    pub decision: Vec<String>,
}

impl JobProgress {
    /// A bar on standard error; none with JSON output.
    pub fn new(output: Output) -> Self {
        let bar = ProgressBar::new(0);
        if let Ok(style) = ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {msg} (ETA {eta})") {
            bar.set_style(style.progress_chars("=> "));
        }
        if output == Output::Json {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        Self { bar, step: 0, total_steps: 0, train_loss: None, held_out_loss: None, decision: Vec::new() }
    }

    /// Takes one event (its message and data) into account and redraws.
    pub fn take(&mut self, message: &str, data: &Value) {
        if let (Some(step), Some(total)) = (data["step"].as_u64(), data["total_steps"].as_u64()) {
            (self.step, self.total_steps) = (step, total);
        }
        if let Some(loss) = data["train_loss"].as_f64() {
            self.train_loss = Some(loss);
        }
        if let Some(loss) = data["held_out_loss"].as_f64() {
            self.held_out_loss = Some(loss);
        }
        if message.starts_with("Held-out loss") || message.starts_with("Version ") || message.starts_with("Job failed") {
            self.decision.push(message.to_string());
        }
        self.bar.set_length(self.total_steps);
        self.bar.set_position(self.step);
        self.bar.set_message(self.describe());
    }

    /// The latest losses, for people.
    pub fn describe(&self) -> String {
        let loss = self.train_loss.map(|l| format!("loss {l:.4}")).unwrap_or_else(|| "waiting for the first step".into());
        let held_out = self.held_out_loss.map(|l| format!(", held-out {l:.4}")).unwrap_or_default();
        format!("{loss}{held_out}")
    }

    pub fn abandon(&self, message: &'static str) {
        self.bar.abandon_with_message(message);
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
