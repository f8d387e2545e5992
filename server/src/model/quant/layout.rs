//! The weight formats re-tiled for integer dot products, at the file's own bits per weight.
//!
//! A weight `[n, k]` is cut into tile rows of 16 output rows. Each tile row holds its 16 rows'
//! codes and scales in planes, laid out so that one 64-byte load gives, for 4 consecutive
//! values t..t+4, the 16 rows × 4 codes that `vpdpbusd` multiplies in its 32-bit lanes (byte
//! 4r + c is row r, value t + c):
//!
//! | format | value | planes of one tile row | bits per weight |
//! | --- | --- | --- | --- |
//! | Q8_0 | d·(u − 128) | u: 8 bits; d: f16 per 32 | 8.5 |
//! | Q5_0 | d·(u − 16) | low 4 bits; high bit; d: f16 per 32 | 5.5 |
//! | Q4_K | d·sc·u − dmin·m | 4 bits; d, dmin: f16 per 256; sc, m: 6 bits (held in a byte) per 32 | 4.625 |
//! | Q6_K | d·sc·(u − 32) | low 4 bits; high 2 bits; sc: i8 per 16; d: f16 per 256 | 6.5625 |
//!
//! with u the unsigned code. A 4-bit plane packs 8 values per row in each 64-byte group: the low
//! nibbles hold values t..t+4, the high nibbles t+4..t+8. Q5_0's high bits for a block of 32 are
//! one 64-byte group, bit i of byte 4r + c belonging to value 4i + c; Q6_K's high bit pairs for
//! 16 values are one group, bits 2i..2i+2 of byte 4r + c belonging to value 4i + c.
//!
//! Re-tiling only moves bits: every value dequantizes to exactly what ggml makes of the file.

use candle_core::quantized::GgmlDType;
use half::f16;

use super::{ActivationFormat, BLOCK, CHUNK, TILE_ROWS};

/// A group: 16 rows × 4 values, one vector register of codes.
pub(crate) const GROUP_BYTES: usize = 64;

/// The quantized formats with integer kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Q8_0,
    Q5_0,
    Q4K,
    Q6K,
}

impl Format {
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::Q8_0 => Format::Q8_0,
            GgmlDType::Q5_0 => Format::Q5_0,
            GgmlDType::Q4K => Format::Q4K,
            GgmlDType::Q6K => Format::Q6K,
            _ => return None,
        })
    }

    /// How llama.cpp rounds the activations this format is multiplied with.
    pub fn activation_format(self) -> ActivationFormat {
        match self {
            Format::Q8_0 | Format::Q5_0 => ActivationFormat::Q8_0,
            Format::Q4K | Format::Q6K => ActivationFormat::Q8K,
        }
    }

    /// Values and bytes of one block in the GGUF file.
    pub(crate) fn file_block(self) -> (usize, usize) {
        match self {
            Format::Q8_0 => (32, 34),
            Format::Q5_0 => (32, 22),
            Format::Q4K => (256, 144),
            Format::Q6K => (256, 210),
        }
    }

    /// Values sharing one scale.
    pub(crate) fn sub_block(self) -> usize {
        match self {
            Format::Q6K => 16,
            _ => 32,
        }
    }

    /// The code that stands for zero: the kernels start each sub-block's integer sum at
    /// −zero·Σ qx.
    pub(crate) const fn zero(self) -> i32 {
        match self {
            Format::Q8_0 => 128,
            Format::Q5_0 => 16,
            Format::Q4K => 0,
            Format::Q6K => 32,
        }
    }

    /// Whether values carry a subtracted minimum per 32 (Q4_K's dmin·m).
    pub(crate) fn has_mins(self) -> bool {
        self == Format::Q4K
    }

    /// Whether `k` values per row can be held: whole file blocks.
    pub(crate) fn fits(self, k: usize) -> bool {
        k > 0 && k % self.file_block().0 == 0
    }
}

/// Where each plane of a tile row starts, in bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Planes {
    /// 8-bit codes (Q8_0) or their low 4 bits (the others).
    low: usize,
    /// Q5_0's high bits, Q6_K's high bit pairs.
    high: usize,
    /// f16 per 32 (Q8_0, Q5_0) or per 256 (K-quants).
    d: usize,
    /// Q4_K's f16 dmin per 256.
    dmin: usize,
    /// Q4_K's u8 sc per 32, Q6_K's i8 sc per 16.
    sc: usize,
    /// Q4_K's u8 m per 32.
    m: usize,
    pub(crate) tile_row_bytes: usize,
}

