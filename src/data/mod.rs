//! Training data: mlx-lm's JSONL formats, tokenization through the chat template,
//! length-grouped batches, and `tuna data prepare` from CSV.

pub mod dataset;
pub mod jsonl;
pub mod prepare;
