//! Causal attention's core as one autodiff operation with a flash-attention backward in plain
//! tensor ops (a burn backend extension).
//!
//! burn differentiates an attention written from tensor ops by keeping every intermediate, the
//! `[B, H, T, S]` scores and probabilities included (the explicit path: fast, but twice PEFT's
//! memory on TinyLlama), and its own attention backward is wrong on Vulkan or slow (the fused and
//! composed paths). This operation keeps only what flash attention keeps — q, k, v, the output and
//! each query row's softmax max and log-sum — and in backward recomputes the probabilities from
//! them and takes dQ, dK, dV in five matrix products:
//! `P = exp(S − max − log_sum)`, `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P (dP − rowsum(dO · O))`,
//! `dQ = dS K / √hd`, `dK = dSᵀ Q / √hd`. One node in the step's graph, so it serves every
//! training step, checkpointed or not. GQA without copying K/V: the query heads sharing a KV
//! head are folded into the row axis of each product.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Backend, Dispatch, backend_extension};
use burn::backend::{TensorMetadata, tensor::FloatTensor};
use burn::tensor::{Shape, Tensor};

use crate::model::op_common::{beside, cast, f32_of};

/// The attention core as a backend operation: the default body (no autodiff) is the forward
/// alone; the autodiff backend records it as one node with the backward above.
#[cfg_attr(feature = "gpu", backend_extension(Flex, Cube, Autodiff))]
#[cfg_attr(not(feature = "gpu"), backend_extension(Flex, Autodiff))]
pub trait AttentionCoreOps: Backend {
    /// q `[B, H, T, hd]`, k and v `[B, KV, S, hd]`, `mask` additive f32 `[1 or B, 1, T, S]`;
    /// returns `[B, T, H * hd]` in v's dtype.
    fn attention_core(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        forward::<Self>(q, k, v, mask).out
    }
}

impl AttentionCoreOps for burn::backend::Flex {}

#[cfg(feature = "gpu")]
impl AttentionCoreOps for burn::backend::Cube {}

impl<B: Backend + AttentionCoreOps, C: CheckpointStrategy> AttentionCoreOps for Autodiff<B, C> {
    fn attention_core(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let mask = mask.into_primitive();
        match Core
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let kept = forward::<B>(
                    q.into_primitive(),
                    k.into_primitive(),
                    v.into_primitive(),
                    mask,
                );
                let out = kept.out.clone();
                prep.finish(kept, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(
                forward::<B>(
                    q.into_primitive(),
                    k.into_primitive(),
                    v.into_primitive(),
                    mask,
                )
                .out,
            ),
        }
    }
}

/// Causal attention's core through [`AttentionCoreOps`] (see the module docs), on whatever
/// backend the tensors live on; `mask` must live on q's device (autodiff or not alike).
pub fn attend_recomputing(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: Tensor<4>) -> Tensor<3> {
    let mask = beside(mask, q.is_autodiff());
    Tensor::from_dispatch(<Dispatch as AttentionCoreOps>::attention_core(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        mask.into_dispatch(),
    ))
}

#[derive(Debug)]
struct Core;

/// What the forward computes and the backward reads: the inputs (q folded, see [`fold`], with
/// its head count), the output and each row's softmax statistics (f32 `[B, H, T, 1]`; max and
/// log-sum apart, so a fully masked row recomputes the forward's 1/S).
#[derive(Debug, Clone)]
pub(crate) struct Kept<B: Backend> {
    q: FloatTensor<B>,
    heads: usize,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    mask: FloatTensor<B>,
    pub(crate) out: FloatTensor<B>,
    max: FloatTensor<B>,
    log_sum: FloatTensor<B>,
}

