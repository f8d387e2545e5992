//! Quantized linear layers: the one seam through which every projection of the model passes,
//! `y = x·Wᵀ + Σ weight·scale·(x·Aᵀ)·Bᵀ`, with the base weights kept quantized.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use tessera_adapters::{add_batch_deltas, batch_scales_down_inputs, scale_down_inputs_in_place, scale_finished_outputs, AdapterMix, LoraDelta, TargetModule};

use crate::gguf::{GgufError, GgufFile};
use crate::model::quant::{Format, Isa, QuantWeight, TileArena};
use crate::model::{with_values, ModelError};

/// One sequence's rows of the batch: they share an adapter mix.
pub struct RowSegment<'a> {
    pub rows: Range<usize>,
    pub adapters: &'a AdapterMix<'a>,
}

/// Which matrix kernels a model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    /// The fastest this CPU supports.
    #[default]
    Best,
    /// AVX2, even where AVX-512 is there (to measure what an AVX2-only CPU gets).
    Avx2,
    /// Plain Rust, no vector instructions named.
    Portable,
}

impl Kernels {
    /// The instructions to use here: the choice, or the best below it this CPU has.
    pub fn isa(self) -> Isa {
        let wanted = match self {
            Kernels::Best => return Isa::detect(),
            Kernels::Avx2 => Isa::Avx2,
            Kernels::Portable => Isa::Portable,
        };
        if wanted.runs_here() {
            wanted
        } else {
            Isa::Portable
        }
    }
}

/// A quantized weight `[out, in]` and the matmul `x·Wᵀ` over it.
pub struct QWeight {
    kernel: Kernel,
    out_features: usize,
    in_features: usize,
}

enum Kernel {
    /// Q8_0, Q5_0, Q4_K and Q6_K, at their file size, through the integer kernels.
    Integer(QuantWeight),
    /// Any other type, through candle's kernels.
    Candle { matmul: QMatMul, tensor: Arc<QTensor> },
}

