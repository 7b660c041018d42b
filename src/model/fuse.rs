//! `tuna fuse`: folds a PEFT adapter into the base weights (`W += scale · B·A`, in f32) and
//! writes a Hugging Face folder. GGUF and other quantized bases are dequantized on load, so the
//! fused model is plain f32 safetensors.

use std::path::Path;

use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use safetensors::SafeTensors;

use super::base::BaseModel;
use super::convert::write_safetensors_f32;
use super::load::tensor_to_f32;
use super::lora::read_peft_config;
use super::weights::RawWeights;

/// Merges the adapter in `adapter_dir` into a copy of the base weights.
pub fn merged_weights(base: &BaseModel, adapter_dir: &Path) -> Result<RawWeights> {
    let (config, _) = read_peft_config(&adapter_dir.join("adapter_config.json"))?;
    let file = adapter_dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a safetensors file", file.display()))?;
    let mut weights = base.weights.clone();
    let mut merged = 0;
    for name in st.names() {
        let Some(module) = name.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let b_name = format!("{module}.lora_B.weight");
        let a = st.tensor(name)?;
        let b = st
            .tensor(&b_name)
            .with_context(|| format!("{}: `{b_name}` is missing", file.display()))?;
        let hf = format!(
            "{}.weight",
            module.strip_prefix("base_model.model.").unwrap_or(module)
        );
        let w = weights.get_mut(&hf).with_context(|| {
            format!(
                "{}: adapts `{hf}`, which the base model does not have",
                file.display()
            )
        })?;
        let (r, d_in) = (a.shape()[0], a.shape()[1]);
        let d_out = b.shape()[0];
        if w.shape != [d_out, d_in] || b.shape()[1] != r {
            bail!(
                "{}: `{module}` has A {:?} and B {:?}, which do not fit `{hf}` {:?}",
                file.display(),
                a.shape(),
                b.shape(),
                w.shape
            );
        }
        let a = tensor_to_f32(name, a.dtype(), a.data())?;
        let b = tensor_to_f32(&b_name, b.dtype(), b.data())?;
        let scale = config.scale as f32;
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
            });
        merged += 1;
    }
    if merged == 0 {
        bail!("{}: no lora_A/lora_B pairs found", file.display());
    }
    Ok(weights)
}

/// Writes the fused model as an HF folder: config.json, model.safetensors, tokenizer files.
pub fn fuse(base: &BaseModel, adapter_dir: &Path, out: &Path) -> Result<()> {
    let weights = merged_weights(base, adapter_dir)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut config = base.raw_config.clone();
    config["torch_dtype"] = serde_json::json!("float32");
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    write_safetensors_f32(&weights, &out.join("model.safetensors"))?;
    base.tokenizer.save_folder(out)?;
    Ok(())
}
