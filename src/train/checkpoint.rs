//! Checkpoints in the run folder (`checkpoint/`): the adapter (PEFT format), the optimizer's
//! moments and step, and where training stood. The data order is a pure function of the seed
//! and the step, so step + seed are all a resumed run needs to see the same batches.
//! A checkpoint is written to `checkpoint.tmp/` and renamed, so a kill never leaves half of one.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::{DType, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::files::write_atomic;
use crate::formats::safetensors;
use crate::formats::weights::{RawTensor, RawWeights};
use crate::model::llama::Llama;
use crate::model::lora;
use crate::optim::AdamW;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Steps completed.
    pub step: u64,
    pub run_id: String,
    pub trained_tokens: u64,
    pub best_val_loss: Option<f64>,
    #[serde(default)]
    pub best_val_step: Option<u64>,
    #[serde(default)]
    pub base_val_loss: Option<f64>,
    pub last_val_loss: Option<f64>,
    pub last_train_loss: Option<f64>,
    pub seed: u64,
    pub batches_per_epoch: usize,
}

fn dir_of(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoint")
}

/// Writes a checkpoint atomically (temporary folder, then rename); a failed write (a full
/// disk) removes the temporary folder and keeps the previous checkpoint.
pub fn save(run_dir: &Path, model: &Llama, opt: &AdamW, c: &Checkpoint) -> Result<()> {
    let tmp = run_dir.join("checkpoint.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    let written = write_into(&tmp, model, opt, c);
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written?;
    // The previous checkpoint is set aside, not deleted, until the new one is in place: a kill
    // between the two renames leaves `checkpoint.old`, which `load` falls back to.
    let final_dir = dir_of(run_dir);
    let old = run_dir.join("checkpoint.old");
    let _ = std::fs::remove_dir_all(&old);
    if final_dir.exists() {
        std::fs::rename(&final_dir, &old)
            .with_context(|| format!("cannot set aside {}", final_dir.display()))?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("cannot move checkpoint into {}", final_dir.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

fn write_into(tmp: &Path, model: &Llama, opt: &AdamW, c: &Checkpoint) -> Result<()> {
    lora::save_adapter(model, tmp, None)?;
    let (step, moments) = opt.export_state();
    let mut tensors = RawWeights::new();
    for (name, m, v) in moments {
        for (suffix, t) in [("m", m), ("v", v)] {
            let shape = t.dims().to_vec();
            let data = t.cast(DType::F32).try_into_vec_as::<f32>()?;
            tensors.insert(format!("{name}.{suffix}"), RawTensor { shape, data });
        }
    }
    safetensors::write_f32(
        &tensors,
        &[("adam_step", step.to_string())],
        &tmp.join("optimizer.safetensors"),
    )?;
    write_atomic(
        &tmp.join("state.json"),
        serde_json::to_string_pretty(c)?.as_bytes(),
    )
}

/// Loads the run's checkpoint into `model` and `opt`, if there is one.
pub fn load(
    run_dir: &Path,
    model: &mut Llama,
    opt: &mut AdamW,
    run_id: &str,
) -> Result<Option<Checkpoint>> {
    let mut dir = dir_of(run_dir);
    if !dir.join("state.json").is_file() {
        // Killed between setting the old checkpoint aside and moving the new one in.
        dir = run_dir.join("checkpoint.old");
    }
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
    lora::load_adapter(model, &dir)?;
    let path = dir.join("optimizer.safetensors");
    let (mut tensors, meta) = safetensors::read_file_with_metadata(&path)?;
    let step: i32 = meta
        .get("adam_step")
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{}: no adam_step in its metadata", path.display()))?;
    let names: Vec<String> = tensors
        .keys()
        .filter_map(|n| n.strip_suffix(".m").map(String::from))
        .collect();
    // The moments must match what trains, name and shape: the optimizer lays them out in one
    // flat vector beside the parameters.
    let shapes: std::collections::HashMap<String, [usize; 2]> = lora::trainable_parameters(model)
        .into_iter()
        .map(|(n, t)| (n, t.dims()))
        .collect();
    let mut moments = Vec::new();
    for name in names {
        let Some(&want) = shapes.get(&name) else {
            bail!(
                "{}: moments for `{name}`, which this run does not train; delete the checkpoint folder to start over",
                path.display()
            );
        };
        let mut get = |suffix: &str| -> Result<Tensor<2>> {
            let key = format!("{name}.{suffix}");
            let t = tensors
                .remove(&key)
                .with_context(|| format!("{}: `{key}` is missing", path.display()))?;
            let [rows, cols] = t.shape[..] else {
                bail!(
                    "{}: `{key}` has shape {:?}; optimizer moments are 2-D",
                    path.display(),
                    t.shape
                );
            };
            if [rows, cols] != want {
                bail!(
                    "{}: `{key}` has shape [{rows}, {cols}], but `{name}` is {want:?}; delete the checkpoint folder to start over",
                    path.display()
                );
            }
            Ok(Tensor::from_data(
                TensorData::new(t.data, [rows, cols]),
                (&model.device, DType::F32),
            ))
        };
        moments.push((name.clone(), get("m")?, get("v")?));
    }
    if let Some(extra) = tensors.keys().next() {
        bail!("{}: unexpected tensor `{extra}`", path.display());
    }
    opt.import_state(step, moments);
    Ok(Some(c))
}

/// Removes the checkpoint of a finished run (its adapter is in `adapter/`).
pub fn remove(run_dir: &Path) {
    let _ = std::fs::remove_dir_all(dir_of(run_dir));
    let _ = std::fs::remove_dir_all(run_dir.join("checkpoint.old"));
}
