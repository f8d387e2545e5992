//! GGUF container reader (format version 2 and 3).
//!
//! Layout, all little-endian:
//!   magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
//!   n_kv × (key: string, type: u32, value)
//!   n_tensors × (name: string, n_dims: u32, ne[n_dims]: u64, type: u32, offset: u64)
//!   padding to `general.alignment` (default 32), then the tensor data.
//!
//! Every length read from the file is checked against the bytes that remain, so a corrupt or
//! truncated file yields an error naming the file and the problem instead of a panic or an abort.

pub mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use memmap2::Mmap;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: cannot read model file: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF model file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: truncated or corrupt: {what} needs bytes up to {needed} but the file has {len}")]
    Truncated {
        path: PathBuf,
        what: String,
        needed: u64,
        len: u64,
    },
    #[error("{path}: tensor `{tensor}` has unsupported type {type_id} ({type_name})")]
    UnsupportedTensorType {
        path: PathBuf,
        tensor: String,
        type_id: u32,
        type_name: &'static str,
    },
    #[error("{path}: unsupported architecture `{found}` (supported: {supported})")]
    UnsupportedArchitecture {
        path: PathBuf,
        found: String,
        supported: &'static str,
    },
    #[error("{path}: architecture `{arch}` is not supported in this shape: {reason}")]
    UnsupportedShape {
        path: PathBuf,
        arch: String,
        reason: String,
    },
    #[error("{path}: metadata `{key}` is missing or has the wrong type (expected {expected})")]
    Metadata {
        path: PathBuf,
        key: String,
        expected: &'static str,
    },
    #[error("{path}: tensor `{tensor}` is missing")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
}

/// A metadata value. Arrays keep their element values.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// A tensor's bytes in a model file's mapping, kept mapped for as long as this lives.
pub struct MappedTensor {
    map: Arc<Mmap>,
    start: usize,
    len: usize,
}

impl MappedTensor {
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }
}

/// Where one tensor lies in the file. `dims` are in row-major order (outermost first), the
/// reverse of GGUF's `ne`, so a linear weight reads `[out_features, in_features]`.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: GgmlDType,
    pub dims: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: usize,
    pub len: usize,
}

pub struct GgufFile {
    path: PathBuf,
    /// Shared so that a tensor read in place ([`MappedTensor`]) outlives the file's parsing.
    map: Arc<Mmap>,
    pub metadata: HashMap<String, Value>,
    pub tensors: HashMap<String, TensorInfo>,
}

