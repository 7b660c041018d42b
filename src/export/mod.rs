//! What leaves tuna as a model: adapters fused into the base weights, GGUF converted to a
//! Hugging Face folder.

pub mod convert;
pub mod fuse;
