//! `tuna bench train`: LoRA training speed and memory on a model *shape* with random weights,
//! so that a benchmark needs no download. Warmup steps (autotune, shader compiles) are run
//! first and kept out of the timing.

use std::time::Instant;

use anyhow::Result;
use serde_json::{Value, json};

use burn::tensor::{DType, Tensor};

use super::{random_weights, shape_config};
use crate::data::dataset::{SplitMix64, Tokenized, collate};
use crate::memory::{device_mem_mb, peak_rss_mb};
use crate::model::config::ModelConfig;
use crate::model::device::device_for;
use crate::model::load::build_model_quantized;
use crate::model::lora::{self, LoraConfig};
use crate::model::quant::QuantSpec;
use crate::optim::{self, AdamW, LossScaler};
use crate::train::step::{self, StepOptions};

/// `tuna bench train`'s arguments (clap reads them straight into this struct).
#[derive(clap::Args, Debug, Clone)]
pub struct BenchTrainArgs {
    /// smollm2-135m, tinyllama-1.1b, qwen2.5-3b, llama-3.2-3b, mistral-7b or tiny.
    #[arg(long, default_value = "smollm2-135m")]
    pub shape: String,
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 512)]
    pub seq: usize,
    #[arg(long, default_value_t = 10, value_parser = at_least_one)]
    pub steps: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    #[arg(long, value_delimiter = ',', default_value = "q_proj,v_proj")]
    pub keys: Vec<String>,
    /// Adapt the last N layers; -1 = all.
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    pub num_layers: i64,
    #[arg(long)]
    pub grad_checkpoint: bool,
    /// Quantize the base's linear layers to this many bits at load (QLoRA); 0 = off.
    #[arg(long, default_value_t = 0)]
    pub quantize_bits: usize,
    /// lora, dora or full (every weight of the last `--num-layers` blocks).
    #[arg(long, default_value = "lora", value_parser = ["lora", "dora", "full"])]
    pub fine_tune_type: String,
    #[arg(long, default_value_t = 64)]
    pub group_size: usize,
    /// Time forward+backward and the optimizer separately: synchronizes after each phase, so
    /// the whole step gets slightly slower.
    #[arg(long)]
    pub profile: bool,
    /// Update the adapters one parameter at a time (what the optimizer did before its flat
    /// update), to measure what the flat update saves.
    #[arg(long)]
    pub optimizer_per_parameter: bool,
    /// Sample every thread's stack through the timed steps and write them to this file as
    /// folded stacks (`bench/host_profile_top.py` sums them up). Linux only.
    #[arg(long)]
    pub host_profile: Option<std::path::PathBuf>,
    /// Samples a second of the process's CPU time for `--host-profile`. The kernel delivers
    /// the timer's signal to one thread at a time, so busy threads beside tuna's own need a
    /// high rate to be seen at all.
    #[arg(long, default_value_t = 997, value_parser = clap::value_parser!(i32).range(1..=100_000))]
    pub host_profile_hz: i32,
}

/// A step count of 1 or more (a benchmark of no steps has no rate to give).
fn at_least_one(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("`{s}` is not a whole number of 1 or more")),
    }
}

