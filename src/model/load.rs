//! Safetensors checkpoints -> [`RawWeights`] -> [`Llama`] on a device.
//!
//! `build_model` only sees HF-named f32 host arrays, so safetensors and GGUF (`model::gguf`)
//! share it; the float dtype is the caller's choice per device (see `model::device`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use burn::tensor::{DType, Device, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use crate::model::config::ModelConfig;
use crate::model::llama::{Attention, DecoderLayer, Linear, Llama, Mlp, RmsNorm};
use crate::model::weights::{RawTensor, RawWeights};

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
pub fn read_safetensors_file(path: &Path) -> Result<RawWeights> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("parsing safetensors {}", path.display()))?;
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
    Ok(out)
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
pub fn load_safetensors_dir(dir: &Path) -> Result<RawWeights> {
    let mut all = RawWeights::new();
    for file in checkpoint_files(dir)? {
        all.extend(read_safetensors_file(&file)?);
    }
    Ok(all)
}

struct Builder<'a> {
    weights: &'a RawWeights,
    device: &'a Device,
    dtype: DType,
}

impl Builder<'_> {
    fn raw(&self, name: &str, shape: &[usize]) -> Result<&RawTensor> {
        let t = self
            .weights
            .get(name)
            .with_context(|| format!("missing tensor `{name}`"))?;
        if t.shape != shape {
            bail!(
                "tensor `{name}` has shape {:?}, expected {:?}",
                t.shape,
                shape
            );
        }
        Ok(t)
    }

    fn t1(&self, name: &str, n: usize) -> Result<Tensor<1>> {
        let t = self.raw(name, &[n])?;
        Ok(Tensor::from_data(
            TensorData::new(t.data.clone(), [n]),
            (self.device, self.dtype),
        ))
    }

    fn t2(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor<2>> {
        let t = self.raw(name, &[rows, cols])?;
        Ok(Tensor::from_data(
            TensorData::new(t.data.clone(), [rows, cols]),
            (self.device, self.dtype),
        ))
    }

    fn linear(&self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let weight = self.t2(&format!("{prefix}.weight"), out, inp)?;
        let bias = if bias {
            Some(self.t1(&format!("{prefix}.bias"), out)?)
        } else {
            None
        };
        Ok(Linear::new(weight, bias))
    }

    fn norm(&self, name: &str, n: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: self.t1(name, n)?,
            eps,
        })
    }
}

/// Builds the model from HF-named weights onto `device` (non-autodiff) in float `dtype`.
pub fn build_model(
    config: &ModelConfig,
    weights: &RawWeights,
    device: &Device,
    dtype: DType,
) -> Result<Llama> {
    let device = device.clone().without_autodiff();
    let b = Builder {
        weights,
        device: &device,
        dtype,
    };
    let c = config;
    let (d, hd) = (c.hidden_size, c.head_dim);
    let (h, kvh) = (c.num_attention_heads, c.num_key_value_heads);
    let embed_tokens = b.t2("model.embed_tokens.weight", c.vocab_size, d)?;
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        layers.push(DecoderLayer {
            input_layernorm: b.norm(&format!("{p}.input_layernorm.weight"), d, c.rms_norm_eps)?,
            self_attn: Attention {
                q_proj: b.linear(&format!("{p}.self_attn.q_proj"), h * hd, d, c.qkv_bias)?,
                k_proj: b.linear(&format!("{p}.self_attn.k_proj"), kvh * hd, d, c.qkv_bias)?,
                v_proj: b.linear(&format!("{p}.self_attn.v_proj"), kvh * hd, d, c.qkv_bias)?,
                o_proj: b.linear(&format!("{p}.self_attn.o_proj"), d, h * hd, c.o_bias)?,
                num_heads: h,
                num_kv_heads: kvh,
                head_dim: hd,
            },
            post_attention_layernorm: b.norm(
                &format!("{p}.post_attention_layernorm.weight"),
                d,
                c.rms_norm_eps,
            )?,
            mlp: Mlp {
                gate_proj: b.linear(
                    &format!("{p}.mlp.gate_proj"),
                    c.intermediate_size,
                    d,
                    c.mlp_bias,
                )?,
                up_proj: b.linear(
                    &format!("{p}.mlp.up_proj"),
                    c.intermediate_size,
                    d,
                    c.mlp_bias,
                )?,
                down_proj: b.linear(
                    &format!("{p}.mlp.down_proj"),
                    d,
                    c.intermediate_size,
                    c.mlp_bias,
                )?,
            },
        });
    }
    let norm = b.norm("model.norm.weight", d, c.rms_norm_eps)?;
    let lm_head = if c.tie_word_embeddings {
        None
    } else {
        Some(b.linear("lm_head", c.vocab_size, d, false)?)
    };
    Ok(Llama::from_parts(
        config.clone(),
        embed_tokens,
        layers,
        norm,
        lm_head,
        dtype,
        device,
    ))
}

/// Loads `config.json` and the safetensors weights of an HF checkpoint directory.
pub fn load_model(dir: &Path, device: &Device, dtype: DType) -> Result<Llama> {
    let config = ModelConfig::from_file(dir.join("config.json"))?;
    let weights = load_safetensors_dir(dir)?;
    let files: Vec<String> = checkpoint_files(dir)?
        .iter()
        .map(|f| f.display().to_string())
        .collect();
    // One message naming both the tensor and the file(s), whatever way the error is printed.
    build_model(&config, &weights, device, dtype)
        .map_err(|e| anyhow!("{e:#} in {}", files.join(", ")))
}
