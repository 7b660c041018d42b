//! Weights by Hugging Face name, the common currency between file formats (safetensors, GGUF)
//! and the burn model. [`TensorSource`] hands them out one tensor at a time, so building a model
//! on a device never holds the whole model on the host; [`RawWeights`] is the all-in-memory
//! f32 form that fusing and converting need.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use burn::tensor::TensorData;

/// One tensor on the host, row-major, already dequantized to f32.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Tensors keyed by their Hugging Face name (`model.layers.0.self_attn.q_proj.weight`, ...).
pub type RawWeights = BTreeMap<String, RawTensor>;

/// A model's tensors under HF names and shapes, read (or dequantized) only when asked for.
pub trait TensorSource: Send + Sync {
    /// Every tensor name, sorted.
    fn names(&self) -> Vec<String>;
    /// The HF shape of `name`, if the source has it.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// The values of `name` in the float type they are stored in (f32, f16 or bf16).
    fn data(&self, name: &str) -> Result<TensorData>;
    /// `name` in mlx's affine quantized layout, when the source stores it in a form that maps
    /// onto it exactly (GGUF Q4_0, Q4_1, Q8_0, Q4_K); `None` for everything else.
    fn affine(&self, _name: &str) -> Result<Option<AffineTensor>> {
        Ok(None)
    }
}

/// A `[rows, cols]` weight in mlx's affine layout: groups of `group_size` values along a row
/// share a scale and a bias (`w = scale · q + bias`), and the `bits`-bit codes are packed into
/// u32 words, lowest bits first, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct AffineTensor {
    pub bits: usize,
    pub group_size: usize,
    pub shape: [usize; 2],
    pub words: Vec<u32>,
    pub scales: Vec<f32>,
    pub biases: Vec<f32>,
}

impl TensorSource for RawWeights {
    fn names(&self) -> Vec<String> {
        self.keys().cloned().collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.get(name).map(|t| t.shape.clone())
    }

    fn data(&self, name: &str) -> Result<TensorData> {
        let t = self
            .get(name)
            .with_context(|| format!("missing tensor `{name}`"))?;
        Ok(TensorData::new(t.data.clone(), t.shape.clone()))
    }
}

/// Every tensor of `source` as f32 host arrays (for fusing and converting, which rewrite them).
pub fn to_raw(source: &dyn TensorSource) -> Result<RawWeights> {
    let mut out = RawWeights::new();
    for name in source.names() {
        let data = source.data(&name)?;
        let shape = data.shape().as_slice().to_vec();
        let data = data
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("tensor `{name}`: {e:?}"))?;
        out.insert(name, RawTensor { shape, data });
    }
    Ok(out)
}