impl Planes {
    pub(crate) fn new(format: Format, k: usize) -> Self {
        let (blocks, superblocks) = (k / BLOCK, k / CHUNK);
        let rows_f16 = 2 * TILE_ROWS;
        let mut at = 0;
        let mut plane = |bytes: usize| {
            let start = at;
            at += bytes;
            start
        };
        let planes = match format {
            Format::Q8_0 => {
                let low = plane(k * TILE_ROWS);
                let d = plane(blocks * rows_f16);
                Planes { low, high: 0, d, dmin: 0, sc: 0, m: 0, tile_row_bytes: 0 }
            }
            Format::Q5_0 => {
                let low = plane(k * TILE_ROWS / 2);
                let high = plane(blocks * GROUP_BYTES);
                let d = plane(blocks * rows_f16);
                Planes { low, high, d, dmin: 0, sc: 0, m: 0, tile_row_bytes: 0 }
            }
            Format::Q4K => {
                let low = plane(k * TILE_ROWS / 2);
                let d = plane(superblocks * rows_f16);
                let dmin = plane(superblocks * rows_f16);
                let sc = plane(blocks * TILE_ROWS);
                let m = plane(blocks * TILE_ROWS);
                Planes { low, high: 0, d, dmin, sc, m, tile_row_bytes: 0 }
            }
            Format::Q6K => {
                let low = plane(k * TILE_ROWS / 2);
                let high = plane(k / 16 * GROUP_BYTES);
                let sc = plane(k / 16 * TILE_ROWS);
                let d = plane(superblocks * rows_f16);
                Planes { low, high, d, dmin: 0, sc, m: 0, tile_row_bytes: 0 }
            }
        };
        Planes { tile_row_bytes: at, ..planes }
    }
}

/// Where, in a tile row, the kernels that read the planes in place find what value t needs.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl Planes {
    /// Q8_0's group of codes t..t + 4.
    pub(crate) fn bytes(&self, t: usize) -> usize {
        self.low + t * TILE_ROWS
    }

    /// The 4-bit group of values t..t + 8 (t a multiple of 8).
    pub(crate) fn nibbles(&self, t: usize) -> usize {
        self.low + t * TILE_ROWS / 2
    }

    /// The group of high bits (Q5_0, `per` 32) or bit pairs (Q6_K, `per` 16) of t's run.
    pub(crate) fn high(&self, t: usize, per: usize) -> usize {
        self.high + t / per * GROUP_BYTES
    }

    /// The 16 lanes' f16 d of t's block (`per` 32) or superblock (`per` 256).
    pub(crate) fn d(&self, t: usize, per: usize) -> usize {
        self.d + t / per * 2 * TILE_ROWS
    }

    /// Q4_K's 16 f16 dmin of t's superblock.
    pub(crate) fn dmin(&self, t: usize) -> usize {
        self.dmin + t / CHUNK * 2 * TILE_ROWS
    }

    /// The 16 sc of t's block (Q4_K, `per` 32) or run of 16 (Q6_K).
    pub(crate) fn sc(&self, t: usize, per: usize) -> usize {
        self.sc + t / per * TILE_ROWS
    }

    /// Q4_K's 16 m of t's block.
    pub(crate) fn m(&self, t: usize) -> usize {
        self.m + t / BLOCK * TILE_ROWS
    }
}

/// One row's file block as unsigned codes and the numbers that scale them.
struct FileBlock {
    codes: [u8; CHUNK],
    /// f16 bits: d (all formats) and dmin (Q4_K).
    d: u16,
    dmin: u16,
    /// Q4_K: (sc, m) per 32; Q6_K: sc per 16 as i8 bits.
    sc: [u8; 16],
    m: [u8; 8],
}

