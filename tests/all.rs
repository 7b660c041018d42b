//! Most integration tests, as modules of one test binary (see `Cargo.toml`); `gguf` and `abort`
//! are binaries of their own because they change process-wide state.

mod common;

mod dora;
mod download;
mod errors;
mod full_ft;
mod fuse;
mod gguf_export;
mod layout;
mod lora_parity;
mod mlx_adapter;
mod model_parity;
mod quant;
mod report;
mod slurm;
mod spec;
mod sweep_parallel;
mod tokenizer;
mod train;
