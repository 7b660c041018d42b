//! Model hyperparameters read from a Hugging Face `config.json`.
//!
//! One struct covers the llama family (llama, mistral, qwen2): they differ only in a few switches
//! (biases, rope scaling, tied embeddings), so the model code reads those switches instead of
//! branching on the architecture name.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::model::quant::QuantSpec;

/// The `model_type` values this crate can run.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

/// Frequency rescaling of RoPE for long-context checkpoints.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.x: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v projections (qwen2 always; llama/mistral when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (llama/mistral `attention_bias`; never on qwen2).
    pub o_bias: bool,
    /// Biases on gate/up/down (llama `mlp_bias`).
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    /// All end-of-sequence ids (`eos_token_id` may be a number or a list).
    pub eos_token_ids: Vec<u32>,
    pub max_position_embeddings: usize,
    /// Mistral's sliding attention window, when the config enables one.
    pub sliding_window: Option<usize>,
    /// mlx's `quantization: {group_size, bits}`: the checkpoint's quantized layers (those with
    /// `scales`) use it.
    pub quantization: Option<QuantSpec>,
}

/// mlx's `quantization` (or `quantization_config`) entry, affine mode only.
fn parse_quantization(v: &Value, source: &str) -> Result<Option<QuantSpec>> {
    let Some(q) = v
        .get("quantization")
        .or_else(|| v.get("quantization_config"))
    else {
        return Ok(None);
    };
    if let Some(method) = q.get("quant_method").and_then(Value::as_str) {
        bail!(
            "{source}: `{method}` quantization is not supported; tuna reads mlx's affine format (mlx-community checkpoints) and GGUF"
        );
    }
    if let Some(mode) = q.get("mode").and_then(Value::as_str)
        && mode != "affine"
    {
        bail!("{source}: quantization mode `{mode}` is not supported (only mlx's `affine`)");
    }
    let (Some(bits), Some(group_size)) = (opt_usize(q, "bits"), opt_usize(q, "group_size")) else {
        // Other tools' `quantization_config` (bitsandbytes, GPTQ) has other keys.
        bail!(
            "{source}: `quantization` needs `bits` and `group_size` (mlx's format); other quantized formats are not supported"
        );
    };
    Ok(Some(QuantSpec { bits, group_size }))
}

fn get_usize(v: &Value, key: &str, source: &str) -> Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .with_context(|| format!("{source}: missing or non-integer `{key}`"))
}

fn opt_usize(v: &Value, key: &str) -> Option<usize> {
    v.get(key).and_then(Value::as_u64).map(|x| x as usize)
}

fn opt_f64(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn opt_bool(v: &Value, key: &str) -> Option<bool> {
    v.get(key).and_then(Value::as_bool)
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

fn parse_rope_scaling(v: &Value, source: &str) -> Result<Option<RopeScaling>> {
    // transformers >= 5 folds scaling into `rope_parameters`; older files use `rope_scaling`.
    let params = match v.get("rope_scaling").filter(|x| !x.is_null()) {
        Some(p) => p,
        None => match v.get("rope_parameters").filter(|x| !x.is_null()) {
            Some(p) => p,
            None => return Ok(None),
        },
    };
    let kind = params
        .get("rope_type")
        .or_else(|| params.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let factor = || {
        opt_f64(params, "factor")
            .with_context(|| format!("{source}: rope scaling `{kind}` needs `factor`"))
    };
    Ok(match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear { factor: factor()? }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: opt_f64(params, "low_freq_factor").unwrap_or(1.0),
            high_freq_factor: opt_f64(params, "high_freq_factor").unwrap_or(4.0),
            original_max_position_embeddings: opt_f64(params, "original_max_position_embeddings")
                .unwrap_or(8192.0),
        }),
        other => bail!(
            "{source}: unsupported rope scaling type `{other}` (supported: default, linear, llama3)"
        ),
    })
}

impl ModelConfig {
    /// Reads and parses a `config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading model config {}", path.display()))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("parsing model config {}", path.display()))?;
        Self::from_json(&value, &path.display().to_string())
    }

    /// Parses an already-loaded config; `source` names it in errors (a path or "GGUF metadata").
    pub fn from_json(v: &Value, source: &str) -> Result<Self> {
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .with_context(|| format!("{source}: missing `model_type`"))?;
        let architecture = match model_type {
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            other => bail!(
                "{source}: unsupported model_type `{other}`; supported: {}",
                SUPPORTED_MODEL_TYPES.join(", ")
            ),
        };
        let hidden_size = get_usize(v, "hidden_size", source)?;
        let num_attention_heads = get_usize(v, "num_attention_heads", source)?;
        let num_key_value_heads =
            opt_usize(v, "num_key_value_heads").unwrap_or(num_attention_heads);
        if num_attention_heads == 0 || num_attention_heads % num_key_value_heads.max(1) != 0 {
            bail!(
                "{source}: num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})"
            );
        }
        let head_dim = opt_usize(v, "head_dim").unwrap_or(hidden_size / num_attention_heads);
        let rope_theta = opt_f64(v, "rope_theta")
            .or_else(|| {
                v.get("rope_parameters")
                    .and_then(|p| opt_f64(p, "rope_theta"))
            })
            .unwrap_or(10000.0);
        let attention_bias = opt_bool(v, "attention_bias").unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };
        let sliding_window = match architecture {
            Architecture::Mistral => opt_usize(v, "sliding_window"),
            Architecture::Qwen2 if opt_bool(v, "use_sliding_window").unwrap_or(false) => {
                opt_usize(v, "sliding_window")
            }
            _ => None,
        };
        let vocab_size = get_usize(v, "vocab_size", source)?;
        Ok(Self {
            architecture,
            model_type: model_type.to_string(),
            hidden_size,
            intermediate_size: get_usize(v, "intermediate_size", source)?,
            num_hidden_layers: get_usize(v, "num_hidden_layers", source)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: opt_f64(v, "rms_norm_eps").unwrap_or(1e-6),
            rope_theta,
            rope_scaling: parse_rope_scaling(v, source)?,
            vocab_size,
            tie_word_embeddings: opt_bool(v, "tie_word_embeddings").unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: opt_bool(v, "mlp_bias").unwrap_or(false),
            bos_token_id: token_ids(v.get("bos_token_id")).first().copied(),
            eos_token_ids: token_ids(v.get("eos_token_id")),
            max_position_embeddings: opt_usize(v, "max_position_embeddings").unwrap_or(4096),
            sliding_window,
            quantization: parse_quantization(v, source)?,
        })
    }

    /// RoPE inverse frequencies (`head_dim / 2` of them), rescaled as the config asks.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        let base: Vec<f64> = (0..self.head_dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d))
            .collect();
        match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            }) => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_model_type_names_file_and_supported() {
        let v = serde_json::json!({"model_type": "gpt2"});
        let err = ModelConfig::from_json(&v, "x/config.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("x/config.json") && err.contains("gpt2") && err.contains("qwen2"));
    }

    #[test]
    fn parses_llama3_scaling_and_defaults() {
        let v = serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100,
            "rope_theta": 500000.0, "eos_token_id": [1, 2],
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        });
        let c = ModelConfig::from_json(&v, "c").unwrap();
        assert_eq!(c.num_key_value_heads, 4);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { .. })));
        let f = c.rope_inv_freq();
        assert_eq!(f.len(), 8);
        assert_eq!(f[0], 1.0);
    }
}
