//! mlx-lm's adapter folder: `adapters.safetensors` + `adapter_config.json`, as `mlx_lm.lora`
//! saves and `mlx_lm.generate --adapter-path` loads it. mlx-lm adapts the last `num_layers`
//! blocks, the same modules (`keys`, paths inside a block) in each; its factors are the
//! transposes of PEFT's (`lora_a` `[in, r]`, `lora_b` `[r, out]`) and DoRA's magnitude is `m`.
//! This module converts between that and PEFT's form, so everything else speaks PEFT.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::peft::{self, Factor, PeftConfig};
use super::safetensors;
use super::weights::{RawTensor, RawWeights};

/// Whether `dir` holds an mlx-lm adapter (rather than a PEFT one).
pub fn is_mlx_adapter(dir: &Path) -> bool {
    dir.join("adapters.safetensors").is_file()
}

fn transpose(t: &RawTensor) -> RawTensor {
    let (r, c) = (t.shape[0], t.shape[1]);
    let mut data = vec![0.0; r * c];
    for i in 0..r {
        for j in 0..c {
            data[j * r + i] = t.data[i * c + j];
        }
    }
    RawTensor {
        shape: vec![c, r],
        data,
    }
}

/// Whether `dir` holds a full fine-tune as mlx-lm saves one (`fine_tune_type: full`): the
/// trained blocks' own weights under the model's tensor names, not LoRA factors.
pub fn is_full_fine_tune(dir: &Path) -> bool {
    is_mlx_adapter(dir)
        && std::fs::read_to_string(dir.join("adapter_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .is_some_and(|v| v["fine_tune_type"] == "full")
}

/// A full fine-tune's weights by the model's tensor names (`model.layers.3.mlp.up_proj.weight`),
/// and how many trailing blocks were trained (-1 = all).
pub fn read_full(dir: &Path) -> Result<(i64, RawWeights)> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("cannot read {}", cfg_path.display()))?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", cfg_path.display()))?;
    let num_layers = v["num_layers"]
        .as_i64()
        .with_context(|| format!("{}: num_layers is missing", cfg_path.display()))?;
    Ok((
        num_layers,
        safetensors::read_file(&dir.join("adapters.safetensors"))?,
    ))
}

/// Writes a full fine-tune as mlx-lm does: `adapters.safetensors` with the trained blocks'
/// tensors (f32) and `adapter_config.json` with `fine_tune_type: full`, which
/// `mlx_lm.generate --adapter-path` and `mlx_lm.fuse` load as they are.
pub fn write_full(dir: &Path, num_layers: i64, tensors: &RawWeights) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    safetensors::write_f32(tensors, &[], &dir.join("adapters.safetensors"))?;
    let json = json!({
        "fine_tune_type": "full",
        "num_layers": num_layers,
        // mlx-lm reads these even for full fine-tunes; they describe no tensors here.
        "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0},
    });
    crate::files::write_atomic(
        &dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )
}

