//! `tuna bench`: speed and memory of training, generation and loading, on model *shapes* with
//! random weights (no download needed) or on a real model. Warmup (autotune, shader compiles)
//! is run first and kept out of the timing. Timings live here, never in tests.

pub mod attention;
#[cfg(all(feature = "gpu", not(target_os = "macos")))]
pub mod blueprints;
#[cfg(all(feature = "gpu", not(target_os = "macos")))]
pub mod coopmat2;
pub mod generate;
#[cfg(target_os = "linux")]
pub mod host_profile;
pub mod load;
pub mod lora_products;
pub mod matmul;
pub mod ops;
pub mod train;

use anyhow::{Result, bail};
use rayon::prelude::*;
use serde_json::{Value, json};

use crate::data::dataset::SplitMix64;
use burn::tensor::TensorData;

use crate::formats::weights::TensorSource;
use crate::model::config::ModelConfig;

/// Runs `work` (then waits for the device) until `secs` have passed. A GPU left idle drops its
/// clocks within a fraction of a second (an H200 falls from 1,980 to 345 MHz while tuna
/// compiles kernels or prepares inputs on the host, `bench/results/h200-2026-12-03c`) and
/// takes longer than a short timed loop to climb back, so every timed loop of these benches
/// starts behind this.
pub fn keep_busy(device: &burn::tensor::Device, secs: f64, mut work: impl FnMut()) {
    let t0 = std::time::Instant::now();
    while t0.elapsed().as_secs_f64() < secs {
        work();
        let _ = device.sync();
    }
}

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
        // The shapes the seeds fine-tune (their config.json values).
        "qwen2.5-3b" => {
            json!({"model_type": "qwen2", "hidden_size": 2048, "intermediate_size": 11008,
            "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": true, "max_position_embeddings": 32768})
        }
        "llama-3.2-3b" => {
            json!({"model_type": "llama", "hidden_size": 3072, "intermediate_size": 8192,
            "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 128256,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": true, "max_position_embeddings": 131072,
            "head_dim": 128})
        }
        "mistral-7b" => {
            json!({"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32768,
            "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "tie_word_embeddings": false, "max_position_embeddings": 32768})
        }
        "tiny" => json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true, "max_position_embeddings": 2048}),
        other => bail!(
            "unknown shape `{other}`; use smollm2-135m, tinyllama-1.1b, qwen2.5-3b, llama-3.2-3b, mistral-7b or tiny"
        ),
    })
}

/// Random weights (normal-ish, std 0.02; norms at 1) for every tensor the shape needs,
/// generated tensor by tensor as the model is built, so a benchmark's host memory is what
/// loading a real checkpoint costs, not a second copy of the model.
pub struct RandomWeights {
    shapes: std::collections::BTreeMap<String, (usize, Vec<usize>)>,
    seed: u64,
}

/// The tensors of a model shape, by HF name.
pub fn random_weights(c: &ModelConfig, seed: u64) -> RandomWeights {
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
    RandomWeights {
        shapes: shapes
            .into_iter()
            .enumerate()
            .map(|(k, (name, shape))| (name, (k, shape)))
            .collect(),
        seed,
    }
}

impl RandomWeights {
    fn values(&self, k: usize, shape: &[usize]) -> Vec<f32> {
        let n: usize = shape.iter().product();
        if shape.len() == 1 {
            return vec![1.0; n];
        }
        let cols = shape[1..].iter().product::<usize>().max(1);
        let mut data = vec![0.0f32; n];
        let tensor_seed = self.seed ^ (k as u64).wrapping_mul(0x2545_F491_4F6C_DD1D);
        data.par_chunks_mut(cols)
            .enumerate()
            .for_each(|(row, out)| {
                let mut rng =
                    SplitMix64(tensor_seed ^ (row as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                for x in out {
                    // Sum of two uniforms: cheap, zero-mean, std ≈ 0.02.
                    *x = ((rng.next() >> 40) as f32 / (1u64 << 24) as f32
                        + (rng.next() >> 40) as f32 / (1u64 << 24) as f32
                        - 1.0)
                        * 0.049;
                }
            });
        data
    }
}

impl TensorSource for RandomWeights {
    fn names(&self) -> Vec<String> {
        self.shapes.keys().cloned().collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.shapes.get(name).map(|(_, s)| s.clone())
    }

    fn data(&self, name: &str) -> Result<TensorData> {
        let (k, shape) = self
            .shapes
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("missing tensor `{name}`"))?;
        Ok(TensorData::new(self.values(*k, shape), shape.clone()))
    }
}
