//! Llama-family models: configuration, weight loading (safetensors, GGUF), tokenizers, chat templates.

pub mod weights;
