//! Quantized weights × 8-bit activations in integer arithmetic, as llama.cpp's CPU backend
//! computes them: each activation row is rounded to 8 bits as llama.cpp rounds it for the weight's
//! format (`activations`: per 32, or per 256 for K-quants, stored as one scale per 32), and
//!
//!   y[i,j] = Σ_blocks dx[i,b] · Σ_sub scale[j,s] · Σ_{t∈s} (u[j,t] − zero)·qx[i,t]  − Σ_b min[j,b]·Σ_{t∈b} x̂[i,t]
//!
//! with the inner sums exact in 32-bit integers. The weights stay at their file's bits per
//! weight, re-tiled in rows of 16 (`layout`); a tile row is decoded to bytes 256 values at a
//! time into a scratch that stays in L1, and up to 64 activation rows pass over it. Up to 4 rows
//! (decode, small batches) skip the scratch: each block's codes and scales are made in
//! registers straight from the planes, as the decoding makes them.
//!
//! Kernels: AVX-512 VNNI, AVX2, and plain Rust, chosen at run time. Integer sums are exact in
//! any order, and every kernel then applies the same float operations per lane in the same
//! order, so all three give the same bits, and a row's result never depends on how many rows
//! share its batch.

mod activations;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod layout;
mod memory;
mod portable;

use std::ops::Range;

pub use activations::{ActivationFormat, QuantizedRows};
pub use layout::Format;
use layout::{Decoded, Planes};
pub use memory::TileArena;
use memory::TileMemory;

use crate::model::each_item_on_workers;

/// Output rows per tile.
pub(crate) const TILE_ROWS: usize = 16;
/// Values per activation scale, and per Q8_0/Q5_0 weight block.
pub(crate) const BLOCK: usize = 32;
/// Values decoded at a time: one K-quant superblock.
pub(crate) const CHUNK: usize = 256;
/// Activation rows sharing each weight load in the AVX-512 kernel.
const ROWS_PER_PASS: usize = 8;
/// Activation rows per unit of work: they share each decoded chunk.
const ROW_GROUP: usize = 64;
/// Units with at least this many rows spread their prefetches over each chunk's blocks.
const SPREAD_ROWS: usize = 8;
/// Units with at most this many rows multiply the planes in place, without decoding: so few
/// rows share a decoded chunk that writing it and reading it back costs more than their
/// products (one-stream decode spent most of its time there, far below the memory bandwidth).
const FUSED_ROWS: usize = 4;
/// How many tile rows ahead a unit's prefetches run. One ahead left a one-stream decode on a
/// 2-core EPYC (Zen 4) 4 % slower, its requests still in flight when the next row began; on a
/// Xeon the two measured alike.
const PREFETCH_AHEAD: usize = 2;

/// The instructions a kernel is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512Vnni,
    Avx2,
    Portable,
}

impl Isa {
    /// The best this CPU runs.
    pub fn detect() -> Self {
        [Isa::Avx512Vnni, Isa::Avx2].into_iter().find(|isa| isa.runs_here()).unwrap_or(Isa::Portable)
    }

    pub fn runs_here(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => avx512::supported(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2::supported(),
            Isa::Portable => true,
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }
}

/// A weight `[n, k]` in one of the integer formats, re-tiled at its file size.
pub struct QuantWeight {
    format: Format,
    n: usize,
    k: usize,
    planes: Planes,
    tiles: TileMemory,
    isa: Isa,
}

/// One unit of work: activation rows `rows` against one tile row, into 16 (or `lanes`) columns
/// of y starting at `column`.
pub(crate) struct Unit<'a> {
    weight: &'a QuantWeight,
    x: &'a QuantizedRows,
    tile_row: usize,
    rows: Range<usize>,
    y: *mut f32,
    stride: usize,
    column: usize,
    lanes: usize,
    /// The tile row this thread multiplies `PREFETCH_AHEAD` tile rows after this one, asked for
    /// while this one is multiplied (empty when there is none, or another unit of this tile
    /// row runs after this one and asks instead).
    ahead: &'a [u8],
}

