//! `tuna eval`: loss and perplexity of a model (and adapter) on one split of a data folder,
//! computed the way validation during training computes it.

use std::path::PathBuf;

use anyhow::Result;

use super::trainer::split_loss;
use crate::data::dataset::tokenize_split;
use crate::model::device::device_for;
use crate::model::load::build_model;
use crate::model::lora::load_adapter;
use crate::source::base::load_base;

#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    #[arg(long)]
    pub model: String,
    /// A PEFT adapter folder (a run's `adapter/`).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Folder with test.jsonl (or the split named by --split).
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value = "test")]
    pub split: String,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 2048)]
    pub max_seq_length: usize,
    /// Loss on the answers only.
    #[arg(long)]
    pub mask_prompt: bool,
    #[arg(long, default_value = "auto")]
    pub device: String,
}

pub fn run(a: &EvalArgs) -> Result<()> {
    let base = load_base(&a.model)?;
    let sel = device_for(&a.device, "auto")?;
    let mut m = build_model(&base.config, &base.weights, &sel.device, sel.dtype)?;
    if let Some(adapter) = &a.adapter {
        load_adapter(&mut m, adapter)?;
    }
    let file = a.data.join(format!("{}.jsonl", a.split));
    let split = tokenize_split(
        &file,
        &base.tokenizer,
        a.max_seq_length,
        a.mask_prompt,
        base.config.vocab_size,
    )?;
    let pad = base
        .tokenizer
        .pad_token_id()
        .or(base.tokenizer.eos_token_id())
        .unwrap_or(0);
    let loss = split_loss(&m, &split, a.batch_size, pad, -1)?;
    println!(
        "{}: loss {loss:.4}, perplexity {:.3} ({} examples)",
        file.display(),
        loss.exp(),
        split.examples.len()
    );
    Ok(())
}