impl FileBlock {
    fn parse(format: Format, block: &[u8]) -> Self {
        let mut out = FileBlock { codes: [0; CHUNK], d: u16::from_le_bytes([block[0], block[1]]), dmin: 0, sc: [0; 16], m: [0; 8] };
        match format {
            Format::Q8_0 => {
                for (code, &q) in out.codes.iter_mut().zip(&block[2..34]) {
                    // q + 128 as an unsigned byte is q with its sign bit flipped.
                    *code = q ^ 0x80;
                }
            }
            Format::Q5_0 => {
                let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
                let qs = &block[6..22];
                for j in 0..16 {
                    out.codes[j] = (qs[j] & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
                    out.codes[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
                }
            }
            Format::Q4K => {
                out.dmin = u16::from_le_bytes([block[2], block[3]]);
                let (scales, qs) = (&block[4..16], &block[16..144]);
                for j in 0..8 {
                    (out.sc[j], out.m[j]) = q4_k_scale_min(j, scales);
                }
                // Each 32 bytes hold sub-block 2p in their low nibbles and 2p + 1 in their high.
                for pair in 0..4 {
                    for (l, &b) in qs[pair * 32..pair * 32 + 32].iter().enumerate() {
                        out.codes[pair * 64 + l] = b & 0x0F;
                        out.codes[pair * 64 + 32 + l] = b >> 4;
                    }
                }
            }
            Format::Q6K => {
                let (ql, rest) = block.split_at(128);
                let (qh, rest) = rest.split_at(64);
                let (sc, d) = rest.split_at(16);
                out.d = u16::from_le_bytes([d[0], d[1]]);
                out.sc.copy_from_slice(sc);
                for half in 0..2 {
                    let (ql, qh) = (&ql[half * 64..], &qh[half * 32..]);
                    let q = &mut out.codes[half * 128..];
                    for l in 0..32 {
                        q[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
                        q[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
                        q[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                        q[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                    }
                }
            }
        }
        out
    }
}

/// ggml's unpacking of the 6-bit (scale, min) pair j of a Q4_K superblock.
fn q4_k_scale_min(j: usize, scales: &[u8]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        ((scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4))
    }
}

/// Byte of value t (of the tile row) in a group plane: group t / 4, row r, lane t % 4.
fn in_group(t: usize, r: usize) -> usize {
    t / 4 * GROUP_BYTES + r * 4 + t % 4
}

/// Byte and shift of value t in a 4-bit plane.
fn in_nibbles(t: usize, r: usize) -> (usize, u32) {
    (t / 8 * GROUP_BYTES + r * 4 + t % 4, if t % 8 >= 4 { 4 } else { 0 })
}

/// Writes row `r`'s file block `b` (values `b·size..`) into a tile row's planes.
fn place(format: Format, planes: &Planes, tile_row: &mut [u8], r: usize, b: usize, block: &FileBlock) {
    let (size, _) = format.file_block();
    let t0 = b * size;
    let put_f16 = |tile_row: &mut [u8], plane: usize, index: usize, bits: u16| {
        tile_row[plane + (index * TILE_ROWS + r) * 2..][..2].copy_from_slice(&bits.to_le_bytes());
    };
    put_f16(tile_row, planes.d, b, block.d);
    for (i, &code) in block.codes[..size].iter().enumerate() {
        let t = t0 + i;
        if format == Format::Q8_0 {
            tile_row[planes.low + in_group(t, r)] = code;
            continue;
        }
        let (at, shift) = in_nibbles(t, r);
        tile_row[planes.low + at] |= (code & 0x0F) << shift;
        let high = code >> 4;
        match format {
            Format::Q5_0 => tile_row[planes.high + t / BLOCK * GROUP_BYTES + r * 4 + t % 4] |= high << (t % BLOCK / 4),
            Format::Q6K => tile_row[planes.high + t / 16 * GROUP_BYTES + r * 4 + t % 4] |= high << (2 * (t % 16 / 4)),
            _ => {}
        }
    }
    match format {
        Format::Q4K => {
            put_f16(tile_row, planes.dmin, b, block.dmin);
            for j in 0..8 {
                tile_row[planes.sc + (b * 8 + j) * TILE_ROWS + r] = block.sc[j];
                tile_row[planes.m + (b * 8 + j) * TILE_ROWS + r] = block.m[j];
            }
        }
        Format::Q6K => {
            for j in 0..16 {
                tile_row[planes.sc + (b * 16 + j) * TILE_ROWS + r] = block.sc[j];
            }
        }
        _ => {}
    }
}

/// Re-tiles a row-major weight `[n, k]` from the file's blocks into `tiles` (the last tile row
/// padded with rows of zero scale); `tiles` holds `n.div_ceil(16)` tile rows, zeroed.
pub(crate) fn retile(format: Format, data: &[u8], n: usize, k: usize, tiles: &mut [u8]) {
    use rayon::prelude::*;
    let planes = Planes::new(format, k);
    let (size, bytes) = format.file_block();
    let row_bytes = k / size * bytes;
    tiles.par_chunks_mut(planes.tile_row_bytes).enumerate().for_each(|(tile_row, out)| {
        for r in (0..TILE_ROWS).take_while(|r| tile_row * TILE_ROWS + r < n) {
            let row = &data[(tile_row * TILE_ROWS + r) * row_bytes..][..row_bytes];
            for (b, block) in row.chunks_exact(bytes).enumerate() {
                place(format, &planes, out, r, b, &FileBlock::parse(format, block));
            }
        }
    });
}

/// One chunk (up to 256 values) of a tile row, ready for the kernels: codes as unsigned bytes
/// in groups of 16 rows × 4 values, f32 scales per sub-block and lane, and Q4_K's minimums per
/// block of 32 and lane.
#[repr(C, align(64))]
pub(crate) struct Decoded {
    /// `[value / 4]`: groups of 16 rows × 4 values.
    pub(crate) codes: [[u8; GROUP_BYTES]; CHUNK / 4],
    pub(crate) scales: [f32; CHUNK / 16 * TILE_ROWS],
    pub(crate) mins: [f32; CHUNK / BLOCK * TILE_ROWS],
}

impl Decoded {
    pub(crate) fn new() -> Self {
        Decoded { codes: [[0; GROUP_BYTES]; CHUNK / 4], scales: [0.0; CHUNK / 16 * TILE_ROWS], mins: [0.0; CHUNK / BLOCK * TILE_ROWS] }
    }
}

/// Where a decoded chunk's codes are: Q8_0's are used in place.
pub(crate) struct ChunkView {
    pub(crate) codes: *const u8,
}

/// The f16 → f32 conversion of 16 lanes, by the instructions of the kernel that decodes.
pub(crate) trait HalfToSingle {
    /// # Safety
    /// `src` must hold 16 values; the CPU must have the instructions the implementation uses.
    unsafe fn convert(src: &[u8], dst: &mut [f32]);
}

/// Portable conversion.
pub(crate) struct SoftHalf;

impl HalfToSingle for SoftHalf {
    unsafe fn convert(src: &[u8], dst: &mut [f32]) {
        for (d, s) in dst[..TILE_ROWS].iter_mut().zip(src.chunks_exact(2)) {
            *d = f16::from_le_bytes([s[0], s[1]]).to_f32();
        }
    }
}

/// Decodes values `t0..t0 + len` of a tile row (t0 a multiple of 256, len a multiple of 32).
/// Plain loops over 64-byte groups: inlined into each kernel's `target_feature` function, the
/// compiler vectorizes them with that kernel's registers.
///
/// # Safety
/// `H` must be able to run on this CPU.
#[inline(always)]
pub(crate) unsafe fn decode<H: HalfToSingle>(format: Format, planes: &Planes, tile_row: &[u8], t0: usize, len: usize, out: &mut Decoded) -> ChunkView {
    let blocks = len / BLOCK;
    let d_plane = &tile_row[planes.d..];
    if format == Format::Q8_0 {
        for b in 0..blocks {
            let at = (t0 / BLOCK + b) * 2 * TILE_ROWS;
            H::convert(&d_plane[at..at + 2 * TILE_ROWS], &mut out.scales[b * TILE_ROWS..]);
        }
        return ChunkView { codes: tile_row[planes.low + t0 * TILE_ROWS..].as_ptr() };
    }
    unpack_nibbles(&tile_row[planes.low + t0 * TILE_ROWS / 2..][..len * TILE_ROWS / 2], &mut out.codes);
    let (high, _) = tile_row[planes.high..].as_chunks::<GROUP_BYTES>();
    match format {
        Format::Q5_0 => {
            for b in 0..blocks {
                let bits = &high[t0 / BLOCK + b];
                for (i, codes) in out.codes[b * BLOCK / 4..][..BLOCK / 4].iter_mut().enumerate() {
                    for (c, &h) in codes.iter_mut().zip(bits) {
                        *c |= ((h >> i) & 1) << 4;
                    }
                }
                let at = (t0 / BLOCK + b) * 2 * TILE_ROWS;
                H::convert(&d_plane[at..at + 2 * TILE_ROWS], &mut out.scales[b * TILE_ROWS..]);
            }
        }
        Format::Q6K => {
            for (g, codes) in out.codes[..len / 4].iter_mut().enumerate() {
                let pairs = &high[t0 / 16 + g / 4];
                let shift = 2 * (g % 4);
                for (c, &h) in codes.iter_mut().zip(pairs) {
                    *c |= ((h >> shift) & 3) << 4;
                }
            }
            let mut d = [0f32; TILE_ROWS];
            H::convert(&d_plane[t0 / CHUNK * 2 * TILE_ROWS..][..2 * TILE_ROWS], &mut d);
            let sc = &tile_row[planes.sc + t0 / 16 * TILE_ROWS..][..len / 16 * TILE_ROWS];
            for (s, scales) in sc.chunks_exact(TILE_ROWS).zip(out.scales.chunks_exact_mut(TILE_ROWS)) {
                for ((scale, &sc), &d) in scales.iter_mut().zip(s).zip(&d) {
                    *scale = d * sc as i8 as f32;
                }
            }
        }
        Format::Q4K => {
            let (mut d, mut dmin) = ([0f32; TILE_ROWS], [0f32; TILE_ROWS]);
            let at = t0 / CHUNK * 2 * TILE_ROWS;
            H::convert(&d_plane[at..at + 2 * TILE_ROWS], &mut d);
            H::convert(&tile_row[planes.dmin + at..][..2 * TILE_ROWS], &mut dmin);
            let sc = &tile_row[planes.sc + t0 / BLOCK * TILE_ROWS..][..blocks * TILE_ROWS];
            let m = &tile_row[planes.m + t0 / BLOCK * TILE_ROWS..][..blocks * TILE_ROWS];
            for b in 0..blocks {
                for l in 0..TILE_ROWS {
                    out.scales[b * TILE_ROWS + l] = d[l] * sc[b * TILE_ROWS + l] as f32;
                    out.mins[b * TILE_ROWS + l] = dmin[l] * m[b * TILE_ROWS + l] as f32;
                }
            }
        }
        Format::Q8_0 => {}
    }
    ChunkView { codes: out.codes.as_ptr() as *const u8 }
}

/// A 4-bit plane into bytes: each 64-byte group gives the group of its low nibbles, then that
/// of its high nibbles.
#[inline(always)]
fn unpack_nibbles(plane: &[u8], codes: &mut [[u8; GROUP_BYTES]]) {
    for (group, out) in plane.chunks_exact(GROUP_BYTES).zip(codes.chunks_exact_mut(2)) {
        let [low, high] = out else { unreachable!("chunks of 2") };
        for ((l, h), &b) in low.iter_mut().zip(high.iter_mut()).zip(group) {
            *l = b & 0x0F;
            *h = b >> 4;
        }
    }
}

/// Rows of a tile row dequantized exactly as ggml dequantizes the file: `out` holds `rows`
/// (indices within the tile row) × k values. Inlined into each kernel's `target_feature`
/// function, like [`decode`].
///
/// # Safety
/// `H` must be able to run on this CPU.
#[inline(always)]
pub(crate) unsafe fn dequantize<H: HalfToSingle>(format: Format, planes: &Planes, tile_row: &[u8], k: usize, rows: std::ops::Range<usize>, out: &mut [f32]) {
    let mut decoded = Decoded::new();
    let (zero, sub) = (format.zero(), format.sub_block());
    for t0 in (0..k).step_by(CHUNK) {
        let len = CHUNK.min(k - t0);
        let view = decode::<H>(format, planes, tile_row, t0, len, &mut decoded);
        // SAFETY: the view's codes hold `len / 4` groups.
        let groups = std::slice::from_raw_parts(view.codes as *const [u8; GROUP_BYTES], len / 4);
        for (i, r) in rows.clone().enumerate() {
            let values = &mut out[i * k + t0..][..len];
            for (g, (four, codes)) in values.chunks_exact_mut(4).zip(groups).enumerate() {
                let scale = decoded.scales[g * 4 / sub * TILE_ROWS + r];
                // Zero where the format has no minimums; subtracting it changes nothing.
                let min = decoded.mins[g * 4 / BLOCK * TILE_ROWS + r];
                for (v, &code) in four.iter_mut().zip(&codes[r * 4..r * 4 + 4]) {
                    *v = scale * (code as i32 - zero) as f32 - min;
                }
            }
        }
    }
}
