//! Q8_0 weights × Q8_0-quantized activations in 8-bit integer arithmetic (AVX-512 VNNI), as
//! ggml computes a Q8_0 matmul: each run of 32 activations of a row is quantized as
//! x ≈ dx·qx with dx = max|x| / 127, and
//!
//!   y[i,j] = Σ_b dx[i,b]·dw[j,b]·Σ_{t∈b} qx[i,t]·qw[j,t]
//!
//! with the inner sums exact in 32-bit integers. `vpdpbusd` multiplies unsigned by signed bytes
//! four at a time, so the weights go in as qw + 128 and each block's sum starts from
//! −128·Σ_t qx[i,t], which takes the offset out again.
//!
//! Serving does not use this (rounding the activations moves outputs with the batch's
//! arithmetic, see `packed`); training's output loss does, where the logits GEMM is the largest
//! single cost of a step and `vpdpbusd` does four times the multiply-adds of an f32 FMA.

use std::ops::Range;

use crate::model::packed::{Tile, BLOCK, TILE_ROWS};

/// Activation rows sharing each weight vector load.
const ROWS_PER_PASS: usize = 8;

/// Whether this CPU has the instructions: AVX-512 VNNI for the products, VBMI for the byte
/// shuffle that regroups a tile's columns.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vbmi")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Rows of activations `[rows, k]` quantized per run of 32, as Q8_0.
pub struct QuantizedRows {
    k: usize,
    rows: usize,
    q: Vec<i8>,
    /// `[rows][k / 32]`: dx.
    scale: Vec<f32>,
    /// `[rows][k / 32]`: −128·Σ qx, where each block's integer sum starts.
    start: Vec<i32>,
}

impl QuantizedRows {
    /// `x: [rows, k]` row-major, `k` a multiple of 32.
    pub fn quantize(x: &[f32], k: usize) -> Self {
        assert!(k % BLOCK == 0 && x.len() % k == 0, "activations are not [rows, {k}] in blocks of {BLOCK}");
        let blocks = x.len() / BLOCK;
        let mut q = vec![0i8; x.len()];
        let mut scale = Vec::with_capacity(blocks);
        let mut start = Vec::with_capacity(blocks);
        for (values, q) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)) {
            let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = max / 127.0;
            let inverse = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in q.iter_mut().zip(values) {
                *q = (v * inverse).round() as i8;
                sum += *q as i32;
            }
            scale.push(d);
            start.push(-128 * sum);
        }
        Self {
            k,
            rows: x.len() / k,
            q,
            scale,
            start,
        }
    }
}

/// A Q8_0 weight `[n, k]` in the tiles of `packed`, on a CPU that runs the int8 kernel.
#[derive(Clone, Copy)]
pub struct Int8Weight<'a> {
    tiles: &'a [Tile],
    n: usize,
    k: usize,
}

/// One row of tiles regrouped for `vpdpbusd`: per block, 8 vectors of 16 weight rows × 4
/// consecutive values (as q + 128), and the 16 rows' scales.
pub struct TileRowScratch {
    weights: Vec<u8>,
    scales: Vec<f32>,
}

impl<'a> Int8Weight<'a> {
    /// # Panics
    /// Where the CPU lacks the instructions ([`supported`]) or `tiles` do not hold `[n, k]`.
    pub(crate) fn new(tiles: &'a [Tile], n: usize, k: usize) -> Self {
        assert!(supported(), "the int8 kernel needs AVX-512 VNNI and VBMI");
        assert_eq!(tiles.len(), n.div_ceil(TILE_ROWS) * (k / BLOCK), "tiles do not hold [{n}, {k}]");
        Self { tiles, n, k }
    }

    pub fn scratch(&self) -> TileRowScratch {
        let kb = self.k / BLOCK;
        TileRowScratch {
            weights: vec![0; kb * BLOCK * TILE_ROWS],
            scales: vec![0.0; kb * TILE_ROWS],
        }
    }

