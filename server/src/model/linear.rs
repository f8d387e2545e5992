//! Quantized linear layers: the one seam through which every projection of the model passes,
//! `y = x·Wᵀ + Σ weight·scale·(x·Aᵀ)·Bᵀ`, with the base weights kept quantized.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};
use tessera_adapters::{AdapterMix, TargetModule};

use crate::gguf::{GgufError, GgufFile};
use crate::model::ModelError;

/// Rows of the batch that share one adapter mix.
pub struct RowSegment<'a> {
    pub rows: Range<usize>,
    pub adapters: &'a AdapterMix<'a>,
}

pub struct QLinear {
    weight: QMatMul,
    layer: usize,
    module: TargetModule,
}

impl QLinear {
    pub fn load(
        gguf: &GgufFile,
        layer: usize,
        module: TargetModule,
        (out_features, in_features): (usize, usize),
    ) -> Result<Self, ModelError> {
        let name = format!("blk.{layer}.{}.weight", module.gguf_name());
        let qtensor = load_qtensor(gguf, &name, &[out_features, in_features])?;
        Ok(Self {
            weight: QMatMul::from_arc(Arc::new(qtensor))?,
            layer,
            module,
        })
    }

    /// `x: [rows, in] → [rows, out]`. The base matmul runs once over every row of the batch;
    /// each segment's adapter delta touches only its own rows.
    pub fn forward(&self, x: &Tensor, segments: &[RowSegment]) -> Result<Tensor, ModelError> {
        let y = self.weight.forward(x)?;
        if segments.iter().all(|s| s.adapters.is_empty()) {
            return Ok(y);
        }
        let (rows, out_features) = y.dims2()?;
        let in_features = x.dim(1)?;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let mut ys = y.flatten_all()?.to_vec1::<f32>()?;
        for segment in segments.iter().filter(|s| !s.adapters.is_empty()) {
            let Range { start, end } = segment.rows.clone();
            segment.adapters.add_to(
                self.layer,
                self.module,
                &xs[start * in_features..end * in_features],
                &mut ys[start * out_features..end * out_features],
            );
        }
        Ok(Tensor::from_vec(ys, (rows, out_features), &Device::Cpu)?)
    }
}

/// Reads a weight tensor, checked against its expected row-major shape, into a quantized
/// tensor. Q5_0 is re-laid as Q8_0 (exactly: every Q5_0 value is a small integer times the
/// block scale), since candle has no vectorised Q5_0 dot product.
pub fn load_qtensor(
    gguf: &GgufFile,
    name: &str,
    shape: &[usize],
) -> Result<QTensor, ModelError> {
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
    Ok(QTensor::new(storage, shape)?)
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
