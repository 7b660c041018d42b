//! Weights as plain host arrays, the common currency between file formats (safetensors, GGUF)
//! and the burn model: every loader produces these, HF-named, and the model consumes them.

use std::collections::BTreeMap;

/// One tensor on the host, row-major, already dequantized to f32.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Tensors keyed by their Hugging Face name (`model.layers.0.self_attn.q_proj.weight`, ...).
pub type RawWeights = BTreeMap<String, RawTensor>;
