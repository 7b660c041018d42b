//! GGUF -> Hugging Face folder conversion: `config.json`, `generation_config.json`,
//! `model.safetensors` (f32), `tokenizer.json`, `tokenizer_config.json` (with the chat template)
//! and `chat_template.jinja`.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;

use crate::formats::gguf::load_gguf;
use crate::formats::safetensors;

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
    safetensors::write_f32(&model.weights, &[], &out.join("model.safetensors"))?;
    model.tokenizer.save_folder(out)?;
    Ok(())
}
