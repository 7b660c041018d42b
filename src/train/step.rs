//! One micro-batch's loss and the gradients of what trains (adapters or whole blocks): what a training step runs.
//!
//! The backward is cut in segments, each seeded through a surrogate `sum(out · grad)`, whose
//! gradient with respect to `out` is `grad` (burn's backward starts from a tensor, not from a
//! given gradient):
//! - the head (final norm, LM head on the target positions only, cross-entropy) runs in row
//!   chunks, each with its own small graph, so f32 logits of every position never exist at once;
//! - with `checkpoint`, every adapted decoder layer is its own segment: the forward keeps only
//!   each layer's input and the backward recomputes the layer from it, as PEFT's gradient
//!   checkpointing does; without it, one graph spans the adapted layers.
//!
//! Layers below the first adapter run outside autodiff and get no backward at all. Nothing here
//! reads a value back to the host: the loss stays on the device until someone asks for it.

use std::collections::HashMap;

use anyhow::Result;
use burn::tensor::{Bool, DType, Int, Tensor, TensorData, activation};

use crate::data::dataset::Batch;
use crate::model::llama::{AttentionPath, Llama};
use crate::model::lora::{self, trainable_parameters};
use crate::optim::{AdamW, FlatLayout, StepGradients};

/// Logits computed at once in the head: about 2^25 f32 values (128 MB) per chunk.
const HEAD_CHUNK_VALUES: usize = 1 << 25;

#[derive(Debug, Clone)]
pub struct StepOptions {
    /// Recompute each adapted layer in backward instead of keeping its activations.
    pub checkpoint: bool,
    /// LoRA dropout masks come from this seed (a function of the run's seed and the step), so a
    /// recomputed layer and a resumed run draw the same masks. `None`: no dropout.
    pub dropout_seed: Option<u64>,
    /// The loss is multiplied by this before backward (f16 loss scaling); the gradients come
    /// back multiplied by it too.
    pub loss_scale: f64,
    /// The path every causal attention of the step takes; `None`: `TUNA_ATTENTION`, else each
    /// pass's default ([`Llama::attend`]: recompute where gradients flow).
    pub attention: Option<AttentionPath>,
}

impl Default for StepOptions {
    fn default() -> Self {
        Self {
            checkpoint: false,
            dropout_seed: None,
            loss_scale: 1.0,
            attention: None,
        }
    }
}

/// What one micro-batch gives the optimizer.
pub struct StepGrads {
    /// Mean loss over the target tokens, f32 `[1]`, still on the device.
    pub loss: Tensor<1>,
    pub targets: usize,
    /// Adapter gradients (times `loss_scale`), named and ordered as [`trainable_parameters`].
    pub grads: Vec<(String, Tensor<2>)>,
}

/// Flat `[B*T]` rows whose hidden state predicts a target, and those targets
/// (shifted as transformers does: position t-1 predicts token t).
pub fn target_positions(b: &Batch) -> (Vec<i64>, Vec<i64>) {
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    for r in 0..b.batch {
        for t in 1..b.seq {
            if b.loss_mask[r * b.seq + t] > 0.0 {
                rows.push((r * b.seq + t - 1) as i64);
                targets.push(b.ids[r * b.seq + t] as i64);
            }
        }
    }
    (rows, targets)
}

/// The final-normed hidden states of the target rows, `[n, d]`, from the last layer's output.
fn target_rows(model: &Llama, h: Tensor<2>, rows: Vec<i64>) -> Tensor<2> {
    let n = rows.len();
    let idx = Tensor::<1, Int>::from_data(TensorData::new(rows, [n]), &model.device);
    model.norm.forward(h).select(0, idx)
}

/// Summed NLL of `targets` under the LM head applied to `sel` (`[n, d]`, outside autodiff),
/// chunk by chunk. With `grad_scale`, also the gradient of `grad_scale · NLL` w.r.t. `sel`.
fn head_nll(
    model: &Llama,
    sel: Tensor<2>,
    targets: &[i64],
    grad_scale: Option<f64>,
) -> (Tensor<1>, Option<Tensor<2>>) {
    let [n, d] = sel.dims();
    let vocab = model.config.vocab_size;
    let chunk = (HEAD_CHUNK_VALUES / vocab).max(1);
    let mut total: Option<Tensor<1>> = None;
    let mut parts = Vec::new();
    for c in (0..n).step_by(chunk) {
        let e = (c + chunk).min(n);
        let len = e - c;
        let mut hc = sel.clone().slice([c..e, 0..d]);
        if grad_scale.is_some() {
            hc = hc.autodiff().require_grad();
        }
        let tgt = Tensor::<2, Int>::from_data(
            TensorData::new(targets[c..e].to_vec(), [len, 1]),
            &model.device,
        );
        let logits = model
            .head(hc.clone().reshape([1, len, d]))
            .reshape([len, vocab])
            .cast(DType::F32);
        let nll = activation::log_softmax(logits, 1)
            .gather(1, tgt)
            .sum()
            .neg();
        if let Some(s) = grad_scale {
            let g = nll.clone().mul_scalar(s).backward();
            parts.push(hc.grad(&g).expect("the chunk is a leaf"));
        }
        let nll = nll.inner();
        total = Some(match total {
            None => nll,
            Some(t) => t + nll,
        });
    }
    let total = total.unwrap_or_else(|| Tensor::zeros([1], (&model.device, DType::F32)));
    (total, grad_scale.map(|_| Tensor::cat(parts, 0)))
}

