//! tuna: LoRA / QLoRA fine-tuning and declarative hyperparameter sweeps on burn.
//!
//! The binary (`src/main.rs`) only parses arguments; everything it does lives here.

pub mod cli;
pub mod config;
pub mod data;
pub mod generate;
pub mod model;
pub mod optim;
pub mod report;
pub mod sweep;
pub mod train;
