//! Llama-family models: configuration, weight loading (safetensors, GGUF), tokenizers, chat templates.

pub mod base;
pub mod config;
pub mod convert;
pub mod device;
pub mod fuse;
pub mod gguf;
pub mod llama;
pub mod load;
pub mod lora;
pub mod source;
pub mod tokenizer;
pub mod weights;
