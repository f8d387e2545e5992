//! Activations quantized to 8 bits, x ≈ dx·qx with qx = round(x · 127 / max|x|), ties to even,
//! exactly as llama.cpp rounds the activations each weight format meets (its `vec_dot_type`):
//! - Q8_0 (for Q8_0 and Q5_0 weights): max over each run of 32, dx = max/127 kept as f16;
//! - Q8_K (for Q4_K and Q6_K weights): max over each run of 256, dx = 1 / (127/max) in f32.
//! Rounding as the reference does keeps the integer products the same as its own, so what
//! differs is only the order floats are summed in.

use std::ops::Range;

use candle_core::utils::barrier_pool;

use super::{Isa, BLOCK};

/// Runs of 16 activations: the finest scale any weight format has (Q6_K's), so each run's
/// integer sum is kept for the formats whose codes carry a zero point.
pub(crate) const RUN: usize = 16;

/// How the activations meeting a weight format are rounded (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivationFormat {
    Q8_0,
    Q8K,
}

impl ActivationFormat {
    /// Values sharing one maximum.
    fn span(self) -> usize {
        match self {
            ActivationFormat::Q8_0 => BLOCK,
            ActivationFormat::Q8K => 256,
        }
    }
}

/// Rows `[rows, k]` of activations, quantized with one scale per block of 32 (blocks of a Q8_K
/// span share theirs).
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
    /// `x: [rows, k]` row-major, `k` a multiple of the format's span, on the calling thread.
    /// Rows are independent, so a row rounds the same whatever else is quantized with it.
    pub fn quantize(x: &[f32], k: usize, format: ActivationFormat) -> Self {
        let mut out = Self::zeroed(x, k, format);
        let rows = out.rows;
        out.quantize_rows(x, 0..rows, format, Isa::detect());
        out
    }

    /// As [`Self::quantize`], the rows split over the serving workers, with the instructions of
    /// `isa` (the kernels the weight was made for).
    pub fn quantize_on_workers(x: &[f32], k: usize, format: ActivationFormat, isa: Isa) -> Self {
        /// Rows below which one thread is quicker than waking the others.
        const PARALLEL_ROWS: usize = 16;
        let mut out = Self::zeroed(x, k, format);
        let rows = out.rows;
        if rows < PARALLEL_ROWS {
            out.quantize_rows(x, 0..rows, format, isa);
            return out;
        }
        let shared = SharedRows(&mut out as *mut Self);
        barrier_pool().execute_chunked(rows, |range| {
            // SAFETY: each call writes only the rows of its own range (see `quantize_rows`).
            unsafe { (*shared.get()).quantize_rows(x, range, format, isa) }
        });
        out
    }

    fn zeroed(x: &[f32], k: usize, format: ActivationFormat) -> Self {
        let span = format.span();
        assert!(k % span == 0 && x.len() % k == 0, "activations are not [rows, {k}] in blocks of {span}");
        let blocks = x.len() / BLOCK;
        Self { k, rows: x.len() / k, q: vec![0; x.len()], scale: vec![0.0; blocks], run_sum: vec![0; blocks * 2], block_sum: vec![0.0; blocks] }
    }

    /// Quantizes `rows` of x into their own parts of the buffers.
    fn quantize_rows(&mut self, x: &[f32], rows: Range<usize>, format: ActivationFormat, isa: Isa) {
        let (k, blocks_per_row) = (self.k, self.k / BLOCK);
        let blocks = rows.start * blocks_per_row..rows.end * blocks_per_row;
        let span = format.span();
        let per_span = x[rows.start * k..rows.end * k]
            .chunks_exact(span)
            .zip(self.q[rows.start * k..rows.end * k].chunks_exact_mut(span))
            .zip(self.scale[blocks.clone()].chunks_exact_mut(span / BLOCK))
            .zip(self.run_sum[blocks.start * 2..blocks.end * 2].chunks_exact_mut(2 * span / BLOCK))
            .zip(self.block_sum[blocks].chunks_exact_mut(span / BLOCK));
        let encode = vectorized_encoder(isa).unwrap_or(encode_block);
        for ((((values, q), scales), run_sums), block_sums) in per_span {
            let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            let inverse = if max > 0.0 { 127.0 / max } else { 0.0 };
            let d = match format {
                ActivationFormat::Q8_0 => half::f16::from_f32(max / 127.0).to_f32(),
                ActivationFormat::Q8K if max > 0.0 => 1.0 / inverse,
                ActivationFormat::Q8K => 0.0,
            };
            let blocks = values.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)).zip(run_sums.chunks_exact_mut(2));
            for (((values, q), run_sum), (scale, block_sum)) in blocks.zip(scales.iter_mut().zip(block_sums.iter_mut())) {
                let values: &[f32; BLOCK] = values.try_into().unwrap_or_else(|_| unreachable!("chunks of {BLOCK}"));
                let q: &mut [i8; BLOCK] = q.try_into().unwrap_or_else(|_| unreachable!("chunks of {BLOCK}"));
                // SAFETY: a vectorized encoder was chosen for this CPU's features.
                let sums = unsafe { encode(values, q, inverse) };
                *scale = d;
                run_sum.copy_from_slice(&sums);
                *block_sum = d * (sums[0] + sums[1]) as f32;
            }
        }
    }
}

