//! GGUF (llama.cpp) model files: a bounds-checked reader for format versions 2 and 3,
//! dequantization to f32, and translation into the crate's Hugging Face vocabulary
//! (HF tensor names and shapes, an HF-style `config.json`, a `tokenizers` tokenizer).
//!
//! Format summary (little-endian):
//! `"GGUF"`, version `u32`, tensor count `u64`, metadata count `u64`, then the metadata
//! key/value pairs (`string key`, `u32 type`, value), then the tensor infos (`string name`,
//! `u32 n_dims`, `u64 dims[n_dims]`, `u32 ggml type`, `u64 offset`), then padding up to
//! `general.alignment` (default 32), then the tensor data; each offset is relative to that
//! data section. Strings are a `u64` byte length followed by UTF-8 bytes. Dimensions are
//! listed fastest-varying first, so a GGUF `[in, out]` matrix is the row-major HF `[out, in]`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::{Value, json};

use crate::formats::weights::{AffineTensor, RawTensor, RawWeights, TensorSource};
use crate::tokenizer::{SpecialTokens, Tokenizer};

/// GGUF files start with these four bytes.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Data-section alignment used when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Dequantization formats implemented by [`dequantize`].
pub const SUPPORTED_TYPES: &str =
    "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";
const MAX_DIMS: u32 = 4;
const MAX_ARRAY_NESTING: usize = 8;

/// What went wrong while reading or interpreting a GGUF file (without the file name;
/// [`GgufError`] adds it).
#[derive(Debug, thiserror::Error)]
pub enum GgufErrorKind {
    #[error("cannot read file: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a GGUF file: bad magic {found:02x?} (expected \"GGUF\" = [47, 47, 55, 46])")]
    BadMagic { found: Vec<u8> },
    #[error("unsupported GGUF version {0} (supported: 2 and 3)")]
    UnsupportedVersion(u32),
    #[error(
        "truncated file: {what} needs {needed} bytes at offset {offset}, but the file has {len} bytes"
    )]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        len: u64,
    },
    #[error("malformed file: {0}")]
    Malformed(String),
    #[error(
        "tensor `{tensor}` has unsupported type {type_name} (ggml type id {type_id}); supported: {SUPPORTED_TYPES}"
    )]
    UnsupportedType {
        tensor: String,
        type_id: u32,
        type_name: String,
    },
    #[error("unsupported architecture `{0}` (supported: llama, qwen2)")]
    UnsupportedArchitecture(String),
    #[error("missing metadata key `{0}`")]
    MissingKey(String),
    #[error("metadata key `{key}` has an unexpected value: {msg}")]
    BadValue { key: String, msg: String },
    #[error("{0}")]
    Other(String),
}

/// A [`GgufErrorKind`] together with the file it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{}: {kind}", path.display())]
pub struct GgufError {
    pub path: PathBuf,
    pub kind: GgufErrorKind,
}

type KResult<T> = std::result::Result<T, GgufErrorKind>;

fn malformed<T>(msg: impl Into<String>) -> KResult<T> {
    Err(GgufErrorKind::Malformed(msg.into()))
}

// ---------------------------------------------------------------------------------------------
// ggml tensor types
// ---------------------------------------------------------------------------------------------

/// A ggml tensor type id, as stored in the tensor infos.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q5_0: GgmlType = GgmlType(6);
    pub const Q5_1: GgmlType = GgmlType(7);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const Q8_1: GgmlType = GgmlType(9);
    pub const Q2_K: GgmlType = GgmlType(10);
    pub const Q3_K: GgmlType = GgmlType(11);
    pub const Q4_K: GgmlType = GgmlType(12);
    pub const Q5_K: GgmlType = GgmlType(13);
    pub const Q6_K: GgmlType = GgmlType(14);
    pub const Q8_K: GgmlType = GgmlType(15);
    pub const I8: GgmlType = GgmlType(24);
    pub const I16: GgmlType = GgmlType(25);
    pub const I32: GgmlType = GgmlType(26);
    pub const I64: GgmlType = GgmlType(27);
    pub const F64: GgmlType = GgmlType(28);
    pub const BF16: GgmlType = GgmlType(30);

    /// The llama.cpp name of the type (`Q4_K`, ...), or `type<N>` for unknown ids.
    pub fn name(self) -> String {
        let n = match self.0 {
            0 => "F32",
            1 => "F16",
            2 => "Q4_0",
            3 => "Q4_1",
            4 => "Q4_2 (removed)",
            5 => "Q4_3 (removed)",
            6 => "Q5_0",
            7 => "Q5_1",
            8 => "Q8_0",
            9 => "Q8_1",
            10 => "Q2_K",
            11 => "Q3_K",
            12 => "Q4_K",
            13 => "Q5_K",
            14 => "Q6_K",
            15 => "Q8_K",
            16 => "IQ2_XXS",
            17 => "IQ2_XS",
            18 => "IQ3_XXS",
            19 => "IQ1_S",
            20 => "IQ4_NL",
            21 => "IQ3_S",
            22 => "IQ2_S",
            23 => "IQ4_XS",
            24 => "I8",
            25 => "I16",
            26 => "I32",
            27 => "I64",
            28 => "F64",
            29 => "IQ1_M",
            30 => "BF16",
            34 => "TQ1_0",
            35 => "TQ2_0",
            39 => "MXFP4",
            other => return format!("type{other}"),
        };
        n.to_string()
    }

    /// `(elements per block, bytes per block)` for the types whose layout this reader knows;
    /// `None` for others (their tensors can still be listed, not read).
    pub fn block_layout(self) -> Option<(usize, usize)> {
        Some(match self.0 {
            0 => (1, 4),
            1 => (1, 2),
            2 => (32, 18),
            3 => (32, 20),
            6 => (32, 22),
            7 => (32, 24),
            8 => (32, 34),
            9 => (32, 36),
            10 => (256, 84),
            11 => (256, 110),
            12 => (256, 144),
            13 => (256, 176),
            14 => (256, 210),
            15 => (256, 292),
            24 => (1, 1),
            25 => (1, 2),
            26 => (1, 4),
            27 => (1, 8),
            28 => (1, 8),
            30 => (1, 2),
            _ => return None,
        })
    }

    /// Whether [`dequantize`] handles this type.
    pub fn is_supported(self) -> bool {
        matches!(
            self.0,
            0 | 1 | 2 | 3 | 6 | 7 | 8 | 10 | 11 | 12 | 13 | 14 | 30
        )
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

// ---------------------------------------------------------------------------------------------
// metadata values
// ---------------------------------------------------------------------------------------------

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            GgufValue::I8(v) => Some(v as f64),
            GgufValue::I16(v) => Some(v as f64),
            GgufValue::I32(v) => Some(v as f64),
            GgufValue::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short human description of the value type (`u32`, `array[string]`, ...).
    pub fn type_name(&self) -> String {
        match self {
            GgufValue::U8(_) => "u8".into(),
            GgufValue::I8(_) => "i8".into(),
            GgufValue::U16(_) => "u16".into(),
            GgufValue::I16(_) => "i16".into(),
            GgufValue::U32(_) => "u32".into(),
            GgufValue::I32(_) => "i32".into(),
            GgufValue::F32(_) => "f32".into(),
            GgufValue::Bool(_) => "bool".into(),
            GgufValue::String(_) => "string".into(),
            GgufValue::U64(_) => "u64".into(),
            GgufValue::I64(_) => "i64".into(),
            GgufValue::F64(_) => "f64".into(),
            GgufValue::Array(a) => match a.first() {
                Some(v) => format!("array[{}]", v.type_name()),
                None => "array[]".into(),
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// the reader
// ---------------------------------------------------------------------------------------------

/// One tensor's description from the tensor-info table.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Dimensions in GGUF order (fastest-varying first).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset relative to the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Number of elements (the product of the dimensions; overflow is rejected at parse time).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The row-major shape in Hugging Face order (GGUF dims reversed).
    pub fn hf_shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Size of the tensor data in bytes, if the type's layout is known.
    pub fn n_bytes(&self) -> Option<u64> {
        let (be, bb) = self.ggml_type.block_layout()?;
        Some(self.n_elements() / be as u64 * bb as u64)
    }
}

/// A parsed GGUF file held in memory.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
    pub alignment: u64,
    /// Absolute file offset of the tensor data section.
    pub data_offset: u64,
    /// The file's bytes: all of them (mapped, or in memory), or only a prefix holding the
    /// header when opened with [`GgufFile::open_metadata`].
    bytes: FileBytes,
    /// Whether `bytes` is the whole file (tensor data readable).
    complete: bool,
}

/// A file's bytes, in memory or memory-mapped (a mapped file is paged in as tensors are read,
/// so opening a multi-gigabyte model costs no heap).
enum FileBytes {
    Owned(Vec<u8>),
    Mapped(memmap2::Mmap),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Owned(v) => v,
            FileBytes::Mapped(m) => m,
        }
    }
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> KResult<&'a [u8]> {
        if n > self.remaining() {
            return Err(GgufErrorKind::Truncated {
                what: what(),
                offset: self.pos as u64,
                needed: n as u64,
                len: self.buf.len() as u64,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> KResult<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> KResult<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> KResult<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> KResult<String> {
        let len = self.u64(&|| format!("length of {}", what()))?;
        if len > self.remaining() as u64 {
            return Err(GgufErrorKind::Truncated {
                what: what(),
                offset: self.pos as u64,
                needed: len,
                len: self.buf.len() as u64,
            });
        }
        let bytes = self.take(len as usize, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            // Some converters wrote invalid UTF-8 in token strings; keep what is there.
            Err(_) => Ok(String::from_utf8_lossy(bytes).into_owned()),
        }
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> KResult<GgufValue> {
        let what = || format!("value of metadata key `{key}`");
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>(&what)?[0]),
            1 => GgufValue::I8(self.array::<1>(&what)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(&what)?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => match self.array::<1>(&what)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => {
                    return malformed(format!("metadata key `{key}`: bool byte {b} is not 0 or 1"));
                }
            },
            8 => GgufValue::String(self.string(&what)?),
            9 => {
                if depth >= MAX_ARRAY_NESTING {
                    return malformed(format!("metadata key `{key}`: arrays nested too deeply"));
                }
                let elem_ty = self.u32(&|| format!("array type of metadata key `{key}`"))?;
                let count = self.u64(&|| format!("array length of metadata key `{key}`"))?;
                let min_size: u64 = match elem_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 => 8,
                    9 => 12,
                    10..=12 => 8,
                    t => {
                        return malformed(format!(
                            "metadata key `{key}`: unknown array element type {t}"
                        ));
                    }
                };
                if count.saturating_mul(min_size) > self.remaining() as u64 {
                    return Err(GgufErrorKind::Truncated {
                        what: format!("array of {count} elements of metadata key `{key}`"),
                        offset: self.pos as u64,
                        needed: count.saturating_mul(min_size),
                        len: self.buf.len() as u64,
                    });
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem_ty, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.array(&what)?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(&what)?)),
            t => return malformed(format!("metadata key `{key}` has unknown value type {t}")),
        })
    }
}

