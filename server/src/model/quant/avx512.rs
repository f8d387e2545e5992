//! AVX-512 VNNI: one 32-bit lane per weight row, `vpdpbusd` adding 4 products of an unsigned
//! code and a signed activation at a time, exact in 32 bits.
//!
//! Per sub-block of a weight row and activation row: isum = −zero·Σ qx + Σ u·qx, then
//! sum += isum·(scale·dx) in one fused step, and for Q4_K sum −= min·Σ x̂ per block of 32.

use std::arch::x86_64::*;

use super::layout::{dequantize as dequantize_with, HalfToSingle, Planes, GROUP_BYTES};
use super::{Chunk, Scratch, Format, QuantizedRows, Unit, BLOCK, ROWS_PER_PASS, TILE_ROWS};

struct Avx512Half;

impl HalfToSingle for Avx512Half {
    #[inline(always)]
    unsafe fn convert(src: &[u8], dst: &mut [f32]) {
        let values = _mm512_cvtph_ps(_mm256_loadu_si256(src.as_ptr() as *const __m256i));
        _mm512_storeu_ps(dst.as_mut_ptr(), values);
    }
}

/// Whether this CPU runs these kernels.
pub(super) fn supported() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vnni")
}

/// # Safety
/// The CPU must pass [`supported`]; the unit's output must be its own.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn run(unit: &Unit, scratch: &mut Scratch) {
    match unit.weight.format {
        Format::Q8_0 | Format::Q5_0 => run_format::<32, false>(unit, scratch),
        Format::Q4K => run_format::<32, true>(unit, scratch),
        Format::Q6K => run_format::<16, false>(unit, scratch),
    }
}

/// Rows of a tile row dequantized (see `layout::dequantize`), decoded with these instructions.
///
/// # Safety
/// The CPU must pass [`supported`].
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn dequantize(format: Format, planes: &Planes, tile_row: &[u8], k: usize, rows: std::ops::Range<usize>, out: &mut [f32]) {
    dequantize_with::<Avx512Half>(format, planes, tile_row, k, rows, out)
}

#[inline(always)]
unsafe fn run_format<const SUB: usize, const MINS: bool>(unit: &Unit, scratch: &mut Scratch) {
    let acc = unit.accumulate::<Avx512Half>(scratch, unit.weight.format.zero(), |chunk, acc| {
        let mut first = 0;
        while first < acc.len() {
            let (row, sums, asks) = (unit.rows.start + first, &mut acc[first..], first == 0);
            first += match sums.len().min(ROWS_PER_PASS) {
                8 => pass::<8, SUB, MINS>(chunk, unit.x, asks, row, sums),
                7 => pass::<7, SUB, MINS>(chunk, unit.x, asks, row, sums),
                6 => pass::<6, SUB, MINS>(chunk, unit.x, asks, row, sums),
                5 => pass::<5, SUB, MINS>(chunk, unit.x, asks, row, sums),
                4 => pass::<4, SUB, MINS>(chunk, unit.x, asks, row, sums),
                3 => pass::<3, SUB, MINS>(chunk, unit.x, asks, row, sums),
                2 => pass::<2, SUB, MINS>(chunk, unit.x, asks, row, sums),
                _ => pass::<1, SUB, MINS>(chunk, unit.x, asks, row, sums),
            };
        }
    });
    let mask: __mmask16 = if unit.lanes >= TILE_ROWS { !0 } else { (1u16 << unit.lanes) - 1 };
    for (i, sums) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(unit.output(i), mask, _mm512_loadu_ps(sums.as_ptr()));
    }
}

/// Activation rows `row..row + R` against the chunk, into their 16-lane sums; the unit's first
/// pass `asks` for the next tile row's lines. Returns R.
#[inline(always)]
unsafe fn pass<const R: usize, const SUB: usize, const MINS: bool>(chunk: &Chunk, x: &QuantizedRows, asks: bool, row: usize, acc: &mut [[f32; TILE_ROWS]]) -> usize {
    let (k, blocks_per_row) = (x.k, x.k / BLOCK);
    let mut sums: [__m512; R] = std::array::from_fn(|r| if chunk.first { _mm512_setzero_ps() } else { _mm512_loadu_ps(acc[r].as_ptr()) });
    let q = x.q.as_ptr();
    for b in 0..chunk.blocks {
        if asks {
            chunk.prefetch_share(b);
        }
        let kb = chunk.t0 / BLOCK + b;
        let dx: [__m512; R] = std::array::from_fn(|r| _mm512_set1_ps(*x.scale.get_unchecked((row + r) * blocks_per_row + kb)));
        for s in 0..BLOCK / SUB {
            let mut isum: [__m512i; R] = std::array::from_fn(|r| {
                let runs = x.run_sum.as_ptr().add(((row + r) * blocks_per_row + kb) * 2);
                let start = if SUB == 16 { *runs.add(s) } else { *runs + *runs.add(1) };
                _mm512_set1_epi32(-chunk.zero * start)
            });
            let first = b * BLOCK + s * SUB;
            // With few rows the sums are latency-bound chains: odd groups go into a second
            // chain (integer sums are exact in any order).
            let mut odd = [_mm512_setzero_si512(); R];
            for g in 0..SUB / 4 {
                let w = _mm512_loadu_si512(chunk.codes.add((first / 4 + g) * GROUP_BYTES) as *const _);
                for r in 0..R {
                    let four = std::ptr::read_unaligned(q.add((row + r) * k + chunk.t0 + first + g * 4) as *const i32);
                    let sum = if R <= 4 && g % 2 == 1 { &mut odd[r] } else { &mut isum[r] };
                    *sum = _mm512_dpbusd_epi32(*sum, w, _mm512_set1_epi32(four));
                }
            }
            if R <= 4 {
                for r in 0..R {
                    isum[r] = _mm512_add_epi32(isum[r], odd[r]);
                }
            }
            let scale = _mm512_loadu_ps(chunk.scales.add((b * BLOCK / SUB + s) * TILE_ROWS));
            for r in 0..R {
                sums[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r]), _mm512_mul_ps(scale, dx[r]), sums[r]);
            }
        }
        if MINS {
            let min = _mm512_loadu_ps(chunk.mins.add(b * TILE_ROWS));
            for (r, sum) in sums.iter_mut().enumerate() {
                let block_sum = _mm512_set1_ps(*x.block_sum.get_unchecked((row + r) * blocks_per_row + kb));
                *sum = _mm512_fnmadd_ps(min, block_sum, *sum);
            }
        }
    }
    for (r, sum) in sums.iter().enumerate() {
        _mm512_storeu_ps(acc[r].as_mut_ptr(), *sum);
    }
    R
}
