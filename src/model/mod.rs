//! Llama-family models: configuration, weight loading (safetensors, GGUF), tokenizers, chat templates.

pub mod config;
pub mod device;
pub mod llama;
pub mod load;
pub mod lora;
pub mod weights;
pub mod convert;
pub mod gguf;
pub mod source;
pub mod tokenizer;