/// The GGUF type id of a dtype.
pub(crate) fn type_id(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// GGML type ids as written in GGUF.
fn ggml_type(type_id: u32) -> Result<GgmlDType, &'static str> {
    Ok(match type_id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        30 => GgmlDType::BF16,
        9 => return Err("Q8_1"),
        15 => return Err("Q8_K"),
        16..=23 => return Err("IQ quantization"),
        24..=28 => return Err("integer or f64"),
        29 => return Err("IQ1_M"),
        _ => return Err("unknown"),
    })
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: what.to_string(),
                needed: self.pos as u64 + n as u64,
                len: self.bytes.len() as u64,
            }),
        }
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }
    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    /// A count that must fit in the remaining bytes at `min_item_size` bytes per item.
    fn count(&mut self, min_item_size: usize, what: &str) -> Result<usize, GgufError> {
        let n = self.u64(what)?;
        let needed = (n.saturating_mul(min_item_size as u64)).saturating_add(self.pos as u64);
        if needed > self.bytes.len() as u64 {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: format!("{what} ({n})"),
                needed,
                len: self.bytes.len() as u64,
            });
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let n = self.count(1, what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::Corrupt {
            path: self.path.to_path_buf(),
            reason: format!("{what} is not valid UTF-8"),
        })
    }
    fn value(&mut self, type_id: u32, key: &str, depth: usize) -> Result<Value, GgufError> {
        Ok(match type_id {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => Value::Bool(self.array::<1>(key)?[0] != 0),
            8 => Value::String(self.string(key)?),
            9 if depth == 0 => {
                let elem_type = self.u32(key)?;
                let n = self.count(1, key)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem_type, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => {
                return Err(GgufError::Corrupt {
                    path: self.path.to_path_buf(),
                    reason: format!("metadata `{key}` has unknown value type {other}"),
                })
            }
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the file is opened read-only and the model files are not modified while served;
        // a changed file is picked up only by loading it anew.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (metadata, tensors) = Self::parse(path, &map)?;
        let parsed = Self {
            path: path.to_path_buf(),
            map: Arc::new(map),
            metadata,
            tensors,
        };
        // The header (the tokenizer's 150k strings among it) now lives in `metadata`.
        let data_start = parsed.tensors.values().map(|t| t.start).min().unwrap_or(parsed.map.len());
        parsed.release_pages(0, data_start);
        Ok(parsed)
    }

    #[allow(clippy::type_complexity)]
    fn parse(
        path: &Path,
        bytes: &[u8],
    ) -> Result<(HashMap<String, Value>, HashMap<String, TensorInfo>), GgufError> {
        let corrupt = |reason: String| GgufError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let mut cur = Cursor {
            bytes,
            pos: 0,
            path,
        };
        let magic = cur.array::<4>("the magic number")?;
        if &magic != b"GGUF" {
            return Err(corrupt(format!("bad magic {magic:?}, expected \"GGUF\"")));
        }
        let version = cur.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(corrupt(format!("unsupported GGUF version {version}")));
        }
        // A tensor entry takes at least 24 bytes, a metadata entry at least 13.
        let n_tensors = cur.count(24, "the tensor count")?;
        let n_kv = cur.count(13, "the metadata count")?;

        let mut metadata = HashMap::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = cur.string("a metadata key")?;
            let type_id = cur.u32(&key)?;
            let value = cur.value(type_id, &key, 0)?;
            metadata.insert(key, value);
        }

        let mut entries = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = cur.string("a tensor name")?;
            let n_dims = cur.u32(&name)? as usize;
            if n_dims == 0 || n_dims > 4 {
                return Err(corrupt(format!("tensor `{name}` has {n_dims} dimensions")));
            }
            let mut ne = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                ne.push(cur.u64(&name)?);
            }
            let type_id = cur.u32(&name)?;
            let offset = cur.u64(&name)?;
            entries.push((name, ne, type_id, offset));
        }

        let alignment = match metadata.get("general.alignment") {
            Some(v) => v
                .as_u64()
                .filter(|a| *a > 0 && a.is_power_of_two())
                .ok_or_else(|| corrupt("general.alignment is not a power of two".into()))?,
            None => 32,
        } as usize;
        let data_start = cur.pos.div_ceil(alignment) * alignment;

        let mut tensors = HashMap::with_capacity(n_tensors);
        for (name, ne, type_id, offset) in entries {
            let dtype = ggml_type(type_id).map_err(|type_name| GgufError::UnsupportedTensorType {
                path: path.to_path_buf(),
                tensor: name.clone(),
                type_id,
                type_name,
            })?;
            let elems = ne
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| corrupt(format!("tensor `{name}` has an absurd size")))?;
            let block = dtype.block_size() as u64;
            if ne[0] % block != 0 {
                return Err(corrupt(format!(
                    "tensor `{name}` has a row of {} values, not a multiple of its block size {block}",
                    ne[0]
                )));
            }
            let len = elems / block * dtype.type_size() as u64;
            let start = (data_start as u64).checked_add(offset);
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(start), Some(end)) if end <= bytes.len() as u64 => {
                    let dims = ne.iter().rev().map(|&d| d as usize).collect();
                    tensors.insert(
                        name,
                        TensorInfo {
                            dtype,
                            dims,
                            start: start as usize,
                            len: len as usize,
                        },
                    );
                }
                _ => {
                    return Err(GgufError::Truncated {
                        path: path.to_path_buf(),
                        what: format!("tensor `{name}`"),
                        needed: end.unwrap_or(u64::MAX),
                        len: bytes.len() as u64,
                    })
                }
            }
        }
        Ok((metadata, tensors))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn has_key(&self, key: &str) -> bool {
        self.metadata.contains_key(key)
    }

    fn metadata_error(&self, key: &str, expected: &'static str) -> GgufError {
        GgufError::Metadata {
            path: self.path.clone(),
            key: key.to_string(),
            expected,
        }
    }

    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.metadata
            .get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| self.metadata_error(key, "an unsigned integer"))
    }

    pub fn get_usize(&self, key: &str) -> Result<usize, GgufError> {
        self.get_u64(key).map(|v| v as usize)
    }

    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        self.metadata
            .get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| self.metadata_error(key, "a number"))
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.metadata
            .get(key)
            .and_then(Value::as_str)
            .ok_or_else(|| self.metadata_error(key, "a string"))
    }

    pub fn get_array(&self, key: &str) -> Result<&[Value], GgufError> {
        self.metadata
            .get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| self.metadata_error(key, "an array"))
    }

    /// The tensor's info, checked against the expected row-major shape.
    pub fn tensor_info(&self, name: &str, expected: &[usize]) -> Result<&TensorInfo, GgufError> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| GgufError::MissingTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
            })?;
        if info.dims != expected {
            return Err(GgufError::ShapeMismatch {
                path: self.path.clone(),
                tensor: name.to_string(),
                found: info.dims.clone(),
                expected: expected.to_vec(),
            });
        }
        Ok(info)
    }

    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.map[info.start..info.start + info.len]
    }

    /// A tensor left in the file's mapping, to be read where it lies: its pages are read in
    /// (and count towards the process's memory) only as they are touched.
    pub fn mapped_tensor(&self, info: &TensorInfo) -> MappedTensor {
        MappedTensor { map: Arc::clone(&self.map), start: info.start, len: info.len }
    }

    /// Gives back the memory of a tensor's pages once its bytes have been copied: the weights
    /// live in their re-tiled copy, and the file's pages would otherwise count twice towards
    /// the process's memory until the file is closed. A later read faults them in again.
    pub fn release_tensor_pages(&self, info: &TensorInfo) {
        self.release_pages(info.start, info.len);
    }

    /// The same for `len` bytes of the file from `offset`, once they have been copied.
    pub fn release_pages(&self, offset: usize, len: usize) {
        const PAGE: usize = 4096;
        // Whole pages inside the range only: its neighbours may still be read.
        let start = offset.next_multiple_of(PAGE);
        let end = (offset + len) / PAGE * PAGE;
        if end > start {
            // SAFETY: the map is read-only and private; dropping its pages loses nothing (they
            // are read again from the file on the next access), and no slice of them is held
            // past this call by the caller, which has copied the tensor.
            let released = unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
            if let Err(error) = released {
                tracing::debug!(%error, "madvise(DONTNEED) on a model tensor failed; its pages stay until the file closes");
            }
        }
    }

    pub fn unsupported_tensor_type(&self, tensor: &str, dtype: GgmlDType) -> GgufError {
        GgufError::UnsupportedTensorType {
            path: self.path.clone(),
            tensor: tensor.to_string(),
            type_id: u32::MAX,
            type_name: dtype_name(dtype),
        }
    }
}

pub fn dtype_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
        #[allow(unreachable_patterns)]
        _ => "other",
    }
}
