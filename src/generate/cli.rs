//! `tuna generate`: load a model (and adapter), apply the chat template, stream the answer.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use serde_json::json;

use super::{GenerateConfig, SamplingConfig, generate};
use crate::model::device::device_for;
use crate::model::load::build_model;
use crate::model::lora::load_adapter;
use crate::source::base::load_base;

/// `tuna generate`'s arguments (clap reads them straight into this struct).
#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    #[arg(long)]
    pub model: String,
    /// A PEFT adapter folder (a run's `adapter/`).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    /// Send the prompt as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temp: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Stop when the output contains this (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "auto")]
    pub device: String,
}

impl GenerateArgs {
    fn sampling(&self) -> SamplingConfig {
        SamplingConfig {
            temperature: self.temp,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            repetition_context: None,
            seed: self.seed,
        }
    }
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    let base = load_base(&args.model)?;
    let sel = device_for(&args.device, "auto")?;
    let mut model = build_model(&base.config, &base.weights, &sel.device, sel.dtype)?;
    if let Some(a) = &args.adapter {
        load_adapter(&mut model, a)?;
    }
    let tok = &base.tokenizer;
    let text = if args.raw || tok.chat_template().is_none() {
        if !args.raw {
            eprintln!("note: the model has no chat template; sending the prompt as is");
        }
        args.prompt.clone()
    } else {
        let mut messages = Vec::new();
        if let Some(s) = &args.system {
            messages.push(json!({"role": "system", "content": s}));
        }
        messages.push(json!({"role": "user", "content": args.prompt}));
        tok.apply_chat_template(&messages, true, None)?
    };
    let ids = tok.try_encode(&text, args.raw && tok.add_bos_token())?;
    let mut config = GenerateConfig {
        max_new_tokens: args.max_tokens,
        sampling: args.sampling(),
        stop_strings: args.stop.clone(),
        ..Default::default()
    }
    .with_model_eos(&base.config);
    config.eos_token_ids.extend(tok.eos_token_ids());
    let decode = |ids: &[u32]| tok.decode(ids, true);
    let t0 = Instant::now();
    let mut first: Option<f64> = None;
    let mut out = std::io::stdout();
    let g = generate(&model, &ids, &config, Some(&decode), &mut |ev| {
        first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
        let _ = write!(out, "{}", ev.text);
        let _ = out.flush();
        true
    })?;
    println!();
    let total = t0.elapsed().as_secs_f64();
    let n = g.tokens.len();
    let prefill = first.unwrap_or(total);
    eprintln!(
        "prompt: {} tokens, {:.1} tok/s; generation: {n} tokens, {:.1} tok/s",
        ids.len(),
        ids.len() as f64 / prefill.max(1e-9),
        n.saturating_sub(1) as f64 / (total - prefill).max(1e-9)
    );
    Ok(())
}
