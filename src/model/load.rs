//! HF-named weights ([`TensorSource`]) -> [`Llama`] on a device.
//!
//! `build_model` reads one tensor at a time from whatever source (mapped safetensors, GGUF
//! dequantized per tensor, host arrays) and uploads it in the model's dtype, the caller's choice
//! per device (see `model::device`).

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::formats::safetensors;
use crate::formats::weights::TensorSource;
use crate::model::config::ModelConfig;
use crate::model::llama::{Attention, DecoderLayer, Linear, Llama, Mlp, RmsNorm};
use crate::model::quant::{QuantSpec, QuantWeight};

struct Builder<'a> {
    weights: &'a dyn TensorSource,
    device: &'a Device,
    dtype: DType,
    quantization: Option<QuantSpec>,
    /// Quantize dense linear layers at load (QLoRA on a full-precision base).
    quantize: Option<QuantSpec>,
}

impl Builder<'_> {
    /// Reads one tensor, checks its shape and uploads it in the model's dtype; the host copy
    /// is dropped as soon as it is on the device.
    fn tensor<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<D>> {
        let data = self.host(name, &shape)?;
        Ok(Tensor::from_data(data, (self.device, self.dtype)))
    }

    /// One tensor's host data, after checking it has `shape`.
    fn host(&self, name: &str, shape: &[usize]) -> Result<TensorData> {
        let found = self
            .weights
            .shape(name)
            .with_context(|| format!("missing tensor `{name}`"))?;
        if found != shape {
            bail!("tensor `{name}` has shape {found:?}, expected {shape:?}");
        }
        self.weights.data(name)
    }

    fn t1(&self, name: &str, n: usize) -> Result<Tensor<1>> {
        self.tensor(name, [n])
    }

    fn t2(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor<2>> {
        self.tensor(name, [rows, cols])
    }

    /// A quantized `[out, inp]` weight at `prefix` (`weight` as packed u32 words, `scales`,
    /// `biases`), or `None` when the checkpoint stores it dense.
    fn quantized(&self, prefix: &str, out: usize, inp: usize) -> Result<Option<QuantWeight>> {
        // A GGUF block type that is affine groups of 32 stays quantized as it is.
        if let Some(t) = self.weights.affine(&format!("{prefix}.weight"))? {
            if t.shape != [out, inp] {
                bail!(
                    "tensor `{prefix}.weight` has shape {:?}, expected {:?}",
                    t.shape,
                    [out, inp]
                );
            }
            let groups = [out, inp / t.group_size];
            let spec = QuantSpec {
                bits: t.bits,
                group_size: t.group_size,
            };
            return QuantWeight::new(
                &t.words,
                TensorData::new(t.scales, groups),
                TensorData::new(t.biases, groups),
                [out, inp],
                spec,
                self.device,
            )
            .with_context(|| format!("quantized weight `{prefix}`"))
            .map(Some);
        }
        if self.weights.shape(&format!("{prefix}.scales")).is_none() {
            return Ok(None);
        }
        let spec = self.quantization.with_context(|| {
            format!("`{prefix}` is quantized (it has scales) but config.json has no `quantization`")
        })?;
        spec.check([out, inp])
            .with_context(|| format!("quantized weight `{prefix}`"))?;
        let name = format!("{prefix}.weight");
        let words: Vec<u32> = self
            .host(&name, &[out, inp * spec.bits / 32])
            .with_context(|| format!("packed {}-bit words", spec.bits))?
            .try_to_vec::<u32>()
            .map_err(|e| anyhow!("tensor `{name}` is not packed u32 words: {e:?}"))?;
        let scales = self.weights.data(&format!("{prefix}.scales"))?;
        let biases = self.weights.data(&format!("{prefix}.biases"))?;
        // mlx checkpoints: scales and biases in the model's float type, as mlx holds them.
        QuantWeight::new(&words, scales, biases, [out, inp], spec, self.device)
            .with_context(|| format!("quantized weight `{prefix}`"))
            .map(|q| Some(q.scales_as(self.dtype)))
    }

    /// A `[rows, cols]` matrix that may be stored quantized, dense in the model's dtype.
    fn matrix(&self, prefix: &str, rows: usize, cols: usize) -> Result<Tensor<2>> {
        match self.quantized(prefix, rows, cols)? {
            Some(q) => Ok(q.dequantize(self.dtype)),
            None => self.t2(&format!("{prefix}.weight"), rows, cols),
        }
    }

    fn linear(&self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let mut lin = match (self.quantized(prefix, out, inp)?, self.quantize) {
            (Some(q), _) => Linear::quantized(q),
            (None, Some(spec)) if spec.check([out, inp]).is_ok() => {
                // Quantized from the stored values on the host, one layer at a time.
                let name = format!("{prefix}.weight");
                let host: Vec<f32> = self
                    .host(&name, &[out, inp])?
                    .convert::<f32>()
                    .try_to_vec::<f32>()
                    .map_err(|e| anyhow!("tensor `{name}`: {e:?}"))?;
                Linear::quantized(
                    QuantWeight::from_dense(&host, [out, inp], spec, self.device)?
                        .scales_as(self.dtype),
                )
            }
            (None, _) => Linear::new(self.t2(&format!("{prefix}.weight"), out, inp)?, None),
        };
        if bias {
            lin.bias = Some(self.t1(&format!("{prefix}.bias"), out)?);
        }
        Ok(lin)
    }

    fn norm(&self, name: &str, n: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: self.t1(name, n)?,
            eps,
        })
    }
}

/// Builds the model from HF-named weights onto `device` (non-autodiff) in float `dtype`, one
/// tensor at a time.
pub fn build_model(
    config: &ModelConfig,
    weights: &dyn TensorSource,
    device: &Device,
    dtype: DType,
) -> Result<Llama> {
    build_model_quantized(config, weights, device, dtype, None)
}

/// [`build_model`], quantizing every dense decoder linear layer and the LM head to `quantize`
/// as it is loaded (layers whose input size the group size does not divide stay dense, as in
/// mlx-lm); layers the checkpoint already stores quantized keep their own quantization.
pub fn build_model_quantized(
    config: &ModelConfig,
    weights: &dyn TensorSource,
    device: &Device,
    dtype: DType,
    quantize: Option<QuantSpec>,
) -> Result<Llama> {
    let device = device.clone().without_autodiff();
    let b = Builder {
        weights,
        device: &device,
        dtype,
        quantization: config.quantization,
        quantize,
    };
    let c = config;
    let (d, hd) = (c.hidden_size, c.head_dim);
    let (h, kvh) = (c.num_attention_heads, c.num_key_value_heads);
    // A quantized embedding is expanded once: lookups need rows, not matmuls.
    let embed_tokens = b.matrix("model.embed_tokens", c.vocab_size, d)?;
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
            full: false,
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
    let weights = safetensors::map_dir(dir)?;
    let files: Vec<String> = safetensors::checkpoint_files(dir)?
        .iter()
        .map(|f| f.display().to_string())
        .collect();
    // One message naming both the tensor and the file(s), whatever way the error is printed.
    build_model(&config, &weights, device, dtype)
        .map_err(|e| anyhow!("{e:#} in {}", files.join(", ")))
}
