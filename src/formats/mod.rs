//! File formats, each read into (or written from) plain host data: safetensors, GGUF, PEFT
//! adapters. Nothing here knows the network; `model` builds on these.

pub mod gguf;
pub mod peft;
pub mod safetensors;
pub mod weights;
