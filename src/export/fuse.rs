//! `tuna fuse`: folds a PEFT adapter into the base weights (`W += scale · B·A`, in f32) and
//! writes a Hugging Face folder. GGUF and other quantized bases are dequantized on load, so the
//! fused model is plain f32 safetensors.

use std::path::Path;

use anyhow::{Context, Result, bail};
use rayon::prelude::*;

use crate::formats::peft::{self, Factor};
use crate::formats::safetensors::{self, FloatType};
use crate::formats::weights::RawWeights;
use crate::source::base::BaseModel;

/// Merges the adapter in `adapter_dir` into a copy of the base weights.
/// A full fine-tune (mlx-lm's `fine_tune_type: full`) replaces the blocks' tensors instead.
pub fn merged_weights(base: &BaseModel, adapter_dir: &Path) -> Result<RawWeights> {
    if crate::formats::mlx_adapter::is_full_fine_tune(adapter_dir) {
        return replaced_weights(base, adapter_dir);
    }
    let (config, tensors) =
        crate::formats::read_adapter(adapter_dir, base.config.num_hidden_layers)?;
    let file = adapter_dir.to_path_buf();
    let mut weights = base.weights.clone();
    let mut merged = 0;
    for (name, a) in &tensors {
        let Some((layer, module, Factor::A)) = peft::parse_tensor_name(name) else {
            continue;
        };
        let b_name = peft::tensor_name(layer, module, Factor::B);
        let b = tensors
            .get(&b_name)
            .with_context(|| format!("{}: `{b_name}` is missing", file.display()))?;
        let hf = format!("model.layers.{layer}.{module}.weight");
        let w = weights.get_mut(&hf).with_context(|| {
            format!(
                "{}: adapts `{hf}`, which the base model does not have",
                file.display()
            )
        })?;
        // Both factors are 2-D (checked on read); they must chain into the weight's shape.
        let (r, d_in) = (a.shape[0], a.shape[1]);
        let d_out = b.shape[0];
        if w.shape != [d_out, d_in] || b.shape[1] != r {
            bail!(
                "{}: layer {layer} `{module}` has A {:?} and B {:?}, which do not fit `{hf}` {:?}",
                file.display(),
                a.shape,
                b.shape,
                w.shape
            );
        }
        let scale = config.scale as f32;
        // DoRA: after W + s·B·A, each row is scaled to its magnitude.
        let magnitude = tensors
            .get(&peft::tensor_name(layer, module, Factor::Magnitude))
            .map(|m| &m.data);
        if let Some(m) = magnitude
            && m.len() != d_out
        {
            bail!(
                "{}: layer {layer} `{module}` has {} magnitudes for {d_out} rows",
                file.display(),
                m.len()
            );
        }
        let (a, b) = (&a.data, &b.data);
        w.data
            .par_chunks_mut(d_in)
            .enumerate()
            .for_each(|(o, row)| {
                for k in 0..r {
                    let s = scale * b[o * r + k];
                    let a_row = &a[k * d_in..(k + 1) * d_in];
                    for (x, &av) in row.iter_mut().zip(a_row) {
                        *x += s * av;
                    }
                }
                if let Some(m) = magnitude {
                    let norm = row.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                    let k = (m[o] as f64 / norm.max(1e-30)) as f32;
                    row.iter_mut().for_each(|x| *x *= k);
                }
            });
        merged += 1;
    }
    if merged == 0 {
        bail!("{}: no lora_A/lora_B pairs found", file.display());
    }
    Ok(weights)
}

/// The base weights with a full fine-tune's tensors in place of the blocks' own.
fn replaced_weights(base: &BaseModel, dir: &Path) -> Result<RawWeights> {
    let (_, tensors) = crate::formats::mlx_adapter::read_full(dir)?;
    let file = dir.join("adapters.safetensors");
    let mut weights = base.weights.clone();
    for (name, t) in tensors {
        let w = weights.get_mut(&name).with_context(|| {
            format!(
                "{}: `{name}` is not a tensor of the base model",
                file.display()
            )
        })?;
        if w.shape != t.shape {
            bail!(
                "{}: `{name}` has shape {:?}, the base model's is {:?}",
                file.display(),
                t.shape,
                w.shape
            );
        }
        *w = t;
    }
    Ok(weights)
}

/// How `tuna fuse` writes its output, as mlx-lm's fuse does: in the base's float type unless
/// `dtype` says otherwise; a quantized base only with `dequantize` (then f16 by default).
#[derive(Debug, Clone, Copy, Default)]
pub struct FuseOptions {
    pub dtype: Option<FloatType>,
    pub dequantize: bool,
    /// Also write `ggml-model-<type>.gguf` into the output folder (mlx-lm's `--export-gguf` name).
    pub gguf: Option<crate::export::gguf::GgufType>,
}

/// Where `tuna fuse --gguf TYPE` puts the GGUF file.
pub fn gguf_path(out: &Path, ty: crate::export::gguf::GgufType) -> std::path::PathBuf {
    out.join(format!("ggml-model-{}.gguf", ty.name()))
}

/// The float type a config.json declares (`torch_dtype`, or transformers 5's `dtype`).
fn declared_type(config: &serde_json::Value) -> Option<FloatType> {
    ["torch_dtype", "dtype"]
        .iter()
        .find_map(|k| config.get(*k).and_then(|v| v.as_str()))
        .and_then(FloatType::from_torch_name)
}

/// Writes the fused model as an HF folder: config.json, model.safetensors, tokenizer files.
/// Returns the float type written.
pub fn fuse(base: &BaseModel, adapter_dir: &Path, out: &Path, o: FuseOptions) -> Result<FloatType> {
    if base.dequantized && !o.dequantize {
        bail!(
            "{} is quantized; pass --dequantize to write a dense fused model (a re-quantized output is not supported yet)",
            base.path.display()
        );
    }
    let ty = match (o.dtype, base.dequantized) {
        (Some(t), _) => t,
        (None, true) => FloatType::F16,
        (None, false) => declared_type(&base.raw_config).unwrap_or(FloatType::F32),
    };
    let weights = merged_weights(base, adapter_dir)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut config = base.raw_config.clone();
    if let Some(m) = config.as_object_mut() {
        m.remove("quantization");
        m.remove("quantization_config");
        m.insert("torch_dtype".into(), ty.torch_name().into());
        if m.contains_key("dtype") {
            m.insert("dtype".into(), ty.torch_name().into());
        }
    }
    crate::files::write_atomic(
        &out.join("config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    safetensors::write_as(&weights, ty, &out.join("model.safetensors"))?;
    base.tokenizer.save_folder(out)?;
    if let Some(g) = o.gguf {
        let name = base
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        crate::export::gguf::write_gguf_model(
            &weights,
            &base.config,
            &base.tokenizer,
            &name,
            g,
            &gguf_path(out, g),
        )?;
    }
    Ok(ty)
}