impl GgufFile {
    /// Reads and parses a GGUF file (header, metadata and tensor infos; the data stays in
    /// memory and is dequantized on request).
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref();
        let io = |e: std::io::Error| GgufError {
            path: path.to_path_buf(),
            kind: GgufErrorKind::Io(e),
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: read-only map; like every reader of model files, this assumes the file is not
        // rewritten while it is being loaded.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::from_file_bytes(FileBytes::Mapped(map), path)
    }

    /// Parses an in-memory GGUF image; `path` is only used in error messages.
    pub fn from_bytes(bytes: Vec<u8>, path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        Self::from_file_bytes(FileBytes::Owned(bytes), path)
    }

    fn from_file_bytes(bytes: FileBytes, path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref().to_path_buf();
        let len = bytes.len() as u64;
        match parse(&bytes, len) {
            Ok((version, metadata, tensors, alignment, data_offset)) => Ok(GgufFile {
                path,
                version,
                metadata,
                tensors,
                alignment,
                data_offset,
                bytes,
                complete: true,
            }),
            Err(kind) => Err(GgufError { path, kind }),
        }
    }

    /// Reads only the header (metadata and tensor infos), not the tensor data: enough for
    /// [`gguf_config`] and [`gguf_tokenizer`]; dequantizing tensors then fails.
    pub fn open_metadata(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        use std::io::Read;
        let path = path.as_ref().to_path_buf();
        let io = |e: std::io::Error| GgufError {
            path: path.clone(),
            kind: GgufErrorKind::Io(e),
        };
        let mut file = std::fs::File::open(&path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut buf: Vec<u8> = Vec::new();
        let mut want = file_len.min(4 << 20);
        loop {
            let have = buf.len();
            buf.resize(want as usize, 0);
            file.read_exact(&mut buf[have..]).map_err(io)?;
            match parse(&buf, file_len) {
                Ok((version, metadata, tensors, alignment, data_offset)) => {
                    let complete = buf.len() as u64 == file_len;
                    return Ok(GgufFile {
                        path,
                        version,
                        metadata,
                        tensors,
                        alignment,
                        data_offset,
                        bytes: FileBytes::Owned(buf),
                        complete,
                    });
                }
                Err(GgufErrorKind::Truncated { .. }) if (buf.len() as u64) < file_len => {
                    want = want.saturating_mul(4).min(file_len);
                }
                Err(kind) => return Err(GgufError { path, kind }),
            }
        }
    }

    /// Wraps an error kind with this file's path.
    pub fn err(&self, kind: GgufErrorKind) -> GgufError {
        GgufError {
            path: self.path.clone(),
            kind,
        }
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str, GgufError> {
        match self.get("general.architecture") {
            Some(v) => v.as_str().ok_or_else(|| {
                self.err(GgufErrorKind::BadValue {
                    key: "general.architecture".into(),
                    msg: format!("expected a string, found {}", v.type_name()),
                })
            }),
            None => Err(self.err(GgufErrorKind::MissingKey("general.architecture".into()))),
        }
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor.
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> Result<&[u8], GgufError> {
        if !self.complete {
            return Err(self.err(GgufErrorKind::Other(format!(
                "tensor `{}`: the file was opened for its metadata only (GgufFile::open_metadata)",
                info.name
            ))));
        }
        let n = info.n_bytes().ok_or_else(|| {
            self.err(GgufErrorKind::UnsupportedType {
                tensor: info.name.clone(),
                type_id: info.ggml_type.0,
                type_name: info.ggml_type.name(),
            })
        })?;
        let start = self.data_offset.checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(n));
        match (start, end) {
            (Some(s), Some(e)) if e <= self.bytes.len() as u64 => {
                Ok(&self.bytes[s as usize..e as usize])
            }
            _ => Err(self.err(GgufErrorKind::Truncated {
                what: format!("data of tensor `{}`", info.name),
                offset: start.unwrap_or(u64::MAX),
                needed: n,
                len: self.bytes.len() as u64,
            })),
        }
    }

    /// Dequantizes one tensor to f32, in GGUF element order (= HF row-major order).
    pub fn dequantize_tensor(&self, info: &GgufTensorInfo) -> Result<Vec<f32>, GgufError> {
        if !info.ggml_type.is_supported() {
            return Err(self.err(GgufErrorKind::UnsupportedType {
                tensor: info.name.clone(),
                type_id: info.ggml_type.0,
                type_name: info.ggml_type.name(),
            }));
        }
        let bytes = self.tensor_bytes(info)?;
        dequantize(info.ggml_type, bytes, info.n_elements() as usize).map_err(|k| {
            self.err(match k {
                GgufErrorKind::UnsupportedType {
                    type_id, type_name, ..
                } => GgufErrorKind::UnsupportedType {
                    tensor: info.name.clone(),
                    type_id,
                    type_name,
                },
                other => other,
            })
        })
    }

    /// A typed metadata value: `None` when absent, an error naming the key when of another type.
    fn meta<'a, T>(
        &'a self,
        key: &str,
        what: &str,
        get: impl Fn(&'a GgufValue) -> Option<T>,
    ) -> Result<Option<T>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => get(v).map(Some).ok_or_else(|| {
                self.err(GgufErrorKind::BadValue {
                    key: key.into(),
                    msg: format!("expected {what}, found {}", v.type_name()),
                })
            }),
        }
    }

    fn meta_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.meta(key, "an unsigned integer", GgufValue::as_u64)
    }

    fn meta_f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        self.meta(key, "a number", GgufValue::as_f64)
    }

    fn meta_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        self.meta(key, "a string", GgufValue::as_str)
    }

    fn meta_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        self.meta(key, "a bool", GgufValue::as_bool)
    }

    fn require_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.meta_u64(key)?
            .ok_or_else(|| self.err(GgufErrorKind::MissingKey(key.into())))
    }
}

