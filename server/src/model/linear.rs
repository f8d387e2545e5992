//! Quantized linear layers: the one seam through which every projection of the model passes,
//! `y = x·Wᵀ + Σ weight·scale·(x·Aᵀ)·Bᵀ`, with the base weights kept quantized.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};
use tessera_adapters::{add_batch_deltas, AdapterMix, TargetModule};

use crate::gguf::{GgufError, GgufFile};
use crate::model::int8::Int8Weight;
use crate::model::packed::{PackedWeight, Workers};
use crate::model::{with_values, ModelError};

/// One sequence's rows of the batch: they share an adapter mix and a kernel choice.
pub struct RowSegment<'a> {
    pub rows: Range<usize>,
    pub adapters: &'a AdapterMix<'a>,
}

impl RowSegment<'_> {
    /// Long chunks (prefill) take the dense path. The choice depends on the sequence's own
    /// chunk alone, so its results do not change with whatever else shares the batch.
    fn dense(&self) -> bool {
        self.rows.len() >= DENSE_MIN_ROWS
    }
}

/// Which matrix kernels a model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// The fastest this CPU supports.
    #[default]
    Best,
    /// candle's kernels only (what CPUs without AVX2 get).
    Portable,
}

/// A quantized weight `[out, in]` and the matmul `x·Wᵀ` over it.
pub struct QWeight {
    kernel: Kernel,
    out_features: usize,
    in_features: usize,
}

enum Kernel {
    /// Q8_0, Q4_K or Q6_K repacked for the vector kernels: f32 activations, one exact path for
    /// any number of rows.
    Packed(PackedWeight),
    /// candle's kernels: tiled VNNI for Q4_K and Q6_K, generic dot products otherwise.
    Candle {
        matmul: QMatMul,
        tensor: Arc<QTensor>,
        /// Q8_0 rows that are not whole 256-value superblocks (candle's tiles need those, and
        /// quantize activations per 256 values, which loses too much on Gemma's outlier
        /// channels): long chunks dequantize into a reused buffer and run an f32 GEMM.
        dense_for_many_rows: bool,
        /// candle runs a single Q6_K row through a different kernel than several; padding lone
        /// rows keeps a sequence's results independent of how many rows share its batch.
        pad_single_row: bool,
    },
}

/// From this many rows of one sequence on, dequantize-then-GEMM beats per-row Q8_0 dot products.
const DENSE_MIN_ROWS: usize = 32;

impl QWeight {
    pub fn load(
        gguf: &GgufFile,
        name: &str,
        (out_features, in_features): (usize, usize),
        kernels: Kernels,
    ) -> Result<Self, ModelError> {
        let tensor = load_qtensor(gguf, name, &[out_features, in_features])?;
        let is_q8_0 = tensor.dtype() == GgmlDType::Q8_0;
        let packed = match (kernels == Kernels::Best && PackedWeight::supported(), tensor.dtype()) {
            (false, _) => None,
            (true, GgmlDType::Q8_0) => PackedWeight::pack(&tensor.data()?, out_features, in_features),
            (true, dtype @ (GgmlDType::Q4K | GgmlDType::Q6K)) => PackedWeight::pack_k_quant(
                &tensor.data()?,
                out_features,
                in_features,
                dtype == GgmlDType::Q6K,
            ),
            (true, _) => None,
        };
        let kernel = match packed {
            Some(packed) => Kernel::Packed(packed),
            None => {
                let tensor = Arc::new(tensor);
                Kernel::Candle {
                    matmul: QMatMul::from_arc(tensor.clone())?,
                    dense_for_many_rows: is_q8_0 && in_features % SUPERBLOCK != 0,
                    pad_single_row: tensor.dtype() == GgmlDType::Q6K,
                    tensor,
                }
            }
        };
        Ok(Self {
            kernel,
            out_features,
            in_features,
        })
    }

