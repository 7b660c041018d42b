//! tuna: LoRA / QLoRA fine-tuning and declarative hyperparameter sweeps on burn.
//!
//! The binary (`src/main.rs`) only parses arguments; everything it does lives here.

pub mod bench;
pub mod cli;
pub mod config;
pub mod data;
pub mod export;
pub mod files;
pub mod formats;
pub mod generate;
pub mod memory;
pub mod model;
pub mod optim;
pub mod report;
pub mod source;
pub mod sweep;
pub mod tokenizer;
pub mod train;
