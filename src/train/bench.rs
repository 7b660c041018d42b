//! `tuna bench train`: LoRA training speed and memory on a model *shape* with random weights,
//! so that a benchmark needs no download. Warmup steps (autotune, shader compiles) are run
//! first and kept out of the timing.

use std::time::Instant;

use anyhow::{Result, bail};
use rayon::prelude::*;
use serde_json::{Value, json};

use burn::tensor::{DType, Tensor};

use super::step::{self, StepOptions};
use super::trainer::device_for;
use crate::data::dataset::{SplitMix64, Tokenized, collate};
use crate::model::config::ModelConfig;
use crate::model::load::build_model;
use crate::model::lora::{self, AdamW, LoraConfig};
use crate::model::weights::{RawTensor, RawWeights};
use crate::optim::{self, LossScaler};

/// HF `config.json` contents of the shapes we benchmark.
pub fn shape_config(shape: &str) -> Result<Value> {
    Ok(match shape {
        "smollm2-135m" => {
            json!({"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
            "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": true, "max_position_embeddings": 8192})
        }
        "tinyllama-1.1b" => {
            json!({"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632,
            "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false, "max_position_embeddings": 2048})
        }
        "tiny" => json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true, "max_position_embeddings": 2048}),
        other => bail!("unknown shape `{other}`; use smollm2-135m, tinyllama-1.1b or tiny"),
    })
}

/// Random weights (normal-ish, std 0.02; norms at 1) for every tensor the shape needs.
pub fn random_weights(c: &ModelConfig, seed: u64) -> RawWeights {
    let (d, hd, h, kv, inter) = (
        c.hidden_size,
        c.head_dim,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.intermediate_size,
    );
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![c.vocab_size, d]),
        ("model.norm.weight".into(), vec![d]),
    ];
    if !c.tie_word_embeddings {
        shapes.push(("lm_head.weight".into(), vec![c.vocab_size, d]));
    }
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        shapes.extend([
            (format!("{p}.input_layernorm.weight"), vec![d]),
            (format!("{p}.post_attention_layernorm.weight"), vec![d]),
            (format!("{p}.self_attn.q_proj.weight"), vec![h * hd, d]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv * hd, d]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv * hd, d]),
            (format!("{p}.self_attn.o_proj.weight"), vec![d, h * hd]),
            (format!("{p}.mlp.gate_proj.weight"), vec![inter, d]),
            (format!("{p}.mlp.up_proj.weight"), vec![inter, d]),
            (format!("{p}.mlp.down_proj.weight"), vec![d, inter]),
        ]);
        if c.qkv_bias {
            shapes.extend([
                (format!("{p}.self_attn.q_proj.bias"), vec![h * hd]),
                (format!("{p}.self_attn.k_proj.bias"), vec![kv * hd]),
                (format!("{p}.self_attn.v_proj.bias"), vec![kv * hd]),
            ]);
        }
    }
    shapes
        .into_par_iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let n: usize = shape.iter().product();
            let data = if shape.len() == 1 {
                vec![1.0; n]
            } else {
                let mut rng = SplitMix64(seed ^ (k as u64).wrapping_mul(0x2545_F491_4F6C_DD1D));
                // Sum of two uniforms: cheap, zero-mean, std ≈ 0.02.
                (0..n)
                    .map(|_| {
                        ((rng.next() >> 40) as f32 / (1u64 << 24) as f32
                            + (rng.next() >> 40) as f32 / (1u64 << 24) as f32
                            - 1.0)
                            * 0.049
                    })
                    .collect()
            };
            (name, RawTensor { shape, data })
        })
        .collect()
}

/// `tuna bench train`'s arguments (clap reads them straight into this struct).
#[derive(clap::Args, Debug, Clone)]
pub struct BenchTrainArgs {
    /// smollm2-135m, tinyllama-1.1b or tiny.
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
    #[arg(long, default_value_t = 10)]
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
    /// Time forward+backward and the optimizer separately: synchronizes after each phase, so
    /// the whole step gets slightly slower.
    #[arg(long)]
    pub profile: bool,
}

