//! A layer's projections that read the same input as one product per group (q/k/v, gate/up),
//! and the operations that read such a product (burn backend extensions): the product itself
//! against frozen weights, attention fed by the q/k/v rows with RoPE inside, and SwiGLU fed by
//! the gate/up rows. Opt-in (`TUNA_PROJECTIONS=fused`), and only in passes a gradient flows
//! through (`llama::Pass::fuses`): on an H100 it trained SmolLM2 at the default's speed and
//! TinyLlama at 0.91× of it, in 15-17 % less GPU memory (`bench/results/h100-2026-12-07/call1-fused/`).
//!
//! Run as one product per group, a layer needs two matrix products instead of five forward and
//! two instead of five for the input gradient, and its input's gradient is summed from fewer
//! parts. But the parts must then be cut out of the product's columns, and autodiff's slice pays
//! for that in backward: each slice's gradient is a zero tensor of the whole product's size with
//! the slice assigned into it, then the parts' gradients are added. The operations below take
//! the whole product and cut it themselves, untracked, so their backward writes the product's
//! gradient as one concatenation of the parts'. Each is one node in the step's graph where the
//! tensor ops they replace recorded about ten (RoPE's reshape, flip, products and sum per head
//! group, the swaps to heads; SiLU's sigmoid and products).
//!
//! The weights are joined for the product only: [`GroupProductOps`] keeps the model's own
//! tensors for backward and joins them again there, so no joined copy of every layer's weights
//! stays alive through the step (TinyLlama's would be 1.2 GB in f16).
//!
//! SmolLM2's training step is bound by the host's cost per operation (README *Measured speed*),
//! which is why this was tried; 180 fewer product launches a step did not move it.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Backend, Dispatch, backend_extension};
use burn::backend::{TensorMetadata, tensor::FloatTensor};
use burn::tensor::{Shape, Slice, Tensor};

use crate::model::attention_op::{self, Kept};
use crate::model::op_common::{beside, cast, f32_of, joined};

/// How the q/k/v product's columns split: `heads` query heads, then `kv_heads` key heads and as
/// many value heads, `head_dim` wide each; its rows are `seq` positions of each batch row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QkvLayout {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub seq: usize,
}

impl QkvLayout {
    fn new(heads: usize, kv_heads: usize, head_dim: usize, seq: usize) -> Self {
        Self {
            heads,
            kv_heads,
            head_dim,
            seq,
        }
    }

    fn width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }
}

/// `x` `[rows, in]` times frozen weights `[out_i, in]` joined by rows and transposed:
/// `[rows, Σ out_i]`. The default body (no autodiff) is the product alone; the autodiff backend
/// records one node that keeps the weights as they are and joins them again in backward.
#[cfg_attr(feature = "gpu", backend_extension(Flex, Cube, Autodiff))]
#[cfg_attr(not(feature = "gpu"), backend_extension(Flex, Autodiff))]
pub trait GroupProductOps: Backend {
    /// Two weights (gate, up).
    fn group_product2(
        x: FloatTensor<Self>,
        w0: FloatTensor<Self>,
        w1: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        group_forward::<Self>(x, &[w0, w1])
    }

    /// Three weights (q, k, v).
    fn group_product3(
        x: FloatTensor<Self>,
        w0: FloatTensor<Self>,
        w1: FloatTensor<Self>,
        w2: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        group_forward::<Self>(x, &[w0, w1, w2])
    }
}

/// Attention from a fused q/k/v product. The default body (no autodiff) is the forward alone;
/// the autodiff backend records it as one node.
#[cfg_attr(feature = "gpu", backend_extension(Flex, Cube, Autodiff))]
#[cfg_attr(not(feature = "gpu"), backend_extension(Flex, Autodiff))]
pub trait QkvAttentionOps: Backend {
    /// `qkv` `[B·T, (H + 2·KV)·hd]` (see [`QkvLayout`]); RoPE's `cos` and `[-sin, sin]`
    /// `[1, T, 1, 2, hd / 2]` in qkv's dtype; `mask` additive f32 `[1 or B, 1, T, T]`. Returns
    /// the attention core's output as rows `[B·T, H·hd]`.
    #[allow(clippy::too_many_arguments)]
    fn qkv_attention(
        qkv: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        seq: usize,
    ) -> FloatTensor<Self> {
        let layout = QkvLayout::new(heads, kv_heads, head_dim, seq);
        attention_forward::<Self>(qkv, cos, sin, mask, layout).0
    }
}

