//! AVX2: each tile's 16 weight rows as two halves of 8 lanes. `vpmaddubsw` multiplies unsigned
//! codes by signed activations into pairs of 16 bits and `vpmaddwd` adds the pairs into 32, so
//! a lane gets the same exact sum of 4 products as `vpdpbusd` gives. The float steps are the
//! AVX-512 kernel's, lane for lane, so both give the same bits.
//!
//! Pairs of 16 bits saturate past 32767: Q8_0's codes (up to 255) would, so its signed weights
//! go in as |w| times the activation with w's sign, and its sums start at 0 instead of
//! −128·Σ qx. The integer sums are the same.

use std::arch::x86_64::*;

use super::layout::{dequantize as dequantize_with, HalfToSingle, Planes, GROUP_BYTES};
use super::{Chunk, Scratch, Format, QuantizedRows, Unit, BLOCK, TILE_ROWS};

const LANES: usize = 8;
/// Activation rows per pass: 16 registers hold 4 rows' sums and integer sums, and the operands.
const ROWS_PER_PASS: usize = 4;

struct F16c;

impl HalfToSingle for F16c {
    #[inline(always)]
    unsafe fn convert(src: &[u8], dst: &mut [f32]) {
        for half in 0..2 {
            let values = _mm256_cvtph_ps(_mm_loadu_si128(src.as_ptr().add(half * 16) as *const __m128i));
            _mm256_storeu_ps(dst.as_mut_ptr().add(half * LANES), values);
        }
    }
}

/// Whether this CPU runs these kernels.
pub(super) fn supported() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

/// # Safety
/// The CPU must pass [`supported`]; the unit's output must be its own.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn run(unit: &Unit, scratch: &mut Scratch) {
    match unit.weight.format {
        Format::Q8_0 => run_format::<32, false, true>(unit, scratch),
        Format::Q5_0 => run_format::<32, false, false>(unit, scratch),
        Format::Q4K => run_format::<32, true, false>(unit, scratch),
        Format::Q6K => run_format::<16, false, false>(unit, scratch),
    }
}

/// Rows of a tile row dequantized (see `layout::dequantize`), decoded with these instructions.
///
/// # Safety
/// The CPU must pass [`supported`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dequantize(format: Format, planes: &Planes, tile_row: &[u8], k: usize, rows: std::ops::Range<usize>, out: &mut [f32]) {
    dequantize_with::<F16c>(format, planes, tile_row, k, rows, out)
}

#[inline(always)]
unsafe fn run_format<const SUB: usize, const MINS: bool, const SIGNED: bool>(unit: &Unit, scratch: &mut Scratch) {
    let zero = if SIGNED { 0 } else { unit.weight.format.zero() };
    let acc = unit.accumulate::<F16c>(scratch, zero, |chunk, acc| {
        for half in 0..2 {
            let mut first = 0;
            while first < acc.len() {
                let (row, sums, asks) = (unit.rows.start + first, &mut acc[first..], half == 0 && first == 0);
                first += match sums.len().min(ROWS_PER_PASS) {
                    4 => pass::<4, SUB, MINS, SIGNED>(chunk, half, unit.x, asks, row, sums),
                    3 => pass::<3, SUB, MINS, SIGNED>(chunk, half, unit.x, asks, row, sums),
                    2 => pass::<2, SUB, MINS, SIGNED>(chunk, half, unit.x, asks, row, sums),
                    _ => pass::<1, SUB, MINS, SIGNED>(chunk, half, unit.x, asks, row, sums),
                };
            }
        }
    });
    let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(unit.lanes as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    let mask_high = _mm256_cmpgt_epi32(_mm256_set1_epi32(unit.lanes as i32), _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15));
    for (i, sums) in acc.iter().enumerate() {
        let out = unit.output(i);
        _mm256_maskstore_ps(out, mask, _mm256_loadu_ps(sums.as_ptr()));
        _mm256_maskstore_ps(out.add(LANES), mask_high, _mm256_loadu_ps(sums.as_ptr().add(LANES)));
    }
}

/// Σ of 4 products per 32-bit lane: unsigned codes `w` times the 4 signed activations `x`.
#[inline(always)]
unsafe fn dot4<const SIGNED: bool>(w: __m256i, x: __m256i) -> __m256i {
    let pairs = if SIGNED {
        let signed = _mm256_xor_si256(w, _mm256_set1_epi8(-128));
        _mm256_maddubs_epi16(_mm256_abs_epi8(signed), _mm256_sign_epi8(x, signed))
    } else {
        _mm256_maddubs_epi16(w, x)
    };
    _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
}

/// Activation rows `row..row + R` against one half (8 weight rows) of the chunk; the unit's
/// first pass `asks` for the next tile row's lines. Returns R.
#[inline(always)]
unsafe fn pass<const R: usize, const SUB: usize, const MINS: bool, const SIGNED: bool>(
    chunk: &Chunk,
    half: usize,
    x: &QuantizedRows,
    asks: bool,
    row: usize,
    acc: &mut [[f32; TILE_ROWS]],
) -> usize {
    let (k, blocks_per_row) = (x.k, x.k / BLOCK);
    let lanes = half * LANES;
    let mut sums: [__m256; R] = std::array::from_fn(|r| if chunk.first { _mm256_setzero_ps() } else { _mm256_loadu_ps(acc[r].as_ptr().add(lanes)) });
    let q = x.q.as_ptr();
    for b in 0..chunk.blocks {
        if asks {
            chunk.prefetch_share(b);
        }
        let kb = chunk.t0 / BLOCK + b;
        for s in 0..BLOCK / SUB {
            let mut isum: [__m256i; R] = std::array::from_fn(|r| {
                let runs = x.run_sum.as_ptr().add(((row + r) * blocks_per_row + kb) * 2);
                let start = if SUB == 16 { *runs.add(s) } else { *runs + *runs.add(1) };
                _mm256_set1_epi32(-chunk.zero * start)
            });
            let first = b * BLOCK + s * SUB;
            for g in 0..SUB / 4 {
                let w = _mm256_loadu_si256(chunk.codes.add((first / 4 + g) * GROUP_BYTES + lanes * 4) as *const __m256i);
                for (r, isum) in isum.iter_mut().enumerate() {
                    let four = std::ptr::read_unaligned(q.add((row + r) * k + chunk.t0 + first + g * 4) as *const i32);
                    *isum = _mm256_add_epi32(*isum, dot4::<SIGNED>(w, _mm256_set1_epi32(four)));
                }
            }
            let scale = _mm256_loadu_ps(chunk.scales.add((b * BLOCK / SUB + s) * TILE_ROWS + lanes));
            for r in 0..R {
                let dx = _mm256_set1_ps(*x.scale.get_unchecked((row + r) * blocks_per_row + kb));
                sums[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_mul_ps(scale, dx), sums[r]);
            }
        }
        if MINS {
            let min = _mm256_loadu_ps(chunk.mins.add(b * TILE_ROWS + lanes));
            for (r, sum) in sums.iter_mut().enumerate() {
                let block_sum = _mm256_set1_ps(*x.block_sum.get_unchecked((row + r) * blocks_per_row + kb));
                *sum = _mm256_fnmadd_ps(min, block_sum, *sum);
            }
        }
    }
    for (r, sum) in sums.iter().enumerate() {
        _mm256_storeu_ps(acc[r].as_mut_ptr().add(lanes), *sum);
    }
    R
}
