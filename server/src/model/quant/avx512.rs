//! AVX-512 VNNI: one 32-bit lane per weight row, `vpdpbusd` adding 4 products of an unsigned
//! code and a signed activation at a time, exact in 32 bits.
//!
//! Per sub-block of a weight row and activation row: isum = −zero·Σ qx + Σ u·qx, then
//! sum += isum·(scale·dx) in one fused step, and for Q4_K sum −= min·Σ x̂ per block of 32.

use std::arch::x86_64::*;

use super::layout::{dequantize as dequantize_with, HalfToSingle, Planes, GROUP_BYTES};
use super::{Chunk, Scratch, Format, QuantizedRows, Unit, BLOCK, CHUNK, FUSED_ROWS, ROWS_PER_PASS, TILE_ROWS};

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
    const _: () = assert!(FUSED_ROWS == 4, "in_place is made for 1 to 4 rows");
    match unit.rows.len() {
        1 => in_place::<1>(unit),
        2 => in_place::<2>(unit),
        3 => in_place::<3>(unit),
        4 => in_place::<4>(unit),
        _ => match unit.weight.format {
            Format::Q8_0 | Format::Q5_0 => run_format::<32, false>(unit, scratch),
            Format::Q4K => run_format::<32, true>(unit, scratch),
            Format::Q6K => run_format::<16, false>(unit, scratch),
        },
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

/// Up to `FUSED_ROWS` activation rows against the unit's tile row, its planes read in place:
/// each block's codes and scales are made in registers as `layout::decode` makes them, then go
/// through `pass`'s integer sums and float steps in its order, so they give its bits.
///
/// # Safety
/// The CPU must pass [`supported`]; the unit's output must be its own.
#[inline(always)]
unsafe fn in_place<const R: usize>(unit: &Unit) {
    let weight = unit.weight;
    let tile = Tile { bytes: weight.tile_row(unit.tile_row).as_ptr(), planes: &weight.planes };
    let x = Rows::<R> { x: unit.x, first: unit.rows.start };
    let mut sums = [_mm512_setzero_ps(); R];
    unit.each_chunk(|t0, len| match weight.format {
        Format::Q8_0 => q8_0(&tile, &x, t0, len, &mut sums),
        Format::Q5_0 => q5_0(&tile, &x, t0, len, &mut sums),
        Format::Q4K => q4_k(&tile, &x, t0, len, &mut sums),
        Format::Q6K => q6_k(&tile, &x, t0, len, &mut sums),
    });
    let mask: __mmask16 = if unit.lanes >= TILE_ROWS { !0 } else { (1u16 << unit.lanes) - 1 };
    for (i, sum) in sums.iter().enumerate() {
        _mm512_mask_storeu_ps(unit.output(i), mask, *sum);
    }
}

/// Q8_0 values t0..t0 + len: codes used as they are, d per 32.
#[inline(always)]
unsafe fn q8_0<const R: usize>(tile: &Tile, x: &Rows<R>, t0: usize, len: usize, sums: &mut [__m512; R]) {
    for t in (t0..t0 + len).step_by(BLOCK) {
        let codes: [__m512i; BLOCK / 4] = std::array::from_fn(|g| tile.load(tile.planes.bytes(t + 4 * g)));
        sub_block::<R, { Format::Q8_0.zero() }>(sums, x, t, &codes, tile.halves(tile.planes.d(t, BLOCK)), &x.dx(t));
    }
}

/// Q5_0 values t0..t0 + len: 4-bit codes and their fifth bits, d per 32.
#[inline(always)]
unsafe fn q5_0<const R: usize>(tile: &Tile, x: &Rows<R>, t0: usize, len: usize, sums: &mut [__m512; R]) {
    for t in (t0..t0 + len).step_by(BLOCK) {
        let mut codes = tile.nibbles::<{ BLOCK / 4 }>(t);
        with_high_bits::<1>(&mut codes, tile.load(tile.planes.high(t, BLOCK)));
        sub_block::<R, { Format::Q5_0.zero() }>(sums, x, t, &codes, tile.halves(tile.planes.d(t, BLOCK)), &x.dx(t));
    }
}

/// Q4_K values t0..t0 + len (one superblock): 4-bit codes, scale d·sc and minimum dmin·m per 32.
#[inline(always)]
unsafe fn q4_k<const R: usize>(tile: &Tile, x: &Rows<R>, t0: usize, len: usize, sums: &mut [__m512; R]) {
    let (d, dmin) = (tile.halves(tile.planes.d(t0, CHUNK)), tile.halves(tile.planes.dmin(t0)));
    for t in (t0..t0 + len).step_by(BLOCK) {
        let scale = _mm512_mul_ps(d, tile.unsigned(tile.planes.sc(t, BLOCK)));
        sub_block::<R, { Format::Q4K.zero() }>(sums, x, t, &tile.nibbles::<{ BLOCK / 4 }>(t), scale, &x.dx(t));
        let min = _mm512_mul_ps(dmin, tile.unsigned(tile.planes.m(t)));
        for (r, sum) in sums.iter_mut().enumerate() {
            *sum = _mm512_fnmadd_ps(min, x.block_sum(r, t), *sum);
        }
    }
}

/// Q6_K values t0..t0 + len (one superblock): 4-bit codes and their two high bits, scale d·sc
/// per 16.
#[inline(always)]
unsafe fn q6_k<const R: usize>(tile: &Tile, x: &Rows<R>, t0: usize, len: usize, sums: &mut [__m512; R]) {
    const RUN: usize = 16;
    let d = tile.halves(tile.planes.d(t0, CHUNK));
    for t in (t0..t0 + len).step_by(BLOCK) {
        let dx = x.dx(t);
        for t in (t..t + BLOCK).step_by(RUN) {
            let mut codes = tile.nibbles::<{ RUN / 4 }>(t);
            with_high_bits::<2>(&mut codes, tile.load(tile.planes.high(t, RUN)));
            let scale = _mm512_mul_ps(d, tile.signed(tile.planes.sc(t, RUN)));
            sub_block::<R, { Format::Q6K.zero() }>(sums, x, t, &codes, scale, &dx);
        }
    }
}

/// One sub-block, values t..t + 4·codes.len(), of each row: isum = −ZERO·Σ qx + Σ u·qx, then
/// sum += isum·(scale·dx), as `pass` adds it.
#[inline(always)]
unsafe fn sub_block<const R: usize, const ZERO: i32>(sums: &mut [__m512; R], x: &Rows<R>, t: usize, codes: &[__m512i], scale: __m512, dx: &[__m512; R]) {
    for (r, sum) in sums.iter_mut().enumerate() {
        // Two chains of half the length: a row's products would each wait on the one before
        // (integer sums are exact in any order).
        let mut chains = [_mm512_set1_epi32(-ZERO * x.run_sum(r, t, 4 * codes.len())), _mm512_setzero_si512()];
        for (g, &w) in codes.iter().enumerate() {
            chains[g % 2] = _mm512_dpbusd_epi32(chains[g % 2], w, x.four(r, t + 4 * g));
        }
        let isum = _mm512_add_epi32(chains[0], chains[1]);
        *sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(scale, dx[r]), *sum);
    }
}