/// SwiGLU from a fused gate/up product. The default body (no autodiff) is the forward alone;
/// the autodiff backend records it as one node.
#[cfg_attr(feature = "gpu", backend_extension(Flex, Cube, Autodiff))]
#[cfg_attr(not(feature = "gpu"), backend_extension(Flex, Autodiff))]
pub trait SwiGluOps: Backend {
    /// `gate_up` `[rows, 2·I]`: gate's `I` columns, then up's. Returns `silu(gate) · up`
    /// `[rows, I]` in its dtype.
    fn swiglu(gate_up: FloatTensor<Self>) -> FloatTensor<Self> {
        swiglu_forward::<Self>(gate_up)
    }
}

impl GroupProductOps for burn::backend::Flex {}
impl QkvAttentionOps for burn::backend::Flex {}
impl SwiGluOps for burn::backend::Flex {}

#[cfg(feature = "gpu")]
impl GroupProductOps for burn::backend::Cube {}
#[cfg(feature = "gpu")]
impl QkvAttentionOps for burn::backend::Cube {}
#[cfg(feature = "gpu")]
impl SwiGluOps for burn::backend::Cube {}

impl<B: Backend + GroupProductOps, C: CheckpointStrategy> GroupProductOps for Autodiff<B, C> {
    fn group_product2(
        x: FloatTensor<Self>,
        w0: FloatTensor<Self>,
        w1: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        group_recorded::<B, C>(x, vec![w0.into_primitive(), w1.into_primitive()])
    }

    fn group_product3(
        x: FloatTensor<Self>,
        w0: FloatTensor<Self>,
        w1: FloatTensor<Self>,
        w2: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let ws = vec![
            w0.into_primitive(),
            w1.into_primitive(),
            w2.into_primitive(),
        ];
        group_recorded::<B, C>(x, ws)
    }
}