    /// `x: [rows, in] → [rows, out]`, each segment's rows through its own kernel choice (runs
    /// of neighbouring segments with the same choice go together). `scratch` is reused between
    /// calls for dequantized weights.
    pub fn forward(
        &self,
        x: &Tensor,
        segments: &[RowSegment],
        scratch: &mut Vec<f32>,
    ) -> Result<Tensor, ModelError> {
        let (tensor, dense_for_many_rows) = match &self.kernel {
            Kernel::Packed(_) => return self.forward_quantized(x),
            Kernel::Candle {
                tensor,
                dense_for_many_rows,
                ..
            } => (tensor, *dense_for_many_rows),
        };
        if !dense_for_many_rows || segments.iter().all(|s| !s.dense()) {
            return self.forward_quantized(x);
        }
        let mut runs: Vec<(Range<usize>, bool)> = Vec::new();
        for segment in segments {
            match runs.last_mut() {
                Some((rows, dense)) if *dense == segment.dense() => rows.end = segment.rows.end,
                _ => runs.push((segment.rows.clone(), segment.dense())),
            }
        }
        let mut dequantized = false;
        let mut outputs = Vec::with_capacity(runs.len());
        for (rows, dense) in runs {
            let x_run = x.narrow(0, rows.start, rows.len())?;
            if dense {
                if !dequantized {
                    scratch.resize(self.out_features * self.in_features, 0.0);
                    dequantize_q8_0(&tensor.data()?, scratch);
                    dequantized = true;
                }
                outputs.push(self.dense_matmul(&x_run, scratch)?);
            } else {
                outputs.push(self.forward_quantized(&x_run)?);
            }
        }
        Ok(Tensor::cat(&outputs, 0)?)
    }

    /// `x·Wᵀ` as a row-major vector, when the packed kernel runs (no tensor in between).
    fn forward_packed_values(&self, x: &Tensor) -> Result<Option<Vec<f32>>, ModelError> {
        let Kernel::Packed(packed) = &self.kernel else {
            return Ok(None);
        };
        let rows = x.dim(0)?;
        let mut y = vec![0f32; rows * self.out_features];
        with_values(x, |xs| packed.matmul(xs, &mut y))?;
        Ok(Some(y))
    }

    /// `x·Wᵀ` through the quantized kernel for every row.
    pub fn forward_quantized(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        match &self.kernel {
            Kernel::Packed(_) => {
                let rows = x.dim(0)?;
                let y = self.forward_packed_values(x)?.unwrap_or_default();
                Ok(Tensor::from_vec(y, (rows, self.out_features), &Device::Cpu)?)
            }
            Kernel::Candle {
                matmul,
                pad_single_row,
                ..
            } => {
                if *pad_single_row && x.dim(0)? == 1 {
                    let padded = x.pad_with_zeros(0, 0, 1)?;
                    return Ok(matmul.forward(&padded)?.narrow(0, 0, 1)?);
                }
                Ok(matmul.forward(x)?)
            }
        }
    }

    /// `x·Wᵀ` in f32 against the weight already dequantized into `weight` (`[out, in]`).
    fn dense_matmul(&self, x: &Tensor, weight: &[f32]) -> Result<Tensor, ModelError> {
        let (n, k) = (self.out_features, self.in_features);
        let rows = x.dim(0)?;
        let x = x.contiguous()?;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let mut y = vec![0f32; rows * n];
        // SAFETY: x is [rows, k], the weight [n, k] read as its transpose, y [rows, n].
        unsafe { sgemm((rows, n, k), &mut y, false, Strided::rows(&xs, k), Strided::transposed(weight, k)) };
        Ok(Tensor::from_vec(y, (rows, n), &Device::Cpu)?)
    }

    /// Rows of the weight, dequantized: `ids: [n] → [n, in]` (an embedding lookup).
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor, ModelError> {
        match &self.kernel {
            Kernel::Packed(packed) => {
                let ids = ids.to_vec1::<u32>()?;
                let mut out = vec![0f32; ids.len() * self.in_features];
                for (&id, row) in ids.iter().zip(out.chunks_exact_mut(self.in_features)) {
                    packed.dequantize_row(id as usize, row);
                }
                Ok(Tensor::from_vec(out, (ids.len(), self.in_features), &Device::Cpu)?)
            }
            Kernel::Candle { tensor, .. } => Ok(tensor.embedding(ids)?),
        }
    }
}