type Parsed = (
    u32,
    BTreeMap<String, GgufValue>,
    Vec<GgufTensorInfo>,
    u64,
    u64,
);

/// Parses the header in `buf` (the whole file, or a prefix of a file of `file_len` bytes);
/// tensor data ranges are checked against `file_len`.
fn parse(buf: &[u8], file_len: u64) -> KResult<Parsed> {
    let mut r = Reader { buf, pos: 0 };
    let (version, n_tensors, n_kv) = read_preamble(&mut r)?;
    let metadata = read_metadata(&mut r, n_kv)?;
    // Each tensor info takes at least 8 (name length) + 4 + 4 + 8 bytes.
    ensure_room(&r, n_tensors, 24, || format!("{n_tensors} tensor infos"))?;
    let alignment = alignment_of(&metadata)?;
    let tensors = read_tensor_infos(&mut r, n_tensors, alignment)?;
    let pos = r.pos as u64;
    let data_offset = pos.div_ceil(alignment) * alignment;
    check_tensor_data(&tensors, data_offset, file_len)?;
    Ok((version, metadata, tensors, alignment, data_offset))
}

/// Reads magic, version and the two counts, rejecting other formats and byte orders up front
/// so that later errors can assume a little-endian GGUF v2/v3 layout.
/// Returns (version, tensor count, metadata count).
fn read_preamble(r: &mut Reader) -> KResult<(u32, u64, u64)> {
    if r.buf.len() < 4 {
        return Err(GgufErrorKind::Truncated {
            what: "magic".into(),
            offset: 0,
            needed: 4,
            len: r.buf.len() as u64,
        });
    }
    let magic = r.take(4, &|| "magic".into())?;
    if magic != GGUF_MAGIC {
        return Err(GgufErrorKind::BadMagic {
            found: magic.to_vec(),
        });
    }
    let version = r.u32(&|| "version".into())?;
    if version != 2 && version != 3 {
        if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
            return malformed("big-endian GGUF files are not supported");
        }
        return Err(GgufErrorKind::UnsupportedVersion(version));
    }
    let n_tensors = r.u64(&|| "tensor count".into())?;
    let n_kv = r.u64(&|| "metadata count".into())?;
    Ok((version, n_tensors, n_kv))
}

/// Fails when `count` items of at least `min_bytes` each cannot fit in what is left of the
/// buffer, so that absurd counts are rejected before anything is allocated for them.
fn ensure_room(
    r: &Reader,
    count: u64,
    min_bytes: u64,
    what: impl FnOnce() -> String,
) -> KResult<()> {
    if count.saturating_mul(min_bytes) > r.remaining() as u64 {
        return Err(GgufErrorKind::Truncated {
            what: what(),
            offset: r.pos as u64,
            needed: count.saturating_mul(min_bytes),
            len: r.buf.len() as u64,
        });
    }
    Ok(())
}

/// Reads the `n_kv` metadata pairs; a key given twice is an error rather than a silent
/// overwrite, since either value could be the one the writer meant.
fn read_metadata(r: &mut Reader, n_kv: u64) -> KResult<BTreeMap<String, GgufValue>> {
    // Each metadata pair takes at least 8 (key length) + 4 (type) + 1 bytes, each tensor info
    // at least 8 + 4 + 4 + 8: reject absurd counts before allocating anything.
    ensure_room(r, n_kv, 13, || format!("{n_kv} metadata entries"))?;
    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = r.string(&|| format!("key of metadata entry {i}"))?;
        let ty = r.u32(&|| format!("type of metadata key `{key}`"))?;
        let v = r.value(ty, &key, 0)?;
        if metadata.insert(key.clone(), v).is_some() {
            return malformed(format!("duplicate metadata key `{key}`"));
        }
    }
    Ok(metadata)
}

/// `general.alignment`, or the default; tensor offsets and the data section start are
/// multiples of it, so anything but a positive power of two is rejected.
fn alignment_of(metadata: &BTreeMap<String, GgufValue>) -> KResult<u64> {
    match metadata.get("general.alignment") {
        None => Ok(DEFAULT_ALIGNMENT),
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => Ok(a),
            _ => malformed(format!(
                "general.alignment must be a positive power of two, found {v:?}"
            )),
        },
    }
}

/// Reads the `n_tensors` tensor infos; names must be unique since tensors are looked up by name.
fn read_tensor_infos(
    r: &mut Reader,
    n_tensors: u64,
    alignment: u64,
) -> KResult<Vec<GgufTensorInfo>> {
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut seen = std::collections::HashSet::new();
    for i in 0..n_tensors {
        let info = read_tensor_info(r, i, alignment)?;
        if !seen.insert(info.name.clone()) {
            return malformed(format!("duplicate tensor name `{}`", info.name));
        }
        tensors.push(info);
    }
    Ok(tensors)
}

/// Reads tensor info number `i` and checks what can be checked without the data: dimension
/// count, element count, offset alignment and whole quantization blocks per row.
fn read_tensor_info(r: &mut Reader, i: u64, alignment: u64) -> KResult<GgufTensorInfo> {
    let name = r.string(&|| format!("name of tensor {i}"))?;
    let what = |field: &str| format!("{field} of tensor `{name}`");
    let n_dims = r.u32(&|| what("dimension count"))?;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return malformed(format!(
            "tensor `{name}` has {n_dims} dimensions (expected 1 to {MAX_DIMS})"
        ));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        dims.push(r.u64(&|| what("dimensions"))?);
    }
    let ggml_type = GgmlType(r.u32(&|| what("type"))?);
    let offset = r.u64(&|| what("data offset"))?;
    let n: Option<u64> = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
    if n.is_none_or(|n| n > isize::MAX as u64 / 8) {
        return malformed(format!("tensor `{name}` has absurd dimensions {dims:?}"));
    }
    if !offset.is_multiple_of(alignment) {
        return malformed(format!(
            "tensor `{name}` data offset {offset} is not a multiple of the alignment {alignment}"
        ));
    }
    if let Some((be, _)) = ggml_type.block_layout()
        && !dims[0].is_multiple_of(be as u64)
    {
        return malformed(format!(
            "tensor `{name}` of type {ggml_type} has rows of {} elements, not a multiple of the block size {be}",
            dims[0]
        ));
    }
    Ok(GgufTensorInfo {
        name,
        dims,
        ggml_type,
        offset,
    })
}

/// Checks that every tensor's data lies inside a file of `len` bytes, so a truncated file
/// fails here, naming the tensor, rather than when that tensor is first read.
fn check_tensor_data(tensors: &[GgufTensorInfo], data_offset: u64, len: u64) -> KResult<()> {
    for t in tensors {
        if let Some(nb) = t.n_bytes() {
            let end = data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(nb));
            if end.is_none_or(|e| e > len) {
                return Err(GgufErrorKind::Truncated {
                    what: format!("data of tensor `{}` ({} bytes)", t.name, nb),
                    offset: data_offset.saturating_add(t.offset),
                    needed: nb,
                    len,
                });
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// dequantization
// ---------------------------------------------------------------------------------------------

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Q4_0: `d: f16`, 16 bytes of nibbles; element j (< 16) is the low nibble of byte j, element
/// j + 16 its high nibble; value = (q - 8) * d.
pub fn dequant_block_q4_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        out[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
        out[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1: `d: f16`, `m: f16`, 16 bytes of nibbles (layout as Q4_0); value = q * d + m.
pub fn dequant_block_q4_1(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        out[j] = (qs[j] & 0x0f) as f32 * d + m;
        out[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// Q5_0: `d: f16`, `qh: u32` (the fifth bit of each element, bit j for element j), 16 bytes
/// of nibbles laid out as in Q4_0; value = (q - 16) * d.
pub fn dequant_block_q5_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) as u8;
        let h1 = ((qh >> (j + 16)) & 1) as u8;
        out[j] = (((qs[j] & 0x0f) | (h0 << 4)) as i32 - 16) as f32 * d;
        out[j + 16] = (((qs[j] >> 4) | (h1 << 4)) as i32 - 16) as f32 * d;
    }
}

/// Q5_1: `d: f16`, `m: f16`, `qh: u32`, 16 bytes of nibbles (as Q5_0); value = q * d + m.
pub fn dequant_block_q5_1(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) as u8;
        let h1 = ((qh >> (j + 16)) & 1) as u8;
        out[j] = ((qs[j] & 0x0f) | (h0 << 4)) as f32 * d + m;
        out[j + 16] = ((qs[j] >> 4) | (h1 << 4)) as f32 * d + m;
    }
}

/// Q8_0: `d: f16`, 32 signed bytes; value = q * d.
pub fn dequant_block_q8_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        out[j] = (b[2 + j] as i8) as f32 * d;
    }
}

