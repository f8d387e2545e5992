//! The real server binary on the real instruct model (Qwen2.5-Coder 0.5B Instruct, fetched from
//! the catalog on first use), driven by the official `openai` Python SDK
//! (`tests/e2e/real_model_sdk.py`: sensible chat, tool calls in every `tool_choice`, streamed and
//! sent back, structured outputs, and feedback that trains an adapter in the background until it
//! answers what it was taught), then stopped with SIGTERM.

use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::{free_port, KillOnDrop};

/// The script's own limit is about six minutes of training plus the other sections; past this
/// something hangs.
const SCRIPT_LIMIT: Duration = Duration::from_secs(15 * 60);

#[test]
fn the_openai_sdk_drives_the_instruct_model_through_chat_tools_structured_outputs_and_tuning() {
    let entry = &tessera::model_store::catalog::QWEN2_5_CODER_0_5B;
    let model = tessera::model_store::ensure_model(entry).expect("qwen2.5-coder-0.5b-instruct");
    let served_id = model.file_stem().unwrap().to_str().unwrap().to_string();
    let port = free_port();
    let tuning = tempfile::tempdir().unwrap();
    let adapters = tempfile::tempdir().unwrap();
    let mut server = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string(), "--model"])
            .arg(&model)
            .arg("--tuning-dir")
            .arg(tuning.path())
            .arg("--adapters-dir")
            .arg(adapters.path())
            // The script sends 24 pairs at once: they start the job on their own. Short
            // sequences (its pairs are under 64 tokens) and both cores for the trainer, since
            // nothing is served while the script waits for the job.
            .args(["--train-after", "24", "--train-max-seq-len", "128", "--train-threads", "2"])
            .spawn()
            .expect("starting tessera serve"),
    );
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/real_model_sdk.py");
    let mut python = KillOnDrop(
        Command::new("python3")
            .arg(&script)
            .arg(format!("http://127.0.0.1:{port}/v1"))
            .arg(&served_id)
            .spawn()
            .expect("running python3 (the SDK is installed by `pip install openai pydantic`)"),
    );
    let deadline = Instant::now() + SCRIPT_LIMIT;
    let status = loop {
        if let Some(status) = python.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the SDK checks did not finish in {SCRIPT_LIMIT:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.success(), "the real-model SDK checks failed (see the output above)");

    let pid = server.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(exit) = server.0.try_wait().unwrap() {
            assert!(exit.success(), "the server exited with {exit} after SIGTERM");
            break;
        }
        assert!(Instant::now() < deadline, "the server did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
}