/// What the kernels that read the weight planes in place take of row `row` around value t.
/// Unchecked: they run once per 4 values.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl QuantizedRows {
    /// Codes t..t + 4 as one 32-bit word.
    ///
    /// # Safety
    /// `row < rows`, `t + 4 ≤ k`.
    #[inline(always)]
    pub(crate) unsafe fn four(&self, row: usize, t: usize) -> i32 {
        std::ptr::read_unaligned(self.q.as_ptr().add(row * self.k + t) as *const i32)
    }

    /// dx of t's block.
    ///
    /// # Safety
    /// `row < rows`, `t < k`.
    #[inline(always)]
    pub(crate) unsafe fn dx(&self, row: usize, t: usize) -> f32 {
        *self.scale.get_unchecked((row * self.k + t) / BLOCK)
    }

    /// Σ qx over t..t + len.
    ///
    /// # Safety
    /// `row < rows`, `t + len ≤ k`, both multiples of 16.
    #[inline(always)]
    pub(crate) unsafe fn run_sum(&self, row: usize, t: usize, len: usize) -> i32 {
        let first = (row * self.k + t) / RUN;
        (first..first + len / RUN).map(|run| *self.run_sum.get_unchecked(run)).sum()
    }

    /// dx·Σ qx over t's block.
    ///
    /// # Safety
    /// `row < rows`, `t < k`.
    #[inline(always)]
    pub(crate) unsafe fn block_sum(&self, row: usize, t: usize) -> f32 {
        *self.block_sum.get_unchecked((row * self.k + t) / BLOCK)
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

type BlockEncoder = unsafe fn(&[f32; BLOCK], &mut [i8; BLOCK], f32) -> [i32; 2];

/// One block's codes round(x · inverse), ties to even, and its two runs' sums of codes.
unsafe fn encode_block(values: &[f32; BLOCK], q: &mut [i8; BLOCK], inverse: f32) -> [i32; 2] {
    for (q, &v) in q.iter_mut().zip(values) {
        *q = (v * inverse).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    let first = q[..RUN].iter().map(|&v| v as i32).sum();
    let second = q[RUN..].iter().map(|&v| v as i32).sum();
    [first, second]
}

/// The AVX-512 form of [`encode_block`] with the AVX-512 kernels: the same operations (the
/// conversion rounds to nearest even, as `round_ties_even` does), so the same codes.
fn vectorized_encoder(isa: Isa) -> Option<BlockEncoder> {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Vnni && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
        return Some(avx512_encode);
    }
    None
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn avx512_encode(values: &[f32; BLOCK], q: &mut [i8; BLOCK], inverse: f32) -> [i32; 2] {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_loadu_ps(values.as_ptr()), _mm512_loadu_ps(values.as_ptr().add(RUN)));
    let inverse = _mm512_set1_ps(inverse);
    let limit = _mm512_set1_epi32(127);
    let code = |v| _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, inverse)), limit), _mm512_sub_epi32(_mm512_setzero_si512(), limit));
    let (qa, qb) = (code(a), code(b));
    _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128(q.as_mut_ptr().add(RUN) as *mut __m128i, _mm512_cvtsepi32_epi8(qb));
    [_mm512_reduce_add_epi32(qa), _mm512_reduce_add_epi32(qb)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_rounds_per_block_of_32_with_an_f16_scale() {
        let x: Vec<f32> = (0..64).map(|i| if i < 32 { i as f32 - 16.0 } else { 0.0 }).collect();
        let q = QuantizedRows::quantize(&x, 64, ActivationFormat::Q8_0);
        let d = half::f16::from_f32(16.0 / 127.0).to_f32();
        assert_ne!(d, 16.0 / 127.0, "the scale is rounded to 16 bits");
        assert_eq!(q.scale, [d, 0.0]);
        assert_eq!(q.q[0], -127);
        assert_eq!(q.q[16], 0);
        assert_eq!(q.q[31], (15.0f32 * (127.0 / 16.0)).round_ties_even() as i8);
        assert!(q.q[32..].iter().all(|&v| v == 0));
        let first: i32 = q.q[..16].iter().map(|&v| v as i32).sum();
        let second: i32 = q.q[16..32].iter().map(|&v| v as i32).sum();
        assert_eq!(q.run_sum, [first, second, 0, 0]);
        assert_eq!(q.block_sum, [d * (first + second) as f32, 0.0]);
    }

    #[test]
    fn q8_k_shares_one_maximum_per_256() {
        let mut x = vec![0.5f32; 512];
        x[3] = -8.0;
        let q = QuantizedRows::quantize(&x, 512, ActivationFormat::Q8K);
        let inverse = 127.0f32 / 8.0;
        assert_eq!(q.scale[..8], [1.0 / inverse; 8]);
        assert_eq!(q.q[3], -127);
        assert_eq!(q.q[200], (0.5 * inverse).round_ties_even() as i8);
        // The second span's maximum is its own 0.5.
        assert_eq!((q.scale[8], q.q[300]), (1.0 / 254.0, 127));
    }

    /// The vector form rounds exactly as the scalar one, ties included.
    #[test]
    fn the_vector_encoder_gives_the_scalar_codes() {
        let Some(vectorized) = vectorized_encoder(Isa::Avx512Vnni) else { return };
        for seed in 0..200u32 {
            let values: [f32; BLOCK] = std::array::from_fn(|i| {
                let v = ((seed as usize * 7919 + i * 104729) % 1000) as f32 / 37.0 - 13.0;
                // Halfway points: 127 and 63.5 times the step.
                if i == 5 { 12.7 } else if i == 6 { -6.35 } else { v * if seed % 7 == 0 { 40.0 } else { 1.0 } }
            });
            let inverse = 127.0 / values.iter().fold(0f32, |m, v| m.max(v.abs()));
            let (mut scalar, mut vector) = ([0i8; BLOCK], [0i8; BLOCK]);
            // SAFETY: the vector function was chosen for this CPU.
            let (expected, got) = unsafe { (encode_block(&values, &mut scalar, inverse), vectorized(&values, &mut vector, inverse)) };
            assert_eq!((got, vector), (expected, scalar), "seed {seed}");
        }
    }
}
