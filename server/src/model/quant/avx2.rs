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
use super::{Chunk, Scratch, Format, QuantizedRows, Unit, BLOCK, CHUNK, FUSED_ROWS, TILE_ROWS};

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
    const _: () = assert!(FUSED_ROWS == 4, "in_place is made for 1 to 4 rows");
    match unit.rows.len() {
        1 => in_place::<1>(unit),
        2 => in_place::<2>(unit),
        3 => in_place::<3>(unit),
        4 => in_place::<4>(unit),
        _ => match unit.weight.format {
            Format::Q8_0 => run_format::<32, false, true, 1>(unit, scratch),
            Format::Q5_0 => run_format::<32, false, false, 4>(unit, scratch),
            Format::Q4K => run_format::<32, true, false, 8>(unit, scratch),
            Format::Q6K => run_format::<16, false, false, 2>(unit, scratch),
        },
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
unsafe fn run_format<const SUB: usize, const MINS: bool, const SIGNED: bool, const G: usize>(unit: &Unit, scratch: &mut Scratch) {
    let zero = if SIGNED { 0 } else { unit.weight.format.zero() };
    let acc = unit.accumulate::<F16c>(scratch, zero, |chunk, acc| {
        for half in 0..2 {
            let mut first = 0;
            while first < acc.len() {
                let (row, sums, asks) = (unit.rows.start + first, &mut acc[first..], half == 0 && first == 0);
                first += match sums.len().min(ROWS_PER_PASS) {
                    4 => pass::<4, SUB, MINS, SIGNED, G>(chunk, half, unit.x, asks, row, sums),
                    3 => pass::<3, SUB, MINS, SIGNED, G>(chunk, half, unit.x, asks, row, sums),
                    2 => pass::<2, SUB, MINS, SIGNED, G>(chunk, half, unit.x, asks, row, sums),
                    _ => pass::<1, SUB, MINS, SIGNED, G>(chunk, half, unit.x, asks, row, sums),
                };
            }
        }
    });
    for (i, sums) in acc.iter().enumerate() {
        store(unit, i, [_mm256_loadu_ps(sums.as_ptr()), _mm256_loadu_ps(sums.as_ptr().add(LANES))]);
    }
}

/// Row i's two halves of sums into the unit's `lanes` outputs.
///
/// # Safety
/// `i < unit.rows.len()`; the unit's output must be its own.
#[inline(always)]
unsafe fn store(unit: &Unit, i: usize, halves: [__m256; 2]) {
    let lanes = _mm256_set1_epi32(unit.lanes as i32);
    let mask = _mm256_cmpgt_epi32(lanes, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    let mask_high = _mm256_cmpgt_epi32(lanes, _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15));
    let out = unit.output(i);
    _mm256_maskstore_ps(out, mask, halves[0]);
    _mm256_maskstore_ps(out.add(LANES), mask_high, halves[1]);
}

/// Σ of 2 products per 16-bit lane: unsigned codes `w` times the signed activations `x`.
#[inline(always)]
unsafe fn pairs<const SIGNED: bool>(w: __m256i, x: __m256i) -> __m256i {
    if SIGNED {
        let signed = _mm256_xor_si256(w, _mm256_set1_epi8(-128));
        _mm256_maddubs_epi16(_mm256_abs_epi8(signed), _mm256_sign_epi8(x, signed))
    } else {
        _mm256_maddubs_epi16(w, x)
    }
}

/// Σ of 4 products per 32-bit lane, over `G` groups of 4 values: `group(g)` gives group g's
/// codes and activations. A pair is at most 2·c·128 for codes below c, so the pairs of G groups
/// add up in 16 bits without saturating where G·2·c·128 < 2¹⁵: G = 8 for Q4_K's codes (< 16),
/// 4 for Q5_0's (< 32), 2 for Q6_K's (< 64), 1 for Q8_0's magnitudes (≤ 128). Widening to 32
/// bits once per G groups instead of once per group leaves every sum exact.
#[inline(always)]
unsafe fn dot_groups<const SIGNED: bool, const G: usize>(group: impl Fn(usize) -> (__m256i, __m256i)) -> __m256i {
    let (w, x) = group(0);
    let mut sum = pairs::<SIGNED>(w, x);
    for g in 1..G {
        let (w, x) = group(g);
        sum = _mm256_add_epi16(sum, pairs::<SIGNED>(w, x));
    }
    _mm256_madd_epi16(sum, _mm256_set1_epi16(1))
}

/// Activation rows `row..row + R` against one half (8 weight rows) of the chunk; the unit's
/// first pass `asks` for the next tile row's lines. Returns R.
#[inline(always)]
unsafe fn pass<const R: usize, const SUB: usize, const MINS: bool, const SIGNED: bool, const G: usize>(
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
            for g0 in (0..SUB / 4).step_by(G) {
                let w: [__m256i; G] = std::array::from_fn(|g| _mm256_loadu_si256(chunk.codes.add((first / 4 + g0 + g) * GROUP_BYTES + lanes * 4) as *const __m256i));
                for (r, isum) in isum.iter_mut().enumerate() {
                    let four = |g: usize| std::ptr::read_unaligned(q.add((row + r) * k + chunk.t0 + first + (g0 + g) * 4) as *const i32);
                    *isum = _mm256_add_epi32(*isum, dot_groups::<SIGNED, G>(|g| (w[g], _mm256_set1_epi32(four(g)))));
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

/// Up to `FUSED_ROWS` activation rows against the unit's tile row, its planes read in place,
/// half a tile row (8 weight rows) at a time: each block's codes and scales are made in
/// registers as `layout::decode` makes them, then go through `pass`'s integer sums and float
/// steps in its order, so they give its bits.
///
/// # Safety
/// The CPU must pass [`supported`]; the unit's output must be its own.
#[inline(always)]
unsafe fn in_place<const R: usize>(unit: &Unit) {
    let weight = unit.weight;
    let bytes = weight.tile_row(unit.tile_row).as_ptr();
    let x = Rows::<R> { x: unit.x, first: unit.rows.start };
    let mut sums = [[_mm256_setzero_ps(); R]; 2];
    unit.each_chunk(|t0, len| {
        for (half, sums) in sums.iter_mut().enumerate() {
            let tile = Tile { bytes, planes: &weight.planes, half };
            match weight.format {
                Format::Q8_0 => q8_0(&tile, &x, t0, len, sums),
                Format::Q5_0 => q5_0(&tile, &x, t0, len, sums),
                Format::Q4K => q4_k(&tile, &x, t0, len, sums),
                Format::Q6K => q6_k(&tile, &x, t0, len, sums),
            }
        }
    });
    let [low, high] = sums;
    for (i, (low, high)) in low.into_iter().zip(high).enumerate() {
        store(unit, i, [low, high]);
    }
}

/// Q8_0 values t0..t0 + len: codes used as they are (signed, see the module), d per 32.
#[inline(always)]
unsafe fn q8_0<const R: usize>(tile: &Tile, x: &Rows<R>, t0: usize, len: usize, sums: &mut [__m256; R]) {
    for t in (t0..t0 + len).step_by(BLOCK) {
        let codes: [__m256i; BLOCK / 4] = std::array::from_fn(|g| tile.load(tile.planes.bytes(t + 4 * g)));
        sub_block::<R, 0, true, 1>(sums, x, t, &codes, tile.halves(tile.planes.d(t, BLOCK)));
    }
}

/// Q5_0 values t0..t0 + len: 4-bit codes and their fifth bits, d per 32.
#[inline(always)]
unsafe fn q5_0<const R: usize>(tile: &Tile, x: &Rows<R>, t0: usize, len: usize, sums: &mut [__m256; R]) {
    for t in (t0..t0 + len).step_by(BLOCK) {
        let mut codes = tile.nibbles::<{ BLOCK / 4 }>(t);
        with_high_bits::<1>(&mut codes, tile.load(tile.planes.high(t, BLOCK)));
        sub_block::<R, { Format::Q5_0.zero() }, false, 4>(sums, x, t, &codes, tile.halves(tile.planes.d(t, BLOCK)));
    }
}

/// Q4_K values t0..t0 + len (one superblock): 4-bit codes, scale d·sc and minimum dmin·m per 32.
#[inline(always)]
unsafe fn q4_k<const R: usize>(tile: &Tile, x: &Rows<R>, t0: usize, len: usize, sums: &mut [__m256; R]) {
    let (d, dmin) = (tile.halves(tile.planes.d(t0, CHUNK)), tile.halves(tile.planes.dmin(t0)));
    for t in (t0..t0 + len).step_by(BLOCK) {
        let scale = _mm256_mul_ps(d, tile.unsigned(tile.planes.sc(t, BLOCK)));
        sub_block::<R, { Format::Q4K.zero() }, false, 8>(sums, x, t, &tile.nibbles::<{ BLOCK / 4 }>(t), scale);
        let min = _mm256_mul_ps(dmin, tile.unsigned(tile.planes.m(t)));
        for (r, sum) in sums.iter_mut().enumerate() {
            *sum = _mm256_fnmadd_ps(min, x.block_sum(r, t), *sum);
        }
    }
}

/// Q6_K values t0..t0 + len (one superblock): 4-bit codes and their two high bits, scale d·sc
/// per 16.
#[inline(always)]
unsafe fn q6_k<const R: usize>(tile: &Tile, x: &Rows<R>, t0: usize, len: usize, sums: &mut [__m256; R]) {
    const RUN: usize = 16;
    let d = tile.halves(tile.planes.d(t0, CHUNK));
    for t in (t0..t0 + len).step_by(RUN) {
        let mut codes = tile.nibbles::<{ RUN / 4 }>(t);
        with_high_bits::<2>(&mut codes, tile.load(tile.planes.high(t, RUN)));
        let scale = _mm256_mul_ps(d, tile.signed(tile.planes.sc(t, RUN)));
        sub_block::<R, { Format::Q6K.zero() }, false, 2>(sums, x, t, &codes, scale);
    }
}

/// One sub-block, values t..t + 4·codes.len(), of each row: isum = −ZERO·Σ qx + Σ u·qx, then
/// sum += isum·(scale·dx), as `pass` adds it.
#[inline(always)]
unsafe fn sub_block<const R: usize, const ZERO: i32, const SIGNED: bool, const G: usize>(sums: &mut [__m256; R], x: &Rows<R>, t: usize, codes: &[__m256i], scale: __m256) {
    for (r, sum) in sums.iter_mut().enumerate() {
        let mut isum = _mm256_set1_epi32(-ZERO * x.run_sum(r, t, 4 * codes.len()));
        for g0 in (0..codes.len()).step_by(G) {
            isum = _mm256_add_epi32(isum, dot_groups::<SIGNED, G>(|g| (codes[g0 + g], x.four(r, t + 4 * (g0 + g)))));
        }
        *sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(scale, x.dx(r, t)), *sum);
    }
}

/// ORs into bit 4 of each group's codes its high bits: `WIDTH` bits per group of 4 values,
/// group i's at bits WIDTH·i.. of each byte (see `layout`).
#[inline(always)]
unsafe fn with_high_bits<const WIDTH: usize>(codes: &mut [__m256i], high: __m256i) {
    let mask = _mm256_set1_epi8((((1 << WIDTH) - 1) << 4) as i8);
    for (i, code) in codes.iter_mut().enumerate() {
        // A 16-bit shift moves both bytes' bits alike, none lost over at most 4 places.
        let from = WIDTH * i;
        let bits = if from <= 4 {
            _mm256_sll_epi16(high, _mm_cvtsi32_si128((4 - from) as i32))
        } else {
            _mm256_srl_epi16(high, _mm_cvtsi32_si128((from - 4) as i32))
        };
        *code = _mm256_or_si256(*code, _mm256_and_si256(bits, mask));
    }
}

/// Half a tile row's planes (weight rows 8·half..), read in place.
struct Tile<'a> {
    bytes: *const u8,
    planes: &'a Planes,
    half: usize,
}

/// Loads at offsets the planes give (`Planes::bytes` and the like), within the tile row.
impl Tile<'_> {
    #[inline(always)]
    unsafe fn load(&self, offset: usize) -> __m256i {
        _mm256_loadu_si256(self.bytes.add(offset + self.half * GROUP_BYTES / 2) as *const __m256i)
    }

    /// The codes of N groups of 4 values from t on, in a 4-bit plane: each 64-byte group's low
    /// nibbles are values t..t + 4, its high nibbles t + 4..t + 8.
    #[inline(always)]
    unsafe fn nibbles<const N: usize>(&self, t: usize) -> [__m256i; N] {
        let low = _mm256_set1_epi8(0x0F);
        std::array::from_fn(|g| {
            let packed = self.load(self.planes.nibbles(t + g / 2 * 8));
            _mm256_and_si256(if g % 2 == 0 { packed } else { _mm256_srli_epi16::<4>(packed) }, low)
        })
    }

    /// The half's 8 lanes of f16.
    #[inline(always)]
    unsafe fn halves(&self, offset: usize) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(self.bytes.add(offset + self.half * 2 * LANES) as *const __m128i))
    }

    /// The half's 8 lanes of u8.
    #[inline(always)]
    unsafe fn unsigned(&self, offset: usize) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(self.bytes.add(offset + self.half * LANES) as *const __m128i)))
    }

    /// The half's 8 lanes of i8.
    #[inline(always)]
    unsafe fn signed(&self, offset: usize) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(self.bytes.add(offset + self.half * LANES) as *const __m128i)))
    }
}

/// The unit's R activation rows, `first` on.
struct Rows<'a, const R: usize> {
    x: &'a QuantizedRows,
    first: usize,
}

impl<const R: usize> Rows<'_, R> {
    #[inline(always)]
    unsafe fn dx(&self, r: usize, t: usize) -> __m256 {
        _mm256_set1_ps(self.x.dx(self.first + r, t))
    }

    #[inline(always)]
    unsafe fn block_sum(&self, r: usize, t: usize) -> __m256 {
        _mm256_set1_ps(self.x.block_sum(self.first + r, t))
    }

    /// Row r's codes t..t + 4 in every 32-bit lane.
    #[inline(always)]
    unsafe fn four(&self, r: usize, t: usize) -> __m256i {
        _mm256_set1_epi32(self.x.four(self.first + r, t))
    }

    #[inline(always)]
    unsafe fn run_sum(&self, r: usize, t: usize, len: usize) -> i32 {
        self.x.run_sum(self.first + r, t, len)
    }
}
