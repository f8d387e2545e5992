//! Prometheus metrics, owned by the application (no global registry).

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub prompt_tokens: IntCounter,
    pub generated_tokens: IntCounter,
    pub queue_depth: IntGauge,
    pub running_sequences: IntGauge,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub kv_cache_capacity_bytes: IntGauge,
    pub kv_cache_used_bytes: IntGauge,
    pub prefix_cache_bytes: IntGauge,
    pub prefix_cache_query_tokens: IntCounter,
    pub prefix_cache_hit_tokens: IntCounter,
    pub preemptions: IntCounter,
    pub resident_memory_bytes: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("tessera_requests_total", "HTTP requests by route and status code"),
            &["route", "status"],
        )
        .expect("valid metric");
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        let prompt_tokens = counter("tessera_prompt_tokens_total", "Prompt tokens processed");
        let generated_tokens = counter("tessera_generated_tokens_total", "Tokens generated");
        let queue_depth = gauge("tessera_queue_depth", "Requests waiting for a batch slot");
        let running_sequences = gauge("tessera_running_sequences", "Sequences in the running batch");
        let latency_buckets = vec![
            0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0,
        ];
        let time_to_first_token = Histogram::with_opts(
            HistogramOpts::new(
                "tessera_time_to_first_token_seconds",
                "From submission to the first generated token",
            )
            .buckets(latency_buckets.clone()),
        )
        .expect("valid metric");
        let inter_token_latency = Histogram::with_opts(
            HistogramOpts::new(
                "tessera_inter_token_latency_seconds",
                "Between consecutive generated tokens of one sequence",
            )
            .buckets(latency_buckets),
        )
        .expect("valid metric");
        let kv_cache_capacity_bytes = gauge("tessera_kv_cache_capacity_bytes", "Bytes the KV block pool may hold");
        let kv_cache_used_bytes =
            gauge("tessera_kv_cache_used_bytes", "Bytes of KV blocks allocated (running sequences and prefix cache)");
        let prefix_cache_bytes =
            gauge("tessera_prefix_cache_bytes", "Bytes of KV blocks the prefix cache keeps (some shared with running sequences)");
        let prefix_cache_query_tokens =
            counter("tessera_prefix_cache_query_tokens_total", "Prompt tokens looked up in the prefix cache");
        let prefix_cache_hit_tokens =
            counter("tessera_prefix_cache_hit_tokens_total", "Prompt tokens found in the prefix cache (not prefilled)");
        let preemptions =
            counter("tessera_preemptions_total", "Sequences preempted to free KV blocks (recomputed later)");
        let resident_memory_bytes = gauge("tessera_resident_memory_bytes", "The process's resident memory, read at each scrape");
        for m in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(prompt_tokens.clone()),
            Box::new(generated_tokens.clone()),
            Box::new(queue_depth.clone()),
            Box::new(running_sequences.clone()),
            Box::new(time_to_first_token.clone()),
            Box::new(inter_token_latency.clone()),
            Box::new(kv_cache_capacity_bytes.clone()),
            Box::new(kv_cache_used_bytes.clone()),
            Box::new(prefix_cache_bytes.clone()),
            Box::new(prefix_cache_query_tokens.clone()),
            Box::new(prefix_cache_hit_tokens.clone()),
            Box::new(preemptions.clone()),
            Box::new(resident_memory_bytes.clone()),
        ] {
            registry.register(m).expect("metric names are unique");
        }
        Self {
            registry,
            requests,
            prompt_tokens,
            generated_tokens,
            queue_depth,
            running_sequences,
            time_to_first_token,
            inter_token_latency,
            kv_cache_capacity_bytes,
            kv_cache_used_bytes,
            prefix_cache_bytes,
            prefix_cache_query_tokens,
            prefix_cache_hit_tokens,
            preemptions,
            resident_memory_bytes,
        }
    }

    /// Adds a metric that another part of the server owns (the store's latency, say).
    pub fn register(&self, collector: impl prometheus::core::Collector + 'static) {
        if let Err(e) = self.registry.register(Box::new(collector)) {
            tracing::warn!(error = %e, "metric not registered");
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        if let Some(bytes) = process_status_bytes("VmRSS") {
            self.resident_memory_bytes.set(bytes as i64);
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Lowers the process's peak resident set (`VmHWM`) to what it holds now, so that memory used
/// and given back before (a probe's buffers) does not count as a later measurement's peak; a
/// child started afterwards starts its own peak from there too. False where the kernel does
/// not offer it (`/proc/self/clear_refs`, Linux 4.0).
pub fn reset_peak_resident_set() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Returns the allocator's free pages to the system, so that what an earlier measurement freed
/// is not still resident (and in the peak) when the next one starts.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only gives free pages back; it touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A `/proc/self/status` field given in kB (`VmRSS`, `VmHWM`, …), in bytes; `None` off Linux.
pub fn process_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    let kib: u64 = line.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}
