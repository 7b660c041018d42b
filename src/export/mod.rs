//! What leaves tuna as a model: adapters fused into the base weights, GGUF converted to a
//! Hugging Face folder, a fused model as one GGUF file.

pub mod convert;
pub mod fuse;
pub mod gguf;
