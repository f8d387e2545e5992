//! `tessera bench adapters`: serving throughput when concurrent requests are spread over several
//! LoRA adapters, against the same load on the base alone, and the cold-load latency of an
//! adapter.

use std::path::Path;
use std::time::Instant;

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use tessera_adapters::peft::{BaseShape, CONFIG_FILE, WEIGHTS_FILE};
use tessera_adapters::TargetModule;

/// Writes a random PEFT adapter of rank `rank` on all seven linear layers of every block.
pub fn write_random_adapter(dir: &Path, shape: &BaseShape, rank: usize, seed: u64) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join(CONFIG_FILE),
        format!(
            r#"{{"peft_type":"LORA","r":{rank},"lora_alpha":{},"target_modules":["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]}}"#,
            2 * rank
        ),
    )?;
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut data = Vec::new();
    for layer in 0..shape.n_layers {
        for module in TargetModule::ALL {
            let block = match module {
                TargetModule::Q | TargetModule::K | TargetModule::V | TargetModule::O => "self_attn",
                _ => "mlp",
            };
            let (input, output) = shape.features(module);
            let prefix = format!("base_model.model.model.layers.{layer}.{block}.{}", module.peft_name());
            for (factor, dims) in [("lora_A", [rank, input]), ("lora_B", [output, rank])] {
                let bytes: Vec<u8> = (0..dims[0] * dims[1])
                    .flat_map(|_| {
                        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        (((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02).to_le_bytes()
                    })
                    .collect();
                data.push((format!("{prefix}.{factor}.weight"), bytes, dims.to_vec()));
            }
        }
    }
    let views = data
        .iter()
        .map(|(name, bytes, dims)| {
            TensorView::new(Dtype::F32, dims.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(std::io::Error::other)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bytes = safetensors::serialize(views, None).map_err(std::io::Error::other)?;
    std::fs::write(dir.join(WEIGHTS_FILE), bytes)
}

/// Milliseconds to load `path` as a fresh adapter, `runs` times.
pub fn cold_loads(registry: &crate::registry::Registry, path: &Path, runs: usize) -> Result<Vec<f64>, crate::registry::RegistryError> {
    (0..runs)
        .map(|i| {
            let started = Instant::now();
            let name = format!("cold-{i}");
            registry.load(&name, path)?;
            let ms = started.elapsed().as_secs_f64() * 1e3;
            registry.unload(&name)?;
            Ok(ms)
        })
        .collect()
}
