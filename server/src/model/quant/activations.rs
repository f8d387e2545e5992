//! Activations quantized to 8 bits per run of 32, as ggml's Q8_0: x ≈ dx·qx with
//! dx = max|x| / 127 and qx = round(x / dx), ties to even.
//!
//! llama.cpp quantizes activations per 256 values for K-quant weights (Q8_K) and per 32 for the
//! others; one scale per 32 everywhere is never coarser, so a single outlier channel costs the
//! precision of 31 neighbours, not 255.

use std::ops::Range;

use candle_core::utils::barrier_pool;

use super::BLOCK;

/// Runs of 16 activations: the finest scale any weight format has (Q6_K's), so each run's
/// integer sum is kept for the formats whose codes carry a zero point.
pub(crate) const RUN: usize = 16;

/// Rows `[rows, k]` of activations, quantized per run of 32.
pub struct QuantizedRows {
    pub(crate) k: usize,
    pub(crate) rows: usize,
    /// `[rows][k]`.
    pub(crate) q: Vec<i8>,
    /// `[rows][k / 32]`: dx.
    pub(crate) scale: Vec<f32>,
    /// `[rows][k / 16]`: Σ qx over each run of 16.
    pub(crate) run_sum: Vec<i32>,
    /// `[rows][k / 32]`: dx·Σ qx, the block's sum of the rounded activations.
    pub(crate) block_sum: Vec<f32>,
}

impl QuantizedRows {
    /// `x: [rows, k]` row-major, `k` a multiple of 32, on the calling thread. Rows are
    /// independent, so a row rounds the same whatever else is quantized with it.
    pub fn quantize(x: &[f32], k: usize) -> Self {
        let mut out = Self::zeroed(x, k);
        let rows = out.rows;
        out.quantize_rows(x, 0..rows);
        out
    }

    /// As [`Self::quantize`], the rows split over the serving workers.
    pub fn quantize_on_workers(x: &[f32], k: usize) -> Self {
        /// Rows below which one thread is quicker than waking the others.
        const PARALLEL_ROWS: usize = 16;
        let mut out = Self::zeroed(x, k);
        let rows = out.rows;
        if rows < PARALLEL_ROWS {
            out.quantize_rows(x, 0..rows);
            return out;
        }
        let shared = SharedRows(&mut out as *mut Self);
        barrier_pool().execute_chunked(rows, |range| {
            // SAFETY: each call writes only the rows of its own range (see `quantize_rows`).
            unsafe { (*shared.get()).quantize_rows(x, range) }
        });
        out
    }

    fn zeroed(x: &[f32], k: usize) -> Self {
        assert!(k % BLOCK == 0 && x.len() % k == 0, "activations are not [rows, {k}] in blocks of {BLOCK}");
        let blocks = x.len() / BLOCK;
        Self { k, rows: x.len() / k, q: vec![0; x.len()], scale: vec![0.0; blocks], run_sum: vec![0; blocks * 2], block_sum: vec![0.0; blocks] }
    }

    /// Quantizes `rows` of x into their own parts of the buffers.
    fn quantize_rows(&mut self, x: &[f32], rows: Range<usize>) {
        let (k, blocks_per_row) = (self.k, self.k / BLOCK);
        let blocks = rows.start * blocks_per_row..rows.end * blocks_per_row;
        let per_block = x[rows.start * k..rows.end * k]
            .chunks_exact(BLOCK)
            .zip(self.q[rows.start * k..rows.end * k].chunks_exact_mut(BLOCK))
            .zip(&mut self.scale[blocks.clone()])
            .zip(self.run_sum[blocks.start * 2..blocks.end * 2].chunks_exact_mut(2))
            .zip(&mut self.block_sum[blocks]);
        let vectorized = vectorized_block();
        for ((((values, q), scale), run_sum), block_sum) in per_block {
            let values: &[f32; BLOCK] = values.try_into().unwrap_or_else(|_| unreachable!("chunks of {BLOCK}"));
            let q: &mut [i8; BLOCK] = q.try_into().unwrap_or_else(|_| unreachable!("chunks of {BLOCK}"));
            let (d, sums) = match vectorized {
                // SAFETY: the function was chosen for this CPU's features.
                Some(block) => unsafe { block(values, q) },
                None => quantize_block(values, q),
            };
            *scale = d;
            run_sum.copy_from_slice(&sums);
            *block_sum = d * (sums[0] + sums[1]) as f32;
        }
    }
}