impl QWeight {
    pub fn load(
        gguf: &GgufFile,
        name: &str,
        (out_features, in_features): (usize, usize),
        kernels: Kernels,
        arena: &TileArena,
    ) -> Result<Self, ModelError> {
        let info = gguf.tensor_info(name, &[out_features, in_features])?.clone();
        let bytes = gguf.tensor_bytes(&info);
        let integer = Format::from_ggml(info.dtype)
            .and_then(|format| QuantWeight::from_file(format, bytes, out_features, in_features, kernels.isa(), arena, |read| gguf.release_pages(info.start + read.start, read.len())));
        let kernel = match integer {
            Some(weight) => Kernel::Integer(weight),
            None => {
                if matches!(info.dtype, GgmlDType::Q8_1 | GgmlDType::Q8K) {
                    return Err(gguf.unsupported_tensor_type(name, info.dtype).into());
                }
                // The model says so once for all of them (`Decoder::load`).
                tracing::debug!(
                    tensor = name,
                    dtype = ?info.dtype,
                    "no integer kernel for this tensor's type and shape; it runs on candle's portable kernels"
                );
                let storage = QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, info.dtype)?;
                let tensor = Arc::new(QTensor::new(storage, (out_features, in_features))?);
                gguf.release_tensor_pages(&info);
                Kernel::Candle { matmul: QMatMul::from_arc(tensor.clone())?, tensor }
            }
        };
        Ok(Self {
            kernel,
            out_features,
            in_features,
        })
    }

    /// `x·Wᵀ` as a row-major vector, when the integer kernels run (no tensor in between).
    fn forward_integer_values(&self, x: &Tensor) -> Result<Option<Vec<f32>>, ModelError> {
        let Kernel::Integer(weight) = &self.kernel else {
            return Ok(None);
        };
        Ok(Some(with_values(x, |xs| weight.matmul(xs))?))
    }

    /// `x: [rows, in] → [rows, out]` as a row-major vector: the integer kernels' own output,
    /// never copied out of a tensor (the LM head's is 1 MiB a row).
    pub fn forward_values(&self, x: &Tensor) -> Result<Vec<f32>, ModelError> {
        match self.forward_integer_values(x)? {
            Some(y) => Ok(y),
            None => Ok(self.forward(x)?.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?),
        }
    }

    /// `x·W_iᵀ` for weights of the same width over one `x`, as row-major vectors: with the
    /// integer kernels all in one pass over the workers ([`QuantWeight::matmul_each`]).
    pub fn forward_values_each(weights: &[&QWeight], x: &Tensor) -> Result<Vec<Vec<f32>>, ModelError> {
        match weights.iter().map(|w| w.integer()).collect::<Option<Vec<_>>>() {
            Some(integer) => Ok(with_values(x, |xs| QuantWeight::matmul_each(&integer, xs))?),
            None => weights.iter().map(|w| w.forward_values(x)).collect(),
        }
    }

    /// `x: [rows, in] → [rows, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        match &self.kernel {
            Kernel::Integer(_) => {
                let rows = x.dim(0)?;
                let y = self.forward_integer_values(x)?.unwrap_or_default();
                Ok(Tensor::from_vec(y, (rows, self.out_features), &Device::Cpu)?)
            }
            Kernel::Candle { matmul, .. } => Ok(matmul.forward(x)?),
        }
    }

    /// Rows of the weight, dequantized: `ids: [n] → [n, in]` (an embedding lookup).
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor, ModelError> {
        match &self.kernel {
            Kernel::Integer(weight) => {
                let ids = ids.to_vec1::<u32>()?;
                let mut out = vec![0f32; ids.len() * self.in_features];
                for (&id, row) in ids.iter().zip(out.chunks_exact_mut(self.in_features)) {
                    let id = id as usize;
                    if id >= self.out_features {
                        return Err(ModelError::TokenOutOfRange { id: id as u32, vocab: self.out_features });
                    }
                    weight.dequantize_rows_into(id..id + 1, row);
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

    /// The weight for the integer kernels, where its type has them.
    pub fn integer(&self) -> Option<&QuantWeight> {
        match &self.kernel {
            Kernel::Integer(weight) => Some(weight),
            Kernel::Candle { .. } => None,
        }
    }

    /// The file's type of a weight that runs on candle's portable kernels (no integer kernel
    /// takes its type or shape).
    pub fn portable_dtype(&self) -> Option<GgmlDType> {
        match &self.kernel {
            Kernel::Integer(_) => None,
            Kernel::Candle { tensor, .. } => Some(tensor.dtype()),
        }
    }

    /// `x·W[rows]ᵀ` for `x: [m, in]`: `[m, rows.len()]`, row-major, in f32 (training needs
    /// the loss to be smooth in x). Each task dequantizes at most 1024 weight rows into its own
    /// scratch and multiplies them, so no full-precision copy of the matrix is made; there are
    /// at least as many tasks as threads, and no more than that needs (each GEMM call packs x
    /// again).
    pub fn matmul_rows_background(&self, x: &[f32], rows: Range<usize>) -> Result<Vec<f32>, ModelError> {
        use rayon::prelude::*;
        const MAX_ROWS_PER_TASK: usize = 1024;
        let (k, width) = (self.in_features, rows.len());
        let m = x.len() / k;
        let per_task = width.div_ceil(rayon::current_num_threads().max(1)).next_multiple_of(16).min(MAX_ROWS_PER_TASK);
        let mut y = vec![0f32; m * width];
        let out = SharedOutput(y.as_mut_ptr());
        (0..width.div_ceil(per_task)).into_par_iter().try_for_each(|task| {
            let start = rows.start + task * per_task;
            let chunk = start..(start + per_task).min(rows.end);
            let mut weight = vec![0f32; chunk.len() * k];
            self.dequantize_rows_into(chunk.clone(), &mut weight)?;
            // SAFETY: x is [m, k]; the chunk [len, k] read as its transpose; the task writes
            // its own columns `start - rows.start..` of y ([m, width]).
            unsafe {
                gemm_raw(
                    (m, chunk.len(), k),
                    out.at(start - rows.start),
                    width,
                    false,
                    Strided::rows(x, k),
                    Strided::transposed(&weight, k),
                )
            };
            Ok::<_, ModelError>(())
        })?;
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

    /// `‖W[o, :] + s·(B·A)[o, :]‖` of every output row o: DoRA's norms of the adapted weight.
    pub fn adapted_row_norms(&self, delta: &LoraDelta) -> Result<Vec<f32>, ModelError> {
        self.row_norms_with(|o, row| delta.add_row_of_product(o, row))
    }

    /// `‖W[o, :] + Δ[o, :]‖` of every output row o, where `add_delta(o, row)` adds row o of Δ:
    /// row chunks are dequantized one at a time on the caller's rayon pool, and each norm is
    /// summed in f64.
    pub fn row_norms_with(&self, add_delta: impl Fn(usize, &mut [f32]) + Sync) -> Result<Vec<f32>, ModelError> {
        use rayon::prelude::*;
        const ROWS_PER_TASK: usize = 64;
        let k = self.in_features;
        let starts: Vec<usize> = (0..self.out_features).step_by(ROWS_PER_TASK).collect();
        let chunks = starts
            .into_par_iter()
            .map(|start| {
                let rows = start..(start + ROWS_PER_TASK).min(self.out_features);
                let mut weight = vec![0f32; rows.len() * k];
                self.dequantize_rows_into(rows.clone(), &mut weight)?;
                Ok(rows
                    .zip(weight.chunks_exact_mut(k))
                    .map(|(o, row)| {
                        add_delta(o, row);
                        row.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt() as f32
                    })
                    .collect::<Vec<f32>>())
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(chunks.concat())
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
            Kernel::Integer(weight) => weight.dequantize_rows_into(rows, out),
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
        arena: &TileArena,
    ) -> Result<Self, ModelError> {
        let name = format!("blk.{layer}.{}.weight", module.gguf_name());
        let bias_name = format!("blk.{layer}.{}.bias", module.gguf_name());
        Ok(Self {
            weight: QWeight::load(gguf, &name, shape, kernels, arena)?,
            bias: gguf.has_tensor(&bias_name).then(|| load_vector(gguf, &bias_name, shape.0)).transpose()?,
            layer,
            module,
        })
    }

    /// `x: [rows, in] → [rows, out]`. The base matmul runs once over every row of the batch;
    /// each segment's adapter delta touches only its own rows.
    pub fn forward(&self, x: &Tensor, segments: &[RowSegment]) -> Result<Tensor, ModelError> {
        if self.module == TargetModule::Down && batch_scales_down_inputs(self.layer, segments.iter().map(|s| s.adapters)) {
            return self.forward_scaled_inputs(x, segments);
        }
        let [y] = Self::forward_each([self], x, segments)?;
        Ok(y)
    }

    /// [`Self::forward`] on `down` where some rows' mixes scale its input and also add a
    /// low-rank term to it (IA³ composed with LoRA): the base product runs over the scaled rows,
    /// the low-rank deltas over the rows as they came. IA³ alone never comes here: its scale is
    /// served on `up`'s output ([`scale_finished_outputs`]).
    fn forward_scaled_inputs(&self, x: &Tensor, segments: &[RowSegment]) -> Result<Tensor, ModelError> {
        let mut scaled = with_values(x, <[f32]>::to_vec)?;
        scale_down_inputs_in_place(self.layer, segments.iter().map(|s| (s.rows.clone(), s.adapters)), &mut scaled);
        let scaled = Tensor::from_vec(scaled, x.shape(), &Device::Cpu)?;
        // The same kernels as unscaled batches take, so a row's product never depends on them.
        let [base]: [Vec<f32>; 1] = QWeight::forward_values_each(&[&self.weight], &scaled)?
            .try_into()
            .unwrap_or_else(|_| unreachable!("one product per weight"));
        self.finish(x, base, x.dim(0)?, segments)
    }

    /// [`Self::forward`] of several layers over the same input (a block's q, k and v, or its
    /// gate and up): their base matmuls share one pass over the workers, then each adds its
    /// own deltas and bias.
    pub fn forward_each<const N: usize>(linears: [&QLinear; N], x: &Tensor, segments: &[RowSegment]) -> Result<[Tensor; N], ModelError> {
        let bases = QWeight::forward_values_each(&linears.map(|l| &l.weight), x)?;
        let rows = x.dim(0)?;
        let outputs = linears
            .iter()
            .zip(bases)
            .map(|(linear, base)| linear.finish(x, base, rows, segments))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(outputs.try_into().unwrap_or_else(|_| unreachable!("one output per layer")))
    }

    /// The base product `ys: [rows, out]` plus each segment's adapter delta and the bias, all
    /// in place; last, the scales that apply to the finished rows.
    fn finish(&self, x: &Tensor, mut ys: Vec<f32>, rows: usize, segments: &[RowSegment]) -> Result<Tensor, ModelError> {
        let adapted = segments.iter().any(|s| !s.adapters.is_empty());
        let rows_of = || segments.iter().map(|s| (s.rows.clone(), s.adapters));
        let bias = self.bias.as_ref().map(Tensor::to_vec1::<f32>).transpose()?;
        if adapted {
            with_values(x, |xs| add_batch_deltas(self.layer, self.module, rows_of(), xs, bias.as_deref(), &mut ys))?;
        }
        if let Some(bias) = &bias {
            for row in ys.chunks_exact_mut(bias.len()) {
                row.iter_mut().zip(bias).for_each(|(y, b)| *y += b);
            }
        }
        if adapted {
            scale_finished_outputs(self.layer, self.module, rows_of(), &mut ys);
        }
        Ok(Tensor::from_vec(ys, (rows, self.weight.out_features), &Device::Cpu)?)
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// A type no integer kernel takes (Q4_0, Q4_1, F16) loads onto candle's kernels, and
    /// multiplies as the file's values say: within candle's own rounding of the activations to
    /// 8 bits, of x·Wᵀ over the dequantized weight.
    #[test]
    fn a_type_without_an_integer_kernel_multiplies_on_candles_kernels() -> Result<(), Box<dyn std::error::Error>> {
        let (n, k, m) = (48, 64, 3);
        let values: Vec<f32> = (0..n * k).map(|i| ((i * 13 % 29) as f32 - 14.0) / 40.0).collect();
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 17) as f32 - 8.0) / 9.0).collect();
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::F16] {
            let q = QTensor::quantize(&Tensor::from_vec(values.clone(), (n, k), &Device::Cpu)?, dtype)?;
            let w = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
            let mut writer = crate::gguf::writer::GgufWriter::default();
            writer.tensor("w.weight", dtype, &[n, k], q.data()?.into_owned());
            let dir = tempfile::tempdir()?;
            let path = dir.path().join("w.gguf");
            writer.write(&path)?;
            let gguf = GgufFile::open(&path)?;
            let weight = QWeight::load(&gguf, "w.weight", (n, k), Kernels::Best, &TileArena::default())?;
            assert!(weight.integer().is_none(), "{dtype:?}");
            assert_eq!(weight.portable_dtype(), Some(dtype));
            let y = weight.forward_values(&Tensor::from_vec(x.clone(), (m, k), &Device::Cpu)?)?;
            for (ij, &got) in y.iter().enumerate() {
                let (i, j) = (ij / n, ij % n);
                let want: f32 = (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum();
                assert!((got - want).abs() < 0.02 * (1.0 + want.abs()), "{dtype:?} [{i}, {j}]: {got} against {want}");
            }
        }
        Ok(())
    }

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
}
