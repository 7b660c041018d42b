//! File formats, each read into (or written from) plain host data: safetensors, GGUF, PEFT
//! adapters. Nothing here knows the network; `model` builds on these.

pub mod gguf;
pub mod gguf_write;
pub mod mlx_adapter;
pub mod peft;
pub mod safetensors;
pub mod weights;

/// An adapter folder in PEFT's form, whichever format it is in: PEFT
/// (`adapter_model.safetensors`) or mlx-lm (`adapters.safetensors`, converted). `n_layers` is the
/// model's block count, which mlx-lm's `num_layers` counts back from.
pub fn read_adapter(
    dir: &std::path::Path,
    n_layers: usize,
) -> anyhow::Result<(peft::PeftConfig, weights::RawWeights)> {
    if mlx_adapter::is_mlx_adapter(dir) {
        mlx_adapter::read_as_peft(dir, n_layers)
    } else {
        peft::read_adapter(dir)
    }
}