/// A pointer to rows being quantized by several threads, each into its own rows.
struct SharedRows(*mut QuantizedRows);

// SAFETY: threads write disjoint rows (see `quantize_on_workers`).
unsafe impl Sync for SharedRows {}

impl SharedRows {
    fn get(&self) -> *mut QuantizedRows {
        self.0
    }
}

type BlockQuantizer = unsafe fn(&[f32; BLOCK], &mut [i8; BLOCK]) -> (f32, [i32; 2]);

/// One block: its scale dx and its two runs' sums of codes.
fn quantize_block(values: &[f32; BLOCK], q: &mut [i8; BLOCK]) -> (f32, [i32; 2]) {
    let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = max / 127.0;
    let inverse = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in q.iter_mut().zip(values) {
        *q = (v * inverse).round_ties_even() as i8;
    }
    let first = q[..RUN].iter().map(|&v| v as i32).sum();
    let second = q[RUN..].iter().map(|&v| v as i32).sum();
    (d, [first, second])
}

/// The AVX-512 form of [`quantize_block`] where the CPU has it: the same operations (the
/// conversion rounds to nearest even, as `round_ties_even` does), so the same codes.
fn vectorized_block() -> Option<BlockQuantizer> {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
        return Some(avx512_block);
    }
    None
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn avx512_block(values: &[f32; BLOCK], q: &mut [i8; BLOCK]) -> (f32, [i32; 2]) {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_loadu_ps(values.as_ptr()), _mm512_loadu_ps(values.as_ptr().add(RUN)));
    let max = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    let d = max / 127.0;
    let inverse = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    let (qa, qb) = (_mm512_cvtps_epi32(_mm512_mul_ps(a, inverse)), _mm512_cvtps_epi32(_mm512_mul_ps(b, inverse)));
    _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128(q.as_mut_ptr().add(RUN) as *mut __m128i, _mm512_cvtsepi32_epi8(qb));
    (d, [_mm512_reduce_add_epi32(qa), _mm512_reduce_add_epi32(qb)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activations_round_per_block_of_32() {
        let x: Vec<f32> = (0..64).map(|i| if i < 32 { i as f32 - 16.0 } else { 0.0 }).collect();
        let q = QuantizedRows::quantize(&x, 64);
        assert_eq!(q.scale, [16.0 / 127.0, 0.0]);
        assert_eq!(q.q[0], -127);
        assert_eq!(q.q[16], 0);
        assert_eq!(q.q[31], (15.0f32 * 127.0 / 16.0).round() as i8);
        assert!(q.q[32..].iter().all(|&v| v == 0));
        let first: i32 = q.q[..16].iter().map(|&v| v as i32).sum();
        let second: i32 = q.q[16..32].iter().map(|&v| v as i32).sum();
        assert_eq!(q.run_sum, [first, second, 0, 0]);
        assert_eq!(q.block_sum, [16.0 / 127.0 * (first + second) as f32, 0.0]);
    }

    /// The vector form rounds exactly as the scalar one, ties included.
    #[test]
    fn the_vector_quantizer_gives_the_scalar_codes() {
        let Some(vectorized) = vectorized_block() else { return };
        for seed in 0..200u32 {
            let values: [f32; BLOCK] = std::array::from_fn(|i| {
                let v = ((seed as usize * 7919 + i * 104729) % 1000) as f32 / 37.0 - 13.0;
                // Halfway points: 127 and 63.5 times the step.
                if i == 5 { 12.7 } else if i == 6 { -6.35 } else { v * if seed % 7 == 0 { 40.0 } else { 1.0 } }
            });
            let (mut scalar, mut vector) = ([0i8; BLOCK], [0i8; BLOCK]);
            let expected = quantize_block(&values, &mut scalar);
            // SAFETY: the function was chosen for this CPU.
            let got = unsafe { vectorized(&values, &mut vector) };
            assert_eq!((got, vector), (expected, scalar), "seed {seed}");
        }
    }
}
