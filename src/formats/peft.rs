//! PEFT's LoRA adapter folder: `adapter_config.json` + `adapter_model.safetensors`, the format
//! `PeftModel.from_pretrained` loads. This module knows the file layout and tensor names only;
//! attaching the factors to a model is `model::lora`'s job.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::safetensors;
use super::weights::RawWeights;

/// Prefix of every adapter tensor name, before the layer index.
const PREFIX: &str = "base_model.model.model.layers.";

/// The LoRA settings an `adapter_config.json` records.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftConfig {
    pub rank: usize,
    /// The multiplier on `B·A`: `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA).
    pub scale: f64,
    pub dropout: f64,
    /// Short module names (`q_proj`, ...), as `target_modules` lists them.
    pub target_modules: Vec<String>,
    /// `layers_to_transform`, when the adapter covers only some layers.
    pub layers: Option<Vec<usize>>,
    /// DoRA (`use_dora`): each adapted module also has a magnitude vector.
    pub use_dora: bool,
}

/// Which factor of a LoRA pair a tensor holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Factor {
    /// `lora_A`, `[rank, in]`.
    A,
    /// `lora_B`, `[out, rank]`.
    B,
    /// DoRA's `lora_magnitude_vector`, `[out]`.
    Magnitude,
}

/// The tensor name of one factor: `base_model.model.model.layers.{layer}.{module}.lora_A.weight`
/// where `module` is the path inside the decoder layer (`self_attn.q_proj`).
pub fn tensor_name(layer: usize, module: &str, factor: Factor) -> String {
    match factor {
        Factor::A => format!("{PREFIX}{layer}.{module}.lora_A.weight"),
        Factor::B => format!("{PREFIX}{layer}.{module}.lora_B.weight"),
        Factor::Magnitude => format!("{PREFIX}{layer}.{module}.lora_magnitude_vector"),
    }
}

/// Splits a tensor name into (layer, module path, factor); `None` for anything else.
pub fn parse_tensor_name(name: &str) -> Option<(usize, &str, Factor)> {
    let (idx, rest) = name.strip_prefix(PREFIX)?.split_once('.')?;
    let layer = idx.parse().ok()?;
    if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        Some((layer, m, Factor::A))
    } else if let Some(m) = rest.strip_suffix(".lora_magnitude_vector") {
        Some((layer, m, Factor::Magnitude))
    } else {
        rest.strip_suffix(".lora_B.weight")
            .map(|m| (layer, m, Factor::B))
    }
}

/// Reads `adapter_config.json`.
pub fn read_config(path: &Path) -> Result<PeftConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let src = path.display();
    if let Some(t) = v.get("peft_type").and_then(Value::as_str)
        && t != "LORA"
    {
        bail!("{src}: peft_type `{t}` is not LORA");
    }
    let rank = v
        .get("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .with_context(|| format!("{src}: missing or zero `r` (the LoRA rank)"))?
        as usize;
    let alpha = v
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .unwrap_or(rank as f64);
    let scale = if v.get("use_rslora").and_then(Value::as_bool) == Some(true) {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank as f64
    };
    let target_modules = match v.get("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(|s| s.rsplit('.').next().unwrap_or(s).to_string())
            .collect(),
        _ => Vec::new(),
    };
    let layers = match v.get("layers_to_transform") {
        Some(Value::Array(a)) => Some(
            a.iter()
                .filter_map(Value::as_u64)
                .map(|x| x as usize)
                .collect(),
        ),
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as usize]),
        _ => None,
    };
    Ok(PeftConfig {
        rank,
        scale,
        dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        target_modules,
        layers,
        use_dora: v.get("use_dora").and_then(Value::as_bool) == Some(true),
    })
}

/// Reads an adapter folder: its config and its tensors (any float dtype, as f32). Every tensor
/// must be a 2-D `lora_A`/`lora_B` factor.
pub fn read_adapter(dir: &Path) -> Result<(PeftConfig, RawWeights)> {
    let config = read_config(&dir.join("adapter_config.json"))?;
    let file = dir.join("adapter_model.safetensors");
    let tensors = safetensors::read_file(&file)?;
    for (name, t) in &tensors {
        let Some((_, _, factor)) = parse_tensor_name(name) else {
            bail!(
                "{}: unexpected tensor `{name}` (only `{PREFIX}N.<module>.lora_A/lora_B.weight` and DoRA's `lora_magnitude_vector`)",
                file.display()
            );
        };
        let want = if factor == Factor::Magnitude { 1 } else { 2 };
        if t.shape.len() != want {
            bail!(
                "{}: `{name}` has shape {:?}; it must be {want}-D",
                file.display(),
                t.shape
            );
        }
        if factor == Factor::Magnitude && !config.use_dora {
            bail!(
                "{}: `{name}` is a DoRA magnitude but adapter_config.json does not set use_dora",
                file.display()
            );
        }
    }
    if tensors.is_empty() {
        bail!("{}: no LoRA tensors", file.display());
    }
    Ok((config, tensors))
}

/// Writes an adapter folder; `tensors` are named by [`tensor_name`].
pub fn write_adapter(
    dir: &Path,
    config: &PeftConfig,
    base_model: Option<&str>,
    tensors: &RawWeights,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    safetensors::write_f32(tensors, &[], &dir.join("adapter_model.safetensors"))?;
    let layers = match &config.layers {
        None => Value::Null,
        Some(l) => json!(l),
    };
    let json = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.scale * config.rank as f64,
        "lora_dropout": config.dropout,
        "target_modules": config.target_modules,
        "layers_to_transform": layers,
        "layers_pattern": if config.layers.is_some() { json!("layers") } else { Value::Null },
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": false,
        "use_dora": config.use_dora,
        "revision": null,
    });
    crate::files::write_atomic(
        &dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_names_round_trip() {
        let n = tensor_name(3, "self_attn.q_proj", Factor::B);
        assert_eq!(
            n,
            "base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight"
        );
        assert_eq!(
            parse_tensor_name(&n),
            Some((3, "self_attn.q_proj", Factor::B))
        );
        assert_eq!(parse_tensor_name("model.embed_tokens.weight"), None);
        assert_eq!(
            parse_tensor_name("base_model.model.model.layers.x.q.lora_A.weight"),
            None
        );
    }
}
