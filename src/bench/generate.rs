//! `tuna bench generate`: prompt (prefill) and generation tokens/s, after one warmup run that
//! pays for kernel compiles and autotune.

use std::time::Instant;

use anyhow::Result;
use serde_json::{Value, json};

use super::{random_weights, shape_config};
use crate::data::dataset::SplitMix64;
use crate::formats::weights::TensorSource;
use crate::generate::{GenerateConfig, generate};
use crate::model::config::ModelConfig;
use crate::model::device::device_for;
use crate::model::load::build_model;
use crate::source::base::open_base;

/// `tuna bench generate`'s arguments (clap reads them straight into this struct).
#[derive(clap::Args, Debug, Clone)]
pub struct BenchGenerateArgs {
    /// A model spec, or `shape:NAME` (e.g. `shape:smollm2-135m`) for random weights.
    #[arg(long)]
    pub model: String,
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
}

pub fn bench_generate(a: &BenchGenerateArgs) -> Result<Value> {
    let t0 = Instant::now();
    let (config, weights): (ModelConfig, Box<dyn TensorSource>) =
        match a.model.strip_prefix("shape:") {
            Some(shape) => {
                let c = ModelConfig::from_json(&shape_config(shape)?, shape)?;
                let w = random_weights(&c, 0);
                (c, Box::new(w))
            }
            None => {
                let b = open_base(&a.model)?;
                (b.config, b.weights)
            }
        };
    let sel = device_for(&a.device, &a.dtype)?;
    let model = build_model(&config, weights.as_ref(), &sel.device, sel.dtype)?;
    drop(weights);
    let load_s = t0.elapsed().as_secs_f64();
    let mut rng = SplitMix64(3);
    let prompt: Vec<u32> = (0..a.prompt_tokens)
        .map(|_| (rng.next() % config.vocab_size as u64) as u32)
        .collect();
    // No EOS: always generate exactly `tokens` tokens.
    let gc = GenerateConfig {
        max_new_tokens: a.tokens,
        ..Default::default()
    };
    let run = || -> Result<(f64, f64)> {
        let start = Instant::now();
        let mut first = None;
        generate(&model, &prompt, &gc, None, &mut |_| {
            first.get_or_insert_with(|| start.elapsed().as_secs_f64());
            true
        })?;
        let total = start.elapsed().as_secs_f64();
        Ok((first.unwrap_or(total), total))
    };
    run()?; // warmup
    let (prefill, total) = run()?;
    Ok(json!({
        "bench": "generate", "model": a.model, "device": sel.kind.to_string(), "dtype": format!("{:?}", sel.dtype),
        "prompt_tokens": a.prompt_tokens, "tokens": a.tokens,
        "prompt_tokens_per_s": a.prompt_tokens as f64 / prefill,
        "generation_tokens_per_s": (a.tokens - 1) as f64 / (total - prefill).max(1e-9),
        "load_s": load_s,
    }))
}