/// Training's use of a frozen weight: on the caller's rayon pool (its own thread budget), never
/// the serving workers, and with the input gradient of `y = x·Wᵀ`.
impl QWeight {
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// The weight for the int8 kernel, where it is Q8_0 and the CPU runs that kernel.
    pub fn int8(&self) -> Option<Int8Weight<'_>> {
        match &self.kernel {
            Kernel::Packed(packed) => packed.int8(),
            Kernel::Candle { .. } => None,
        }
    }

    /// `x·W[rows]ᵀ` for `x: [m, in]`: `[m, rows.len()]`, row-major (`rows.start` a multiple of 16).
    pub fn matmul_rows_background(&self, x: &[f32], rows: Range<usize>) -> Result<Vec<f32>, ModelError> {
        let m = x.len() / self.in_features;
        let mut y = vec![0f32; m * rows.len()];
        match &self.kernel {
            Kernel::Packed(packed) if m < DENSE_MIN_ROWS => packed.matmul_rows(x, &mut y, rows, Workers::CurrentRayonPool),
            // Training's many rows: dequantizing once and an f32 GEMM beat the 8-bit kernel.
            _ => {
                let weight = self.dequantize_rows(rows.clone())?;
                // SAFETY: x is [m, in], the weight [rows, in] read as its transpose, y [m, rows].
                unsafe {
                    sgemm(
                        (m, rows.len(), self.in_features),
                        &mut y,
                        false,
                        Strided::rows(x, self.in_features),
                        Strided::transposed(&weight, self.in_features),
                    )
                };
            }
        }
        Ok(y)
    }

    /// `grad_x += grad_y·W[rows]` for `grad_y: [m, rows.len()]` and `grad_x: [m, in]`: the
    /// backward pass of `y = x·Wᵀ` with respect to x, through the dequantized weight.
    pub fn accumulate_input_grad(&self, grad_y: &[f32], rows: Range<usize>, grad_x: &mut [f32]) -> Result<(), ModelError> {
        const ROWS_PER_CHUNK: usize = 1024;
        let (m, k) = (grad_x.len() / self.in_features, self.in_features);
        let width = rows.len();
        let mut start = rows.start;
        while start < rows.end {
            let chunk = start..(start + ROWS_PER_CHUNK).min(rows.end);
            let weight = self.dequantize_rows(chunk.clone())?;
            let offset = chunk.start - rows.start;
            // SAFETY: grad_y's columns `offset..offset + chunk` of rows `width` apart, the weight
            // chunk [chunk, k] row-major, grad_x [m, k].
            unsafe { sgemm((m, k, chunk.len()), grad_x, true, Strided::rows(&grad_y[offset..], width), Strided::rows(&weight, k)) };
            start = chunk.end;
        }
        Ok(())
    }

    /// Rows of the weight dequantized, `[rows.len(), in]` row-major, on the caller's rayon pool.
    fn dequantize_rows(&self, rows: Range<usize>) -> Result<Vec<f32>, ModelError> {
        use rayon::prelude::*;
        const ROWS_PER_TASK: usize = 64;
        let k = self.in_features;
        let mut out = vec![0f32; rows.len() * k];
        out.par_chunks_mut(ROWS_PER_TASK * k).enumerate().try_for_each(|(i, out)| {
            let start = rows.start + i * ROWS_PER_TASK;
            self.dequantize_rows_into(start..start + out.len() / k, out)
        })?;
        Ok(out)
    }

    /// Rows of the weight dequantized into `out` (`[rows.len(), in]`, row-major), on this thread.
    pub fn dequantize_rows_into(&self, rows: Range<usize>, out: &mut [f32]) -> Result<(), ModelError> {
        let k = self.in_features;
        assert_eq!(out.len(), rows.len() * k, "output is not [{}, {k}]", rows.len());
        match &self.kernel {
            Kernel::Packed(packed) => {
                for (row, values) in rows.zip(out.chunks_exact_mut(k)) {
                    packed.dequantize_row(row, values);
                }
            }
            Kernel::Candle { tensor, .. } => {
                // Rows of a quantized tensor are whole blocks: dequantize just their bytes.
                let dtype = tensor.dtype();
                let row_bytes = k / dtype.block_size() * dtype.type_size();
                let data = tensor.data()?;
                let bytes = &data[rows.start * row_bytes..rows.end * row_bytes];
                let storage = QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, dtype)?;
                let part = QTensor::new(storage, (rows.len(), k))?.dequantize(&Device::Cpu)?;
                out.copy_from_slice(&part.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        Ok(())
    }
}

/// A matrix in a slice, by its row and column strides.
#[derive(Clone, Copy)]
pub(crate) struct Strided<'a> {
    pub values: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Strided<'a> {
    /// A row-major matrix with rows `row_stride` apart.
    pub fn rows(values: &'a [f32], row_stride: usize) -> Self {
        Self { values, row_stride, col_stride: 1 }
    }

    /// The transpose of a row-major matrix with rows `row_stride` apart.
    pub fn transposed(values: &'a [f32], row_stride: usize) -> Self {
        Self { values, row_stride: 1, col_stride: row_stride }
    }
}

