//! Quantized weights × f32 activations with AVX-512, or AVX2 and FMA.
//!
//! y[i,j] = Σ_t x[i,t]·w[j,t], with w[j,t] = s·q − o for an 8-bit q and a scale s and offset o
//! per run of 16 values: Q8_0 (o = 0, one f16 scale per 32) and, repacked exactly, Q6_K
//! (o = 0, s = d·scale per 16) and Q4_K (s = d·scale, o = dmin·min per 32). The weights stay
//! 8-bit in memory and are widened to f32 in registers, and the activations are not quantized
//! at all. Quantizing them (as ggml
//! does) makes the output jump with the rounding of single values, so two correct kernels that
//! merely sum in another order can disagree by most of a nat; in f32 they agree to rounding.
//!
//! Weights are repacked in tiles of 16 output rows × 32 values, stored column by column: the 16
//! bytes of column t are one row each, so a sign-extending load gives a vector of the 16 rows'
//! weights at t, scaled by the rows' scales and multiplied with the broadcast x[i,t]. Every output element goes through the same operations in the same order whatever the
//! number of rows, so a sequence's results never depend on what else shares its batch.
//!
//! With AVX2 a tile's 16 rows are two 8-lane halves, each through the same per-lane operations
//! as the 16-lane AVX-512 form, so both give the same bits.

use std::ops::Range;

use candle_core::utils::barrier_pool;
use half::f16;

use crate::model::int8::{self, Int8Weight};

pub(crate) const BLOCK: usize = 32;
pub(crate) const TILE_ROWS: usize = 16;
/// Activation rows sharing each load of a weight tile.
const ROWS_PER_PASS: usize = 8;
const Q8_0_BLOCK_BYTES: usize = 34;

/// Which threads run a matmul: the serving engine's pool, or (for background work on a thread
/// budget of its own) the rayon pool the caller runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    Serving,
    CurrentRayonPool,
}

/// 16 rows × 32 values of weights, column-major, and the 16 block scales.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Tile {
    pub(crate) qs: [i8; BLOCK * TILE_ROWS],
    /// f16 bits.
    pub(crate) d: [u16; TILE_ROWS],
}

/// 16 rows × 32 values as w = s·q − o: 8-bit q column-major, a scale per row and half (16
/// values), an offset per row.
#[repr(C)]
#[derive(Clone, Copy)]
struct AffineTile {
    qs: [i8; BLOCK * TILE_ROWS],
    /// `[half][row]`.
    scale: [f32; 2 * TILE_ROWS],
    offset: [f32; TILE_ROWS],
}

enum Tiles {
    Q8_0(Vec<Tile>),
    Affine(Vec<AffineTile>),
}

/// The vector instructions a kernel is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Avx512,
    Avx2,
}

impl Isa {
    /// The widest this CPU runs.
    fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Some(Isa::Avx512);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                return Some(Isa::Avx2);
            }
        }
        None
    }
}

/// A weight `[n, k]` repacked for the vector kernels.
pub struct PackedWeight {
    /// `[n / 16][k / 32]` tiles.
    tiles: Tiles,
    n: usize,
    k: usize,
    isa: Isa,
}

const Q4_K_BLOCK_BYTES: usize = 144;
const Q6_K_BLOCK_BYTES: usize = 210;
const SUPERBLOCK: usize = 256;

