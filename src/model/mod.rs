//! The network: llama-family configuration, the decoder on burn, LoRA adapters, full fine-tuning, device and
//! dtype choice, and building the model from host weights.

pub mod attention_op;
pub mod config;
pub mod device;
pub mod full;
pub mod llama;
pub mod load;
pub mod lora;
pub mod quant;