/// Runs the benchmark and returns its result as one JSON object (also printed by the CLI).
/// Steps are the trainer's own (`train::step`, the loss scaler in f16, AdamW on the device);
/// the host waits for the GPU only at the end of the warmup and of the timed steps.
pub fn bench_train(a: &BenchTrainArgs) -> Result<Value> {
    let config = ModelConfig::from_json(&shape_config(&a.shape)?, &a.shape)?;
    let t0 = Instant::now();
    let weights = random_weights(&config, 0);
    let sel = device_for(&a.device, &a.dtype)?;
    let mut model = build_model(&config, &weights, &sel.device, sel.dtype)?;
    drop(weights);
    let load_s = t0.elapsed().as_secs_f64();
    let lcfg = LoraConfig {
        rank: a.rank,
        scale: 2.0,
        dropout: 0.0,
        keys: a.keys.clone(),
        num_layers: a.num_layers,
    };
    lora::apply_lora(&mut model, &lcfg, 0)?;
    let mut opt = AdamW::new(1e-4, 0.0);
    let scaler = (model.dtype == DType::F16).then(LossScaler::for_f16);
    let mut rng = SplitMix64(7);
    let mut phases = [0.0f64; 2];
    let sync = |model: &crate::model::llama::Llama| {
        let _ = model.device.sync();
    };
    let mut step = |model: &mut crate::model::llama::Llama, phases: &mut [f64; 2]| -> Tensor<1> {
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
        };
        let t = Instant::now();
        let sg = step::loss_and_grads(model, &b, &opts);
        if a.profile {
            sync(model);
            phases[0] += t.elapsed().as_secs_f64();
        }
        let t = Instant::now();
        let finite = match (&scaler, optim::global_norm_sq(&sg.grads)) {
            (Some(_), Some(n)) => Some(optim::finite(&n)),
            _ => None,
        };
        opt.step_where(model, &sg.grads, finite.as_ref(), 1.0 / loss_scale);
        if a.profile {
            sync(model);
            phases[1] += t.elapsed().as_secs_f64();
        }
        sg.loss
    };
    let tw = Instant::now();
    for _ in 0..a.warmup {
        step(&mut model, &mut phases);
    }
    sync(&model);
    phases = [0.0; 2];
    let warmup_s = tw.elapsed().as_secs_f64();
    let tm = Instant::now();
    let mut losses = Vec::new();
    for _ in 0..a.steps {
        losses.push(step(&mut model, &mut phases));
    }
    let losses: Vec<f32> = Tensor::cat(losses, 0).try_into_vec_as::<f32>()?;
    let secs = tm.elapsed().as_secs_f64();
    let tokens = (a.batch * a.seq * a.steps) as f64;
    Ok(json!({
        "bench": "train", "shape": a.shape, "device": sel.kind.to_string(), "dtype": format!("{:?}", sel.dtype),
        "batch": a.batch, "seq": a.seq, "steps": a.steps, "warmup_steps": a.warmup, "rank": a.rank, "keys": a.keys,
        "num_layers": a.num_layers, "grad_checkpoint": a.grad_checkpoint, "params": model.num_parameters(),
        "lora_params": lora::num_lora_parameters(&model),
        "tokens_per_s": tokens / secs, "s_per_step": secs / a.steps as f64, "warmup_s": warmup_s, "load_s": load_s,
        "first_loss": losses.first(), "last_loss": losses.last(), "peak_rss_mb": super::metrics::peak_rss_mb(),
        "gpu_reserved_mb": super::metrics::device_mem_mb(&model.device),
        "profile_s_per_step": a.profile.then(|| json!({"forward_backward": phases[0] / a.steps as f64,
            "optimizer": phases[1] / a.steps as f64})),
    }))
}