/// ORs into bit 4 of each group's codes its high bits: `WIDTH` bits per group of 4 values,
/// group i's at bits WIDTH·i.. of each byte (see `layout`).
#[inline(always)]
unsafe fn with_high_bits<const WIDTH: i32>(codes: &mut [__m512i], high: __m512i) {
    let mask = _mm512_set1_epi8((((1 << WIDTH) - 1) << 4) as i8);
    // A 32-bit rotation moves every byte's bits alike, none lost: by 4 − WIDTH·i, group i's
    // bits land on bit 4 of their own byte.
    let mut bits = _mm512_rol_epi32::<4>(high);
    for code in codes {
        // code | (bits & mask)
        *code = _mm512_ternarylogic_epi32::<0xF8>(*code, bits, mask);
        bits = _mm512_ror_epi32::<WIDTH>(bits);
    }
}

/// A tile row's planes, read in place.
struct Tile<'a> {
    bytes: *const u8,
    planes: &'a Planes,
}

/// Loads at offsets the planes give (`Planes::bytes` and the like), within the tile row.
impl Tile<'_> {
    #[inline(always)]
    unsafe fn load(&self, offset: usize) -> __m512i {
        _mm512_loadu_si512(self.bytes.add(offset) as *const _)
    }

    /// The codes of N groups of 4 values from t on, in a 4-bit plane: each 64-byte group's low
    /// nibbles are values t..t + 4, its high nibbles t + 4..t + 8.
    #[inline(always)]
    unsafe fn nibbles<const N: usize>(&self, t: usize) -> [__m512i; N] {
        let low = _mm512_set1_epi8(0x0F);
        std::array::from_fn(|g| {
            let packed = self.load(self.planes.nibbles(t + g / 2 * 8));
            _mm512_and_si512(if g % 2 == 0 { packed } else { _mm512_srli_epi16::<4>(packed) }, low)
        })
    }

    /// 16 lanes of f16.
    #[inline(always)]
    unsafe fn halves(&self, offset: usize) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(self.bytes.add(offset) as *const __m256i))
    }

    /// 16 lanes of u8.
    #[inline(always)]
    unsafe fn unsigned(&self, offset: usize) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(self.bytes.add(offset) as *const __m128i)))
    }

    /// 16 lanes of i8.
    #[inline(always)]
    unsafe fn signed(&self, offset: usize) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(self.bytes.add(offset) as *const __m128i)))
    }
}

/// The unit's R activation rows, `first` on.
struct Rows<'a, const R: usize> {
    x: &'a QuantizedRows,
    first: usize,
}

impl<const R: usize> Rows<'_, R> {
    /// Each row's dx for t's block.
    #[inline(always)]
    unsafe fn dx(&self, t: usize) -> [__m512; R] {
        std::array::from_fn(|r| _mm512_set1_ps(self.x.dx(self.first + r, t)))
    }

    #[inline(always)]
    unsafe fn block_sum(&self, r: usize, t: usize) -> __m512 {
        _mm512_set1_ps(self.x.block_sum(self.first + r, t))
    }

    /// Row r's codes t..t + 4 in every 32-bit lane.
    #[inline(always)]
    unsafe fn four(&self, r: usize, t: usize) -> __m512i {
        _mm512_set1_epi32(self.x.four(self.first + r, t))
    }

    #[inline(always)]
    unsafe fn run_sum(&self, r: usize, t: usize, len: usize) -> i32 {
        self.x.run_sum(self.first + r, t, len)
    }
}
