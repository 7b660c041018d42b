//! Checkpoints in the run folder (`checkpoint/`): the adapter (PEFT format), the optimizer's
//! moments and step, and where training stood. The data order is a pure function of the seed
//! and the step, so step + seed are all a resumed run needs to see the same batches.
//! A checkpoint is written to `checkpoint.tmp/` and renamed, so a kill never leaves half of one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::{DType, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};

use crate::model::llama::Llama;
use crate::model::lora::{self, AdamW};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Steps completed.
    pub step: u64,
    pub run_id: String,
    pub trained_tokens: u64,
    pub best_val_loss: Option<f64>,
    pub last_val_loss: Option<f64>,
    pub last_train_loss: Option<f64>,
    pub seed: u64,
    pub batches_per_epoch: usize,
}

fn dir_of(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoint")
}

/// Writes a checkpoint atomically (temporary folder, then rename).
pub fn save(run_dir: &Path, model: &Llama, opt: &AdamW, c: &Checkpoint) -> Result<()> {
    let tmp = run_dir.join("checkpoint.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    lora::save_peft_adapter(model, &tmp, None)?;
    let (step, moments) = opt.export_state();
    let mut bufs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, m, v) in moments {
        for (suffix, t) in [("m", m), ("v", v)] {
            let shape = t.dims().to_vec();
            let data: Vec<f32> = t
                .cast(DType::F32)
                .into_data()
                .try_into_vec::<f32>()
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            bufs.push((
                format!("{name}.{suffix}"),
                shape,
                data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ));
        }
    }
    let views: Vec<(String, TensorView)> = bufs
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    let meta: HashMap<String, String> = [("adam_step".to_string(), step.to_string())].into();
    safetensors::serialize_to_file(views, Some(meta), &tmp.join("optimizer.safetensors"))?;
    std::fs::write(tmp.join("state.json"), serde_json::to_string_pretty(c)?)?;
    let final_dir = dir_of(run_dir);
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("cannot move checkpoint into {}", final_dir.display()))
}

/// Loads the run's checkpoint into `model` and `opt`, if there is one.
pub fn load(
    run_dir: &Path,
    model: &mut Llama,
    opt: &mut AdamW,
    run_id: &str,
) -> Result<Option<Checkpoint>> {
    let dir = dir_of(run_dir);
    let state = dir.join("state.json");
    if !state.is_file() {
        return Ok(None);
    }
    let c: Checkpoint = serde_json::from_str(&std::fs::read_to_string(&state)?)
        .with_context(|| format!("{}: unreadable checkpoint state", state.display()))?;
    if c.run_id != run_id {
        bail!(
            "{}: the checkpoint belongs to run {}, not {run_id}; delete the folder to start over",
            dir.display(),
            c.run_id
        );
    }
    lora::load_peft_adapter(model, &dir)?;
    let path = dir.join("optimizer.safetensors");
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)?;
    let step: i32 = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("adam_step"))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{}: no adam_step", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)?;
    let mut moments = Vec::new();
    let names: Vec<String> = st
        .names()
        .iter()
        .filter_map(|n| n.strip_suffix(".m").map(String::from))
        .collect();
    for name in names {
        let get = |suffix: &str| -> Result<Tensor<2>> {
            let v = st.tensor(&format!("{name}.{suffix}"))?;
            let data: Vec<f32> = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let shape = [v.shape()[0], v.shape()[1]];
            Ok(Tensor::from_data(
                TensorData::new(data, shape),
                (&model.device, DType::F32),
            ))
        };
        moments.push((name.clone(), get("m")?, get("v")?));
    }
    opt.import_state(step, moments);
    Ok(Some(c))
}

/// Removes the checkpoint of a finished run (its adapter is in `adapter/`).
pub fn remove(run_dir: &Path) {
    let _ = std::fs::remove_dir_all(dir_of(run_dir));
}