/// `dst[m, n] (+)= a[m, k]·b[k, n]`, `dst` row-major, on the caller's rayon pool.
///
/// Each thread takes one block of columns (or, for a narrow `dst`, of rows) and runs gemm on
/// it alone. gemm's own rayon split runs these shapes (hundreds of rows, n and k in the
/// thousands) at under half the speed on 2 cores: measured on an AVX-512 Xeon at m = 512,
/// 84–116 GFLOP/s split by gemm against 216–300 by column blocks.
///
/// # Safety
/// `a` and `b` must cover every element their shapes and strides address.
pub(crate) unsafe fn sgemm((m, n, k): (usize, usize, usize), dst: &mut [f32], accumulate: bool, a: Strided, b: Strided) {
    use rayon::prelude::*;
    /// The narrowest block worth a thread of its own; a multiple of the kernels' 16 lanes.
    const MIN_BLOCK: usize = 64;
    assert!(dst.len() >= m * n, "the output is not [{m}, {n}]");
    let threads = rayon::current_num_threads();
    let (by_columns, extent) = if n >= 2 * MIN_BLOCK { (true, n) } else { (false, m) };
    let blocks = threads.min(extent / MIN_BLOCK);
    if blocks <= 1 {
        return sgemm_on_this_thread((m, n, k), dst, accumulate, a, b);
    }
    let width = extent.div_ceil(blocks).next_multiple_of(16);
    let dst = SharedOutput(dst.as_mut_ptr());
    (0..blocks).into_par_iter().for_each(|block| {
        let start = (block * width).min(extent);
        let len = width.min(extent - start);
        if len == 0 {
            return;
        }
        // SAFETY: the blocks are disjoint columns (or rows) of dst; a and b start at offsets
        // inside their slices and address what the caller vouches for.
        unsafe {
            if by_columns {
                let b = Strided { values: &b.values[start * b.col_stride..], ..b };
                gemm_raw((m, len, k), dst.at(start), n, accumulate, a, b);
            } else {
                let a = Strided { values: &a.values[start * a.row_stride..], ..a };
                gemm_raw((len, n, k), dst.at(start * n), n, accumulate, a, b);
            }
        }
    });
}

/// dst's start, written by several threads at disjoint elements.
struct SharedOutput(*mut f32);

// SAFETY: each thread writes only its own block of the output (see `sgemm`).
unsafe impl Sync for SharedOutput {}