/// The group's product as one autodiff node of `x` (the weights are frozen: see
/// [`group_product`]).
fn group_recorded<B: Backend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    ws: Vec<FloatTensor<B>>,
) -> FloatTensor<Autodiff<B, C>> {
    match GroupProduct
        .prepare::<C>([x.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let out = group_forward::<B>(x.into_primitive(), &ws);
            prep.finish(ws, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(group_forward::<B>(x.into_primitive(), &ws)),
    }
}

impl<B: Backend + QkvAttentionOps, C: CheckpointStrategy> QkvAttentionOps for Autodiff<B, C> {
    fn qkv_attention(
        qkv: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        seq: usize,
    ) -> FloatTensor<Self> {
        let layout = QkvLayout::new(heads, kv_heads, head_dim, seq);
        let (cos, sin, mask) = (
            cos.into_primitive(),
            sin.into_primitive(),
            mask.into_primitive(),
        );
        match QkvAttention
            .prepare::<C>([qkv.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (out, core) = attention_forward::<B>(
                    qkv.into_primitive(),
                    cos.clone(),
                    sin.clone(),
                    mask,
                    layout,
                );
                prep.finish(
                    AttentionKept {
                        core,
                        cos,
                        sin,
                        layout,
                    },
                    out,
                )
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(attention_forward::<B>(qkv.into_primitive(), cos, sin, mask, layout).0)
            }
        }
    }
}

impl<B: Backend + SwiGluOps, C: CheckpointStrategy> SwiGluOps for Autodiff<B, C> {
    fn swiglu(gate_up: FloatTensor<Self>) -> FloatTensor<Self> {
        match SwiGlu
            .prepare::<C>([gate_up.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let gu = gate_up.into_primitive();
                let out = swiglu_forward::<B>(gu.clone());
                prep.finish(gu, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(swiglu_forward::<B>(gate_up.into_primitive())),
        }
    }
}

/// `x` `[rows, in]` times the weights `ws` (two or three, `[out_i, in]` each, in x's dtype)
/// joined by rows: `[rows, Σ out_i]`. Frozen weights go through [`GroupProductOps`]; trained
/// ones (full fine-tuning) are joined and multiplied under autodiff, which gives each its
/// gradient.
pub fn group_product(x: Tensor<2>, ws: Vec<Tensor<2>>) -> Tensor<2> {
    if ws.iter().any(Tensor::is_tracked) || !(2..=3).contains(&ws.len()) {
        return x.matmul(Tensor::cat(ws, 0).transpose());
    }
    let (tracked, n) = (x.is_autodiff(), ws.len());
    let mut ws = ws.into_iter().map(|w| joined(w, tracked).into_dispatch());
    let mut next = || ws.next().expect("two or three weights");
    let x = x.into_dispatch();
    Tensor::from_dispatch(match n {
        2 => <Dispatch as GroupProductOps>::group_product2(x, next(), next()),
        _ => <Dispatch as GroupProductOps>::group_product3(x, next(), next(), next()),
    })
}

/// Causal attention from the fused q/k/v rows `qkv` (see [`QkvAttentionOps::qkv_attention`]),
/// autodiff or not; `cos`, `sin` and `mask` join qkv's side (they carry no gradient).
pub fn qkv_attention(
    qkv: Tensor<2>,
    cos: Tensor<5>,
    sin: Tensor<5>,
    mask: Tensor<4>,
    layout: QkvLayout,
) -> Tensor<2> {
    let side = qkv.is_autodiff();
    let (cos, sin, mask) = (beside(cos, side), beside(sin, side), beside(mask, side));
    Tensor::from_dispatch(<Dispatch as QkvAttentionOps>::qkv_attention(
        qkv.into_dispatch(),
        cos.into_dispatch(),
        sin.into_dispatch(),
        mask.into_dispatch(),
        layout.heads,
        layout.kv_heads,
        layout.head_dim,
        layout.seq,
    ))
}

/// `silu(gate) · up` from the fused gate/up rows (see [`SwiGluOps::swiglu`]), autodiff or not.
pub fn swiglu(gate_up: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as SwiGluOps>::swiglu(gate_up.into_dispatch()))
}

#[derive(Debug)]
struct GroupProduct;

impl<B: Backend> Backward<B, 1> for GroupProduct {
    type State = Vec<FloatTensor<B>>;

    /// `dx = dy · W` with the weights joined again for this product only.
    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let Some(node) = node else { return };
        let w = B::float_cat(ops.state, 0);
        grads.register::<B>(node.id, B::float_matmul(dy, w));
    }
}

/// `x · [w0; w1; …]ᵀ`.
fn group_forward<B: Backend>(x: FloatTensor<B>, ws: &[FloatTensor<B>]) -> FloatTensor<B> {
    let w = B::float_cat(ws.to_vec(), 0);
    B::float_matmul(x, B::float_transpose(w))
}

#[derive(Debug)]
struct QkvAttention;

/// The attention core's state (roped q and k, v, output, softmax statistics), RoPE's tables
/// for the way back, and the layout to cut and join the product's columns by.
#[derive(Debug, Clone)]
struct AttentionKept<B: Backend> {
    core: Kept<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
    layout: QkvLayout,
}

impl<B: Backend> Backward<B, 1> for QkvAttention {
    type State = AttentionKept<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let d_out = grads.consume::<B>(&ops.node);
        let Some(node) = node else { return };
        let AttentionKept {
            core,
            cos,
            sin,
            layout,
        } = ops.state;
        let QkvLayout {
            heads: h,
            kv_heads: kvh,
            head_dim: hd,
            seq: t,
        } = layout;
        let rows = d_out.shape()[0];
        let b = rows / t;
        let d_out = B::float_reshape(d_out, Shape::new([b, t, h * hd]));
        let [dq, dk, dv] = attention_op::core_grads::<B>(core, d_out, [true; 3]);
        let back = |g: Option<FloatTensor<B>>, heads: usize, roped: bool| {
            let g = B::float_swap_dims(g.expect("asked for"), 1, 2);
            let g = match roped {
                true => rope::<B>(g, cos.clone(), sin.clone(), true),
                false => g,
            };
            B::float_reshape(g, Shape::new([rows, heads * hd]))
        };
        let d_qkv = B::float_cat(
            vec![back(dq, h, true), back(dk, kvh, true), back(dv, kvh, false)],
            1,
        );
        grads.register::<B>(node.id, d_qkv);
    }
}

#[derive(Debug)]
struct SwiGlu;

impl<B: Backend> Backward<B, 1> for SwiGlu {
    type State = FloatTensor<B>;

    /// `d gate = d · up · s · (1 + gate · (1 − s))`, `d up = d · silu(gate)` with `s` the
    /// sigmoid of gate, in f32; the product's gradient is the two side by side.
    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let d = grads.consume::<B>(&ops.node);
        let Some(node) = node else { return };
        let gate_up = ops.state;
        let dtype = gate_up.dtype();
        let (gate, up) = halves::<B>(gate_up);
        let (g, s) = gate_sigmoid::<B>(gate);
        let d = f32_of::<B>(d);
        let silu = B::float_mul(g.clone(), s.clone());
        let du = B::float_mul(d.clone(), silu);
        // s · (1 + g · (1 − s)) = s + silu · (1 − s)
        let one_minus_s = B::float_add_scalar(B::float_neg(s.clone()), 1.0.into());
        let dsilu = B::float_add(s.clone(), B::float_mul(B::float_mul(g, s), one_minus_s));
        let dg = B::float_mul(B::float_mul(d, f32_of::<B>(up)), dsilu);
        let d_gate_up = B::float_cat(vec![cast::<B>(dg, dtype), cast::<B>(du, dtype)], 1);
        grads.register::<B>(node.id, d_gate_up);
    }
}

