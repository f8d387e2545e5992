//! The real server binary on the default model, driven by the official `openai` Python SDK
//! (`tests/e2e/openai_sdk.py`: chat, completions, responses, files, supervised and DPO fine-tuning jobs, batches), then stopped
//! with SIGTERM.

use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::{free_port, KillOnDrop};

#[test]
fn the_openai_sdk_drives_the_real_model_and_sigterm_stops_the_server() {
    let model = tessera::model_store::ensure_model(&tessera::model_store::catalog::GEMMA_3_270M).expect("gemma-3-270m");
    let port = free_port();
    let tuning = tempfile::tempdir().unwrap();
    let mut server = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string(), "--model"])
            .arg(&model)
            .arg("--tuning-dir")
            .arg(tuning.path())
            .spawn()
            .expect("starting tessera serve"),
    );
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/openai_sdk.py");
    let status = Command::new("python3")
        .arg(&script)
        .arg(format!("http://127.0.0.1:{port}/v1"))
        .arg("gemma-3-270m-q4_k_m")
        .status()
        .expect("running python3 (the SDK is installed by `pip install openai`)");
    assert!(status.success(), "the SDK checks failed (see the output above)");

    let pid = server.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(exit) = server.0.try_wait().unwrap() {
            assert!(exit.success(), "the server exited with {exit} after SIGTERM");
            break;
        }
        assert!(Instant::now() < deadline, "the server did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
}
