//! `tessera adapters …` and `tessera feedback add`.

use std::io::Read;
use std::path::Path;

use serde_json::{json, Value};

use super::{segment, Client, ClientError, Output};

/// One line per adapter: name, version, pairs, training state and held-out loss.
fn adapter_line(a: &Value) -> String {
    let tuning = match (a["version"].as_u64(), a["pairs"].as_u64()) {
        (Some(version), pairs) => {
            let training = if a["training"].as_bool() == Some(true) { ", training" } else { "" };
            let loss = a["metrics"]["held_out_loss"].as_f64().map(|l| format!(", held-out loss {l:.4}")).unwrap_or_default();
            format!("v{version}, {} pairs{training}{loss}", pairs.unwrap_or(0))
        }
        (None, _) => "not tuned online".into(),
    };
    let rank = a["rank"].as_u64().map(|r| format!("r{r}")).unwrap_or_else(|| "not loaded".into());
    format!("{:<24} {rank:<10} {tuning}", a["name"].as_str().unwrap_or("?"))
}

pub async fn list(client: &Client, output: Output) -> Result<(), ClientError> {
    let adapters = client.get("/v1/adapters").await?;
    output.print(&adapters, |v| {
        let rows: Vec<String> = v["data"].as_array().into_iter().flatten().map(adapter_line).collect();
        if rows.is_empty() {
            "no adapters".into()
        } else {
            rows.join("\n")
        }
    });
    Ok(())
}

pub async fn show(client: &Client, name: &str, output: Output) -> Result<(), ClientError> {
    let adapter = client.get(&format!("/v1/adapters/{}", segment(name))).await?;
    output.print(&adapter, |a| {
        let versions = a["versions"].as_array().map(|v| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", "));
        let mut text = adapter_line(a);
        if let Some(versions) = versions {
            text.push_str(&format!("\nversions: {versions}"));
        }
        text.push_str(&format!("\npath: {}", a["path"].as_str().unwrap_or("?")));
        text
    });
    Ok(())
}

/// Uploads `path` as `name`: a PEFT folder (its two files), a zip or tar archive, or a
/// GGUF-LoRA file.
pub async fn upload(client: &Client, name: &str, path: &Path, output: Output) -> Result<(), ClientError> {
    let part = |bytes: Vec<u8>, file: &str| reqwest::multipart::Part::bytes(bytes).file_name(file.to_string());
    let mut form = reqwest::multipart::Form::new().text("name", name.to_string());
    if path.is_dir() {
        for file in [tessera_adapters::peft::CONFIG_FILE, tessera_adapters::peft::WEIGHTS_FILE] {
            form = form.part(file, part(std::fs::read(path.join(file))?, file));
        }
    } else {
        let bytes = std::fs::read(path)?;
        let field = if bytes.starts_with(b"GGUF") { "gguf" } else { "archive" };
        let file = path.file_name().and_then(|n| n.to_str()).unwrap_or("adapter").to_string();
        form = form.part(field, part(bytes, &file));
    }
    let adapter = client.post_form("/v1/adapters", form).await?;
    output.print(&adapter, |a| format!("uploaded\n{}", adapter_line(a)));
    Ok(())
}

/// Writes `name` (or its `version`) in `format` to `out` (default: the server's file name).
pub async fn download(client: &Client, name: &str, format: &str, version: Option<u32>, out: Option<&Path>, output: Output) -> Result<(), ClientError> {
    let mut uri = format!("/v1/adapters/{}/download?format={format}", segment(name));
    if let Some(version) = version {
        uri.push_str(&format!("&version={version}"));
    }
    let bytes = client.download(&uri).await?;
    let suffix = version.map(|v| format!("-v{v}")).unwrap_or_default();
    let extension = if format == "gguf" { "gguf" } else { "zip" };
    let path = out.map(Path::to_path_buf).unwrap_or_else(|| format!("{name}{suffix}.{extension}").into());
    std::fs::write(&path, &bytes)?;
    output.print(&json!({"path": path, "bytes": bytes.len(), "format": format}), |_| format!("wrote {} ({} bytes)", path.display(), bytes.len()));
    Ok(())
}

pub async fn delete(client: &Client, name: &str, output: Output) -> Result<(), ClientError> {
    let answer = client.delete(&format!("/v1/adapters/{}", segment(name))).await?;
    output.print(&answer, |_| format!("deleted {name}"));
    Ok(())
}

pub async fn rollback(client: &Client, name: &str, version: u32, output: Output) -> Result<(), ClientError> {
    let adapter = client.post(&format!("/v1/adapters/{}/rollback", segment(name)), &json!({"version": version})).await?;
    output.print(&adapter, |a| format!("serving version {version}\n{}", adapter_line(a)));
    Ok(())
}

/// Posts the records in `file` (`-`: standard input) as feedback on `name`.
pub async fn add_feedback(client: &Client, name: &str, file: &Path, query: &str, output: Output) -> Result<(), ClientError> {
    let body = if file == Path::new("-") {
        let mut body = Vec::new();
        std::io::stdin().read_to_end(&mut body)?;
        body
    } else {
        std::fs::read(file)?
    };
    let uri = format!("/v1/adapters/{}/feedback{query}", segment(name));
    let receipt = client.post_bytes(&uri, "application/json", body).await?;
    output.print(&receipt, |r| {
        let job = r["job"].as_str().map(|j| format!("; started job {j}")).unwrap_or_default();
        format!(
            "stored {} pairs, skipped {} duplicates; {} has {} pairs, {} since its last training{job}",
            r["stored"], r["duplicates"], name, r["total_pairs"], r["pairs_since_training"]
        )
    });
    Ok(())
}