/// Columns `from..to` of the rows `x` `[rows, width]`.
fn columns<B: Backend>(x: FloatTensor<B>, from: usize, to: usize) -> FloatTensor<B> {
    let rows = x.shape()[0];
    B::float_slice(x, &[Slice::from(0..rows), Slice::from(from..to)])
}

/// Gate's columns and up's of the fused rows `[rows, 2·I]`.
fn halves<B: Backend>(gate_up: FloatTensor<B>) -> (FloatTensor<B>, FloatTensor<B>) {
    let width = gate_up.shape()[1];
    let i = width / 2;
    (
        columns::<B>(gate_up.clone(), 0, i),
        columns::<B>(gate_up, i, width),
    )
}

/// Gate in f32 and its sigmoid, `1 / (1 + e^(−g))`, in f32.
fn gate_sigmoid<B: Backend>(gate: FloatTensor<B>) -> (FloatTensor<B>, FloatTensor<B>) {
    let g = f32_of::<B>(gate);
    let s = B::float_recip(B::float_add_scalar(
        B::float_exp(B::float_neg(g.clone())),
        1.0.into(),
    ));
    (g, s)
}

/// `silu(gate) · up`: SiLU in f32 rounded once to the model's dtype, then times up in that
/// dtype (`activation::silu` rounds the sigmoid first and multiplies in the model's dtype: in
/// f16 the two differ by rounding).
fn swiglu_forward<B: Backend>(gate_up: FloatTensor<B>) -> FloatTensor<B> {
    let dtype = gate_up.dtype();
    let (gate, up) = halves::<B>(gate_up);
    let (g, s) = gate_sigmoid::<B>(gate);
    let silu = cast::<B>(B::float_mul(g, s), dtype);
    B::float_mul(silu, up)
}

/// RoPE on `x` `[B, T, heads, hd]` in HF's half-split layout, as `llama::apply_rope` states it:
/// `x·cos + swap(x)·sin±`, `swap` exchanging the halves; `inverse` turns by the opposite angle
/// (`x·cos − swap(x)·sin±`), which is the rotation's transpose and so its backward.
fn rope<B: Backend>(
    x: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
    inverse: bool,
) -> FloatTensor<B> {
    let shape = x.shape();
    let [b, t, h, hd] = [shape[0], shape[1], shape[2], shape[3]];
    let x = B::float_reshape(x, Shape::new([b, t, h, 2, hd / 2]));
    let turned = B::float_mul(B::float_flip(x.clone(), &[3]), sin);
    let straight = B::float_mul(x, cos);
    let y = match inverse {
        false => B::float_add(straight, turned),
        true => B::float_sub(straight, turned),
    };
    B::float_reshape(y, Shape::new([b, t, h, hd]))
}