/// Q2_K: super-block of 256 = 16 sub-blocks of 16. 16 scale bytes (low nibble scale, high
/// nibble min), 64 bytes of 2-bit values, `d: f16`, `dmin: f16`. Each half h (128 elements)
/// uses bytes `qs[32h..32h+32]`; its quarter k takes bits 2k..2k+1 of those bytes, the first
/// 16 bytes for sub-block 8h + 2k, the next 16 for sub-block 8h + 2k + 1;
/// value = d * scale * q - dmin * min.
pub fn dequant_block_q2_k(b: &[u8], out: &mut [f32]) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let d = f16_at(b, 80);
    let dmin = f16_at(b, 82);
    for h in 0..2 {
        let q = &qs[32 * h..32 * h + 32];
        for k in 0..4 {
            let shift = 2 * k;
            for half in 0..2 {
                let sc = scales[8 * h + 2 * k + half];
                let dl = d * (sc & 0x0f) as f32;
                let ml = dmin * (sc >> 4) as f32;
                let o = &mut out[128 * h + 32 * k + 16 * half..][..16];
                for l in 0..16 {
                    o[l] = dl * ((q[16 * half + l] >> shift) & 3) as f32 - ml;
                }
            }
        }
    }
}

/// Q3_K: super-block of 256 = 16 sub-blocks of 16. 32 bytes `hmask` (the third bit), 64 bytes
/// of 2-bit values (laid out as Q2_K), 12 bytes of 6-bit signed scales (offset 32), `d: f16`.
/// Scale i has its low 4 bits in byte i (low nibble, i < 8) or byte i - 8 (high nibble), and
/// its top 2 bits at bits 2(i/4).. of byte 8 + i%4. Element l of quarter k of half h has its
/// high bit at bit 4h + k of `hmask[l]` (l < 32); when that bit is clear, 4 is subtracted.
/// value = d * (scale - 32) * (q - 4 * !high).
pub fn dequant_block_q3_k(b: &[u8], out: &mut [f32]) {
    let hmask = &b[0..32];
    let qs = &b[32..96];
    let sb = &b[96..108];
    let d = f16_at(b, 108);
    let mut scales = [0i32; 16];
    for (i, sc) in scales.iter_mut().enumerate() {
        let low = if i < 8 { sb[i] & 0x0f } else { sb[i - 8] >> 4 };
        let high = (sb[8 + i % 4] >> (2 * (i / 4))) & 3;
        *sc = (low | (high << 4)) as i32 - 32;
    }
    for h in 0..2 {
        let q = &qs[32 * h..32 * h + 32];
        for k in 0..4 {
            let shift = 2 * k;
            let m = 1u8 << (4 * h + k);
            for half in 0..2 {
                let dl = d * scales[8 * h + 2 * k + half] as f32;
                let o = &mut out[128 * h + 32 * k + 16 * half..][..16];
                for (l, y) in o.iter_mut().enumerate() {
                    let idx = 16 * half + l;
                    let lo = ((q[idx] >> shift) & 3) as i32;
                    let sub = if hmask[idx] & m != 0 { 0 } else { 4 };
                    *y = dl * (lo - sub) as f32;
                }
            }
        }
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) packed in Q4_K's 12 scale bytes.
#[inline]
fn k4_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Q4_K: super-block of 256 = 8 sub-blocks of 32. `d: f16`, `dmin: f16`, 12 bytes of packed
/// 6-bit (scale, min) pairs, 128 bytes of nibbles. Each 64-element chunk c uses bytes
/// `qs[32c..32c+32]`: low nibbles are sub-block 2c, high nibbles sub-block 2c+1;
/// value = d * scale * q - dmin * min.
pub fn dequant_block_q4_k(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for c in 0..4 {
        let (sc1, m1) = k4_scale_min(2 * c, scales);
        let (sc2, m2) = k4_scale_min(2 * c + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let q = &qs[32 * c..32 * c + 32];
        let o = &mut out[64 * c..64 * c + 64];
        for l in 0..32 {
            o[l] = d1 * (q[l] & 0x0f) as f32 - m1;
            o[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// Q5_K: as Q4_K (d, dmin, 12 scale bytes, 128 nibble bytes after 32 `qh` bytes), plus a
/// fifth bit per element: for chunk c (64 elements), bit 2c of `qh[l]` for the low-nibble
/// element l and bit 2c+1 for the high-nibble element l + 32.
pub fn dequant_block_q5_k(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for c in 0..4 {
        let (sc1, m1) = k4_scale_min(2 * c, scales);
        let (sc2, m2) = k4_scale_min(2 * c + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let q = &qs[32 * c..32 * c + 32];
        let o = &mut out[64 * c..64 * c + 64];
        for l in 0..32 {
            let h1 = (qh[l] >> (2 * c)) & 1;
            let h2 = (qh[l] >> (2 * c + 1)) & 1;
            o[l] = d1 * ((q[l] & 0x0f) | (h1 << 4)) as f32 - m1;
            o[l + 32] = d2 * ((q[l] >> 4) | (h2 << 4)) as f32 - m2;
        }
    }
}

/// Q6_K: super-block of 256 = 16 sub-blocks of 16. 128 bytes `ql` (low 4 bits), 64 bytes `qh`
/// (high 2 bits), 16 signed scales, `d: f16` at the end. For each half h (128 elements) and
/// l < 32, with ql = ql[64h..], qh = qh[32h..], sc = scales[8h..]:
/// element l     = low nibble of ql[l]      | bits 0-1 of qh[l] << 4, scale sc[l/16]
/// element l+32  = low nibble of ql[l+32]   | bits 2-3 of qh[l] << 4, scale sc[l/16 + 2]
/// element l+64  = high nibble of ql[l]     | bits 4-5 of qh[l] << 4, scale sc[l/16 + 4]
/// element l+96  = high nibble of ql[l+32]  | bits 6-7 of qh[l] << 4, scale sc[l/16 + 6]
/// value = d * scale * (q - 32).
pub fn dequant_block_q6_k(b: &[u8], out: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = f16_at(b, 208);
    for h in 0..2 {
        let ql = &ql_all[64 * h..64 * h + 64];
        let qh = &qh_all[32 * h..32 * h + 32];
        let sc = &sc_all[8 * h..8 * h + 8];
        let o = &mut out[128 * h..128 * h + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            o[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            o[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            o[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            o[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

fn dequant_block_f32(b: &[u8], out: &mut [f32]) {
    out[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
}

fn dequant_block_f16(b: &[u8], out: &mut [f32]) {
    out[0] = f16_at(b, 0);
}

fn dequant_block_bf16(b: &[u8], out: &mut [f32]) {
    out[0] = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
}

/// Runs `f` over every block, in parallel over groups of blocks.
fn par_blocks(
    data: &[u8],
    out: &mut [f32],
    block_elems: usize,
    block_bytes: usize,
    f: fn(&[u8], &mut [f32]),
) {
    // About 16k elements per task: enough to amortize scheduling, small enough to balance.
    let blocks_per_task = (16384 / block_elems).max(1);
    out.par_chunks_mut(block_elems * blocks_per_task)
        .zip(data.par_chunks(block_bytes * blocks_per_task))
        .for_each(|(o, d)| {
            for (ob, db) in o
                .chunks_exact_mut(block_elems)
                .zip(d.chunks_exact(block_bytes))
            {
                f(db, ob);
            }
        });
}

/// Dequantizes `n_elements` values of type `ty` from `data` (which must hold exactly the
/// corresponding number of blocks) to f32.
pub fn dequantize(ty: GgmlType, data: &[u8], n_elements: usize) -> Result<Vec<f32>, GgufErrorKind> {
    let unsupported = || GgufErrorKind::UnsupportedType {
        tensor: String::from("<unnamed>"),
        type_id: ty.0,
        type_name: ty.name(),
    };
    let f: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => dequant_block_f32,
        GgmlType::F16 => dequant_block_f16,
        GgmlType::BF16 => dequant_block_bf16,
        GgmlType::Q4_0 => dequant_block_q4_0,
        GgmlType::Q4_1 => dequant_block_q4_1,
        GgmlType::Q8_0 => dequant_block_q8_0,
        GgmlType::Q5_0 => dequant_block_q5_0,
        GgmlType::Q5_1 => dequant_block_q5_1,
        GgmlType::Q2_K => dequant_block_q2_k,
        GgmlType::Q3_K => dequant_block_q3_k,
        GgmlType::Q4_K => dequant_block_q4_k,
        GgmlType::Q5_K => dequant_block_q5_k,
        GgmlType::Q6_K => dequant_block_q6_k,
        _ => return Err(unsupported()),
    };
    let (be, bb) = ty.block_layout().ok_or_else(unsupported)?;
    if !n_elements.is_multiple_of(be) {
        return malformed(format!(
            "{n_elements} elements of type {ty} are not a whole number of {be}-element blocks"
        ));
    }
    let expected = n_elements / be * bb;
    if data.len() != expected {
        return malformed(format!(
            "{n_elements} elements of type {ty} need {expected} bytes, got {}",
            data.len()
        ));
    }
    let mut out = vec![0f32; n_elements];
    par_blocks(data, &mut out, be, bb, f);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Quantized blocks as mlx affine groups (QLoRA on GGUF bases without expanding them)
// ---------------------------------------------------------------------------------------------

/// One group of 32 codes with its scale and bias, from one block (or a Q4_K sub-block).
type Group = ([u8; 32], f32, f32);

fn nibbles(qs: &[u8]) -> [u8; 32] {
    let mut c = [0u8; 32];
    for j in 0..16 {
        c[j] = qs[j] & 0x0f;
        c[j + 16] = qs[j] >> 4;
    }
    c
}

/// The groups of one block of `ty`, for the types whose values are exactly `scale · q + bias`
/// with `q` a 4- or 8-bit code in groups of 32: (bits, groups).
fn affine_groups(ty: GgmlType, b: &[u8]) -> Option<(usize, Vec<Group>)> {
    Some(match ty {
        // (q - 8) · d
        GgmlType::Q4_0 => {
            let d = f16_at(b, 0);
            (4, vec![(nibbles(&b[2..18]), d, -8.0 * d)])
        }
        // q · d + m
        GgmlType::Q4_1 => (4, vec![(nibbles(&b[4..20]), f16_at(b, 0), f16_at(b, 2))]),
        // q · d with q signed: code q + 128
        GgmlType::Q8_0 => {
            let d = f16_at(b, 0);
            let mut c = [0u8; 32];
            for (j, x) in c.iter_mut().enumerate() {
                *x = ((b[2 + j] as i8) as i16 + 128) as u8;
            }
            (8, vec![(c, d, -128.0 * d)])
        }
        // Eight sub-blocks of 32: d · scale · q - dmin · min
        GgmlType::Q4_K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let (scales, qs) = (&b[4..16], &b[16..144]);
            let mut groups = Vec::with_capacity(8);
            for c in 0..4 {
                let q = &qs[32 * c..32 * c + 32];
                for (sub, shift) in [(2 * c, 0), (2 * c + 1, 4)] {
                    let (sc, m) = k4_scale_min(sub, scales);
                    let mut codes = [0u8; 32];
                    for l in 0..32 {
                        codes[l] = (q[l] >> shift) & 0x0f;
                    }
                    groups.push((codes, d * sc as f32, -(dmin * m as f32)));
                }
            }
            (4, groups)
        }
        _ => return None,
    })
}

/// A `[rows, cols]` tensor of `ty` re-expressed exactly in mlx's affine layout (groups of 32),
/// or `None` for types that do not map onto it.
pub fn to_affine(
    ty: GgmlType,
    data: &[u8],
    rows: usize,
    cols: usize,
) -> Option<Result<AffineTensor, GgufErrorKind>> {
    let (be, bb) = ty.block_layout()?;
    let bits = affine_groups(ty, &vec![0u8; bb])?.0;
    Some((|| {
        if !cols.is_multiple_of(be) || data.len() != rows * cols / be * bb {
            return malformed(format!(
                "a [{rows}, {cols}] tensor of type {ty} cannot be {} bytes",
                data.len()
            ));
        }
        let per_word = 32 / bits;
        let mut words = Vec::with_capacity(rows * cols / per_word);
        let mut scales = Vec::with_capacity(rows * cols / 32);
        let mut biases = Vec::with_capacity(rows * cols / 32);
        for block in data.chunks_exact(bb) {
            let (_, groups) = affine_groups(ty, block).expect("type checked above");
            for (codes, scale, bias) in groups {
                for w in codes.chunks_exact(per_word) {
                    words.push(
                        w.iter()
                            .enumerate()
                            .fold(0u32, |acc, (k, &q)| acc | (q as u32) << (k * bits)),
                    );
                }
                scales.push(scale);
                biases.push(bias);
            }
        }
        Ok(AffineTensor {
            bits,
            group_size: 32,
            shape: [rows, cols],
            words,
            scales,
            biases,
        })
    })())
}

// ---------------------------------------------------------------------------------------------
// GGUF -> Hugging Face
// ---------------------------------------------------------------------------------------------

/// llama.cpp's tensor names beside Hugging Face's: the model's own, then each block's parts
/// (`blk.N.<gguf>` ↔ `model.layers.N.<hf>`), each with a `.weight` or `.bias` suffix.
pub const MODEL_TENSOR_NAMES: &[(&str, &str)] = &[
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
];
pub const BLOCK_TENSOR_NAMES: &[(&str, &str)] = &[
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
];

/// The Hugging Face name of a llama.cpp tensor name, if there is one.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    let (base, suffix) = gguf_name.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    if let Some((_, hf)) = MODEL_TENSOR_NAMES.iter().find(|(g, _)| *g == base) {
        return Some(format!("{hf}.{suffix}"));
    }
    let (layer, part) = base.strip_prefix("blk.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, hf) = BLOCK_TENSOR_NAMES.iter().find(|(g, _)| *g == part)?;
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Undoes llama.cpp's converter permutation of Q/K rows. The converter reorders, inside each
/// head of `head_dim` rows, row `s * head_dim/2 + j` (s in {0, 1}) to position `2j + s`
/// (interleaving the two rotary halves); this puts them back. Works for weights `[rows, cols]`
/// and biases (`cols` = 1).
pub fn unpermute_qk_rows<T: Copy + Default>(
    data: &[T],
    rows: usize,
    cols: usize,
    n_heads: usize,
) -> Option<Vec<T>> {
    if n_heads == 0 || !rows.is_multiple_of(n_heads) || data.len() != rows * cols {
        return None;
    }
    let hd = rows / n_heads;
    if !hd.is_multiple_of(2) {
        return None;
    }
    let half = hd / 2;
    let mut out = vec![T::default(); data.len()];
    for h in 0..n_heads {
        for s in 0..2 {
            for j in 0..half {
                let dst = h * hd + s * half + j;
                let src = h * hd + 2 * j + s;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Some(out)
}

fn check_arch(file: &GgufFile) -> Result<String, GgufError> {
    let arch = file.architecture()?.to_string();
    match arch.as_str() {
        "llama" | "qwen2" => Ok(arch),
        _ => Err(file.err(GgufErrorKind::UnsupportedArchitecture(arch))),
    }
}

/// How GGUF tensors map onto HF ones: names, and the head count that undoes llama.cpp's
/// Q/K row permutation.
struct HfLayout {
    arch: String,
    n_head: usize,
    n_kv: usize,
    /// HF name -> index into the file's tensor list.
    by_hf: BTreeMap<String, usize>,
}

impl HfLayout {
    fn new(file: &GgufFile) -> Result<Self, GgufError> {
        let arch = check_arch(file)?;
        let n_head = file.require_u64(&format!("{arch}.attention.head_count"))? as usize;
        let n_kv = file
            .meta_u64(&format!("{arch}.attention.head_count_kv"))?
            .map(|v| v as usize)
            .unwrap_or(n_head);
        let mut by_hf = BTreeMap::new();
        for (i, info) in file.tensors.iter().enumerate() {
            if info.name == "rope_freqs.weight" {
                // llama3-style rope scaling factors; recomputed from the config.
                continue;
            }
            let Some(hf) = hf_tensor_name(&info.name) else {
                return Err(file.err(GgufErrorKind::Other(format!(
                    "tensor `{}` has no Hugging Face equivalent for architecture {arch}",
                    info.name
                ))));
            };
            by_hf.insert(hf, i);
        }
        Ok(Self {
            arch,
            n_head,
            n_kv,
            by_hf,
        })
    }

    /// One quantized tensor in mlx's affine layout, under its HF shape and row order, when its
    /// type maps onto that layout exactly.
    fn affine(&self, file: &GgufFile, hf: &str) -> Result<Option<AffineTensor>, GgufError> {
        let Some(&i) = self.by_hf.get(hf) else {
            return Ok(None);
        };
        let info = &file.tensors[i];
        let shape = info.hf_shape();
        let [rows, cols] = shape[..] else {
            return Ok(None);
        };
        let Some(t) = to_affine(info.ggml_type, file.tensor_bytes(info)?, rows, cols) else {
            return Ok(None);
        };
        let mut t = t.map_err(|k| file.err(k))?;
        if let Some(heads) = self.qk_heads(hf) {
            let bad = || {
                file.err(GgufErrorKind::Other(format!(
                    "tensor `{}` with shape {shape:?} cannot be split into {heads} heads of even size",
                    info.name
                )))
            };
            let wcols = cols * t.bits / 32;
            let gcols = cols / t.group_size;
            t.words = unpermute_qk_rows(&t.words, rows, wcols, heads).ok_or_else(bad)?;
            t.scales = unpermute_qk_rows(&t.scales, rows, gcols, heads).ok_or_else(bad)?;
            t.biases = unpermute_qk_rows(&t.biases, rows, gcols, heads).ok_or_else(bad)?;
        }
        Ok(Some(t))
    }

    /// The head count whose row permutation llama.cpp applied to `hf` (llama Q and K).
    fn qk_heads(&self, hf: &str) -> Option<usize> {
        if self.arch != "llama" {
            None
        } else if hf.contains("self_attn.q_proj.") {
            Some(self.n_head)
        } else if hf.contains("self_attn.k_proj.") {
            Some(self.n_kv)
        } else {
            None
        }
    }

    /// One tensor dequantized to f32, under its HF shape and row order.
    fn tensor(&self, file: &GgufFile, hf: &str) -> Result<Option<RawTensor>, GgufError> {
        let Some(&i) = self.by_hf.get(hf) else {
            return Ok(None);
        };
        let info = &file.tensors[i];
        let shape = info.hf_shape();
        let mut data = file.dequantize_tensor(info)?;
        {
            if let Some(heads) = self.qk_heads(hf) {
                let rows = shape[0];
                let cols: usize = shape[1..].iter().product();
                data = unpermute_qk_rows(&data, rows, cols, heads).ok_or_else(|| {
                    file.err(GgufErrorKind::Other(format!(
                        "tensor `{}` with shape {shape:?} cannot be split into {heads} heads of even size",
                        info.name
                    )))
                })?;
            }
        }
        Ok(Some(RawTensor { shape, data }))
    }
}

/// Every weight dequantized to f32 under HF names and shapes (Q/K rows back in HF order).
pub fn gguf_weights(file: &GgufFile) -> Result<RawWeights, GgufError> {
    let layout = HfLayout::new(file)?;
    let mut out = RawWeights::new();
    for hf in layout.by_hf.keys() {
        if let Some(t) = layout.tensor(file, hf)? {
            out.insert(hf.clone(), t);
        }
    }
    Ok(out)
}

/// A GGUF model's weights, dequantized one tensor at a time as a model is built from them:
/// the file is memory-mapped, so the host never holds more than one f32 tensor.
pub struct GgufSource {
    file: GgufFile,
    layout: HfLayout,
}

impl GgufSource {
    pub fn new(file: GgufFile) -> Result<Self, GgufError> {
        let layout = HfLayout::new(&file)?;
        Ok(Self { file, layout })
    }
}

impl TensorSource for GgufSource {
    fn names(&self) -> Vec<String> {
        self.layout.by_hf.keys().cloned().collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let i = *self.layout.by_hf.get(name)?;
        Some(self.file.tensors[i].hf_shape())
    }

    fn data(&self, name: &str) -> anyhow::Result<burn::tensor::TensorData> {
        let t = self
            .layout
            .tensor(&self.file, name)?
            .ok_or_else(|| anyhow::anyhow!("missing tensor `{name}`"))?;
        Ok(burn::tensor::TensorData::new(t.data, t.shape))
    }

    fn affine(&self, name: &str) -> anyhow::Result<Option<AffineTensor>> {
        Ok(self.layout.affine(&self.file, name)?)
    }
}

fn f32_json(v: f64) -> Value {
    // Metadata floats are mostly f32; keep the value exactly as transformers reads it.
    json!(v)
}

/// An HF-style `config.json` built from the `llama.*` / `qwen2.*` metadata.
pub fn gguf_config(file: &GgufFile) -> Result<Value, GgufError> {
    let arch = check_arch(file)?;
    let k = |s: &str| format!("{arch}.{s}");
    let hidden = file.require_u64(&k("embedding_length"))?;
    let layers = file.require_u64(&k("block_count"))?;
    let ffn = file.require_u64(&k("feed_forward_length"))?;
    let heads = file.require_u64(&k("attention.head_count"))?;
    if heads == 0 || hidden % heads != 0 {
        return Err(file.err(GgufErrorKind::BadValue {
            key: k("attention.head_count"),
            msg: format!("{heads} heads do not divide the hidden size {hidden}"),
        }));
    }
    let kv_heads = file
        .meta_u64(&k("attention.head_count_kv"))?
        .unwrap_or(heads);
    let head_dim = file
        .meta_u64(&k("attention.key_length"))?
        .unwrap_or(hidden / heads);
    let eps = file
        .meta_f64(&k("attention.layer_norm_rms_epsilon"))?
        .unwrap_or(1e-5);
    let default_theta = if arch == "qwen2" { 1e6 } else { 1e4 };
    let theta = file
        .meta_f64(&k("rope.freq_base"))?
        .unwrap_or(default_theta);
    let ctx = file.meta_u64(&k("context_length"))?.unwrap_or(2048);
    let vocab = match file.meta_u64(&k("vocab_size"))? {
        Some(v) => v,
        None => match file.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
            Some(t) => t.len() as u64,
            None => match file.tensor("token_embd.weight") {
                Some(t) => *t.dims.last().unwrap_or(&0),
                None => {
                    return Err(file.err(GgufErrorKind::MissingKey(k("vocab_size"))));
                }
            },
        },
    };
    let tied = file.tensor("output.weight").is_none();
    let has_qkv_bias = file.tensor("blk.0.attn_q.bias").is_some();
    let bos = file.meta_u64("tokenizer.ggml.bos_token_id")?;
    let eos = file.meta_u64("tokenizer.ggml.eos_token_id")?;
    let pad = file.meta_u64("tokenizer.ggml.padding_token_id")?;
    let mut rope_parameters = json!({ "rope_theta": f32_json(theta), "rope_type": "default" });
    let mut rope_scaling = Value::Null;
    if let Some(kind) = file.meta_str(&k("rope.scaling.type"))?
        && kind == "linear"
        && let Some(f) = file.meta_f64(&k("rope.scaling.factor"))?
    {
        rope_parameters["rope_type"] = json!("linear");
        rope_parameters["factor"] = json!(f);
        rope_scaling = json!({ "rope_type": "linear", "type": "linear", "factor": f });
    }
    if let Some(info) = file.tensor("rope_freqs.weight") {
        let scaling = llama3_scaling_from_rope_freqs(file, info, theta, head_dim)?;
        for (k, v) in scaling.as_object().into_iter().flatten() {
            rope_parameters[k] = v.clone();
        }
        rope_scaling = scaling;
    }
    let (model_type, class) = match arch.as_str() {
        "qwen2" => ("qwen2", "Qwen2ForCausalLM"),
        _ => ("llama", "LlamaForCausalLM"),
    };
    let mut cfg = json!({
        "architectures": [class],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": ctx,
        "rms_norm_eps": f32_json(eps),
        "rope_theta": f32_json(theta),
        "rope_parameters": rope_parameters,
        "rope_scaling": rope_scaling,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "dtype": "float32",
        "torch_dtype": "float32",
    });
    if arch == "llama" {
        cfg["attention_bias"] = json!(has_qkv_bias);
        cfg["mlp_bias"] = json!(false);
    } else {
        cfg["use_sliding_window"] = json!(false);
    }
    Ok(cfg)
}

/// Llama 3.1-style rope scaling from llama.cpp's `rope_freqs.weight` (the per-frequency
/// divisors the converter precomputed). The factor is the largest divisor; the other parameters
/// are Llama 3.1/3.2's (low 1, high 4, original context 8192), checked against the tensor.
fn llama3_scaling_from_rope_freqs(
    file: &GgufFile,
    info: &GgufTensorInfo,
    theta: f64,
    head_dim: u64,
) -> Result<Value, GgufError> {
    let divisors = file.dequantize_tensor(info)?;
    let n = divisors.len();
    if n == 0 || n as u64 * 2 != head_dim {
        return Err(file.err(GgufErrorKind::Other(format!(
            "rope_freqs.weight has {n} entries, expected head_dim / 2 = {}",
            head_dim / 2
        ))));
    }
    let factor = divisors.iter().cloned().fold(f32::MIN, f32::max) as f64;
    let (low, high, orig) = (1.0f64, 4.0f64, 8192.0f64);
    let (low_wavelen, high_wavelen) = (orig / low, orig / high);
    for (i, &got) in divisors.iter().enumerate() {
        let freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
        let wavelen = 2.0 * std::f64::consts::PI / freq;
        let want = if wavelen < high_wavelen {
            1.0
        } else if wavelen > low_wavelen {
            factor
        } else {
            let smooth = (orig / wavelen - low) / (high - low);
            1.0 / ((1.0 - smooth) / factor + smooth)
        };
        if ((got as f64) - want).abs() > 1e-3 * want.abs().max(1.0) {
            return Err(file.err(GgufErrorKind::Other(format!(
                "rope_freqs.weight[{i}] = {got} does not match llama3 rope scaling \
                 (factor {factor}, low_freq_factor 1, high_freq_factor 4, original context 8192: expected {want})"
            ))));
        }
    }
    Ok(json!({
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": orig as u64,
    }))
}

// ---------------------------------------------------------------------------------------------
// tokenizer
// ---------------------------------------------------------------------------------------------

/// GGUF token types (`tokenizer.ggml.token_type`).
pub mod token_type {
    pub const NORMAL: i64 = 1;
    pub const UNKNOWN: i64 = 2;
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
    pub const UNUSED: i64 = 5;
    pub const BYTE: i64 = 6;
}

/// The pre-tokenizer split regex for a `tokenizer.ggml.pre` name, and whether digits are split
/// individually first. `None` for names this crate does not know.
pub fn bpe_pre_tokenizer_json(pre: &str) -> Option<Value> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    let digits = json!({"type": "Digits", "individual_digits": true});
    Some(match pre {
        "default" | "gpt-2" | "gpt2" | "olmo" | "jais" => byte_level(true),
        // These split every digit on its own before the GPT-2 regex.
        "smollm" | "starcoder" | "refact" | "codeshell" | "command-r" | "exaone" | "minerva-7b" => {
            json!({"type": "Sequence", "pretokenizers": [digits, byte_level(true)]})
        }
        "llama3" | "llama-bpe" | "llama-v3" | "falcon3" | "pixtral" | "dbrx" | "smaug-bpe" => {
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3), byte_level(false)]})
        }
        "qwen2" | "deepseek-r1-qwen" | "megrez" => {
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2), byte_level(false)]})
        }
        _ => return None,
    })
}

/// A metadata array whose every element `get` accepts; `None` when the key is absent.
fn typed_array<'a, T>(
    file: &'a GgufFile,
    key: &str,
    what: &str,
    get: impl Fn(&'a GgufValue) -> Option<T>,
) -> Result<Option<Vec<T>>, GgufError> {
    let Some(v) = file.get(key) else {
        return Ok(None);
    };
    let bad = || {
        file.err(GgufErrorKind::BadValue {
            key: key.into(),
            msg: format!("expected an array of {what}, found {}", v.type_name()),
        })
    };
    let arr = v.as_array().ok_or_else(bad)?;
    arr.iter()
        .map(|x| get(x).ok_or_else(bad))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn string_array<'a>(file: &'a GgufFile, key: &str) -> Result<Option<Vec<&'a str>>, GgufError> {
    typed_array(file, key, "strings", GgufValue::as_str)
}

fn number_array(file: &GgufFile, key: &str) -> Result<Option<Vec<f64>>, GgufError> {
    typed_array(file, key, "numbers", GgufValue::as_f64)
}

/// Byte-pair merges for a SentencePiece BPE vocabulary, as transformers derives them: every
/// split of a piece into two pieces that both exist is a merge, ranked by the merged piece's
/// score (higher first), ties by the merged piece's id, then by the ids of the two halves.
fn spm_merges(tokens: &[&str], scores: &[f64]) -> Vec<(String, String)> {
    let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, t) in tokens.iter().enumerate() {
        index.entry(t).or_insert(i);
    }
    let mut merges: Vec<(f64, usize, usize, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        for (split, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split);
            if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                merges.push((scores[id], id, li, ri));
            }
        }
    }
    merges.sort_by(|a, b| {
        b.0.partial_cmp(&a.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    merges
        .into_iter()
        .map(|(_, _, l, r)| (tokens[l].to_string(), tokens[r].to_string()))
        .collect()
}

/// A `tokenizer.json` document (the `tokenizers` crate's serialization) built from the
/// `tokenizer.ggml.*` metadata.
pub fn gguf_tokenizer_json(file: &GgufFile) -> Result<Value, GgufError> {
    let model = file
        .meta_str("tokenizer.ggml.model")?
        .ok_or_else(|| file.err(GgufErrorKind::MissingKey("tokenizer.ggml.model".into())))?
        .to_string();
    let tokens = string_array(file, "tokenizer.ggml.tokens")?
        .ok_or_else(|| file.err(GgufErrorKind::MissingKey("tokenizer.ggml.tokens".into())))?;
    let types = token_types(file, tokens.len())?;
    let bos = vocab_token_id(file, "tokenizer.ggml.bos_token_id", tokens.len())?;
    let add_bos = file
        .meta_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(model == "llama");
    let unk = vocab_token_id(file, "tokenizer.ggml.unknown_token_id", tokens.len())?;

    let common = TokenizerParts {
        vocab: vocab_json(&tokens),
        added_tokens: added_tokens_json(&tokens, &types, &model),
        post_processor: post_processor_json(&tokens, add_bos, bos),
    };
    match model.as_str() {
        "gpt2" => bpe_tokenizer_json(file, common),
        "llama" => spm_tokenizer_json(file, &tokens, unk, common),
        other => Err(file.err(GgufErrorKind::BadValue {
            key: "tokenizer.ggml.model".into(),
            msg: format!("unsupported tokenizer model `{other}` (supported: gpt2, llama)"),
        })),
    }
}

/// The parts of a `tokenizer.json` that do not depend on the tokenizer model.
struct TokenizerParts {
    vocab: serde_json::Map<String, Value>,
    added_tokens: Vec<Value>,
    post_processor: Value,
}

/// `tokenizer.ggml.token_type`, one per token; every token is normal when it is absent, and a
/// length mismatch is an error since types would be attached to the wrong tokens.
fn token_types(file: &GgufFile, n_tokens: usize) -> Result<Vec<i64>, GgufError> {
    match number_array(file, "tokenizer.ggml.token_type")? {
        Some(t) if t.len() == n_tokens => Ok(t.into_iter().map(|x| x as i64).collect()),
        Some(t) => Err(file.err(GgufErrorKind::BadValue {
            key: "tokenizer.ggml.token_type".into(),
            msg: format!("{} entries for {} tokens", t.len(), n_tokens),
        })),
        None => Ok(vec![token_type::NORMAL; n_tokens]),
    }
}

/// A token id stored under `key`, checked against the vocabulary size so that later indexing
/// into the token list cannot go out of bounds.
fn vocab_token_id(file: &GgufFile, key: &str, n_tokens: usize) -> Result<Option<u32>, GgufError> {
    match file.meta_u64(key)? {
        Some(id) if (id as usize) < n_tokens => Ok(Some(id as u32)),
        Some(id) => Err(file.err(GgufErrorKind::BadValue {
            key: key.into(),
            msg: format!("token id {id} is outside the vocabulary of {}", n_tokens),
        })),
        None => Ok(None),
    }
}

/// The model's `vocab` object: token string → id.
fn vocab_json(tokens: &[&str]) -> serde_json::Map<String, Value> {
    let mut vocab = serde_json::Map::new();
    for (i, t) in tokens.iter().enumerate() {
        // Duplicate strings (rare, e.g. unused slots) keep their first id.
        vocab.entry(t.to_string()).or_insert(json!(i));
    }
    vocab
}

/// `added_tokens`: control, user-defined and unknown tokens, which the `tokenizers` crate must
/// match whole instead of splitting them.
fn added_tokens_json(tokens: &[&str], types: &[i64], model: &str) -> Vec<Value> {
    tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, ty))| {
            matches!(
                **ty,
                token_type::CONTROL | token_type::USER_DEFINED | token_type::UNKNOWN
            )
        })
        .map(|(i, (t, ty))| {
            json!({
                "id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": *ty == token_type::USER_DEFINED && model == "llama",
                "special": *ty != token_type::USER_DEFINED,
            })
        })
        .collect()
}

/// The `post_processor`: a template that prepends BOS when the file asks for it, so encoding
/// matches what llama.cpp feeds the model.
fn post_processor_json(tokens: &[&str], add_bos: bool, bos: Option<u32>) -> Value {
    match (add_bos, bos) {
        (true, Some(b)) => {
            let bt = tokens[b as usize];
            json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bt, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bt, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bt, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": { bt: {"id": bt, "ids": [b], "tokens": [bt]} }
            })
        }
        _ => json!({
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {}
        }),
    }
}

/// The document for a `gpt2` (byte-level BPE) model: pre-tokenizer from `tokenizer.ggml.pre`,
/// merges as stored in the file.
fn bpe_tokenizer_json(file: &GgufFile, common: TokenizerParts) -> Result<Value, GgufError> {
    let pre = file.meta_str("tokenizer.ggml.pre")?.unwrap_or("default");
    let pre_tokenizer = bpe_pre_tokenizer_json(pre).ok_or_else(|| {
        file.err(GgufErrorKind::BadValue {
            key: "tokenizer.ggml.pre".into(),
            msg: format!(
                "unsupported pre-tokenizer `{pre}` (supported: default, gpt-2, smollm, starcoder, refact, codeshell, command-r, llama3/llama-bpe, qwen2, ...)"
            ),
        })
    })?;
    let merges = bpe_merges(file)?;
    let TokenizerParts {
        vocab,
        added_tokens,
        post_processor,
    } = common;
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        }
    }))
}