/// Runs the benchmark and returns its result as one JSON object (also printed by the CLI).
/// Steps are the trainer's own (`train::step`, the loss scaler in f16, AdamW on the device);
/// the host waits for the GPU only at the end of the warmup and of the timed steps.
pub fn bench_train(a: &BenchTrainArgs) -> Result<Value> {
    let config = ModelConfig::from_json(&shape_config(&a.shape)?, &a.shape)?;
    let t0 = Instant::now();
    let weights = random_weights(&config, 0);
    let sel = device_for(&a.device, &a.dtype)?;
    let quantize = (a.quantize_bits > 0).then_some(QuantSpec {
        bits: a.quantize_bits,
        group_size: a.group_size,
    });
    let mut model = build_model_quantized(&config, &weights, &sel.device, sel.dtype, quantize)?;
    drop(weights);
    let load_s = t0.elapsed().as_secs_f64();
    let lcfg = LoraConfig {
        dora: a.fine_tune_type == "dora",
        full: a.fine_tune_type == "full",
        rank: a.rank,
        scale: 2.0,
        dropout: 0.0,
        keys: a.keys.clone(),
        num_layers: a.num_layers,
    };
    lora::apply_fine_tune(&mut model, &lcfg, 0)?;
    let mut opt = AdamW::new(1e-4, 0.0);
    let scaler = (model.dtype == DType::F16).then(LossScaler::for_f16);
    let mut rng = SplitMix64(7);
    let mut phases = [0.0f64; 2];
    let sync = |model: &crate::model::llama::Llama| {
        let _ = model.device.sync();
    };
    let mut step =
        |model: &mut crate::model::llama::Llama, phases: &mut [f64; 2]| -> Result<Tensor<1>> {
            let examples: Vec<Tokenized> = (0..a.batch)
                .map(|_| Tokenized {
                    ids: (0..a.seq)
                        .map(|_| (rng.next() % config.vocab_size as u64) as u32)
                        .collect(),
                    prompt_len: 0,
                })
                .collect();
            let refs: Vec<&Tokenized> = examples.iter().collect();
            let b = collate(&refs, 0, 1);
            let loss_scale = scaler.as_ref().map_or(1.0, |s| s.scale);
            let opts = StepOptions {
                checkpoint: a.grad_checkpoint,
                dropout_seed: None,
                loss_scale,
                attention: None,
            };
            let t = Instant::now();
            let sg = step::loss_and_grads(model, &b, &opts);
            if a.profile {
                sync(model);
                phases[0] += t.elapsed().as_secs_f64();
            }
            let t = Instant::now();
            // As the trainer does: the step's gradients as one flat vector, unless asked to
            // update parameter by parameter (to measure what the flat update saves).
            let grads = if a.optimizer_per_parameter {
                optim::StepGradients::Named(sg.grads)
            } else {
                optim::StepGradients::new(sg.grads, step::trainable_layout(model))
            };
            let finite = match (&scaler, grads.norm_sq()) {
                (Some(_), Some(n)) => Some(optim::finite(&n)),
                _ => None,
            };
            step::apply_gradients(model, &mut opt, grads, finite.as_ref(), 1.0 / loss_scale)?;
            if a.profile {
                sync(model);
                phases[1] += t.elapsed().as_secs_f64();
            }
            Ok(sg.loss)
        };
    // The allocator's pages after load and after each synced warmup step (outside the
    // timing): where in a run the device memory goes.
    sync(&model);
    let mut reserved_mb = vec![device_mem_mb(&model.device)];
    let tw = Instant::now();
    for i in 0..a.warmup {
        eprintln!("[tuna bench train] warmup step {i}");
        step(&mut model, &mut phases)?;
        // The second-to-last warmup step runs straight into the last, as timed steps do: burn's
        // fusion caches a plan per boundary it has seen, and the optimizer's ops followed by the
        // next step's are another boundary than followed by a sync. Unseen, the first timed step
        // would explore it and compile its kernels (0.23 s on top of SmolLM2's 0.10 s step on an
        // H200, `bench/results/h200-2026-12-04b/`), a cost a run pays once. Needs 2 warmup steps
        // or more; that step's memory is `null`.
        if i + 2 != a.warmup {
            sync(&model);
            reserved_mb.push(device_mem_mb(&model.device));
        } else {
            reserved_mb.push(None);
        }
    }
    phases = [0.0; 2];
    let warmup_s = tw.elapsed().as_secs_f64();
    #[cfg(target_os = "linux")]
    let profiler = a
        .host_profile
        .as_ref()
        .map(|path| super::host_profile::HostProfile::start(a.host_profile_hz).map(|p| (p, path)))
        .transpose()?;
    #[cfg(not(target_os = "linux"))]
    if a.host_profile.is_some() {
        anyhow::bail!("tuna bench train: --host-profile samples stacks on Linux only");
    }
    let tm = Instant::now();
    let mut losses = Vec::new();
    // Each step's host time (the loop never waits for the device, unless its queues are full):
    // a step that gets faster through the run is still compiling, tuning or exploring fusions.
    let mut enqueue_per_step = Vec::with_capacity(a.steps);
    for i in 0..a.steps {
        // A marker on stderr, to cut a fusion or cubecl log (BURN_FUSION_LOG, CUBECL_DEBUG_LOG)
        // by step.
        eprintln!("[tuna bench train] timed step {i}");
        let ts = Instant::now();
        losses.push(step(&mut model, &mut phases)?);
        enqueue_per_step.push((ts.elapsed().as_secs_f64() * 1e4).round() / 1e4);
    }
    // Nothing in the loop waits for the device: the loop's time is the host's to state the
    // steps (and any wait the device's queue imposes); the wait that ends the timing is what
    // was still to do, on the device and in fusion's deferred host work. It is the same sync
    // that ended the warmup, so fusion runs a plan it has cached; reading the losses first
    // would end the last step's operations with a concatenation and a read, a boundary fusion
    // has not seen, and explore it inside the timing (`bench/results/h200-2026-12-04b/`).
    let enqueue_s = tm.elapsed().as_secs_f64();
    sync(&model);
    let secs = tm.elapsed().as_secs_f64();
    // The samples end with the timing, before the losses' readback.
    #[cfg(target_os = "linux")]
    let host_samples = profiler.map(|(p, path)| p.write(path)).transpose()?;
    #[cfg(not(target_os = "linux"))]
    let host_samples: Option<u64> = None;
    let losses: Vec<f32> = Tensor::cat(losses, 0).try_into_vec_as::<f32>()?;
    let tokens = (a.batch * a.seq * a.steps) as f64;
    Ok(json!({
        "bench": "train", "shape": a.shape, "device": sel.kind.to_string(), "dtype": format!("{:?}", sel.dtype),
        "batch": a.batch, "seq": a.seq, "steps": a.steps, "warmup_steps": a.warmup, "rank": a.rank, "keys": a.keys,
        "num_layers": a.num_layers, "grad_checkpoint": a.grad_checkpoint, "quantize_bits": a.quantize_bits, "params": model.num_parameters(),
        "fine_tune_type": a.fine_tune_type, "trainable_params": lora::num_trainable_parameters(&model),
        "tokens_per_s": tokens / secs, "s_per_step": secs / a.steps as f64, "warmup_s": warmup_s, "load_s": load_s,
        "enqueue_s": enqueue_s, "drain_s": secs - enqueue_s,
        "enqueue_s_per_step": enqueue_per_step, "host_profile_samples": host_samples,
        "first_loss": losses.first(), "last_loss": losses.last(), "peak_rss_mb": peak_rss_mb(),
        "gpu_reserved_mb": device_mem_mb(&model.device), "gpu_reserved_mb_load_then_warmup": reserved_mb,
        "profile_s_per_step": a.profile.then(|| json!({"forward_backward": phases[0] / a.steps as f64,
            "optimizer": phases[1] / a.steps as f64})),
    }))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// `--host-profile` writes the timed steps' stacks, and they reach into tuna's training step.
    #[test]
    fn host_profile_samples_the_timed_steps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.folded");
        let a = BenchTrainArgs {
            shape: "smollm2-135m".into(),
            device: "cpu".into(),
            dtype: "f32".into(),
            batch: 1,
            seq: 32,
            steps: 3,
            warmup: 0,
            rank: 4,
            keys: vec!["q_proj".into(), "v_proj".into()],
            num_layers: 2,
            grad_checkpoint: false,
            quantize_bits: 0,
            fine_tune_type: "lora".into(),
            group_size: 64,
            profile: false,
            optimizer_per_parameter: false,
            host_profile: Some(path.clone()),
            host_profile_hz: 997,
        };
        let r = bench_train(&a).unwrap();
        let n = r["host_profile_samples"].as_u64().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(n > 0 && !text.is_empty(), "{r}");
        // Names come from the symbol table (`tuna::train::step::loss_and_grads`) or, in a build
        // with debug information, from DWARF (`loss_and_grads`).
        let ours = text
            .lines()
            .filter(|l| l.contains("loss_and_grads"))
            .count();
        assert!(
            ours > 0,
            "no sample inside tuna's training step:\n{}",
            &text[..text.len().min(4000)]
        );
    }
}