/// The forward: q, k and v cut from the product's columns into heads, RoPE on q and k, the
/// attention core ([`attention_op`]); its output as rows `[B·T, H·hd]` and its kept state.
fn attention_forward<B: Backend>(
    qkv: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
    mask: FloatTensor<B>,
    layout: QkvLayout,
) -> (FloatTensor<B>, Kept<B>) {
    let QkvLayout {
        heads: h,
        kv_heads: kvh,
        head_dim: hd,
        seq: t,
    } = layout;
    let [rows, width] = [qkv.shape()[0], qkv.shape()[1]];
    assert!(
        width == layout.width() && t > 0 && rows % t == 0,
        "q/k/v product [{rows}, {width}] does not fit {layout:?}"
    );
    let b = rows / t;
    let heads_of = |from: usize, n: usize| {
        B::float_reshape(
            columns::<B>(qkv.clone(), from * hd, (from + n) * hd),
            Shape::new([b, t, n, hd]),
        )
    };
    let q = rope::<B>(heads_of(0, h), cos.clone(), sin.clone(), false);
    let k = rope::<B>(heads_of(h, kvh), cos, sin, false);
    let v = heads_of(h + kvh, kvh);
    let core = attention_op::forward::<B>(
        B::float_swap_dims(q, 1, 2),
        B::float_swap_dims(k, 1, 2),
        B::float_swap_dims(v, 1, 2),
        mask,
    );
    let out = B::float_reshape(core.out.clone(), Shape::new([rows, h * hd]));
    (out, core)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::{apply_rope, attend_explicit, causal_mask_tensor};
    use crate::model::lora_op::tests::rel;
    use burn::tensor::{DType, Device, Distribution, TensorData, activation};

    fn normal<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
        Tensor::<1>::random(
            [shape.iter().product::<usize>()],
            Distribution::Normal(0.0, 1.0),
            (device, DType::F32),
        )
        .reshape(shape)
    }

    /// RoPE's tables as the model builds them (`cos` on both halves, `[-sin, sin]`), for
    /// positions 0..t at random frequencies: the backward's inverse turn relies on that shape.
    fn tables(t: usize, hd: usize, device: &Device) -> (Tensor<5>, Tensor<5>) {
        let half = hd / 2;
        let freqs: Vec<f64> = (0..half)
            .map(|i| 1.0 / 10f64.powf(i as f64 / half as f64))
            .collect();
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for p in 0..t {
            for sign in [-1.0, 1.0] {
                for f in &freqs {
                    cos.push((p as f64 * f).cos() as f32);
                    sin.push((sign * (p as f64 * f).sin()) as f32);
                }
            }
        }
        let mk = |v: Vec<f32>| {
            Tensor::<1>::from_data(TensorData::new(v, [t * hd]), (device, DType::F32))
                .reshape([1, t, 1, 2, half])
        };
        (mk(cos), mk(sin))
    }

    /// The fused q/k/v attention's output and its gradient of the product equal autodiff of
    /// the same attention written in tensor ops (columns cut by slices, `apply_rope`, the
    /// explicit softmax path), with GQA (4 query heads on 2 KV heads), in f32 and f16.
    #[test]
    fn qkv_attention_gives_autodiffs_gradients() {
        let device = Device::flex();
        let (b, t, h, kvh, hd) = (2, 5, 4, 2, 8);
        let layout = QkvLayout {
            heads: h,
            kv_heads: kvh,
            head_dim: hd,
            seq: t,
        };
        let width = (h + 2 * kvh) * hd;
        let qkv0 = normal([b * t, width], &device);
        let g0 = normal([b * t, h * hd], &device);
        let (cos0, sin0) = tables(t, hd, &device);
        let mask = causal_mask_tensor(t, t, None, &device);
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 4e-3)] {
            let (cos, sin) = (cos0.clone().cast(dtype), sin0.clone().cast(dtype));
            let g = g0.clone().cast(dtype).autodiff();
            let x = qkv0.clone().cast(dtype).autodiff().require_grad();
            let y = qkv_attention(x.clone(), cos.clone(), sin.clone(), mask.clone(), layout);
            assert_eq!((y.dims(), y.dtype()), ([b * t, h * hd], dtype));
            let grads = (y.clone() * g.clone()).sum().backward();

            let xp = qkv0.clone().cast(dtype).autodiff().require_grad();
            let (ca, sa) = (cos.clone().autodiff(), sin.clone().autodiff());
            let heads = |from: usize, n: usize| {
                xp.clone()
                    .slice([0..b * t, from * hd..(from + n) * hd])
                    .reshape([b, t, n, hd])
            };
            let q = apply_rope(heads(0, h), &ca, &sa).swap_dims(1, 2);
            let k = apply_rope(heads(h, kvh), &ca, &sa).swap_dims(1, 2);
            let v = heads(h + kvh, kvh).swap_dims(1, 2);
            let yp = attend_explicit(q, k, v, mask.clone().autodiff()).reshape([b * t, h * hd]);
            let pgrads = (yp.clone() * g.clone()).sum().backward();
            let dy = rel(&y.inner(), &yp.clone().inner());
            let dx = rel(&x.grad(&grads).unwrap(), &xp.grad(&pgrads).unwrap());
            assert!(dy < tol && dx < tol, "{dtype:?}: y {dy}, d qkv {dx}");
            // Untracked, the op is its forward alone.
            let plain = qkv_attention(qkv0.clone().cast(dtype), cos, sin, mask.clone(), layout);
            assert!(rel(&plain, &yp.inner()) < tol);
        }
    }

    /// A q/k/v product that does not fit the layout is refused, naming both.
    #[test]
    #[should_panic(expected = "does not fit")]
    fn qkv_attention_refuses_a_product_of_another_width() {
        let device = Device::flex();
        let layout = QkvLayout {
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            seq: 5,
        };
        let (cos, sin) = tables(5, 8, &device);
        let mask = causal_mask_tensor(5, 5, None, &device);
        qkv_attention(normal([10, 60], &device), cos, sin, mask, layout);
    }

    /// The group's product equals `x` times the joined weights and gives autodiff's gradient
    /// of `x`, with frozen weights (the op) in f32 and f16, and with trained ones (full
    /// fine-tuning: joined under autodiff), which then get theirs.
    #[test]
    fn group_product_gives_autodiffs_gradients() {
        let device = Device::flex();
        let (rows, d_in) = (6, 10);
        let x0 = normal([rows, d_in], &device);
        let ws0: Vec<_> = [8, 4, 4].map(|o| normal([o, d_in], &device)).to_vec();
        let g0 = normal([rows, 16], &device);
        for (dtype, tol) in [(DType::F32, 1e-6), (DType::F16, 2e-3)] {
            for n in [2, 3] {
                let ws: Vec<_> = ws0[..n].iter().map(|w| w.clone().cast(dtype)).collect();
                let width: usize = ws.iter().map(|w| w.dims()[0]).sum();
                let g = g0.clone().slice([0..rows, 0..width]).cast(dtype).autodiff();
                let x = x0.clone().cast(dtype).autodiff().require_grad();
                let y = group_product(x.clone(), ws.clone());
                assert_eq!((y.dims(), y.dtype()), ([rows, width], dtype));
                let grads = (y.clone() * g.clone()).sum().backward();
                let xp = x0.clone().cast(dtype).autodiff().require_grad();
                let wp = Tensor::cat(ws.iter().map(|w| w.clone().autodiff()).collect(), 0);
                let yp = xp.clone().matmul(wp.transpose());
                let pgrads = (yp.clone() * g).sum().backward();
                let dy = rel(&y.inner(), &yp.inner());
                let dx = rel(&x.grad(&grads).unwrap(), &xp.grad(&pgrads).unwrap());
                assert!(
                    dy < tol && dx < tol,
                    "{dtype:?} {n} weights: y {dy}, dx {dx}"
                );
            }
        }
        // Trained weights get their own gradients.
        let x = x0.clone().autodiff();
        let ws: Vec<_> = ws0
            .iter()
            .map(|w| w.clone().autodiff().require_grad())
            .collect();
        let grads = (group_product(x.clone(), ws.clone()) * g0.clone().autodiff())
            .sum()
            .backward();
        let mut from = 0;
        for w in &ws {
            let o = w.dims()[0];
            let want = g0
                .clone()
                .slice([0..rows, from..from + o])
                .transpose()
                .matmul(x0.clone());
            let dw = rel(&w.grad(&grads).unwrap(), &want);
            assert!(dw < 1e-6, "dw {dw}");
            from += o;
        }
    }

    /// SwiGLU's output and its gradient of the fused gate/up rows equal autodiff of
    /// `silu(gate) · up` in tensor ops, in f32 and f16.
    #[test]
    fn swiglu_gives_autodiffs_gradients() {
        let device = Device::flex();
        let (rows, i) = (7, 12);
        let x0 = normal([rows, 2 * i], &device).mul_scalar(3.0);
        let g0 = normal([rows, i], &device);
        for (dtype, tol) in [(DType::F32, 1e-6), (DType::F16, 2e-3)] {
            let g = g0.clone().cast(dtype).autodiff();
            let x = x0.clone().cast(dtype).autodiff().require_grad();
            let y = swiglu(x.clone());
            assert_eq!((y.dims(), y.dtype()), ([rows, i], dtype));
            let grads = (y.clone() * g.clone()).sum().backward();
            let xp = x0.clone().cast(dtype).autodiff().require_grad();
            let gate = xp.clone().slice([0..rows, 0..i]);
            let up = xp.clone().slice([0..rows, i..2 * i]);
            let yp = activation::silu(gate) * up;
            let pgrads = (yp.clone() * g).sum().backward();
            let dy = rel(&y.inner(), &yp.inner());
            let dx = rel(&x.grad(&grads).unwrap(), &xp.grad(&pgrads).unwrap());
            assert!(dy < tol && dx < tol, "{dtype:?}: y {dy}, d gate/up {dx}");
        }
    }
}
