//! `tessera bench --compare-llama-bench PATH`: llama.cpp's `llama-bench` on the same model and
//! threads, run by turns with Tessera's own measurements in the same process's lifetime, so
//! both see the same machine at the same time.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{load_and_measure_memory, median, PREFILL_LENGTHS};
use crate::{LoadError, LoadOptions};

#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("cannot run {path}: {source}")]
    Spawn { path: PathBuf, source: std::io::Error },
    #[error("{path} failed ({status}): {stderr}")]
    Failed { path: PathBuf, status: String, stderr: String },
    #[error("cannot read llama-bench's output: {0}")]
    Output(String),
}

/// One measurement by both, with every run's figure.
pub struct Compared {
    pub name: String,
    pub unit: &'static str,
    pub tessera: Vec<f64>,
    pub llama_cpp: Vec<f64>,
}

/// Where `llama-bench` is: the path itself, or the binary inside a directory.
fn llama_bench_binary(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("llama-bench")
    } else {
        path.to_path_buf()
    }
}

/// Runs `llama-bench` once with `args` and returns its JSON records and its peak RSS in MiB.
fn run_llama_bench(binary: &Path, model: &Path, threads: usize, args: &[&str]) -> Result<(Vec<serde_json::Value>, f64), CompareError> {
    let libraries = binary.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut child = Command::new(binary)
        .arg("-m")
        .arg(model)
        .args(["-t", &threads.to_string(), "-o", "json"])
        .args(args)
        .env("LD_LIBRARY_PATH", libraries)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| CompareError::Spawn { path: binary.to_path_buf(), source })?;
    let (mut stdout, mut stderr) = (String::new(), String::new());
    let io = |source| CompareError::Spawn { path: binary.to_path_buf(), source };
    child.stdout.take().map(|mut s| s.read_to_string(&mut stdout)).transpose().map_err(io)?;
    child.stderr.take().map(|mut s| s.read_to_string(&mut stderr)).transpose().map_err(io)?;
    let (status, max_rss_kib) = wait_with_peak_rss(child.id()).map_err(io)?;
    if status != 0 {
        let tail: String = stderr.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
        return Err(CompareError::Failed { path: binary.to_path_buf(), status: format!("exit status {status}"), stderr: tail });
    }
    let records: Vec<serde_json::Value> = serde_json::from_str(&stdout).map_err(|e| CompareError::Output(e.to_string()))?;
    Ok((records, max_rss_kib as f64 / 1024.0))
}

/// Waits for the child and reads its exit status and peak resident set (KiB) from `wait4`.
fn wait_with_peak_rss(pid: u32) -> Result<(i32, i64), std::io::Error> {
    let mut status = 0;
    // SAFETY: rusage is plain data, filled in by the kernel.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our own child, not yet waited for.
    let waited = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut usage) };
    if waited < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -1 };
    Ok((code, usage.ru_maxrss))
}

/// tokens/s of the record for (n_prompt, n_gen).
fn throughput(records: &[serde_json::Value], prompt: u64, generated: u64) -> Result<f64, CompareError> {
    records
        .iter()
        .find(|r| r["n_prompt"].as_u64() == Some(prompt) && r["n_gen"].as_u64() == Some(generated))
        .and_then(|r| r["avg_ts"].as_f64())
        .ok_or_else(|| CompareError::Output(format!("no result for {prompt} prompt and {generated} generated tokens")))
}

/// `runs` rounds, each Tessera's prefills and decode followed by llama-bench's; then each
/// one's peak memory for the model plus one 512-token prompt.
pub fn run(model_path: &Path, options: &LoadOptions, runs: usize, decode_tokens: usize, threads: usize, llama_bench: &Path) -> Result<Vec<Compared>, CompareError> {
    let binary = llama_bench_binary(llama_bench);
    // First, while this process is small: a child's peak memory starts from its parent's at
    // the fork.
    let (_, llama_rss) = run_llama_bench(&binary, model_path, threads, &["-p", "512", "-n", "0", "-r", "1"])?;
    let (bench, _, tessera_rss) = load_and_measure_memory(model_path, options, 1)?;
    let names: Vec<String> = PREFILL_LENGTHS
        .iter()
        .map(|n| format!("prefill {n} tokens"))
        .chain([format!("decode, 1 stream, {decode_tokens} tokens")])
        .collect();
    let mut rows: Vec<Compared> = names.into_iter().map(|name| Compared { name, unit: "tok/s", tessera: Vec::new(), llama_cpp: Vec::new() }).collect();
    let prompts = PREFILL_LENGTHS.map(|n| n.to_string()).join(",");
    let generated = decode_tokens.to_string();
    // Warm-up, untimed.
    bench.prefill(512)?;
    for round in 0..runs.max(1) {
        eprintln!("round {} of {}…", round + 1, runs.max(1));
        for (row, n) in rows.iter_mut().zip(PREFILL_LENGTHS) {
            row.tessera.push(bench.prefill(n)?);
        }
        rows[PREFILL_LENGTHS.len()].tessera.push(bench.decode(decode_tokens)?);
        let (records, _) = run_llama_bench(&binary, model_path, threads, &["-p", &prompts, "-n", &generated, "-r", "1"])?;
        for (row, n) in rows.iter_mut().zip(PREFILL_LENGTHS) {
            row.llama_cpp.push(throughput(&records, n as u64, 0)?);
        }
        rows[PREFILL_LENGTHS.len()].llama_cpp.push(throughput(&records, 0, decode_tokens as u64)?);
    }
    rows.push(Compared {
        name: "peak RSS, model + one 512-token prompt".into(),
        unit: "MiB",
        tessera: tessera_rss.into_iter().collect(),
        llama_cpp: vec![llama_rss],
    });
    Ok(rows)
}

/// The table: medians, the ratio Tessera / llama.cpp, and every run.
pub fn format_table(cpu: &str, threads: usize, rows: &[Compared]) -> String {
    let mut s = format!("CPU: {cpu}, {threads} threads\n\n");
    s.push_str("| measurement | unit | tessera | llama.cpp | ratio | tessera runs | llama.cpp runs |\n|---|---|---:|---:|---:|---|---|\n");
    let list = |v: &[f64]| v.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(", ");
    for row in rows {
        let (ours, theirs) = (median(&row.tessera), median(&row.llama_cpp));
        s.push_str(&format!(
            "| {} | {} | {ours:.1} | {theirs:.1} | {:.2}× | {} | {} |\n",
            row.name,
            row.unit,
            ours / theirs,
            list(&row.tessera),
            list(&row.llama_cpp)
        ));
    }
    s
}

/// The CPU's model name, from /proc/cpuinfo.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| info.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|m| m.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into())
}
