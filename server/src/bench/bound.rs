//! How fast one-stream decode could be: each generated token reads every weight matrix once (the
//! token's embedding is one row; a tied output projection reads the whole embedding table), so
//! a step can go no faster than those bytes over the memory's read bandwidth. The bandwidth is
//! measured here, by streaming reads on the threads decode uses.

use std::path::Path;
use std::time::Instant;

use crate::gguf::{GgufError, GgufFile};
use crate::model::quant::TileArena;

/// The bytes of weights one decode step reads.
pub fn weight_bytes_per_token(model: &Path) -> Result<u64, GgufError> {
    let file = GgufFile::open(model)?;
    let tied = !file.has_tensor("output.weight");
    let bytes = file
        .tensors
        .iter()
        // An untied embedding table is only looked up, one row a token.
        .filter(|(name, _)| tied || name.as_str() != "token_embd.weight")
        .map(|(_, info)| info.len as u64)
        .sum();
    Ok(bytes)
}

/// Bytes each thread streams per pass: far beyond any last-level cache, so reads come from DRAM.
const PROBE_BYTES_PER_THREAD: usize = 256 << 20;

/// The read bandwidth of `threads` threads streaming disjoint buffers at once, in bytes per
/// second: the best of `passes` passes. The buffers sit in huge pages as the weights do; in 4 KiB
/// pages a virtual machine's page walks, not the memory, would bound the probe (a third of the
/// bandwidth on a 2-core EPYC guest).
pub fn read_bandwidth(threads: usize, passes: usize) -> f64 {
    let threads = threads.max(1);
    let arena = TileArena::default();
    let Some(buffers) = (0..threads).map(|_| arena.tiles(PROBE_BYTES_PER_THREAD)).collect::<Option<Vec<_>>>() else {
        return f64::NAN;
    };
    let mut best = 0.0f64;
    for _ in 0..passes.max(1) {
        let start = Instant::now();
        let sums: Vec<u64> = std::thread::scope(|scope| {
            let handles: Vec<_> = buffers.iter().map(|buffer| scope.spawn(move || stream_sum(buffer.words()))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or_default()).collect()
        });
        let seconds = start.elapsed().as_secs_f64();
        // The sums are kept alive so the reads cannot be optimised away.
        std::hint::black_box(sums);
        best = best.max((threads * PROBE_BYTES_PER_THREAD) as f64 / seconds);
    }
    // The buffers are larger than a small model: given back, they must not be its peak memory
    // (nor, through the fork, llama-bench's).
    drop(buffers);
    if !crate::metrics::reset_peak_resident_set() {
        tracing::warn!("could not reset the peak RSS after the bandwidth probe; the memory figures include its buffers");
    }
    best
}

/// Words ahead of the read that each step asks the cache for (4 KiB).
const PREFETCH_WORDS: usize = 512;

/// Reads every word of `buffer`, eight independent sums wide so the loads, not the adds, bound it,
/// asking for the lines ahead as the kernels do: on the EPYC guests the hardware prefetcher alone
/// streams 5-6 GB/s of a thread, with software prefetches about 29.
fn stream_sum(buffer: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut chunks = buffer.chunks_exact(8);
    for (i, chunk) in (&mut chunks).enumerate() {
        prefetch(buffer.as_ptr().wrapping_add(i * 8 + PREFETCH_WORDS));
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a = a.wrapping_add(x);
        }
    }
    let tail: u64 = chunks.remainder().iter().fold(0, |a, &x| a.wrapping_add(x));
    acc.iter().fold(tail, |a, &x| a.wrapping_add(x))
}

#[cfg(target_arch = "x86_64")]
fn prefetch(at: *const u64) {
    // SAFETY: a prefetch is a hint that never faults, whatever the address.
    unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at.cast::<i8>()) }
}

#[cfg(not(target_arch = "x86_64"))]
fn prefetch(_at: *const u64) {}