impl<B: Backend> Backward<B, 3> for Core {
    type State = Kept<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let d_out = grads.consume::<B>(&ops.node);
        let want = [node_q.is_some(), node_k.is_some(), node_v.is_some()];
        let [dq, dk, dv] = core_grads::<B>(ops.state, d_out, want);
        for (node, grad) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

/// dQ `[B, H, T, hd]`, dK and dV `[B, KV, S, hd]` from the forward's [`Kept`] and dO
/// `[B, T, H * hd]`, each only where `want` asks for it (q, k, v).
pub(crate) fn core_grads<B: Backend>(
    kept: Kept<B>,
    d_out: FloatTensor<B>,
    want: [bool; 3],
) -> [Option<FloatTensor<B>>; 3] {
    let Kept {
        q,
        heads: h,
        k,
        v,
        mask,
        out,
        max,
        log_sum,
    } = kept;
    let [b, kvh, gt, hd] = dims4(&q);
    let s = dims4(&k)[2];
    let t = gt / (h / kvh);
    let dtype = v.dtype();
    let probs = B::float_exp(B::float_sub(
        B::float_sub(scores::<B>(q.clone(), k.clone(), mask, h), max),
        log_sum,
    ));
    let d_out_heads = B::float_reshape(d_out.clone(), Shape::new([b, t, h, hd]));
    let d_out_folded = fold::<B>(B::float_swap_dims(d_out_heads, 1, 2), kvh);
    let dv = want[2].then(|| {
        let p = fold::<B>(cast::<B>(probs.clone(), dtype), kvh);
        B::float_matmul(B::float_swap_dims(p, 2, 3), d_out_folded.clone())
    });
    if !want[0] && !want[1] {
        return [None, None, dv];
    }
    // rowsum(dO · O) per query row, f32 [B, H, T, 1].
    let rows = B::float_mul(f32_of::<B>(d_out), f32_of::<B>(out));
    let rows = B::float_reshape(rows, Shape::new([b, t, h, hd]));
    let rows = B::float_swap_dims(B::float_sum_dim(rows, 3), 1, 2);
    let dp = B::float_matmul(d_out_folded, B::float_swap_dims(v, 2, 3));
    let dp = f32_of::<B>(B::float_reshape(dp, Shape::new([b, h, t, s])));
    let ds = B::float_mul(probs, B::float_sub(dp, rows));
    let ds = B::float_mul_scalar(ds, (1.0 / (hd as f32).sqrt()).into());
    let ds = fold::<B>(cast::<B>(ds, q.dtype()), kvh);
    let dq = want[0].then(|| {
        let dq = B::float_matmul(ds.clone(), k);
        B::float_reshape(dq, Shape::new([b, h, t, hd]))
    });
    let dk = want[1].then(|| B::float_matmul(B::float_swap_dims(ds, 2, 3), q));
    [dq, dk, dv]
}

fn dims4(x: &impl TensorMetadata) -> [usize; 4] {
    let shape = x.shape();
    [shape[0], shape[1], shape[2], shape[3]]
}

/// `[B, H, T, n]` (q, dO, probabilities) as `[B, KV, G·T, n]`: the G query heads sharing a KV
/// head folded into its rows, so each product runs against K/V as they are.
fn fold<B: Backend>(q: FloatTensor<B>, kv_heads: usize) -> FloatTensor<B> {
    let [b, h, t, hd] = dims4(&q);
    B::float_reshape(q, Shape::new([b, kv_heads, h / kv_heads * t, hd]))
}

/// `q kᵀ / √hd + mask` in f32, `[B, H, T, S]`, for folded q of `heads` query heads.
fn scores<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    mask: FloatTensor<B>,
    heads: usize,
) -> FloatTensor<B> {
    let [b, kvh, gt, hd] = dims4(&q);
    let s = dims4(&k)[2];
    let scores = B::float_matmul(q, B::float_swap_dims(k, 2, 3));
    let scores = B::float_mul_scalar(scores, (1.0 / (hd as f32).sqrt()).into());
    let shape = Shape::new([b, heads, gt / (heads / kvh), s]);
    B::float_add(f32_of::<B>(B::float_reshape(scores, shape)), mask)
}

/// The forward: the core's output `[B, T, H * hd]` (v's dtype) and what the backward keeps.
pub(crate) fn forward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    mask: FloatTensor<B>,
) -> Kept<B> {
    let [b, h, t, hd] = dims4(&q);
    let kvh = dims4(&k)[1];
    let q = fold::<B>(q, kvh);
    let scores = scores::<B>(q.clone(), k.clone(), mask.clone(), h);
    let max = B::float_max_dim(scores.clone(), 3);
    let e = B::float_exp(B::float_sub(scores, max.clone()));
    let sum = B::float_sum_dim(e.clone(), 3);
    let probs = cast::<B>(B::float_div(e, sum.clone()), v.dtype());
    let out = B::float_reshape(
        B::float_matmul(fold::<B>(probs, kvh), v.clone()),
        Shape::new([b, h, t, hd]),
    );
    let out = B::float_reshape(B::float_swap_dims(out, 1, 2), Shape::new([b, t, h * hd]));
    Kept {
        q,
        heads: h,
        k,
        v,
        mask,
        out,
        max,
        log_sum: B::float_log(sum),
    }
}
