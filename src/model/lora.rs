//! LoRA adapters.