/// Decode at `tokens_per_second` as a share of what the bandwidth allows.
pub fn fraction_of_bound(tokens_per_second: f64, bytes_per_token: u64, bandwidth: f64) -> f64 {
    tokens_per_second * bytes_per_token as f64 / bandwidth
}

/// The lines the bench prints under its table.
pub fn describe(bytes_per_token: u64, bandwidth: f64, threads: usize, decodes: &[(&str, f64)]) -> String {
    let bound = bandwidth / bytes_per_token as f64;
    let mut text = format!(
        "decode bound: {:.1} MB of weights a token, {:.1} GB/s streaming read on {threads} threads: at most {bound:.1} tok/s\n",
        bytes_per_token as f64 / 1e6,
        bandwidth / 1e9,
    );
    for (who, tokens_per_second) in decodes {
        let share = fraction_of_bound(*tokens_per_second, bytes_per_token, bandwidth);
        text.push_str(&format!("  {who}: {tokens_per_second:.1} tok/s = {:.0} % of the bound\n", share * 100.0));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tied_model_reads_its_embedding_table_and_an_untied_one_does_not() -> Result<(), Box<dyn std::error::Error>> {
        use crate::gguf::writer::GgufWriter;
        use candle_core::quantized::GgmlDType;
        let dir = tempfile::tempdir()?;
        let write = |name: &str, untied: bool| -> Result<std::path::PathBuf, std::io::Error> {
            let mut file = GgufWriter::default();
            file.tensor("token_embd.weight", GgmlDType::F32, &[8, 4], vec![0; 128]);
            file.tensor("blk.0.attn_q.weight", GgmlDType::F32, &[4, 4], vec![0; 64]);
            if untied {
                file.tensor("output.weight", GgmlDType::F32, &[8, 4], vec![0; 128]);
            }
            let path = dir.path().join(name);
            file.write(&path)?;
            Ok(path)
        };
        assert_eq!(weight_bytes_per_token(&write("tied.gguf", false)?)?, 128 + 64);
        assert_eq!(weight_bytes_per_token(&write("untied.gguf", true)?)?, 64 + 128);
        Ok(())
    }

    #[test]
    fn the_bound_is_bandwidth_over_bytes() {
        assert!((fraction_of_bound(50.0, 400_000_000, 40e9) - 0.5).abs() < 1e-12);
        let text = describe(400_000_000, 40e9, 2, &[("tessera", 90.0), ("llama.cpp", 50.0)]);
        assert!(text.contains("at most 100.0 tok/s") && text.contains("tessera: 90.0 tok/s = 90 %"), "{text}");
    }

    #[test]
    fn streaming_reads_sum_every_word() {
        let words: Vec<u64> = (1..=1003).collect();
        assert_eq!(stream_sum(&words), 1003 * 1004 / 2);
        assert!(read_bandwidth(1, 1) > 1e8);
    }

    /// The probe streams 256 MiB a thread; a small model's peak memory, measured after it, must
    /// not be that. The peak is the whole process's, so the probe runs alone in a child test
    /// process: beside the other tests (another probe among them) the figure means nothing.
    #[test]
    fn the_probes_buffers_do_not_stay_in_the_peak_memory() -> Result<(), Box<dyn std::error::Error>> {
        let child = "bench::bound::tests::a_lone_probe_leaves_the_peak_below_its_buffers";
        let output = std::process::Command::new(std::env::current_exe()?)
            .args([child, "--exact", "--ignored", "--test-threads=1"])
            .output()?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
        assert!(stdout.contains("1 passed"), "the child test did not run: {stdout}");
        Ok(())
    }

    #[test]
    #[ignore = "run alone in its own process by the_probes_buffers_do_not_stay_in_the_peak_memory"]
    fn a_lone_probe_leaves_the_peak_below_its_buffers() {
        read_bandwidth(1, 1);
        let peak = crate::metrics::process_status_bytes("VmHWM").expect("VmHWM in /proc/self/status");
        assert!(peak < PROBE_BYTES_PER_THREAD as u64, "peak RSS {} MiB after the probe", peak >> 20);
    }
}