    /// `y = x·W[rows]ᵀ`, `y: [rows of x, rows.len()]` row-major (`rows.start` a multiple of 16),
    /// on the calling thread.
    pub fn matmul_rows_on_this_thread(&self, x: &QuantizedRows, weight_rows: Range<usize>, scratch: &mut TileRowScratch, y: &mut [f32]) {
        let (k, m, width) = (self.k, x.rows, weight_rows.len());
        assert_eq!(x.k, k, "activations have {} columns, the weight {k}", x.k);
        assert!(
            weight_rows.start % TILE_ROWS == 0 && weight_rows.end <= self.n,
            "rows {weight_rows:?} are not tile-aligned within {}",
            self.n
        );
        assert_eq!(y.len(), m * width, "output is not [{m}, {width}]");
        let kb = k / BLOCK;
        let first_tile = weight_rows.start / TILE_ROWS;
        for tile_row in first_tile..weight_rows.end.div_ceil(TILE_ROWS) {
            let column = tile_row * TILE_ROWS - weight_rows.start;
            let lanes = (weight_rows.end - tile_row * TILE_ROWS).min(TILE_ROWS);
            // SAFETY: supported() was checked at construction; the scratch holds kb blocks.
            unsafe { kernel::regroup(&self.tiles[tile_row * kb..(tile_row + 1) * kb], scratch) };
            for first in (0..m).step_by(ROWS_PER_PASS) {
                // SAFETY: as above; a pass writes `lanes` values at column `column` of its rows,
                // all inside y ([m, width]).
                unsafe {
                    let out = y.as_mut_ptr().add(first * width + column);
                    match (m - first).min(ROWS_PER_PASS) {
                        8 => kernel::pass::<8>(scratch, x, first, out, width, lanes),
                        7 => kernel::pass::<7>(scratch, x, first, out, width, lanes),
                        6 => kernel::pass::<6>(scratch, x, first, out, width, lanes),
                        5 => kernel::pass::<5>(scratch, x, first, out, width, lanes),
                        4 => kernel::pass::<4>(scratch, x, first, out, width, lanes),
                        3 => kernel::pass::<3>(scratch, x, first, out, width, lanes),
                        2 => kernel::pass::<2>(scratch, x, first, out, width, lanes),
                        _ => kernel::pass::<1>(scratch, x, first, out, width, lanes),
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::arch::x86_64::*;

    use super::{QuantizedRows, TileRowScratch, BLOCK, TILE_ROWS};
    use crate::model::packed::Tile;

    /// A tile stores column t's 16 rows as 16 bytes; `vpdpbusd` wants each 32-bit lane to hold
    /// one row's 4 consecutive values. Output byte 4r + c takes input byte 16c + r.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub(super) unsafe fn regroup(tiles: &[Tile], scratch: &mut TileRowScratch) {
        let index = _mm512_set_epi8(
            63, 47, 31, 15, 62, 46, 30, 14, 61, 45, 29, 13, 60, 44, 28, 12, 59, 43, 27, 11, 58, 42, 26, 10, 57, 41, 25, 9, 56, 40, 24, 8,
            55, 39, 23, 7, 54, 38, 22, 6, 53, 37, 21, 5, 52, 36, 20, 4, 51, 35, 19, 3, 50, 34, 18, 2, 49, 33, 17, 1, 48, 32, 16, 0,
        );
        let offset = _mm512_set1_epi8(-128);
        for (b, tile) in tiles.iter().enumerate() {
            for group in 0..BLOCK / 4 {
                let columns = _mm512_loadu_si512(tile.qs.as_ptr().add(group * 4 * TILE_ROWS) as *const _);
                // q + 128 as an unsigned byte is q with its sign bit flipped.
                let unsigned = _mm512_xor_si512(_mm512_permutexvar_epi8(index, columns), offset);
                _mm512_storeu_si512(scratch.weights.as_mut_ptr().add((b * BLOCK / 4 + group) * 64) as *mut _, unsigned);
            }
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(tile.d.as_ptr() as *const __m256i));
            _mm512_storeu_ps(scratch.scales.as_mut_ptr().add(b * TILE_ROWS), d);
        }
    }

    /// Rows `first..first + R` of `x` against the regrouped tile row: 16 outputs each, written
    /// at `out` and then every `stride` values (only the first `lanes` of them).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn pass<const R: usize>(scratch: &TileRowScratch, x: &QuantizedRows, first: usize, out: *mut f32, stride: usize, lanes: usize) {
        let (k, kb) = (x.k, x.k / BLOCK);
        let mut sums = [_mm512_setzero_ps(); R];
        let weights = scratch.weights.as_ptr();
        for b in 0..kb {
            let d = _mm512_loadu_ps(scratch.scales.as_ptr().add(b * TILE_ROWS));
            let mut acc: [__m512i; R] = std::array::from_fn(|r| _mm512_set1_epi32(x.start[(first + r) * kb + b]));
            for group in 0..BLOCK / 4 {
                let w = _mm512_loadu_si512(weights.add((b * BLOCK / 4 + group) * 64) as *const _);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let q = x.q.as_ptr().add((first + r) * k + b * BLOCK + group * 4);
                    let four = std::ptr::read_unaligned(q as *const i32);
                    *acc = _mm512_dpbusd_epi32(*acc, w, _mm512_set1_epi32(four));
                }
            }
            for (r, sum) in sums.iter_mut().enumerate() {
                let scale = _mm512_mul_ps(d, _mm512_set1_ps(x.scale[(first + r) * kb + b]));
                *sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r]), scale, *sum);
            }
        }
        let mask: __mmask16 = if lanes >= TILE_ROWS { !0 } else { (1u16 << lanes) - 1 };
        for (r, sum) in sums.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add(r * stride), mask, *sum);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    use super::{QuantizedRows, TileRowScratch};
    use crate::model::packed::Tile;

    pub(super) unsafe fn regroup(_: &[Tile], _: &mut TileRowScratch) {
        unreachable!("supported() is false off x86_64")
    }

    pub(super) unsafe fn pass<const R: usize>(_: &TileRowScratch, _: &QuantizedRows, _: usize, _: *mut f32, _: usize, _: usize) {
        unreachable!("supported() is false off x86_64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::packed::PackedWeight;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// The int8 product equals, to f32 rounding, the exact product of the dequantized weights
    /// with the Q8_0-rounded activations, and so stays within that rounding of the f32 product.
    #[test]
    fn equals_the_product_of_the_quantized_operands() {
        if !supported() || !PackedWeight::supported() {
            eprintln!("skipped: this CPU lacks AVX-512 VNNI and VBMI");
            return;
        }
        // 45 weight rows: a partial last tile. 19 activation rows: a partial last pass.
        let (n, k, m) = (45, 640, 19);
        let values: Vec<f32> = (0..n * k).map(|i| (((i * 7919) % 251) as f32 - 125.0) / 300.0).collect();
        let q = QTensor::quantize(&Tensor::from_vec(values, (n, k), &Device::Cpu).unwrap(), GgmlDType::Q8_0).unwrap();
        let w: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let packed = PackedWeight::pack(&q.data().unwrap(), n, k).unwrap();
        let weight = packed.int8().expect("Q8_0 tiles on a VNNI CPU");
        // Gemma-like activations: mostly small, a few large outliers.
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 20.0 * if i % 89 == 0 { 300.0 } else { 1.0 })
            .collect();
        let quantized = QuantizedRows::quantize(&x, k);
        let rows = 16..n;
        let mut y = vec![f32::NAN; m * rows.len()];
        weight.matmul_rows_on_this_thread(&quantized, rows.clone(), &mut weight.scratch(), &mut y);
        let kb = k / BLOCK;
        for i in 0..m {
            for (c, j) in rows.clone().enumerate() {
                let rounded: f64 = (0..k)
                    .map(|t| quantized.scale[i * kb + t / BLOCK] as f64 * quantized.q[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum();
                let magnitude: f64 = (0..k).map(|t| (x[i * k + t] as f64 * w[j * k + t] as f64).abs()).sum();
                let got = y[i * rows.len() + c] as f64;
                assert!((got - rounded).abs() <= 1e-5 * magnitude + 1e-6, "({i},{j}): {got} vs {rounded}");
                // Rounding moves each activation by at most half its block's step.
                let exact: f64 = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum();
                let rounding: f64 = (0..k).map(|t| quantized.scale[i * kb + t / BLOCK] as f64 / 2.0 * (w[j * k + t] as f64).abs()).sum();
                assert!((got - exact).abs() <= rounding + 1e-5 * magnitude, "({i},{j}): {got} vs the f32 product {exact}");
            }
        }
    }

    #[test]
    fn activations_round_per_block_of_32() {
        let x: Vec<f32> = (0..64).map(|i| if i < 32 { i as f32 - 16.0 } else { 0.0 }).collect();
        let q = QuantizedRows::quantize(&x, 64);
        assert_eq!(q.scale, [16.0 / 127.0, 0.0]);
        assert_eq!(q.q[0], -127);
        assert_eq!(q.q[16], 0);
        assert_eq!(q.q[31], (15.0f32 * 127.0 / 16.0).round() as i8);
        assert!(q.q[32..].iter().all(|&v| v == 0));
        let sum: i32 = q.q[..32].iter().map(|&v| v as i32).sum();
        assert_eq!(q.start, [-128 * sum, 0]);
    }
}
