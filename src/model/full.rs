//! Full fine-tuning (mlx-lm's `fine_tune_type: full`): every weight of the last `num_layers`
//! blocks (the seven projections, their biases, both norms) is a trainable parameter, as
//! mlx-lm unfreezes whole blocks. The trained weights are held in f32, since they are the
//! optimizer's master copy, and cast to the compute dtype in each forward; the frozen blocks
//! stay as loaded. Parameters are named as in the model's own files
//! (`model.layers.3.mlp.up_proj.weight`), which is also how mlx-lm saves a full fine-tune.

use anyhow::{Context, Result, bail};
use burn::tensor::{DType, Tensor};

use super::llama::{BaseWeight, DecoderLayer, Llama};
use super::lora::{LORA_KEYS, layer_range, linear_mut, linear_ref};
use crate::formats::weights::{RawTensor, RawWeights};

/// One trainable tensor of a block.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Slot {
    Weight(&'static str),
    Bias(&'static str),
    Norm(&'static str),
}

const NORMS: [&str; 2] = ["input_layernorm", "post_attention_layernorm"];

impl Slot {
    fn suffix(self) -> String {
        match self {
            Slot::Weight(p) => format!("{p}.weight"),
            Slot::Bias(p) => format!("{p}.bias"),
            Slot::Norm(n) => format!("{n}.weight"),
        }
    }

    fn parse(suffix: &str) -> Option<Slot> {
        let (path, leaf) = suffix.rsplit_once('.')?;
        if let Some(n) = NORMS.iter().find(|n| **n == path) {
            return (leaf == "weight").then_some(Slot::Norm(n));
        }
        let (_, p) = LORA_KEYS.iter().find(|(_, p)| *p == path)?;
        match leaf {
            "weight" => Some(Slot::Weight(p)),
            "bias" => Some(Slot::Bias(p)),
            _ => None,
        }
    }
}

/// The block's slots that hold a tensor (biases only where the model has them).
fn slots(layer: &DecoderLayer) -> Vec<Slot> {
    let mut out = vec![Slot::Norm(NORMS[0])];
    for (_, p) in LORA_KEYS {
        out.push(Slot::Weight(p));
        if linear_ref(layer, p).bias.is_some() {
            out.push(Slot::Bias(p));
        }
    }
    out.push(Slot::Norm(NORMS[1]));
    out
}

/// A slot's tensor as a 2-D parameter: weights `[out, in]`, biases and norms `[1, n]`.
fn get(layer: &DecoderLayer, slot: Slot) -> Tensor<2> {
    let row = |t: &Tensor<1>| t.clone().unsqueeze_dim::<2>(0);
    match slot {
        Slot::Weight(p) => match &linear_ref(layer, p).weight {
            BaseWeight::Dense(w) => w.clone(),
            BaseWeight::Quant(q) => q.dequantize(DType::F32),
        },
        Slot::Bias(p) => row(linear_ref(layer, p).bias.as_ref().expect("listed by slots")),
        Slot::Norm(n) if n == NORMS[0] => row(&layer.input_layernorm.weight),
        Slot::Norm(_) => row(&layer.post_attention_layernorm.weight),
    }
}

fn put(layer: &mut DecoderLayer, slot: Slot, t: Tensor<2>) {
    let flat = |t: Tensor<2>| {
        let n = t.dims()[1];
        t.reshape([n])
    };
    match slot {
        Slot::Weight(p) => linear_mut(layer, p).weight = BaseWeight::Dense(t),
        Slot::Bias(p) => linear_mut(layer, p).bias = Some(flat(t)),
        Slot::Norm(n) if n == NORMS[0] => layer.input_layernorm.weight = flat(t),
        Slot::Norm(_) => layer.post_attention_layernorm.weight = flat(t),
    }
}

fn name(i: usize, slot: Slot) -> String {
    format!("model.layers.{i}.{}", slot.suffix())
}

/// `model.layers.{i}.{slot}` → (i, slot), for names this module gives out.
fn parse_name(name: &str) -> Option<(usize, Slot)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (i, suffix) = rest.split_once('.')?;
    Some((i.parse().ok()?, Slot::parse(suffix)?))
}

/// Makes the last `num_layers` blocks (-1 = all) fully trainable: their weights become f32
/// parameters. A quantized block cannot be: its weights are not on a trainable grid.
pub fn apply_full(model: &mut Llama, num_layers: i64) -> Result<()> {
    for i in layer_range(model.layers.len(), num_layers) {
        let layer = &mut model.layers[i];
        for (_, p) in LORA_KEYS {
            if matches!(linear_ref(layer, p).weight, BaseWeight::Quant(_)) {
                bail!(
                    "lora.fine_tune_type is full, which trains the base weights, but layer {i} \
                     `{p}` is quantized; use lora or dora on a quantized base (QLoRA), or a \
                     full-precision base (quantize.bits: 0)"
                );
            }
            linear_mut(layer, p).lora = None;
        }
        for slot in slots(layer) {
            let t = get(layer, slot).cast(DType::F32);
            put(layer, slot, t);
        }
        layer.full = true;
    }
    Ok(())
}

/// The trainable tensors of every fully fine-tuned block, by model name, in layer order.
pub fn full_parameters(model: &Llama) -> Vec<(String, Tensor<2>)> {
    let mut out = Vec::new();
    for (i, layer) in model.layers.iter().enumerate().filter(|(_, l)| l.full) {
        for slot in slots(layer) {
            out.push((name(i, slot), get(layer, slot)));
        }
    }
    out
}

/// Whether `name` is a full fine-tuning parameter name (as [`full_parameters`] gives them).
pub fn is_full_name(name: &str) -> bool {
    parse_name(name).is_some()
}

/// Replaces one full fine-tuning parameter by name (after an optimizer step, or on resume).
pub fn set_full_parameter(model: &mut Llama, name: &str, t: Tensor<2>) -> Result<()> {
    let (i, slot) = parse_name(name).with_context(|| format!("`{name}` is not a weight name"))?;
    let layer = model
        .layers
        .get_mut(i)
        .filter(|l| l.full && slots(l).contains(&slot))
        .with_context(|| format!("the model has no fully fine-tuned `{name}`"))?;
    put(layer, slot, t);
    Ok(())
}

/// Turns a fully fine-tuned block's parameters (in a copy of the block) into fresh autodiff
/// leaves, appending them by name to `leaves`.
pub fn make_leaves(layer: &mut DecoderLayer, i: usize, leaves: &mut Vec<(String, Tensor<2>)>) {
    if !layer.full {
        return;
    }
    for slot in slots(layer) {
        let leaf = get(layer, slot).autodiff().require_grad();
        put(layer, slot, leaf.clone());
        leaves.push((name(i, slot), leaf));
    }
}

/// The fully fine-tuned blocks as host tensors in the files' shapes (biases and norms 1-D),
/// and how many trailing blocks they are (-1 = all).
pub fn full_tensors(model: &Llama) -> Result<(i64, RawWeights)> {
    let mut out = RawWeights::new();
    let mut layers = 0;
    for (i, layer) in model.layers.iter().enumerate().filter(|(_, l)| l.full) {
        layers += 1;
        for slot in slots(layer) {
            let t = get(layer, slot);
            let shape = match slot {
                Slot::Weight(_) => t.dims().to_vec(),
                _ => vec![t.dims()[1]],
            };
            let data = t.inner().try_into_vec_as::<f32>()?;
            out.insert(name(i, slot), RawTensor { shape, data });
        }
    }
    if layers == 0 {
        bail!("the model has no fully fine-tuned blocks to save");
    }
    let n = model.layers.len();
    Ok((if layers == n { -1 } else { layers as i64 }, out))
}

/// Loads a full fine-tune's weights (mlx-lm's `fine_tune_type: full` folder) into the model;
/// the blocks it covers become fully fine-tuned blocks again (so training can resume).
/// Returns the number of trailing blocks, as `num_layers` counts them.
pub fn load_full(model: &mut Llama, dir: &std::path::Path) -> Result<i64> {
    let (num_layers, tensors) = crate::formats::mlx_adapter::read_full(dir)?;
    let src = dir.join("adapters.safetensors");
    let src = src.display();
    let n = model.layers.len();
    let range = layer_range(n, num_layers);
    apply_full(model, num_layers)?;
    let mut seen = 0;
    for (tname, t) in tensors {
        let (i, slot) = parse_name(&tname)
            .with_context(|| format!("{src}: `{tname}` is not a block weight"))?;
        if !range.contains(&i) {
            bail!("{src}: `{tname}` is outside the last {num_layers} of the model's {n} blocks");
        }
        let layer = &mut model.layers[i];
        if !slots(layer).contains(&slot) {
            bail!("{src}: the model has no `{tname}`");
        }
        let want = get(layer, slot).dims();
        let (rows, cols) = match t.shape[..] {
            [r, c] => (r, c),
            [c] => (1, c),
            _ => (0, 0),
        };
        if [rows, cols] != want || (t.shape.len() == 1) == matches!(slot, Slot::Weight(_)) {
            bail!(
                "{src}: `{tname}` has shape {:?}, the model's is {want:?}",
                t.shape
            );
        }
        let device = model.device.clone();
        put(
            layer,
            slot,
            Tensor::from_data(
                burn::tensor::TensorData::new(t.data, [rows, cols]),
                (&device, DType::F32),
            ),
        );
        seen += 1;
    }
    let expected: usize = range.map(|i| slots(&model.layers[i]).len()).sum();
    if seen != expected {
        bail!("{src}: holds {seen} of the {expected} tensors of the blocks it covers");
    }
    Ok(num_layers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in [
            Slot::Weight("mlp.down_proj"),
            Slot::Bias("self_attn.q_proj"),
            Slot::Norm("post_attention_layernorm"),
        ] {
            assert_eq!(parse_name(&name(7, s)), Some((7, s)));
        }
        assert_eq!(
            parse_name("model.layers.1.self_attn.q_proj.lora_A.weight"),
            None
        );
        assert_eq!(parse_name("model.embed_tokens.weight"), None);
    }
}
