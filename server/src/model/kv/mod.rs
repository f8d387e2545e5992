//! Per-sequence key/value cache. Each layer's keys and values live in one buffer allocated for
//! the sequence's whole context up front, so decoding writes in place and never concatenates.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};

use crate::model::{Config, ModelError};

pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    len: usize,
    capacity: usize,
    /// Values per position: KV heads × head dimension.
    width: usize,
}

impl KvCache {
    /// A cache for up to `capacity` tokens (prompt and generated together).
    pub fn new(config: &Config, capacity: usize) -> Result<Self, ModelError> {
        let width = config.n_kv_heads * config.head_dim;
        let buffer = || Tensor::zeros((capacity, width), DType::F32, &Device::Cpu);
        let keys = (0..config.n_layers).map(|_| buffer()).collect::<Result<_, _>>()?;
        let values = (0..config.n_layers).map(|_| buffer()).collect::<Result<_, _>>()?;
        Ok(Self {
            keys,
            values,
            len: 0,
            capacity,
            width,
        })
    }

    /// Tokens already cached: the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn size_in_bytes(&self) -> usize {
        2 * self.keys.len() * self.keys.first().map_or(0, |k| k.elem_count()) * 4
    }

    pub(crate) fn check_room(&self, new_tokens: usize) -> Result<(), ModelError> {
        if self.len + new_tokens > self.capacity {
            return Err(ModelError::ContextLength {
                needed: self.len + new_tokens,
                limit: self.capacity,
            });
        }
        Ok(())
    }

    /// Stores this chunk's keys and values (`[tokens, width]`) for `layer` after the cached ones.
    pub(crate) fn write(&self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(), ModelError> {
        self.keys[layer].slice_set(k, 0, self.len)?;
        self.values[layer].slice_set(v, 0, self.len)?;
        Ok(())
    }

    /// Keys and values of positions `start..end` for `layer`.
    pub(crate) fn window(
        &self,
        layer: usize,
        start: usize,
        end: usize,
    ) -> Result<(Tensor, Tensor), ModelError> {
        Ok((
            self.keys[layer].narrow(0, start, end - start)?,
            self.values[layer].narrow(0, start, end - start)?,
        ))
    }

    /// Calls `f` with the keys and values of positions `start..end` for `layer`, read in place
    /// (`[positions, width]` each).
    pub(crate) fn with_window_slices<R>(
        &self,
        layer: usize,
        start: usize,
        end: usize,
        f: impl FnOnce(&[f32], &[f32]) -> R,
    ) -> Result<R, ModelError> {
        let (keys, key_layout) = self.keys[layer].storage_and_layout();
        let (values, value_layout) = self.values[layer].storage_and_layout();
        match (&*keys, &*values) {
            (Storage::Cpu(CpuStorage::F32(k)), Storage::Cpu(CpuStorage::F32(v))) => {
                let span = |offset: usize| offset + start * self.width..offset + end * self.width;
                Ok(f(
                    &k[span(key_layout.start_offset())],
                    &v[span(value_layout.start_offset())],
                ))
            }
            _ => Err(ModelError::Compute(candle_core::Error::Msg(
                "the KV cache is not f32 on the CPU".into(),
            ))),
        }
    }

    /// Marks `tokens` more positions as cached, once every layer has written them.
    pub(crate) fn advance(&mut self, tokens: usize) {
        self.len += tokens;
    }
}
