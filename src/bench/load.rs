//! `tuna bench load`: how long reading a model to host weights takes (GGUF dequantization,
//! safetensors decoding), best of a few runs, with the process's peak RSS.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{Value, json};

use crate::memory::peak_rss_mb;
use crate::source::base::load_base;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchLoadArgs {
    /// A model as the spec's `model:` takes it (folder, `.gguf`, `hf:`, `pypi:`).
    #[arg(long)]
    pub model: String,
    /// Timed loads; the best is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
}

pub fn bench_load(a: &BenchLoadArgs) -> Result<Value> {
    let mut best = Duration::MAX;
    let mut params = 0usize;
    for _ in 0..a.repeats.max(1) {
        let t = Instant::now();
        let base = load_base(&a.model)?;
        best = best.min(t.elapsed());
        params = base.weights.values().map(|w| w.data.len()).sum();
    }
    Ok(json!({
        "bench": "load", "model": a.model, "repeats": a.repeats.max(1),
        "best_s": best.as_secs_f64(), "params": params, "peak_rss_mb": peak_rss_mb(),
    }))
}