/// ggml's unpacking of the 6-bit (scale, min) pair j of a Q4_K superblock.
fn q4_k_scale_min(j: usize, scales: &[u8]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// One superblock row of 256 values as (q, scale per 16, offset per 32), exactly as ggml
/// dequantizes it: value = scale·q − offset.
struct Decoded {
    q: [i8; SUPERBLOCK],
    scale: [f32; SUPERBLOCK / 16],
    offset: [f32; SUPERBLOCK / 32],
}

/// Q4_K: d, dmin (f16) | 12 bytes of 6-bit scales and mins | 128 bytes of nibbles. Sub-block j
/// of 32 is d·sc_j·q − dmin·m_j, the low nibbles of 32 bytes then their high nibbles.
fn decode_q4_k(block: &[u8]) -> Decoded {
    let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
    let dmin = f16::from_le_bytes([block[2], block[3]]).to_f32();
    let scales = &block[4..16];
    let qs = &block[16..144];
    let mut out = Decoded {
        q: [0; SUPERBLOCK],
        scale: [0.0; SUPERBLOCK / 16],
        offset: [0.0; SUPERBLOCK / 32],
    };
    for pair in 0..4 {
        let bytes = &qs[pair * 32..pair * 32 + 32];
        for (half, shift) in [(0, 0), (1, 4)] {
            let j = pair * 2 + half;
            let (sc, m) = q4_k_scale_min(j, scales);
            out.scale[2 * j] = d * sc as f32;
            out.scale[2 * j + 1] = d * sc as f32;
            out.offset[j] = dmin * m as f32;
            for (l, &b) in bytes.iter().enumerate() {
                out.q[j * 32 + l] = ((b >> shift) & 0x0F) as i8;
            }
        }
    }
    out
}

/// Q6_K: 128 bytes of low nibbles | 64 bytes of high bit pairs | 16 i8 scales | d (f16).
/// Value = d·sc·(q − 32), one scale per 16 values.
fn decode_q6_k(block: &[u8]) -> Decoded {
    let (ql, rest) = block.split_at(128);
    let (qh, rest) = rest.split_at(64);
    let (sc, d) = rest.split_at(16);
    let d = f16::from_le_bytes([d[0], d[1]]).to_f32();
    let mut out = Decoded {
        q: [0; SUPERBLOCK],
        scale: [0.0; SUPERBLOCK / 16],
        offset: [0.0; SUPERBLOCK / 32],
    };
    for (i, s) in out.scale.iter_mut().enumerate() {
        *s = d * sc[i] as i8 as f32;
    }
    for half in 0..2 {
        let (ql, qh) = (&ql[half * 64..], &qh[half * 32..]);
        let q = &mut out.q[half * 128..];
        for l in 0..32 {
            q[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
            q[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            q[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            q[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
        }
    }
    out
}

impl PackedWeight {
    /// Whether this CPU runs the kernels (AVX-512, or AVX2 with FMA and F16C).
    pub fn supported() -> bool {
        Isa::detect().is_some()
    }

    /// Repacks a row-major Q8_0 weight `[n, k]` (the last tile zero-padded when n is not a
    /// multiple of 16); `None` when the data does not fit the shape or the CPU lacks the kernels.
    pub fn pack(q8_0: &[u8], n: usize, k: usize) -> Option<Self> {
        let isa = Isa::detect()?;
        if k % BLOCK != 0 || q8_0.len() != n * k / BLOCK * Q8_0_BLOCK_BYTES {
            return None;
        }
        let kb = k / BLOCK;
        let row_bytes = kb * Q8_0_BLOCK_BYTES;
        let empty = Tile {
            qs: [0; BLOCK * TILE_ROWS],
            d: [0; TILE_ROWS],
        };
        let mut tiles = vec![empty; n.div_ceil(TILE_ROWS) * kb];
        let pack_tile_row = |(tile_row, tiles): (usize, &mut [Tile])| {
            for (b, tile) in tiles.iter_mut().enumerate() {
                for r in (0..TILE_ROWS).take_while(|r| tile_row * TILE_ROWS + r < n) {
                    let at = (tile_row * TILE_ROWS + r) * row_bytes + b * Q8_0_BLOCK_BYTES;
                    let block = &q8_0[at..at + Q8_0_BLOCK_BYTES];
                    tile.d[r] = u16::from_le_bytes([block[0], block[1]]);
                    for (t, &q) in block[2..].iter().enumerate() {
                        tile.qs[t * TILE_ROWS + r] = q as i8;
                    }
                }
            }
        };
        use rayon::prelude::*;
        tiles.par_chunks_mut(kb).enumerate().for_each(pack_tile_row);
        Some(Self {
            tiles: Tiles::Q8_0(tiles),
            n,
            k,
            isa,
        })
    }

    /// Repacks a row-major Q4_K (`q6_k` false) or Q6_K weight `[n, k]` exactly.
    pub fn pack_k_quant(data: &[u8], n: usize, k: usize, q6_k: bool) -> Option<Self> {
        let isa = Isa::detect()?;
        let block_bytes = if q6_k { Q6_K_BLOCK_BYTES } else { Q4_K_BLOCK_BYTES };
        if k % SUPERBLOCK != 0 || data.len() != n * k / SUPERBLOCK * block_bytes {
            return None;
        }
        let kb = k / BLOCK;
        let row_bytes = k / SUPERBLOCK * block_bytes;
        let empty = AffineTile {
            qs: [0; BLOCK * TILE_ROWS],
            scale: [0.0; 2 * TILE_ROWS],
            offset: [0.0; TILE_ROWS],
        };
        let mut tiles = vec![empty; n.div_ceil(TILE_ROWS) * kb];
        let pack_tile_row = |(tile_row, tiles): (usize, &mut [AffineTile])| {
            for r in (0..TILE_ROWS).take_while(|r| tile_row * TILE_ROWS + r < n) {
                let row = &data[(tile_row * TILE_ROWS + r) * row_bytes..][..row_bytes];
                for (sb, block) in row.chunks_exact(block_bytes).enumerate() {
                    let decoded = if q6_k { decode_q6_k(block) } else { decode_q4_k(block) };
                    for j in 0..SUPERBLOCK / BLOCK {
                        let tile = &mut tiles[sb * SUPERBLOCK / BLOCK + j];
                        tile.scale[r] = decoded.scale[2 * j];
                        tile.scale[TILE_ROWS + r] = decoded.scale[2 * j + 1];
                        tile.offset[r] = decoded.offset[j];
                        for t in 0..BLOCK {
                            tile.qs[t * TILE_ROWS + r] = decoded.q[j * BLOCK + t];
                        }
                    }
                }
            }
        };
        use rayon::prelude::*;
        tiles.par_chunks_mut(kb).enumerate().for_each(pack_tile_row);
        Some(Self {
            tiles: Tiles::Affine(tiles),
            n,
            k,
            isa,
        })
    }

    /// The weight for the int8 kernel: Q8_0 tiles on a CPU that runs it.
    pub fn int8(&self) -> Option<Int8Weight<'_>> {
        match &self.tiles {
            Tiles::Q8_0(tiles) if int8::supported() => Some(Int8Weight::new(tiles, self.n, self.k)),
            _ => None,
        }
    }

    /// Row `row` of the weight, dequantized into `out` (`k` values): an embedding lookup.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        let kb = self.k / BLOCK;
        let (tile_row, r) = (row / TILE_ROWS, row % TILE_ROWS);
        let blocks = out.chunks_exact_mut(BLOCK);
        match &self.tiles {
            Tiles::Q8_0(tiles) => {
                for (tile, values) in tiles[tile_row * kb..].iter().zip(blocks) {
                    let d = f16::from_bits(tile.d[r]).to_f32();
                    for (t, v) in values.iter_mut().enumerate() {
                        *v = d * tile.qs[t * TILE_ROWS + r] as f32;
                    }
                }
            }
            Tiles::Affine(tiles) => {
                for (tile, values) in tiles[tile_row * kb..].iter().zip(blocks) {
                    for (t, v) in values.iter_mut().enumerate() {
                        let scale = tile.scale[(t / 16) * TILE_ROWS + r];
                        *v = scale * tile.qs[t * TILE_ROWS + r] as f32 - tile.offset[r];
                    }
                }
            }
        }
    }

    /// `y = x·Wᵀ` for `x: [m, k]`, `y: [m, n]`, row-major, on the serving workers.
    pub fn matmul(&self, x: &[f32], y: &mut [f32]) {
        self.matmul_rows(x, y, 0..self.n, Workers::Serving);
    }

    /// `y = x·W[rows]ᵀ` for `x: [m, k]`, `y: [m, rows.len()]`: the output columns of a range of
    /// weight rows (`rows.start` a multiple of 16), on the chosen workers.
    pub fn matmul_rows(&self, x: &[f32], y: &mut [f32], weight_rows: Range<usize>, workers: Workers) {
        let (n, k) = (self.n, self.k);
        let m = x.len() / k;
        let width = weight_rows.len();
        assert!(
            weight_rows.start % TILE_ROWS == 0 && weight_rows.end <= n,
            "rows {weight_rows:?} are not tile-aligned within {n}"
        );
        assert_eq!(x.len(), m * k, "activations are not [m, {k}]");
        assert_eq!(y.len(), m * width, "output is not [{m}, {width}]");
        let kb = k / BLOCK;
        let passes = m.div_ceil(ROWS_PER_PASS);
        let first_tile = weight_rows.start / TILE_ROWS;
        let tile_rows = weight_rows.end.div_ceil(TILE_ROWS) - first_tile;
        // An address, so that the closure run on other threads is Send.
        let y_addr = y.as_mut_ptr() as usize;
        // Affine tiles need each row's sums over runs of 16 activations: Σ x·(s·q − o) is
        // s·Σ q·x − o·Σ x.
        let run_sums: Vec<f32> = match self.tiles {
            Tiles::Affine(_) => x.chunks_exact(16).map(|run| run.iter().sum()).collect(),
            Tiles::Q8_0(_) => Vec::new(),
        };
        // Tile-major units: a worker walks every row pass of a tile while it is in cache.
        let units = |units: Range<usize>| {
            for unit in units {
                let (tile_row, pass) = (first_tile + unit / passes, unit % passes);
                let first = pass * ROWS_PER_PASS;
                let pass = Pass {
                    x,
                    run_sums: &run_sums,
                    k,
                    y: y_addr as *mut f32,
                    width,
                    column: tile_row * TILE_ROWS - weight_rows.start,
                    first,
                    // The last tile may hold fewer than 16 real rows.
                    lanes: (weight_rows.end - tile_row * TILE_ROWS).min(TILE_ROWS),
                };
                let span = tile_row * kb..(tile_row + 1) * kb;
                // SAFETY: units cover disjoint (rows, 16 columns) regions of y, which holds
                // m·width values; the ISA was detected before packing.
                unsafe {
                    match (m - first).min(ROWS_PER_PASS) {
                        8 => self.run_pass::<8>(span, &pass),
                        7 => self.run_pass::<7>(span, &pass),
                        6 => self.run_pass::<6>(span, &pass),
                        5 => self.run_pass::<5>(span, &pass),
                        4 => self.run_pass::<4>(span, &pass),
                        3 => self.run_pass::<3>(span, &pass),
                        2 => self.run_pass::<2>(span, &pass),
                        _ => self.run_pass::<1>(span, &pass),
                    }
                }
            }
        };
        match workers {
            Workers::Serving => barrier_pool().execute_chunked(tile_rows * passes, units),
            Workers::CurrentRayonPool => {
                use rayon::prelude::*;
                (0..tile_rows * passes).into_par_iter().for_each(|unit| units(unit..unit + 1));
            }
        }
    }

    /// `R` activation rows against the tiles `span` (one row of tiles), by the CPU's kernel.
    ///
    /// # Safety
    /// `pass.y` must address `[m, pass.width]` values of which no other thread writes these rows'
    /// 16 columns at `pass.column`.
    unsafe fn run_pass<const R: usize>(&self, span: Range<usize>, pass: &Pass) {
        let k = pass.k;
        let xs: [&[f32]; R] = std::array::from_fn(|i| &pass.x[(pass.first + i) * k..(pass.first + i + 1) * k]);
        let out: [*mut f32; R] = std::array::from_fn(|i| pass.y.add((pass.first + i) * pass.width + pass.column));
        let lanes = pass.lanes;
        match (&self.tiles, self.isa) {
            (Tiles::Q8_0(tiles), Isa::Avx512) => kernel::avx512::q8_0(&tiles[span], xs, out, lanes),
            (Tiles::Q8_0(tiles), Isa::Avx2) => kernel::avx2::q8_0(&tiles[span], xs, out, lanes),
            (Tiles::Affine(tiles), isa) => {
                let runs = k / 16;
                let sums: [&[f32]; R] = std::array::from_fn(|i| &pass.run_sums[(pass.first + i) * runs..(pass.first + i + 1) * runs]);
                match isa {
                    Isa::Avx512 => kernel::avx512::affine(&tiles[span], xs, sums, out, lanes),
                    Isa::Avx2 => kernel::avx2::affine(&tiles[span], xs, sums, out, lanes),
                }
            }
        }
    }
}

/// One unit of a matmul: activation rows `first..` against one row of tiles.
struct Pass<'a> {
    x: &'a [f32],
    /// Each row's sums over runs of 16 activations (affine tiles only).
    run_sums: &'a [f32],
    k: usize,
    y: *mut f32,
    /// Columns of y.
    width: usize,
    /// The column of y where this row of tiles' outputs start.
    column: usize,
    first: usize,
    /// Real rows in this row of tiles.
    lanes: usize,
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::arch::x86_64::*;

    /// Weights stream from memory once per decode step: ask for the tile four ahead (a prefetch
    /// past the end of the weights is a hint that never faults).
    #[inline(always)]
    unsafe fn prefetch_ahead<T>(tile: &T) {
        let ahead = (tile as *const T).wrapping_add(4) as *const i8;
        for line in (0..std::mem::size_of::<T>()).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line));
        }
    }

    pub(super) mod avx512 {
        use std::arch::x86_64::*;

        use super::prefetch_ahead;

        use super::super::{AffineTile, Tile, BLOCK, TILE_ROWS};

        /// Writes each row's 16 sums (only the first `lanes` in a partial last tile).
        #[inline(always)]
        unsafe fn store<const R: usize>(out: [*mut f32; R], even: [__m512; R], odd: [__m512; R], lanes: usize) {
            let mask: __mmask16 = if lanes >= TILE_ROWS { !0 } else { (1u16 << lanes) - 1 };
            for r in 0..R {
                _mm512_mask_storeu_ps(out[r], mask, _mm512_add_ps(even[r], odd[r]));
            }
        }


        /// The 16 rows' 8-bit weights at column `t` of a tile, as f32.
        #[inline(always)]
        unsafe fn column(qs: *const i8, t: usize) -> __m512 {
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qs.add(t * TILE_ROWS) as *const __m128i)))
        }

        /// `R` activation rows against one row of affine tiles (16 outputs each): per run of 16
        /// values, s·Σ q·x − o·Σ x with the runs' activation sums given in `run_sums`.
        #[target_feature(enable = "avx512f")]
        pub(in super::super) unsafe fn affine<const R: usize>(
            tiles: &[AffineTile],
            xs: [&[f32]; R],
            run_sums: [&[f32]; R],
            out: [*mut f32; R],
            lanes: usize,
        ) {
            let mut sums = [_mm512_setzero_ps(); R];
            for (b, tile) in tiles.iter().enumerate() {
                prefetch_ahead(tile);
                let offset = _mm512_loadu_ps(tile.offset.as_ptr());
                let qs = tile.qs.as_ptr();
                for half in 0..2 {
                    let mut even = [_mm512_setzero_ps(); R];
                    let mut odd = [_mm512_setzero_ps(); R];
                    for t in (half * 16..half * 16 + 16).step_by(2) {
                        let w0 = column(qs, t);
                        let w1 = column(qs, t + 1);
                        for r in 0..R {
                            let x = xs[r].as_ptr().add(b * BLOCK + t);
                            even[r] = _mm512_fmadd_ps(w0, _mm512_set1_ps(*x), even[r]);
                            odd[r] = _mm512_fmadd_ps(w1, _mm512_set1_ps(*x.add(1)), odd[r]);
                        }
                    }
                    let scale = _mm512_loadu_ps(tile.scale.as_ptr().add(half * TILE_ROWS));
                    for r in 0..R {
                        let x_sum = _mm512_set1_ps(run_sums[r][2 * b + half]);
                        sums[r] = _mm512_fmadd_ps(scale, _mm512_add_ps(even[r], odd[r]), sums[r]);
                        sums[r] = _mm512_fnmadd_ps(offset, x_sum, sums[r]);
                    }
                }
            }
            let zero = [_mm512_setzero_ps(); R];
            store(out, sums, zero, lanes);
        }

        /// `R` activation rows against one row of Q8_0 tiles (16 outputs each): per block, the
        /// integer weights times the activations, then scaled once by the block's d.
        #[target_feature(enable = "avx512f")]
        pub(in super::super) unsafe fn q8_0<const R: usize>(tiles: &[Tile], xs: [&[f32]; R], out: [*mut f32; R], lanes: usize) {
            let mut sums = [_mm512_setzero_ps(); R];
            for (b, tile) in tiles.iter().enumerate() {
                prefetch_ahead(tile);
                // Even and odd columns sum apart: two chains per row hide the FMA latency.
                let mut even = [_mm512_setzero_ps(); R];
                let mut odd = [_mm512_setzero_ps(); R];
                let qs = tile.qs.as_ptr();
                for t in (0..BLOCK).step_by(2) {
                    let w0 = column(qs, t);
                    let w1 = column(qs, t + 1);
                    for r in 0..R {
                        let x = xs[r].as_ptr().add(b * BLOCK + t);
                        even[r] = _mm512_fmadd_ps(w0, _mm512_set1_ps(*x), even[r]);
                        odd[r] = _mm512_fmadd_ps(w1, _mm512_set1_ps(*x.add(1)), odd[r]);
                    }
                }
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(tile.d.as_ptr() as *const __m256i));
                for r in 0..R {
                    sums[r] = _mm512_fmadd_ps(d, _mm512_add_ps(even[r], odd[r]), sums[r]);
                }
            }
            let zero = [_mm512_setzero_ps(); R];
            store(out, sums, zero, lanes);
        }
    }

    /// The same arithmetic on 8 lanes: each half of a tile's 16 rows in turn, and at most 4
    /// activation rows at once (16 vector registers hold 4 rows' sums and two chains each).
    pub(super) mod avx2 {
        use std::arch::x86_64::*;

        use super::super::{AffineTile, Tile, BLOCK, TILE_ROWS};
        use super::prefetch_ahead;

        const LANES: usize = 8;
        const GROUP: usize = 4;

        /// Rows `half·8..half·8 + 8` of a tile's 8-bit weights at column `t`, as f32.
        #[inline(always)]
        unsafe fn column(qs: *const i8, half: usize, t: usize) -> __m256 {
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(qs.add(t * TILE_ROWS + half * LANES) as *const __m128i)))
        }

        /// Writes each row's 8 sums of this half (only the first `lanes` of them).
        #[inline(always)]
        unsafe fn store<const G: usize>(out: &[*mut f32], half: usize, sums: [__m256; G], lanes: usize) {
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            for r in 0..G {
                _mm256_maskstore_ps(out[r].add(half * LANES), mask, sums[r]);
            }
        }

        /// The real rows of this half of the tiles.
        fn lanes_in(half: usize, lanes: usize) -> usize {
            lanes.saturating_sub(half * LANES).min(LANES)
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        pub(in super::super) unsafe fn q8_0<const R: usize>(tiles: &[Tile], xs: [&[f32]; R], out: [*mut f32; R], lanes: usize) {
            for first in (0..R).step_by(GROUP) {
                let (xs, out) = (&xs[first..], &out[first..]);
                match (R - first).min(GROUP) {
                    4 => q8_0_group::<4>(tiles, xs, out, lanes),
                    3 => q8_0_group::<3>(tiles, xs, out, lanes),
                    2 => q8_0_group::<2>(tiles, xs, out, lanes),
                    _ => q8_0_group::<1>(tiles, xs, out, lanes),
                }
            }
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn q8_0_group<const G: usize>(tiles: &[Tile], xs: &[&[f32]], out: &[*mut f32], lanes: usize) {
            for half in 0..2 {
                let lanes = lanes_in(half, lanes);
                if lanes == 0 {
                    break;
                }
                let mut sums = [_mm256_setzero_ps(); G];
                for (b, tile) in tiles.iter().enumerate() {
                    // The second half finds the tiles in cache already.
                    if half == 0 {
                        prefetch_ahead(tile);
                    }
                    let mut even = [_mm256_setzero_ps(); G];
                    let mut odd = [_mm256_setzero_ps(); G];
                    let qs = tile.qs.as_ptr();
                    for t in (0..BLOCK).step_by(2) {
                        let w0 = column(qs, half, t);
                        let w1 = column(qs, half, t + 1);
                        for r in 0..G {
                            let x = xs[r].as_ptr().add(b * BLOCK + t);
                            even[r] = _mm256_fmadd_ps(w0, _mm256_broadcast_ss(&*x), even[r]);
                            odd[r] = _mm256_fmadd_ps(w1, _mm256_broadcast_ss(&*x.add(1)), odd[r]);
                        }
                    }
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(tile.d.as_ptr().add(half * LANES) as *const __m128i));
                    for r in 0..G {
                        sums[r] = _mm256_fmadd_ps(d, _mm256_add_ps(even[r], odd[r]), sums[r]);
                    }
                }
                store(out, half, sums, lanes);
            }
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        pub(in super::super) unsafe fn affine<const R: usize>(
            tiles: &[AffineTile],
            xs: [&[f32]; R],
            run_sums: [&[f32]; R],
            out: [*mut f32; R],
            lanes: usize,
        ) {
            for first in (0..R).step_by(GROUP) {
                let (xs, sums, out) = (&xs[first..], &run_sums[first..], &out[first..]);
                match (R - first).min(GROUP) {
                    4 => affine_group::<4>(tiles, xs, sums, out, lanes),
                    3 => affine_group::<3>(tiles, xs, sums, out, lanes),
                    2 => affine_group::<2>(tiles, xs, sums, out, lanes),
                    _ => affine_group::<1>(tiles, xs, sums, out, lanes),
                }
            }
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn affine_group<const G: usize>(
            tiles: &[AffineTile],
            xs: &[&[f32]],
            run_sums: &[&[f32]],
            out: &[*mut f32],
            lanes: usize,
        ) {
            for half in 0..2 {
                let lanes = lanes_in(half, lanes);
                if lanes == 0 {
                    break;
                }
                let mut sums = [_mm256_setzero_ps(); G];
                for (b, tile) in tiles.iter().enumerate() {
                    // The second half finds the tiles in cache already.
                    if half == 0 {
                        prefetch_ahead(tile);
                    }
                    let offset = _mm256_loadu_ps(tile.offset.as_ptr().add(half * LANES));
                    let qs = tile.qs.as_ptr();
                    for run in 0..2 {
                        let mut even = [_mm256_setzero_ps(); G];
                        let mut odd = [_mm256_setzero_ps(); G];
                        for t in (run * 16..run * 16 + 16).step_by(2) {
                            let w0 = column(qs, half, t);
                            let w1 = column(qs, half, t + 1);
                            for r in 0..G {
                                let x = xs[r].as_ptr().add(b * BLOCK + t);
                                even[r] = _mm256_fmadd_ps(w0, _mm256_broadcast_ss(&*x), even[r]);
                                odd[r] = _mm256_fmadd_ps(w1, _mm256_broadcast_ss(&*x.add(1)), odd[r]);
                            }
                        }
                        let scale = _mm256_loadu_ps(tile.scale.as_ptr().add(run * TILE_ROWS + half * LANES));
                        for r in 0..G {
                            let x_sum = _mm256_set1_ps(run_sums[r][2 * b + run]);
                            sums[r] = _mm256_fmadd_ps(scale, _mm256_add_ps(even[r], odd[r]), sums[r]);
                            sums[r] = _mm256_fnmadd_ps(offset, x_sum, sums[r]);
                        }
                    }
                }
                store(out, half, sums, lanes);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    pub(super) mod avx512 {
        use super::super::{AffineTile, Tile};

        pub(in super::super) unsafe fn q8_0<const R: usize>(_: &[Tile], _: [&[f32]; R], _: [*mut f32; R], _: usize) {
            unreachable!("PackedWeight::supported() is false off x86_64")
        }

        pub(in super::super) unsafe fn affine<const R: usize>(_: &[AffineTile], _: [&[f32]; R], _: [&[f32]; R], _: [*mut f32; R], _: usize) {
            unreachable!("PackedWeight::supported() is false off x86_64")
        }
    }
    pub(super) use avx512 as avx2;
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn weights(n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
        let values: Vec<f32> = (0..n * k).map(|i| (((i * 7919) % 251) as f32 - 125.0) / 300.0).collect();
        let t = Tensor::from_vec(values, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        let dequantized = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        (q.data().unwrap().into_owned(), dequantized)
    }

    #[test]
    fn equals_the_f32_product_with_the_dequantized_weight_and_is_batch_invariant() {
        if !PackedWeight::supported() {
            eprintln!("skipped: this CPU has neither AVX-512 nor AVX2");
            return;
        }
        let (n, k, m) = (48, 640, 20);
        let (bytes, w) = weights(n, k);
        let packed = PackedWeight::pack(&bytes, n, k).unwrap();
        // Gemma-like activations: mostly small, a few large outliers.
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 20.0 * if i % 89 == 0 { 300.0 } else { 1.0 })
            .collect();
        let mut y = vec![0f32; m * n];
        packed.matmul(&x, &mut y);
        for i in 0..m {
            for j in 0..n {
                let exact: f64 = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum();
                let scale: f64 = (0..k).map(|t| (x[i * k + t] as f64 * w[j * k + t] as f64).abs()).sum();
                let err = (y[i * n + j] as f64 - exact).abs();
                assert!(err <= 1e-5 * scale + 1e-6, "({i},{j}): {} vs {exact}", y[i * n + j]);
            }
        }
        // Each row alone gives bit-identical results.
        for i in 0..m {
            let mut alone = vec![0f32; n];
            packed.matmul(&x[i * k..(i + 1) * k], &mut alone);
            assert_eq!(alone, y[i * n..(i + 1) * n]);
        }
        // Rows dequantize back to the weights.
        let mut row = vec![0f32; k];
        packed.dequantize_row(17, &mut row);
        assert_eq!(row, w[17 * k..18 * k]);
    }

    #[test]
    fn k_quants_repack_exactly_and_multiply_in_f32() {
        if !PackedWeight::supported() {
            eprintln!("skipped: this CPU has neither AVX-512 nor AVX2");
            return;
        }
        let (n, k, m) = (32, 512, 20);
        let values: Vec<f32> = (0..n * k).map(|i| (((i * 7919) % 251) as f32 - 100.0) / 300.0).collect();
        let t = Tensor::from_vec(values, (n, k), &Device::Cpu).unwrap();
        for (dtype, q6_k) in [(GgmlDType::Q4K, false), (GgmlDType::Q6K, true)] {
            let q = QTensor::quantize(&t, dtype).unwrap();
            let w: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let packed = PackedWeight::pack_k_quant(&q.data().unwrap(), n, k, q6_k).unwrap();
            for row in [0, 13, 31] {
                let mut ours = vec![0f32; k];
                packed.dequantize_row(row, &mut ours);
                assert_eq!(ours, w[row * k..(row + 1) * k], "{dtype:?} row {row}");
            }
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 31 % 97) as f32 - 48.0) / 20.0).collect();
            let mut y = vec![0f32; m * n];
            packed.matmul(&x, &mut y);
            for i in 0..m {
                let mut alone = vec![0f32; n];
                packed.matmul(&x[i * k..(i + 1) * k], &mut alone);
                assert_eq!(alone, y[i * n..(i + 1) * n], "{dtype:?} row {i} alone");
            }
            for i in 0..m {
                for j in 0..n {
                    let exact: f64 = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum();
                    let scale: f64 = (0..k).map(|t| (x[i * k + t] as f64 * w[j * k + t] as f64).abs()).sum();
                    assert!((y[i * n + j] as f64 - exact).abs() <= 1e-5 * scale + 1e-6, "{dtype:?} ({i},{j})");
                }
            }
        }
    }

    #[test]
    fn a_partial_last_tile_writes_only_its_rows() {
        if !PackedWeight::supported() {
            eprintln!("skipped: this CPU has neither AVX-512 nor AVX2");
            return;
        }
        let (n, k, m) = (37, 64, 3);
        let (bytes, w) = weights(n, k);
        let packed = PackedWeight::pack(&bytes, n, k).unwrap();
        let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 - 6.0).collect();
        // A guard value after y must survive.
        let mut y = vec![7f32; m * n + 1];
        packed.matmul(&x, &mut y[..m * n]);
        assert_eq!(y[m * n], 7.0);
        for i in 0..m {
            for j in 0..n {
                let exact: f32 = (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum();
                assert!((y[i * n + j] - exact).abs() < 1e-3, "({i},{j})");
            }
        }
        let mut row = vec![0f32; k];
        packed.dequantize_row(36, &mut row);
        assert_eq!(row, w[36 * k..37 * k]);
    }

    #[test]
    fn data_that_does_not_fit_the_shape_is_refused() {
        let (bytes, _) = weights(48, 96);
        assert!(PackedWeight::pack(&bytes, 40, 96).is_none());
        assert!(PackedWeight::pack(&bytes[..100], 48, 96).is_none());
        assert!(PackedWeight::pack_k_quant(&bytes, 48, 96, true).is_none());
    }
}