/// `tokenizer.ggml.merges` ("a b" strings) as `[a, b]` pairs; a BPE model cannot do without them.
fn bpe_merges(file: &GgufFile) -> Result<Vec<Value>, GgufError> {
    let merges_raw = string_array(file, "tokenizer.ggml.merges")?
        .ok_or_else(|| file.err(GgufErrorKind::MissingKey("tokenizer.ggml.merges".into())))?;
    let mut merges = Vec::with_capacity(merges_raw.len());
    for m in merges_raw {
        let Some((a, b)) = m.split_once(' ') else {
            return Err(file.err(GgufErrorKind::BadValue {
                key: "tokenizer.ggml.merges".into(),
                msg: format!("merge `{m}` is not two tokens separated by a space"),
            }));
        };
        merges.push(json!([a, b]));
    }
    Ok(merges)
}

/// The document for a `llama` (SentencePiece BPE) model: merges derived from the scores,
/// `▁` for spaces, byte fallback.
fn spm_tokenizer_json(
    file: &GgufFile,
    tokens: &[&str],
    unk: Option<u32>,
    common: TokenizerParts,
) -> Result<Value, GgufError> {
    let scores = spm_scores(file, tokens.len())?;
    let merges: Vec<Value> = spm_merges(tokens, &scores)
        .into_iter()
        .map(|(a, b)| json!([a, b]))
        .collect();
    let add_space = file
        .meta_bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true);
    let (normalizers, decoders) = spm_normalizers_decoders(add_space);
    let TokenizerParts {
        vocab,
        added_tokens,
        post_processor,
    } = common;
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": post_processor,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": null,
            "unk_token": unk.map(|u| tokens[u as usize]),
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        }
    }))
}