impl SharedOutput {
    /// # Safety
    /// `offset` must lie inside the output.
    unsafe fn at(&self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}

/// [`sgemm`] on the calling thread alone, for work already split across threads.
///
/// # Safety
/// As for [`sgemm`].
pub(crate) unsafe fn sgemm_on_this_thread((m, n, k): (usize, usize, usize), dst: &mut [f32], accumulate: bool, a: Strided, b: Strided) {
    assert!(dst.len() >= m * n, "the output is not [{m}, {n}]");
    gemm_raw((m, n, k), dst.as_mut_ptr(), n, accumulate, a, b);
}

/// One single-threaded gemm call, `dst` rows `dst_row_stride` apart.
unsafe fn gemm_raw((m, n, k): (usize, usize, usize), dst: *mut f32, dst_row_stride: usize, accumulate: bool, a: Strided, b: Strided) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_row_stride as isize,
        accumulate,
        a.values.as_ptr(),
        a.col_stride as isize,
        a.row_stride as isize,
        b.values.as_ptr(),
        b.col_stride as isize,
        b.row_stride as isize,
        if accumulate { 1.0 } else { 0.0 },
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// Q8_0 block: d (f16) | 32 × i8; value i is d·q[i].
fn dequantize_q8_0(blocks: &[u8], out: &mut [f32]) {
    use rayon::prelude::*;
    const ROWS_PER_TASK: usize = 64;
    out.par_chunks_mut(32 * ROWS_PER_TASK)
        .zip(blocks.par_chunks(Q8_0_BLOCK_BYTES * ROWS_PER_TASK))
        .for_each(|(out, blocks)| {
            for (values, block) in out.chunks_exact_mut(32).zip(blocks.chunks_exact(Q8_0_BLOCK_BYTES)) {
                let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
                for (v, &q) in values.iter_mut().zip(&block[2..]) {
                    *v = d * (q as i8) as f32;
                }
            }
        });
}

/// A linear layer of a transformer block: the seam where LoRA deltas join the base matmul,
/// `y = x·Wᵀ + b + Σ deltas`, with b where the file has a bias (Qwen 2's q, k and v).
pub struct QLinear {
    pub(crate) weight: QWeight,
    /// `[out]`.
    pub(crate) bias: Option<Tensor>,
    layer: usize,
    module: TargetModule,
}

impl QLinear {
    pub fn load(
        gguf: &GgufFile,
        layer: usize,
        module: TargetModule,
        shape: (usize, usize),
        kernels: Kernels,
    ) -> Result<Self, ModelError> {
        let name = format!("blk.{layer}.{}.weight", module.gguf_name());
        let bias_name = format!("blk.{layer}.{}.bias", module.gguf_name());
        Ok(Self {
            weight: QWeight::load(gguf, &name, shape, kernels)?,
            bias: gguf.has_tensor(&bias_name).then(|| load_vector(gguf, &bias_name, shape.0)).transpose()?,
            layer,
            module,
        })
    }

    /// `x: [rows, in] → [rows, out]`. The base matmul runs once over every row of the batch;
    /// each segment's adapter delta touches only its own rows.
    pub fn forward(
        &self,
        x: &Tensor,
        segments: &[RowSegment],
        scratch: &mut Vec<f32>,
    ) -> Result<Tensor, ModelError> {
        let y = self.forward_without_bias(x, segments, scratch)?;
        Ok(match &self.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        })
    }

    fn forward_without_bias(
        &self,
        x: &Tensor,
        segments: &[RowSegment],
        scratch: &mut Vec<f32>,
    ) -> Result<Tensor, ModelError> {
        if segments.iter().all(|s| s.adapters.is_empty()) {
            return self.weight.forward(x, segments, scratch);
        }
        let rows = x.dim(0)?;
        let out_features = self.weight.out_features;
        let mut ys = match self.weight.forward_packed_values(x)? {
            Some(ys) => ys,
            None => self.weight.forward(x, segments, scratch)?.flatten_all()?.to_vec1::<f32>()?,
        };
        with_values(x, |xs| {
            add_batch_deltas(
                self.layer,
                self.module,
                segments.iter().map(|s| (s.rows.clone(), s.adapters)),
                xs,
                &mut ys,
            )
        })?;
        Ok(Tensor::from_vec(ys, (rows, out_features), &Device::Cpu)?)
    }
}

/// Reads a weight `[out, in]`, checked against its expected shape, into a quantized tensor.
/// Q5_0 is re-laid as Q8_0 (exactly: every Q5_0 value is a small integer times the block
/// scale), since candle has no vectorised Q5_0 dot product.
fn load_qtensor(gguf: &GgufFile, name: &str, shape: &[usize; 2]) -> Result<QTensor, ModelError> {
    let info = gguf.tensor_info(name, shape)?.clone();
    let bytes = gguf.tensor_bytes(&info);
    let (dtype, data): (GgmlDType, Cow<[u8]>) = match info.dtype {
        GgmlDType::Q5_0 => (GgmlDType::Q8_0, Cow::Owned(q5_0_to_q8_0(bytes))),
        GgmlDType::Q8_1 | GgmlDType::Q8K => {
            return Err(gguf.unsupported_tensor_type(name, info.dtype).into())
        }
        other => (other, Cow::Borrowed(bytes)),
    };
    let storage = QStorage::from_data(data, &Device::Cpu, dtype)?;
    Ok(QTensor::new(storage, (shape[0], shape[1]))?)
}

