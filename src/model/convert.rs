//! GGUF -> Hugging Face folder conversion: `config.json`, `generation_config.json`,
//! `model.safetensors` (f32), `tokenizer.json`, `tokenizer_config.json` (with the chat template)
//! and `chat_template.jinja`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

use crate::model::gguf::load_gguf;
use crate::model::weights::RawWeights;

/// The in-memory bytes of an f32 slice (little-endian on little-endian hosts).
fn f32_native_bytes(data: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and every byte pattern is a valid u8; the length covers exactly
    // the slice's memory, and u8 has alignment 1.
    unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, size_of_val(data)) }
}

/// Writes `weights` as an f32 safetensors file (with `{"format": "pt"}` metadata, as
/// transformers expects).
pub fn write_safetensors_f32(weights: &RawWeights, path: &Path) -> Result<()> {
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
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize_to_file(views, Some(meta), path)
        .map_err(|e| anyhow!("{}: cannot write safetensors: {e}", path.display()))
}

/// Converts a GGUF file into a Hugging Face model folder at `out` (created if needed).
pub fn convert_gguf_to_hf(gguf: &Path, out: &Path) -> Result<()> {
    let model = load_gguf(gguf)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let write_json = |name: &str, v: &serde_json::Value| -> Result<()> {
        let p = out.join(name);
        std::fs::write(&p, serde_json::to_string_pretty(v)?)
            .with_context(|| format!("cannot write {}", p.display()))
    };
    write_json("config.json", &model.config)?;
    let gen_cfg = json!({
        "bos_token_id": model.config.get("bos_token_id"),
        "eos_token_id": model.tokenizer.eos_token_ids(),
        "pad_token_id": model.config.get("pad_token_id"),
    });
    write_json("generation_config.json", &gen_cfg)?;
    write_safetensors_f32(&model.weights, &out.join("model.safetensors"))?;
    model.tokenizer.save_folder(out)?;
    Ok(())
}
