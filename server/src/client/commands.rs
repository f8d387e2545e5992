//! The client subcommands as the command line spells them.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::chat::ChatOptions;
use super::jobs::Hyperparameters;
use super::{adapters, chat, jobs, Client, ClientError, Output};

/// Which server to talk to, with which key, and how to print.
#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// The server's address.
    #[arg(long, global = true, env = "TESSERA_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// The key to present (`Authorization: Bearer …`) [default: $TESSERA_API_KEY, else
    /// $TESSERA_TUNE_KEY, else $TESSERA_ADMIN_KEY: the same variables `tessera serve` reads].
    #[arg(long, global = true)]
    pub api_key: Option<String>,
    /// Print one JSON document (for scripts) instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

impl ServerArgs {
    fn client(&self) -> Client {
        let from_env = ["TESSERA_API_KEY", "TESSERA_TUNE_KEY", "TESSERA_ADMIN_KEY"].iter().find_map(|v| std::env::var(v).ok().filter(|k| !k.is_empty()));
        Client::new(&self.url, self.api_key.clone().or(from_env))
    }
}

#[derive(Args, Debug, Clone, Default)]
pub struct HyperparameterArgs {
    /// Passes over the data [default: the server's].
    #[arg(long)]
    pub epochs: Option<u32>,
    #[arg(long)]
    pub batch_size: Option<u32>,
    /// Scales the optimizer's default learning rate.
    #[arg(long)]
    pub learning_rate_multiplier: Option<f64>,
    /// `adamw` (the default), or `adalomo`: each layer updated inside the backward pass, with
    /// about a tenth of AdamW's gradient and optimizer memory.
    #[arg(long)]
    pub optimizer: Option<String>,
}

impl HyperparameterArgs {
    fn hyperparameters(&self) -> Hyperparameters {
        Hyperparameters {
            epochs: self.epochs,
            batch_size: self.batch_size,
            learning_rate_multiplier: self.learning_rate_multiplier,
            optimizer: self.optimizer.clone(),
        }
    }
}

/// Subcommands that drive a running `tessera serve` over HTTP.
#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Adapters on a running server: list, show, upload, download, delete, rollback.
    Adapters {
        #[command(flatten)]
        server: ServerArgs,
        #[command(subcommand)]
        action: AdaptersAction,
    },
    /// Add feedback pairs to an adapter (created on first feedback).
    Feedback {
        #[command(flatten)]
        server: ServerArgs,
        #[command(subcommand)]
        action: FeedbackAction,
    },
    /// Start a training job on an adapter's feedback pairs.
    Train {
        #[command(flatten)]
        server: ServerArgs,
        name: String,
        #[command(flatten)]
        hyperparameters: HyperparameterArgs,
        /// Follow the job to its end with a progress bar.
        #[arg(long)]
        wait: bool,
    },
    /// Fine-tuning jobs: create, list, show, cancel, follow.
    Jobs {
        #[command(flatten)]
        server: ServerArgs,
        #[command(subcommand)]
        action: JobsAction,
    },
    /// Chat with a model, an adapter or a plugin; answers stream as they are generated.
    Chat {
        #[command(flatten)]
        server: ServerArgs,
        /// The model id [default: the server's base model].
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        system: Option<String>,
        #[arg(long, default_value_t = 0.7)]
        temperature: f32,
        #[arg(long)]
        max_tokens: Option<u32>,
    },
}