const SUPERBLOCK: usize = 256;

/// Reads an F32 (or F16/BF16) vector such as a norm weight.
pub fn load_vector(gguf: &GgufFile, name: &str, len: usize) -> Result<Tensor, ModelError> {
    let info = gguf.tensor_info(name, &[len])?.clone();
    let values: Vec<f32> = match info.dtype {
        GgmlDType::F32 => gguf
            .tensor_bytes(&info)
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        GgmlDType::F16 => gguf
            .tensor_bytes(&info)
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        GgmlDType::BF16 => gguf
            .tensor_bytes(&info)
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(ModelError::Gguf(GgufError::UnsupportedTensorType {
                path: gguf.path().to_path_buf(),
                tensor: name.to_string(),
                type_id: u32::MAX,
                type_name: crate::gguf::dtype_name(other),
            }))
        }
    };
    Ok(Tensor::from_vec(values, len, &Device::Cpu)?)
}

const Q5_0_BLOCK_BYTES: usize = 22;
const Q8_0_BLOCK_BYTES: usize = 34;

/// Q5_0 block: d (f16) | qh (32 high bits) | qs (16 bytes of low nibbles).
/// Value j < 16 is `d·((qs[j] & 0xF | bit j of qh << 4) − 16)`, value j + 16 uses the high nibble
/// and bit j + 16. Q8_0 block: d (f16) | 32 × i8, value `d·q`. Same d, q = the 5-bit value − 16.
fn q5_0_to_q8_0(q5: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(q5.len() / Q5_0_BLOCK_BYTES * Q8_0_BLOCK_BYTES);
    for block in q5.chunks_exact(Q5_0_BLOCK_BYTES) {
        out.extend_from_slice(&block[0..2]);
        let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
        let qs = &block[6..22];
        let mut q8 = [0u8; 32];
        for j in 0..16 {
            let low = (qs[j] & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
            let high = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
            q8[j] = (low as i8 - 16) as u8;
            q8[j + 16] = (high as i8 - 16) as u8;
        }
        out.extend_from_slice(&q8);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-thread blocks of `sgemm` (by columns, and by rows for a narrow output, with a
    /// partial last block) against the plain f64 product, overwriting and accumulating.
    #[test]
    fn sgemm_blocks_make_the_whole_product() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for (m, n, k) in [(37, 301, 70), (290, 20, 33), (5, 7, 9)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 19) as f32 - 9.0) * 0.1).collect();
            // b stored as its transpose [n, k], as the weights are.
            let b: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 23) as f32 - 11.0) * 0.05).collect();
            let expected: Vec<f64> = (0..m * n)
                .map(|ij| (0..k).map(|l| a[ij / n * k + l] as f64 * b[ij % n * k + l] as f64).sum())
                .collect();
            for accumulate in [false, true] {
                let start = if accumulate { 1.0 } else { f32::NAN };
                let mut dst = vec![start; m * n];
                // SAFETY: a is [m, k], b [n, k] read as its transpose, dst [m, n].
                pool.install(|| unsafe { sgemm((m, n, k), &mut dst, accumulate, Strided::rows(&a, k), Strided::transposed(&b, k)) });
                for (ij, (&got, &want)) in dst.iter().zip(&expected).enumerate() {
                    let want = want + if accumulate { 1.0 } else { 0.0 };
                    assert!((got as f64 - want).abs() < 1e-4, "[{m}, {n}, {k}] element {ij}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn q5_0_repack_to_q8_0_is_exact() {
        let values: Vec<f32> = (0..64).map(|i| ((i * 37 % 31) as f32 - 15.0) * 0.37).collect();
        let src = Tensor::from_vec(values, (2, 32), &Device::Cpu).unwrap();
        let q5 = QTensor::quantize(&src, GgmlDType::Q5_0).unwrap();
        let expected = q5.dequantize(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        let q8_bytes = q5_0_to_q8_0(&q5.data().unwrap());
        let storage = QStorage::from_data(Cow::Owned(q8_bytes), &Device::Cpu, GgmlDType::Q8_0).unwrap();
        let q8 = QTensor::new(storage, (2, 32)).unwrap();
        let got = q8.dequantize(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(got, expected);
    }
}