impl Unit<'_> {
    /// Where the unit's i-th row's outputs go.
    ///
    /// # Safety
    /// `i < rows.len()`; y must hold `[rows.end, stride]` values.
    unsafe fn output(&self, i: usize) -> *mut f32 {
        self.y.add((self.rows.start + i) * self.stride + self.column)
    }
}

/// A decoded chunk as the vector kernels read it: codes in groups of 64 bytes, scales and
/// minimums in rows of 16 lanes, the chunk's first value, its blocks of 32, the zero code its
/// integer sums start from, and whether it is the tile row's first (its rows' sums start at
/// zero rather than from the scratch, which is never cleared).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct Chunk {
    codes: *const u8,
    scales: *const f32,
    mins: *const f32,
    t0: usize,
    blocks: usize,
    zero: i32,
    first: bool,
    /// The unit's tile row ahead, and the lines of it to ask for while this chunk is multiplied.
    next: *const u8,
    ahead: Range<usize>,
}

impl Unit<'_> {
    /// Walks the unit's tile row 256 values at a time: decodes each chunk with `H` and hands it
    /// to `passes`, which adds its products into each row's 16 sums. Returns the sums.
    ///
    /// # Safety
    /// `H` must be able to run on this CPU.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    #[inline(always)]
    unsafe fn accumulate<'s, H: layout::HalfToSingle>(
        &self,
        scratch: &'s mut Scratch,
        zero: i32,
        mut passes: impl FnMut(&Chunk, &mut [[f32; TILE_ROWS]]),
    ) -> &'s [[f32; TILE_ROWS]] {
        let weight = self.weight;
        let tile_row = weight.tile_row(self.tile_row);
        let Scratch { decoded, sums } = scratch;
        let acc = &mut sums[..self.rows.len()];
        // The tile row ahead is fetched while this one is multiplied, a share with each chunk:
        // a tile row is two streams (codes, then scales at its end) that the hardware
        // prefetcher does not run ahead of, and one-row products wait on every miss (without
        // these prefetches a one-stream decode runs at two thirds of the speed). With many rows
        // the share is spread over the chunk's blocks (`Chunk::prefetch_share`): asked at once
        // it fills the line-fill buffers and stalls work that could go on.
        let next = self.ahead.as_ptr();
        for (c, t0) in (0..weight.k).step_by(CHUNK).enumerate() {
            let len = CHUNK.min(weight.k - t0);
            let view = layout::decode::<H>(weight.format, &weight.planes, tile_row, t0, len, decoded);
            let share = self.ahead_share(c);
            let ahead = if self.rows.len() < SPREAD_ROWS {
                prefetch_lines(next, share);
                0..0
            } else {
                share
            };
            let chunk = Chunk { codes: view.codes, scales: decoded.scales.as_ptr(), mins: decoded.mins.as_ptr(), t0, blocks: len / BLOCK, zero, first: t0 == 0, next, ahead };
            passes(&chunk, acc);
        }
        acc
    }
}

impl Unit<'_> {
    /// Walks the unit's tile row 256 values at a time for the kernels that read its planes in
    /// place (`FUSED_ROWS`), handing on each chunk's first value and length after asking for the
    /// chunk's share of the tile row ahead, as `accumulate` does for few rows.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    #[inline(always)]
    fn each_chunk(&self, mut chunk: impl FnMut(usize, usize)) {
        let k = self.weight.k;
        for (c, t0) in (0..k).step_by(CHUNK).enumerate() {
            prefetch_lines(self.ahead.as_ptr(), self.ahead_share(c));
            chunk(t0, CHUNK.min(k - t0));
        }
    }

    /// The lines of the tile row ahead to ask for with chunk `c`: an equal share per chunk.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    #[inline(always)]
    fn ahead_share(&self, c: usize) -> Range<usize> {
        let (lines, chunks) = (self.ahead.len() / 64, self.weight.k.div_ceil(CHUNK));
        lines * c / chunks..lines * (c + 1) / chunks
    }
}