/// Reads an mlx-lm adapter of a model with `n_layers` blocks, in PEFT's form.
pub fn read_as_peft(dir: &Path, n_layers: usize) -> Result<(PeftConfig, RawWeights)> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("cannot read {}", cfg_path.display()))?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", cfg_path.display()))?;
    let src = cfg_path.display();
    let kind = v["fine_tune_type"].as_str().unwrap_or("lora");
    if kind == "full" {
        bail!(
            "{src}: a full fine-tune (fine_tune_type: full) holds whole weights, not LoRA factors"
        );
    }
    if kind != "lora" && kind != "dora" {
        bail!("{src}: fine_tune_type `{kind}` is not supported (lora, dora or full)");
    }
    let p = &v["lora_parameters"];
    let rank = p["rank"]
        .as_u64()
        .filter(|&r| r > 0)
        .with_context(|| format!("{src}: lora_parameters.rank is missing"))?
        as usize;
    let scale = p["scale"]
        .as_f64()
        .with_context(|| format!("{src}: lora_parameters.scale is missing"))?;
    let num_layers = v["num_layers"]
        .as_i64()
        .with_context(|| format!("{src}: num_layers is missing"))?;
    let first = if num_layers < 0 || num_layers as usize >= n_layers {
        0
    } else {
        n_layers - num_layers as usize
    };
    let file = dir.join("adapters.safetensors");
    let mut tensors = RawWeights::new();
    let mut modules: Vec<String> = Vec::new();
    for (name, t) in safetensors::read_file(&file)? {
        let rest = name
            .strip_prefix("model.layers.")
            .with_context(|| format!("{}: unexpected tensor `{name}`", file.display()))?;
        let (idx, rest) = rest
            .split_once('.')
            .with_context(|| format!("{}: unexpected tensor `{name}`", file.display()))?;
        let layer: usize = idx
            .parse()
            .with_context(|| format!("{}: bad layer index in `{name}`", file.display()))?;
        if layer < first || layer >= n_layers {
            bail!(
                "{}: `{name}` is outside the last {num_layers} of {n_layers} layers",
                file.display()
            );
        }
        let (module, leaf) = rest
            .rsplit_once('.')
            .with_context(|| format!("{}: unexpected tensor `{name}`", file.display()))?;
        let (factor, t) = match leaf {
            "lora_a" if t.shape.len() == 2 => (Factor::A, transpose(&t)),
            "lora_b" if t.shape.len() == 2 => (Factor::B, transpose(&t)),
            "m" if t.shape.len() == 1 => (Factor::Magnitude, t),
            _ => bail!(
                "{}: `{name}` with shape {:?} is not an mlx-lm LoRA/DoRA tensor",
                file.display(),
                t.shape
            ),
        };
        let key = module.rsplit('.').next().unwrap_or(module).to_string();
        if !modules.contains(&key) {
            modules.push(key);
        }
        tensors.insert(peft::tensor_name(layer, module, factor), t);
    }
    let config = PeftConfig {
        rank,
        scale,
        dropout: p["dropout"].as_f64().unwrap_or(0.0),
        target_modules: modules,
        layers: (first > 0).then(|| (first..n_layers).collect()),
        use_dora: kind == "dora",
    };
    Ok((config, tensors))
}

/// Writes PEFT-form adapter tensors as an mlx-lm adapter folder. mlx-lm can only express the
/// last N layers with the same modules in each: anything else is an error naming the layers.
pub fn write_from_peft(
    dir: &Path,
    config: &PeftConfig,
    tensors: &RawWeights,
    n_layers: usize,
) -> Result<()> {
    let mut out = RawWeights::new();
    let mut per_layer: std::collections::BTreeMap<usize, Vec<String>> = Default::default();
    for (name, t) in tensors {
        let (layer, module, factor) = peft::parse_tensor_name(name)
            .with_context(|| format!("`{name}` is not an adapter tensor"))?;
        let (leaf, t) = match factor {
            Factor::A => ("lora_a", transpose(t)),
            Factor::B => ("lora_b", transpose(t)),
            Factor::Magnitude => ("m", t.clone()),
        };
        out.insert(format!("model.layers.{layer}.{module}.{leaf}"), t);
        let mods = per_layer.entry(layer).or_default();
        if !mods.iter().any(|m| m == module) {
            mods.push(module.to_string());
        }
    }
    let Some((&first, keys)) = per_layer.iter().next() else {
        bail!("no adapter tensors to write");
    };
    let keys = keys.clone();
    let contiguous = per_layer.keys().copied().eq(first..n_layers);
    if !contiguous || per_layer.values().any(|m| *m != keys) {
        bail!(
            "mlx-lm adapters cover the last N layers with the same modules in each; this one \
             adapts layers {:?}",
            per_layer.keys().collect::<Vec<_>>()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    safetensors::write_f32(&out, &[], &dir.join("adapters.safetensors"))?;
    let json = json!({
        "fine_tune_type": if config.use_dora { "dora" } else { "lora" },
        "num_layers": n_layers - first,
        "lora_parameters": {
            "rank": config.rank,
            "scale": config.scale,
            "dropout": config.dropout,
            "keys": keys,
        },
    });
    crate::files::write_atomic(
        &dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )
}