#[derive(Subcommand, Debug)]
pub enum AdaptersAction {
    /// Every adapter: rank, version, pairs, training state and held-out loss.
    List,
    /// One adapter, with its versions.
    Show { name: String },
    /// Upload a PEFT folder, a zip or tar archive of one, or a GGUF-LoRA file as NAME.
    Upload { name: String, path: PathBuf },
    /// Save NAME as a PEFT zip or a GGUF-LoRA file.
    Download {
        name: String,
        /// `peft` or `gguf`.
        #[arg(long, default_value = "peft", value_parser = ["peft", "gguf"])]
        format: String,
        /// A version of an adapter tuned online [default: the one served].
        #[arg(long)]
        version: Option<u32>,
        /// Where to write [default: NAME.zip or NAME.gguf here].
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Unload NAME and delete its files from the adapters directory.
    Delete { name: String },
    /// Serve an earlier version of a tuned adapter.
    Rollback { name: String, version: u32 },
}

#[derive(Subcommand, Debug)]
pub enum FeedbackAction {
    /// Post the records of FILE (JSON, a JSON list or JSON Lines in the Alpaca, Dolly, ShareGPT or
    /// OpenAI `messages` format; `-` reads standard input) as feedback on NAME.
    Add {
        name: String,
        file: PathBuf,
        /// Rank of the LoRA created when NAME is new.
        #[arg(long)]
        rank: Option<usize>,
        /// Its α.
        #[arg(long)]
        alpha: Option<f32>,
    },
}

#[derive(Subcommand, Debug)]
pub enum JobsAction {
    /// Fine-tune MODEL (the base or an adapter) on a training file: a local file (uploaded first)
    /// or the id of one uploaded before.
    Create {
        #[arg(long)]
        model: String,
        #[arg(long)]
        training_file: String,
        /// Part of the new adapter's name.
        #[arg(long)]
        suffix: Option<String>,
        #[command(flatten)]
        hyperparameters: HyperparameterArgs,
        /// Follow the job to its end with a progress bar.
        #[arg(long)]
        wait: bool,
    },
    /// Every job, newest first.
    List,
    /// One job's state.
    Show { id: String },
    /// Cancel a job that has not ended (its creator's scope or the admin).
    Cancel { id: String },
    /// Follow a job with a progress bar (step, loss, held-out loss, ETA) to its promotion
    /// decision. Ctrl-C stops following, not the job.
    Follow { id: String },
}

/// Runs one client subcommand against its server.
pub async fn run(command: ClientCommand) -> Result<(), ClientError> {
    match command {
        ClientCommand::Adapters { server, action } => run_adapters(&server.client(), action, Output::new(server.json)).await,
        ClientCommand::Feedback { server, action: FeedbackAction::Add { name, file, rank, alpha } } => {
            let mut query: Vec<String> = rank.iter().map(|r| format!("rank={r}")).collect();
            query.extend(alpha.iter().map(|a| format!("alpha={a}")));
            let query = if query.is_empty() { String::new() } else { format!("?{}", query.join("&")) };
            adapters::add_feedback(&server.client(), &name, &file, &query, Output::new(server.json)).await
        }
        ClientCommand::Train { server, name, hyperparameters, wait } => {
            jobs::train(&server.client(), &name, &hyperparameters.hyperparameters(), wait, Output::new(server.json)).await
        }
        ClientCommand::Jobs { server, action } => run_jobs(&server.client(), action, Output::new(server.json)).await,
        ClientCommand::Chat { server, model, system, temperature, max_tokens } => {
            chat::run(&server.client(), ChatOptions { model, system, temperature, max_tokens }).await
        }
    }
}

async fn run_adapters(client: &Client, action: AdaptersAction, output: Output) -> Result<(), ClientError> {
    match action {
        AdaptersAction::List => adapters::list(client, output).await,
        AdaptersAction::Show { name } => adapters::show(client, &name, output).await,
        AdaptersAction::Upload { name, path } => adapters::upload(client, &name, &path, output).await,
        AdaptersAction::Download { name, format, version, output: path } => adapters::download(client, &name, &format, version, path.as_deref(), output).await,
        AdaptersAction::Delete { name } => adapters::delete(client, &name, output).await,
        AdaptersAction::Rollback { name, version } => adapters::rollback(client, &name, version, output).await,
    }
}

async fn run_jobs(client: &Client, action: JobsAction, output: Output) -> Result<(), ClientError> {
    match action {
        JobsAction::Create { model, training_file, suffix, hyperparameters, wait } => {
            jobs::create(client, &model, &training_file, suffix.as_deref(), &hyperparameters.hyperparameters(), wait, output).await
        }
        JobsAction::List => jobs::list(client, output).await,
        JobsAction::Show { id } => jobs::show(client, &id, output).await,
        JobsAction::Cancel { id } => jobs::cancel(client, &id, output).await,
        JobsAction::Follow { id } => jobs::follow(client, &id, output).await,
    }
}