impl Chunk {
    /// Asks for block `b`'s share of the lines `ahead` of the unit's tile row ahead.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    #[inline(always)]
    fn prefetch_share(&self, b: usize) {
        let (first, n) = (self.ahead.start, self.ahead.len());
        prefetch_lines(self.next, first + n * b / self.blocks..first + n * (b + 1) / self.blocks);
    }
}

/// A worker's buffers, reused from unit to unit: the chunk being decoded, and the running sums
/// of a unit's rows (never cleared: a unit's first chunk starts its sums at zero, so a
/// one-row product touches 64 bytes of them, not 4 KiB).
pub(crate) struct Scratch {
    decoded: Decoded,
    sums: [[f32; TILE_ROWS]; ROW_GROUP],
}

impl Scratch {
    fn new() -> Self {
        Self { decoded: Decoded::new(), sums: [[0.0; TILE_ROWS]; ROW_GROUP] }
    }
}

/// Asks for 64-byte lines `lines` from `start` into L2. A hint: addresses past the weights
/// (after the last tile row) are never dereferenced and do not fault.
#[inline(always)]
fn prefetch_lines(start: *const u8, lines: Range<usize>) {
    #[cfg(target_arch = "x86_64")]
    for line in lines {
        // SAFETY: prefetching never faults, whatever the address.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(start.wrapping_add(line * 64) as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (start, lines);
}

/// y's start, written by several threads at disjoint elements.
#[derive(Clone, Copy)]
struct SharedOutput(*mut f32);

// SAFETY: each unit writes only its own rows × 16 columns of the output.
unsafe impl Send for SharedOutput {}
unsafe impl Sync for SharedOutput {}

impl QuantWeight {
    /// Re-tiles a row-major weight `[n, k]` from the file's blocks, for the given kernels, into
    /// tiles from `arena`; `None` when `k` is not whole blocks of the format or the data does not
    /// fit the shape. The file's bytes are re-tiled a slab of rows at a time; after each slab
    /// `release` gets the range of `data` it read, so the caller can give those file pages back
    /// at once and a large matrix (the 262k-row embedding) never holds its file pages and its
    /// copy whole at the same time.
    pub fn from_file(format: Format, data: &[u8], n: usize, k: usize, isa: Isa, arena: &TileArena, mut release: impl FnMut(std::ops::Range<usize>)) -> Option<Self> {
        /// Rows re-tiled between two releases: a few MiB of file bytes.
        const SLAB_ROWS: usize = TILE_ROWS * 512;
        let (size, bytes) = format.file_block();
        if !format.fits(k) || k % BLOCK != 0 || data.len() != n * (k / size) * bytes {
            return None;
        }
        let planes = Planes::new(format, k);
        let total = n.div_ceil(TILE_ROWS) * planes.tile_row_bytes;
        // Whole cache lines, as the tiles have always been allocated.
        let mut tiles: TileMemory = arena.tiles(total.div_ceil(64) * 64)?;
        let bytes_view = tiles.bytes_mut();
        let row_bytes = k / size * bytes;
        for first in (0..n).step_by(SLAB_ROWS) {
            let rows = SLAB_ROWS.min(n - first);
            let out = &mut bytes_view[first / TILE_ROWS * planes.tile_row_bytes..(first + rows).div_ceil(TILE_ROWS) * planes.tile_row_bytes];
            let read = first * row_bytes..(first + rows) * row_bytes;
            layout::retile(format, &data[read.clone()], rows, k, out);
            release(read);
        }
        Some(Self { format, n, k, planes, tiles, isa })
    }

    /// How the activations this weight meets are rounded.
    pub fn activation_format(&self) -> ActivationFormat {
        self.format.activation_format()
    }

    /// Bytes held in memory.
    pub fn resident_bytes(&self) -> usize {
        self.tiles.len()
    }

    fn tile_row(&self, index: usize) -> &[u8] {
        &self.tiles.bytes()[index * self.planes.tile_row_bytes..][..self.planes.tile_row_bytes]
    }

    /// `y = x·Wᵀ` for `x: [m, k]`: `y: [m, n]`, row-major, computed on the serving workers.
    pub fn matmul(&self, x: &[f32]) -> Vec<f32> {
        Self::matmul_each(&[self], x).pop().unwrap_or_default()
    }

    /// `y_i = x·W_iᵀ` for weights of the same width over one `x: [m, k]`, in one pass over the
    /// serving workers: x is quantized once per activation format, and the units of every
    /// weight are shared out together, so a layer's q, k and v (or gate and up) wait at one
    /// barrier rather than three. Each unit computes what it would alone.
    pub fn matmul_each(weights: &[&QuantWeight], x: &[f32]) -> Vec<Vec<f32>> {
        let mut quantized: Vec<((ActivationFormat, Isa), QuantizedRows)> = Vec::new();
        let mut input_of = Vec::with_capacity(weights.len());
        for weight in weights {
            let key = (weight.activation_format(), weight.isa);
            input_of.push(quantized.iter().position(|(k, _)| *k == key).unwrap_or_else(|| {
                quantized.push((key, QuantizedRows::quantize_on_workers(x, weight.k, key.0, key.1)));
                quantized.len() - 1
            }));
        }
        let inputs: Vec<&QuantizedRows> = input_of.into_iter().map(|i| &quantized[i].1).collect();
        // Every element is written by exactly one unit, so no y is zeroed first (for a
        // 512-token prompt that would be megabytes of stores per matrix).
        let mut ys: Vec<Vec<f32>> = weights.iter().zip(&inputs).map(|(w, x)| Vec::with_capacity(x.rows * w.n)).collect();
        let plans: Vec<(usize, usize)> = weights.iter().zip(&inputs).map(|(w, x)| w.units(x, x.rows * w.n, &(0..w.n))).collect();
        let outputs: Vec<SharedOutput> = ys.iter_mut().map(|y| SharedOutput(y.spare_capacity_mut().as_mut_ptr() as *mut f32)).collect();
        let starts: Vec<usize> = plans.iter().scan(0, |next, &(units, _)| Some(std::mem::replace(next, *next + units))).collect();
        let total = plans.iter().map(|&(units, _)| units).sum();
        // Which weight's which (tile row, row group) a unit is.
        let locate = |unit: usize| {
            let i = starts.partition_point(|&start| start <= unit) - 1;
            let groups = plans[i].1;
            (i, (unit - starts[i]) / groups, (unit - starts[i]) % groups)
        };
        let groups = plans.iter().map(|&(_, groups)| groups).max().unwrap_or(1);
        // One scratch per thread (10 KiB zeroed when made: made per range it was 11 MB of stores
        // in a 16-row decode step), and each unit asks for the tile row this thread runs next.
        each_item_on_workers(total, PREFETCH_AHEAD * groups, Scratch::new, |unit, ahead, scratch| {
            let (i, tile_row, group) = locate(unit);
            // Only a tile row's last row group asks: it runs just before the next tile row.
            let ahead = match ahead {
                Some(later) if group + 1 == plans[i].1 => {
                    let (j, tile_row, _) = locate(later);
                    weights[j].tile_row(tile_row)
                }
                _ => &[],
            };
            weights[i].run(inputs[i], tile_row, group, &(0..weights[i].n), outputs[i], ahead, scratch);
        });
        for ((y, weight), x) in ys.iter_mut().zip(weights).zip(&inputs) {
            // SAFETY: the units cover every (row, column) of [m, n] (see `units`), each storing
            // its rows' `lanes` columns, and all have returned.
            unsafe { y.set_len(x.rows * weight.n) };
        }
        ys
    }

    /// `y = x·W[rows]ᵀ`, `y: [m, rows.len()]` (`rows.start` a multiple of 16), on the calling
    /// thread alone (training splits the work across its own threads).
    pub fn matmul_rows_on_this_thread(&self, x: &QuantizedRows, weight_rows: Range<usize>, y: &mut [f32]) {
        let (units, groups) = self.units(x, y.len(), &weight_rows);
        let y = SharedOutput(y.as_mut_ptr());
        let mut scratch = Scratch::new();
        let first = weight_rows.start / TILE_ROWS;
        let tile_rows = first..weight_rows.end.div_ceil(TILE_ROWS);
        for unit in 0..units {
            let (tile_row, group) = (first + unit / groups, unit % groups);
            let ahead = tile_row + PREFETCH_AHEAD;
            let ahead = if group + 1 == groups && tile_rows.contains(&ahead) { self.tile_row(ahead) } else { &[] };
            self.run(x, tile_row, group, &weight_rows, y, ahead, &mut scratch);
        }
    }

    /// Checks the shapes (`y_len`: the output's length); the number of units and of row groups
    /// per tile row. The units cover every row of x against every tile row of `weight_rows`.
    fn units(&self, x: &QuantizedRows, y_len: usize, weight_rows: &Range<usize>) -> (usize, usize) {
        assert_eq!(x.k, self.k, "activations have {} columns, the weight {}", x.k, self.k);
        assert!(
            weight_rows.start % TILE_ROWS == 0 && weight_rows.end <= self.n,
            "rows {weight_rows:?} are not tile-aligned within {}",
            self.n
        );
        assert_eq!(y_len, x.rows * weight_rows.len(), "output is not [{}, {}]", x.rows, weight_rows.len());
        let groups = x.rows.div_ceil(ROW_GROUP);
        (weight_rows.len().div_ceil(TILE_ROWS) * groups, groups)
    }

    /// One unit: row group `group` of x against tile row `tile_row`, asking for `ahead` meanwhile.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn run(&self, x: &QuantizedRows, tile_row: usize, group: usize, weight_rows: &Range<usize>, y: SharedOutput, ahead: &[u8], scratch: &mut Scratch) {
        let first_row = tile_row * TILE_ROWS;
        let unit = Unit {
            weight: self,
            x,
            tile_row,
            rows: group * ROW_GROUP..((group + 1) * ROW_GROUP).min(x.rows),
            y: y.0,
            stride: weight_rows.len(),
            column: first_row - weight_rows.start,
            lanes: (weight_rows.end - first_row).min(TILE_ROWS),
            ahead,
        };
        match self.isa {
            // SAFETY: the ISA was checked when the weight was made; units cover disjoint
            // (rows, 16 columns) regions of y, checked against its shape in `units`.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => unsafe { avx512::run(&unit, scratch) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::run(&unit, scratch) },
            _ => portable::run(&unit, scratch),
        }
    }

    /// Rows of the weight dequantized exactly as ggml dequantizes the file, into `out`
    /// (`[rows.len(), k]`, row-major).
    pub fn dequantize_rows_into(&self, rows: Range<usize>, out: &mut [f32]) {
        let k = self.k;
        assert!(rows.end <= self.n && out.len() == rows.len() * k, "output is not [{}, {k}]", rows.len());
        let mut row = rows.start;
        while row < rows.end {
            let tile_row = row / TILE_ROWS;
            let within = row % TILE_ROWS..(rows.end - tile_row * TILE_ROWS).min(TILE_ROWS);
            let out = &mut out[(row - rows.start) * k..][..within.len() * k];
            let (format, planes, tiles) = (self.format, &self.planes, self.tile_row(tile_row));
            match self.isa {
                // SAFETY: the ISA was checked when the weight was made.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512Vnni => unsafe { avx512::dequantize(format, planes, tiles, k, within.clone(), out) },
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { avx2::dequantize(format, planes, tiles, k, within.clone(), out) },
                // SAFETY: the portable conversion runs anywhere.
                _ => unsafe { layout::dequantize::<layout::SoftHalf>(format, planes, tiles, k, within.clone(), out) },
            }
            row += within.len();
        }
    }
}

#[cfg(test)]
mod tests;
