//! Safetensors files: reading any float dtype into [`RawWeights`], sharded checkpoints, and
//! writing f32 files that transformers and PEFT read.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use burn::tensor::{DType, TensorData};

use super::weights::{RawTensor, RawWeights, TensorSource};

/// Decodes one safetensors tensor to f32 (F32, F16, BF16, F64 accepted).
pub fn tensor_to_f32(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        other => bail!("tensor `{name}` has unsupported dtype {other:?} (expected F32/F16/BF16)"),
    })
}

/// Reads every tensor of one `.safetensors` file.
pub fn read_file(path: &Path) -> Result<RawWeights> {
    Ok(read_file_with_metadata(path)?.0)
}

/// [`read_file`], with the file's `__metadata__` entries.
pub fn read_file_with_metadata(path: &Path) -> Result<(RawWeights, HashMap<String, String>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let mut out = RawWeights::new();
    for (name, view) in st.iter() {
        let data = tensor_to_f32(name, view.dtype(), view.data())
            .with_context(|| format!("in {}", path.display()))?;
        out.insert(
            name.to_string(),
            RawTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok((out, meta))
}

/// The weight files of a checkpoint directory: the shards of `model.safetensors.index.json`
/// if present, else `model.safetensors`.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("reading {}", index.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: no `weight_map` object", index.display()))?;
        let shards: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
        return Ok(shards.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    bail!(
        "no model.safetensors or model.safetensors.index.json in {}",
        dir.display()
    )
}

/// Reads all weights of a checkpoint directory (single file or sharded).
pub fn read_dir(dir: &Path) -> Result<RawWeights> {
    let mut all = RawWeights::new();
    for file in checkpoint_files(dir)? {
        all.extend(read_file(&file)?);
    }
    Ok(all)
}

/// The in-memory bytes of an f32 slice (little-endian on little-endian hosts).
fn f32_native_bytes(data: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and every byte pattern is a valid u8; the length covers exactly
    // the slice's memory, and u8 has alignment 1.
    unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, size_of_val(data)) }
}

/// Writes `weights` as an f32 safetensors file with `{"format": "pt"}` metadata (transformers
/// expects it) plus `extra` metadata entries.
pub fn write_f32(weights: &RawWeights, extra: &[(&str, String)], path: &Path) -> Result<()> {
    // Safetensors is little-endian: big-endian hosts need byte-swapped copies.
    let swapped: Vec<Vec<u8>> = if cfg!(target_endian = "big") {
        weights
            .values()
            .map(|t| t.data.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect()
    } else {
        Vec::new()
    };
    let mut views = Vec::with_capacity(weights.len());
    for (i, (name, t)) in weights.iter().enumerate() {
        let bytes: &[u8] = match swapped.get(i) {
            Some(b) => b,
            None => f32_native_bytes(&t.data),
        };
        let view = TensorView::new(Dtype::F32, t.shape.clone(), bytes)
            .map_err(|e| anyhow!("{}: tensor `{name}`: {e}", path.display()))?;
        views.push((name.as_str(), view));
    }
    let mut meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    meta.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    safetensors::tensor::serialize_to_file(views, Some(meta), path)
        .map_err(|e| anyhow!("{}: cannot write safetensors: {e}", path.display()))
}

/// The float types a model can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatType {
    F32,
    F16,
    BF16,
}

impl FloatType {
    /// transformers' name (`torch_dtype` / `dtype` in config.json).
    pub fn torch_name(self) -> &'static str {
        match self {
            FloatType::F32 => "float32",
            FloatType::F16 => "float16",
            FloatType::BF16 => "bfloat16",
        }
    }

    /// The type a config.json declares, if it names a float type.
    pub fn from_torch_name(name: &str) -> Option<Self> {
        match name {
            "float32" => Some(FloatType::F32),
            "float16" => Some(FloatType::F16),
            "bfloat16" => Some(FloatType::BF16),
            _ => None,
        }
    }
}

/// Writes `weights` in `ty` (rounded to nearest from f32), with transformers' `format: pt`.
pub fn write_as(weights: &RawWeights, ty: FloatType, path: &Path) -> Result<()> {
    if ty == FloatType::F32 {
        return write_f32(weights, &[], path);
    }
    let bufs: Vec<Vec<u8>> = weights
        .values()
        .map(|t| match ty {
            FloatType::F16 => t
                .data
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
            _ => t
                .data
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
        })
        .collect();
    let dtype = if ty == FloatType::F16 {
        Dtype::F16
    } else {
        Dtype::BF16
    };
    let mut views = Vec::with_capacity(weights.len());
    for ((name, t), bytes) in weights.iter().zip(&bufs) {
        let view = TensorView::new(dtype, t.shape.clone(), bytes)
            .map_err(|e| anyhow!("{}: tensor `{name}`: {e}", path.display()))?;
        views.push((name.as_str(), view));
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize_to_file(views, Some(meta), path)
        .map_err(|e| anyhow!("{}: cannot write safetensors: {e}", path.display()))
}

/// A checkpoint's safetensors files, memory-mapped: tensors are read from the page cache one at
/// a time, in their stored dtype, and nothing stays on the heap once a tensor is uploaded.
pub struct Mapped {
    files: Vec<MappedFile>,
    /// Tensor name -> index into `files`.
    index: HashMap<String, usize>,
}

struct MappedFile {
    path: PathBuf,
    map: memmap2::Mmap,
    /// Where the data section starts (after the 8-byte length and the JSON header).
    data_start: usize,
    header: safetensors::tensor::Metadata,
}

/// Maps the weight files of a checkpoint folder (single file or shards).
pub fn map_dir(dir: &Path) -> Result<Mapped> {
    let mut files = Vec::new();
    let mut index = HashMap::new();
    for path in checkpoint_files(dir)? {
        let file = std::fs::File::open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the map is read-only; like every reader of model files (transformers, mlx),
        // this assumes nobody rewrites the checkpoint while it is being loaded.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        let (n, header) = SafeTensors::read_metadata(&map)
            .with_context(|| format!("{}: not a safetensors file", path.display()))?;
        for name in header.tensors().keys() {
            index.insert(name.clone(), files.len());
        }
        files.push(MappedFile {
            path,
            map,
            data_start: 8 + n,
            header,
        });
    }
    Ok(Mapped { files, index })
}

impl Mapped {
    fn info(&self, name: &str) -> Option<(&MappedFile, &safetensors::tensor::TensorInfo)> {
        let f = &self.files[*self.index.get(name)?];
        f.header.info(name).map(|i| (f, i))
    }
}

impl TensorSource for Mapped {
    fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self.index.keys().cloned().collect();
        n.sort();
        n
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.info(name).map(|(_, i)| i.shape.clone())
    }

    fn data(&self, name: &str) -> Result<TensorData> {
        let (f, info) = self
            .info(name)
            .with_context(|| format!("missing tensor `{name}`"))?;
        let (start, end) = info.data_offsets;
        let bytes = f
            .map
            .get(f.data_start + start..f.data_start + end)
            .with_context(|| {
                format!(
                    "{}: tensor `{name}` lies outside the file",
                    f.path.display()
                )
            })?;
        let dtype = match info.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            // Packed quantized weights (mlx's format).
            Dtype::U32 => DType::U32,
            other => bail!(
                "{}: tensor `{name}` has dtype {other:?}; tuna reads F32, F16, BF16 and packed U32",
                f.path.display()
            ),
        };
        Ok(TensorData::from_bytes_vec(
            bytes.to_vec(),
            info.shape.clone(),
            dtype,
        ))
    }
}
