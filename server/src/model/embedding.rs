//! The token embedding of a model whose output projection is a matrix of its own.
//!
//! A forward pass reads one embedding row per token, so a prompt touches a few hundred of the
//! table's rows (151,936 in Qwen2.5). Copying the whole table into the re-tiled weights would keep
//! all of it resident (89 MiB for Qwen2.5-Coder 0.5B's Q5_0 table) for rows that are never read;
//! left in the file's mapping, only the pages of rows actually looked up are read in, and the
//! system may drop them again under pressure. Where the embedding is tied to the output
//! projection, every row is read on each step anyway and it lives with the other weights.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};

use crate::gguf::{GgufFile, MappedTensor};
use crate::model::ModelError;

/// A `[vocab, hidden]` table in one of GGUF's types, read row by row where the file lies.
pub struct MappedEmbedding {
    table: MappedTensor,
    dtype: GgmlDType,
    vocab: usize,
    hidden: usize,
    /// Bytes of one row: `hidden / block_size` blocks.
    row_bytes: usize,
}

impl MappedEmbedding {
    pub fn load(gguf: &GgufFile, name: &str, (vocab, hidden): (usize, usize)) -> Result<Self, ModelError> {
        let info = gguf.tensor_info(name, &[vocab, hidden])?;
        let dtype = info.dtype;
        if matches!(dtype, GgmlDType::Q8_1 | GgmlDType::Q8K) || hidden % dtype.block_size() != 0 {
            return Err(gguf.unsupported_tensor_type(name, dtype).into());
        }
        let row_bytes = hidden / dtype.block_size() * dtype.type_size();
        Ok(Self { table: gguf.mapped_tensor(info), dtype, vocab, hidden, row_bytes })
    }

    /// The rows of `ids`, dequantized: `ids: [n] → [n, hidden]`.
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor, ModelError> {
        let ids = ids.to_vec1::<u32>()?;
        let table = self.table.bytes();
        let mut gathered = Vec::with_capacity(ids.len() * self.row_bytes);
        for &id in &ids {
            let row = id as usize;
            if row >= self.vocab {
                return Err(ModelError::TokenOutOfRange { id, vocab: self.vocab });
            }
            gathered.extend_from_slice(&table[row * self.row_bytes..][..self.row_bytes]);
        }
        let storage = QStorage::from_data(Cow::Owned(gathered), &Device::Cpu, self.dtype)?;
        Ok(QTensor::new(storage, (ids.len(), self.hidden))?.dequantize(&Device::Cpu)?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::QTensor;

    use super::*;
    use crate::gguf::writer::GgufWriter;
    use crate::model::linear::{Kernels, QWeight};
    use crate::model::quant::TileArena;

    /// Read in place or from the re-tiled copy, a row dequantizes to the same values, in each
    /// type the integer kernels take.
    #[test]
    fn mapped_rows_are_the_tiled_weights_rows() -> Result<(), Box<dyn std::error::Error>> {
        let (vocab, hidden) = (40, 512);
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("tables.gguf");
        let mut writer = GgufWriter::default();
        let types = [GgmlDType::Q8_0, GgmlDType::Q5_0, GgmlDType::Q4K, GgmlDType::Q6K];
        for dtype in types {
            let values = Tensor::randn(0f32, 0.1, (vocab, hidden), &Device::Cpu)?;
            let bytes = QTensor::quantize(&values, dtype)?.data()?.into_owned();
            writer.tensor(&format!("{dtype:?}"), dtype, &[vocab, hidden], bytes);
        }
        writer.write(&path)?;
        let gguf = GgufFile::open(&path)?;
        let ids = Tensor::new(&[0u32, 7, (vocab - 1) as u32, 7], &Device::Cpu)?;
        for dtype in types {
            let name = format!("{dtype:?}");
            let mapped = MappedEmbedding::load(&gguf, &name, (vocab, hidden))?;
            let tiled = QWeight::load(&gguf, &name, (vocab, hidden), Kernels::Best, &TileArena::default())?;
            assert_eq!(mapped.rows(&ids)?.to_vec2::<f32>()?, tiled.rows(&ids)?.to_vec2::<f32>()?, "{name}");
            let outside = Tensor::new(&[vocab as u32], &Device::Cpu)?;
            assert!(matches!(mapped.rows(&outside), Err(ModelError::TokenOutOfRange { .. })), "{name}");
        }
        Ok(())
    }
}
