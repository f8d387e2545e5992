//! `tessera bench adapters`: serving throughput when concurrent requests are spread over several
//! LoRA, DoRA or IA³ adapters, against the same load on the base alone, and the cold-load latency of an
//! adapter.

use std::path::Path;
use std::time::Instant;

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use tessera_adapters::peft::{ia3_scales_input, module_path, BaseShape, CONFIG_FILE, IA3_MODULES, WEIGHTS_FILE};
use tessera_adapters::{AdapterKind, TargetModule};

use super::median;
use super::serve::{run_level, ServeBenchError, ServeLoad};

/// Small random values around `center` (±0.01 for 0), from a linear congruential stream.
struct RandomValues(u64);

impl RandomValues {
    fn next(&mut self, center: f32) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        center + ((self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02
    }

    fn bytes(&mut self, n: usize, center: f32) -> Vec<u8> {
        (0..n).flat_map(|_| self.next(center).to_le_bytes()).collect()
    }
}

/// Writes a random PEFT adapter of `kind`: LoRA or DoRA of rank `rank` on all seven linear
/// layers of every block (DoRA's magnitudes near 1), or IA³ (scales near 1 on k, v and down).
pub fn write_random_adapter(dir: &Path, shape: &BaseShape, kind: AdapterKind, rank: usize, seed: u64) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let config = match kind {
        AdapterKind::Ia3 => r#"{"peft_type":"IA3","target_modules":["k_proj","v_proj","down_proj"],"feedforward_modules":["down_proj"]}"#.to_string(),
        AdapterKind::Lora | AdapterKind::Dora => format!(
            r#"{{"peft_type":"LORA","r":{rank},"lora_alpha":{},"use_dora":{},"target_modules":["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]}}"#,
            2 * rank,
            kind == AdapterKind::Dora
        ),
    };
    std::fs::write(dir.join(CONFIG_FILE), config)?;
    let mut random = RandomValues(seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407));
    let mut data = Vec::new();
    for layer in 0..shape.n_layers {
        for module in TargetModule::ALL {
            let (input, output) = shape.features(module);
            let prefix = format!("base_model.model.model.layers.{layer}.{}", module_path(module));
            match kind {
                AdapterKind::Ia3 if IA3_MODULES.contains(&module) => {
                    let dims = if ia3_scales_input(module) { vec![1, input] } else { vec![output, 1] };
                    data.push((format!("{prefix}.ia3_l"), random.bytes(dims[0] * dims[1], 1.0), dims));
                }
                AdapterKind::Ia3 => {}
                AdapterKind::Lora | AdapterKind::Dora => {
                    for (factor, dims) in [("lora_A", [rank, input]), ("lora_B", [output, rank])] {
                        data.push((format!("{prefix}.{factor}.weight"), random.bytes(dims[0] * dims[1], 0.0), dims.to_vec()));
                    }
                    if kind == AdapterKind::Dora {
                        data.push((format!("{prefix}.lora_magnitude_vector"), random.bytes(output, 1.0), vec![output]));
                    }
                }
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

/// One load the rounds measure: the base alone, or clients spread over some adapters of a kind.
pub struct Level {
    /// `base`, or the adapters' kind.
    pub kind: String,
    /// The models the clients ask for, client c for `models[c % len]`.
    pub models: Vec<String>,
    /// Total tokens per second in each round.
    pub rates: Vec<f64>,
}

/// Runs every level `rounds` times by turns (base, ia3, base, ia3, …), so a slow spell on a
/// shared machine falls on all of them alike. Each level first runs once untimed: every timed
/// run then finds its prompts in the prefix cache as the others do.
pub async fn interleaved(url: &str, levels: &mut [Level], clients: usize, load: &ServeLoad, rounds: usize) -> Result<(), ServeBenchError> {
    for level in levels.iter() {
        run_level(url, &level.models, clients, load).await?;
    }
    for round in 0..rounds {
        for level in levels.iter_mut() {
            let row = run_level(url, &level.models, clients, load).await?;
            level.rates.push(row.tokens as f64 / row.wall.as_secs_f64());
        }
        eprintln!("{clients} clients: round {} of {rounds} done", round + 1);
    }
    Ok(())
}

/// The table: each level's median throughput, its ratio to the base's median, and every round's
/// figure with its ratio to the same round's base.
pub fn format_table(cpu: &str, clients: usize, levels: &[Level]) -> String {
    let base = levels.iter().find(|l| l.kind == "base");
    let base_median = base.map(|b| median(&b.rates)).unwrap_or(f64::NAN);
    let mut s = format!("CPU: {cpu}\n\n| clients | kind | adapters | median tok/s | vs base (medians) | runs tok/s | vs base by round |\n|--------:|:-----|---------:|------------:|--------:|:---|:---|\n");
    for level in levels {
        let spread = if level.kind == "base" { "none".to_string() } else { level.models.len().to_string() };
        let runs: Vec<String> = level.rates.iter().map(|r| format!("{r:.1}")).collect();
        let by_round: Vec<String> = match base {
            Some(base) => level.rates.iter().zip(&base.rates).map(|(r, b)| format!("{:.2}", r / b)).collect(),
            None => Vec::new(),
        };
        let m = median(&level.rates);
        s.push_str(&format!(
            "| {clients:>7} | {} | {spread:>8} | {m:>11.1} | {:>6.2}× | {} | {} |\n",
            level.kind,
            m / base_median,
            runs.join(", "),
            by_round.join(", ")
        ));
    }
    s
}