/// Mean next-token loss over a batch's targets, without gradients (evaluation), f32 `[1]`.
pub fn eval_loss(model: &Llama, b: &Batch) -> (Tensor<1>, usize) {
    let (rows, targets) = target_positions(b);
    let n = targets.len();
    let pass = model.pass(0, b.seq, None, None);
    let mut h = model.embed_rows(model.ids_tensor(&b.ids, b.batch));
    for (i, layer) in model.layers.iter().enumerate() {
        h = model.layer(layer, i, h, &pass);
    }
    let (nll, _) = head_nll(model, target_rows(model, h, rows), &targets, None);
    (nll.div_scalar(n.max(1) as f64), n)
}

/// The loss of one micro-batch and the gradients of its adapters (see the module docs).
/// Batches are padded on the right, so the causal mask alone is exact for the real tokens.
pub fn loss_and_grads(model: &Llama, b: &Batch, o: &StepOptions) -> StepGrads {
    let (rows, targets) = target_positions(b);
    let n = targets.len();
    let mut pass = model.pass(0, b.seq, None, o.dropout_seed);
    pass.attention = o.attention;
    let adapted = lora::adapted_layers(model);
    let nl = model.layers.len();
    let first = adapted.first().copied().unwrap_or(nl);
    let mut x = model.embed_rows(model.ids_tensor(&b.ids, b.batch));
    for i in 0..first {
        x = model.layer(&model.layers[i], i, x, &pass);
    }
    let grad_scale = o.loss_scale / n.max(1) as f64;
    let mut found: HashMap<String, Tensor<2>> = HashMap::new();
    let mut collect = |leaves: Vec<(String, Tensor<2>)>, g: &burn::tensor::Gradients| {
        for (name, leaf) in leaves {
            if let Some(grad) = leaf.grad(g) {
                found.insert(name, grad);
            }
        }
    };
    let head = |h: Tensor<2>| -> (Tensor<1>, Tensor<2>) {
        // Its own segment: a leaf for the last hidden state, the chunked head on top.
        let hl = h.inner().autodiff().require_grad();
        let sel = target_rows(model, hl.clone(), rows.clone());
        let (nll, g_sel) = head_nll(model, sel.clone().inner(), &targets, Some(grad_scale));
        let g = (sel * g_sel.expect("asked for")).sum().backward();
        (nll, hl.grad(&g).expect("the hidden state is a leaf"))
    };
    let nll = if first == nl || n == 0 {
        Tensor::zeros([1], (&model.device, DType::F32))
    } else if !o.checkpoint {
        let mut leaves = Vec::new();
        for i in first..nl {
            let (layer, l) = lora::trainable_layer(&model.layers[i], i);
            leaves.extend(l);
            x = model.layer(&layer, i, x, &pass);
        }
        let (nll, g) = head(x.clone());
        let grads = (x * g).sum().backward();
        collect(leaves, &grads);
        nll
    } else {
        let mut inputs = Vec::with_capacity(nl - first);
        for i in first..nl {
            inputs.push(x.clone());
            x = model.layer(&model.layers[i], i, x, &pass);
        }
        let (nll, mut g) = head(x);
        for i in (first..nl).rev() {
            let (layer, leaves) = lora::trainable_layer(&model.layers[i], i);
            let mut xin = inputs.pop().expect("one input per layer");
            if i > first {
                xin = xin.autodiff().require_grad();
            }
            let y = model.layer(&layer, i, xin.clone(), &pass);
            let grads = (y * g.clone()).sum().backward();
            collect(leaves, &grads);
            if i > first {
                g = xin.grad(&grads).expect("the layer input is a leaf");
            }
        }
        nll
    };
    let grads = trainable_parameters(model)
        .into_iter()
        .filter_map(|(name, _)| found.remove(&name).map(|g| (name, g)))
        .collect();
    StepGrads {
        loss: nll.div_scalar(n.max(1) as f64),
        targets: n,
        grads,
    }
}

/// One optimizer update of the model's adapters from `grads` (as the trainer makes it, through
/// [`apply_gradients`]), written back into the model. `apply` and `grad_mul` as in
/// [`AdamW::step_where`].
pub fn update_adapters(
    model: &mut Llama,
    opt: &mut AdamW,
    grads: &[(String, Tensor<2>)],
    apply: Option<&Tensor<1, Bool>>,
    grad_mul: f64,
) -> Result<()> {
    let grads = StepGradients::new(grads.to_vec(), trainable_layout(model));
    apply_gradients(model, opt, grads, apply, grad_mul)
}

/// The layout of what trains, for [`StepGradients::new`].
pub fn trainable_layout(model: &Llama) -> FlatLayout {
    FlatLayout::of(&trainable_parameters(model))
}

/// [`update_adapters`] from gradients already gathered for the step (flat where they cover
/// every trainable parameter).
pub fn apply_gradients(
    model: &mut Llama,
    opt: &mut AdamW,
    grads: StepGradients,
    apply: Option<&Tensor<1, Bool>>,
    grad_mul: f64,
) -> Result<()> {
    let mut params = trainable_parameters(model);
    match grads {
        StepGradients::Flat(layout, g) => opt.step_flat(&mut params, &layout, g, apply, grad_mul),
        StepGradients::Named(g) => opt.step_named(&mut params, &g, apply, grad_mul),
    }
    lora::set_trainable_parameters(model, params)
}
