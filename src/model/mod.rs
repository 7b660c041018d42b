//! The network: llama-family configuration, the decoder on burn, LoRA adapters, full fine-tuning, device and
//! dtype choice, and building the model from host weights.

pub mod attention_op;
pub mod config;
pub mod device;
pub mod full;
pub mod fused_proj_op;
pub mod llama;
pub mod load;
pub mod lora;
#[cfg(all(feature = "gpu", not(target_os = "macos")))]
pub mod lora_kernels;
pub mod lora_op;
pub mod norm_op;
pub mod op_common;
pub mod quant;