/// `tokenizer.ggml.scores`, one per token; when absent, earlier tokens rank higher, which
/// orders the derived merges by id.
fn spm_scores(file: &GgufFile, n_tokens: usize) -> Result<Vec<f64>, GgufError> {
    match number_array(file, "tokenizer.ggml.scores")? {
        Some(s) if s.len() == n_tokens => Ok(s),
        Some(s) => Err(file.err(GgufErrorKind::BadValue {
            key: "tokenizer.ggml.scores".into(),
            msg: format!("{} scores for {} tokens", s.len(), n_tokens),
        })),
        None => Ok((0..n_tokens).map(|i| -(i as f64)).collect()),
    }
}

/// SentencePiece's space handling as normalizers and decoders: spaces become `▁` (with a
/// leading one when `add_space`), and decoding undoes both.
fn spm_normalizers_decoders(add_space: bool) -> (Vec<Value>, Vec<Value>) {
    let mut normalizers = Vec::new();
    if add_space {
        normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    (normalizers, decoders)
}

/// The special tokens (`bos`/`eos`/`pad`/`unk` strings, add_bos) of a GGUF file.
pub fn gguf_special_tokens(file: &GgufFile) -> Result<SpecialTokens, GgufError> {
    let tokens = string_array(file, "tokenizer.ggml.tokens")?
        .ok_or_else(|| file.err(GgufErrorKind::MissingKey("tokenizer.ggml.tokens".into())))?;
    let tok = |key: &str| -> Result<Option<String>, GgufError> {
        Ok(file
            .meta_u64(key)?
            .and_then(|id| tokens.get(id as usize))
            .map(|s| s.to_string()))
    };
    let model = file.meta_str("tokenizer.ggml.model")?.unwrap_or("gpt2");
    let eos_ids: Vec<u32> = file
        .meta_u64("tokenizer.ggml.eos_token_id")?
        .into_iter()
        .chain(file.meta_u64("tokenizer.ggml.eot_token_id")?)
        .filter(|&id| (id as usize) < tokens.len())
        .map(|id| id as u32)
        .collect();
    Ok(SpecialTokens {
        bos_token: tok("tokenizer.ggml.bos_token_id")?,
        eos_token: tok("tokenizer.ggml.eos_token_id")?,
        pad_token: tok("tokenizer.ggml.padding_token_id")?,
        unk_token: tok("tokenizer.ggml.unknown_token_id")?,
        add_bos_token: file
            .meta_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(model == "llama"),
        add_eos_token: file
            .meta_bool("tokenizer.ggml.add_eos_token")?
            .unwrap_or(false),
        extra_eos_token_ids: eos_ids,
        clean_up_tokenization_spaces: false,
    })
}

/// The tokenizer (with chat template and special tokens) stored in a GGUF file.
pub fn gguf_tokenizer(file: &GgufFile) -> anyhow::Result<Tokenizer> {
    let doc = gguf_tokenizer_json(file)?;
    let inner = tokenizers::Tokenizer::from_bytes(doc.to_string().as_bytes()).map_err(|e| {
        file.err(GgufErrorKind::Other(format!(
            "cannot build a tokenizer from tokenizer.ggml.*: {e}"
        )))
    })?;
    let template = file
        .meta_str("tokenizer.chat_template")?
        .map(|s| s.to_string());
    let special = gguf_special_tokens(file)?;
    let origin = format!("{} (tokenizer.chat_template)", file.path.display());
    Tokenizer::from_parts(
        inner,
        template,
        &origin,
        special,
        &file.path.display().to_string(),
    )
}

/// Everything needed to run a GGUF model with this crate.
#[derive(Debug)]
pub struct GgufModel {
    /// HF-style `config.json` contents.
    pub config: Value,
    /// Dequantized f32 weights under HF names and shapes.
    pub weights: RawWeights,
    pub tokenizer: Tokenizer,
    /// `general.architecture` (`llama` or `qwen2`).
    pub architecture: String,
}

/// Loads a GGUF model: config, dequantized weights and tokenizer.
pub fn load_gguf(path: impl AsRef<Path>) -> anyhow::Result<GgufModel> {
    let file = GgufFile::open(path.as_ref())?;
    let architecture = check_arch(&file)?;
    let config = gguf_config(&file)?;
    let tokenizer = gguf_tokenizer(&file)?;
    let weights = gguf_weights(&file)?;
    Ok(GgufModel {
        config,
        weights,
        tokenizer,
        architecture,
    })
}

/// The tokenizer of a GGUF file, reading only its header.
pub fn load_gguf_tokenizer(path: impl AsRef<Path>) -> anyhow::Result<Tokenizer> {
    let file = GgufFile::open_metadata(path)?;
    gguf_tokenizer(&file)
}

/// The HF-style config of a GGUF file, reading only its header (and, for llama3 rope scaling,
/// failing clearly: that needs the `rope_freqs` tensor, so use [`load_gguf`] then).
pub fn load_gguf_config(path: impl AsRef<Path>) -> anyhow::Result<Value> {
    let file = GgufFile::open_metadata(path)?;
    Ok(gguf_config(&file)?)
}
