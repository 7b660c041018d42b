//! RMSNorm as one autodiff operation with a hand-written backward (a burn backend extension),
//! opt-in with `TUNA_NORM=op`: on an H200 it trained SmolLM2 at the default's speed in 300 MiB
//! less (`bench/results/h200-2026-12-04b/call1-host-norm-op/`).
//!
//! Written out in tensor ops, RMSNorm records nine autodiff nodes (casts, square, mean, add,
//! sqrt, reciprocal, two products) and keeps an f32 copy of its input; its backward runs about
//! fifteen operations. SmolLM2's training step is bound by the host's cost per operation (README
//! *Measured speed*), so this states the norm as one node: the forward runs the same f32
//! arithmetic untracked and keeps only the input and each row's `r = 1/√(mean(x²) + ε)`; the
//! backward is `dx = r · (g·w − n · mean(g·w · n))` with `n = x · r`, and, when the weight is
//! trained (full fine-tuning), `dw = Σ_rows g · n`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Backend, Dispatch, backend_extension};
use burn::backend::{TensorMetadata, tensor::FloatTensor};
use burn::tensor::{Shape, Tensor};

use crate::model::op_common::{cast, f32_of, joined};

/// RMSNorm over the last axis. The default body (no autodiff) is the forward alone; the
/// autodiff backend records it as one node with the backward above.
#[cfg_attr(feature = "gpu", backend_extension(Flex, Cube, Autodiff))]
#[cfg_attr(not(feature = "gpu"), backend_extension(Flex, Autodiff))]
pub trait RmsNormOps: Backend {
    /// x `[rows, d]` in the model's dtype, w `[d]` (the model's dtype, or f32 when trained);
    /// returns `[rows, d]` in x's dtype, computed in f32 as transformers does.
    fn rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        forward::<Self>(x, w, eps).0
    }
}

impl RmsNormOps for burn::backend::Flex {}

#[cfg(feature = "gpu")]
impl RmsNormOps for burn::backend::Cube {}

impl<B: Backend + RmsNormOps, C: CheckpointStrategy> RmsNormOps for Autodiff<B, C> {
    fn rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        match Norm
            .prepare::<C>([x.node(), w.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, w) = (x.into_primitive(), w.into_primitive());
                let (out, r) = forward::<B>(x.clone(), w.clone(), eps);
                prep.finish(Kept { x, w, r }, out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(forward::<B>(x.into_primitive(), w.into_primitive(), eps).0)
            }
        }
    }
}

/// RMSNorm of `x` (`[..., d]`) by `w` (`[d]`) over its last axis, through [`RmsNormOps`],
/// autodiff or not.
pub fn rms_norm<const D: usize>(x: Tensor<D>, w: Tensor<1>, eps: f64) -> Tensor<D> {
    let dims = x.dims();
    let d = dims[D - 1];
    let tracked = x.is_autodiff() || w.is_autodiff();
    // The layers hold rows already: no reshape recorded there.
    let rows: Tensor<2> = match D {
        2 => Tensor::from_dispatch(x.into_dispatch()),
        _ => x.reshape([dims.iter().product::<usize>() / d.max(1), d]),
    };
    let (x, w) = (joined(rows, tracked), joined(w, tracked));
    let y: Tensor<2> = Tensor::from_dispatch(<Dispatch as RmsNormOps>::rms_norm(
        x.into_dispatch(),
        w.into_dispatch(),
        eps as f32,
    ));
    match D {
        2 => Tensor::from_dispatch(y.into_dispatch()),
        _ => y.reshape(dims),
    }
}

#[derive(Debug)]
struct Norm;

/// The input, the weight and each row's `1/√(mean(x²) + ε)` (f32 `[rows, 1]`).
#[derive(Debug, Clone)]
struct Kept<B: Backend> {
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    r: FloatTensor<B>,
}

impl<B: Backend> Backward<B, 2> for Norm {
    type State = Kept<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let g = f32_of::<B>(grads.consume::<B>(&ops.node));
        let Kept { x, w, r } = ops.state;
        let (x_dtype, w_dtype) = (x.dtype(), w.dtype());
        let d = x.shape()[1];
        let n = B::float_mul(f32_of::<B>(x), r.clone());
        if let Some(node) = node_w {
            let dw = B::float_sum_dim(B::float_mul(g.clone(), n.clone()), 0);
            let dw = B::float_reshape(dw, Shape::new([d]));
            grads.register::<B>(node.id, cast::<B>(dw, w_dtype));
        }
        if let Some(node) = node_x {
            let w = B::float_reshape(f32_of::<B>(w), Shape::new([1, d]));
            let gw = B::float_mul(g, w);
            let m = B::float_mean_dim(B::float_mul(gw.clone(), n.clone()), 1);
            let dx = B::float_mul(B::float_sub(gw, B::float_mul(n, m)), r);
            grads.register::<B>(node.id, cast::<B>(dx, x_dtype));
        }
    }
}

/// The norm in x's dtype and each row's `r`, as [`crate::model::llama::RmsNorm::forward_plain`]
/// computes them: f32 arithmetic, the result cast back, then times the weight in x's dtype.
fn forward<B: Backend>(
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    eps: f32,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let dtype = x.dtype();
    let d = x.shape()[1];
    let xf = f32_of::<B>(x);
    let var = B::float_mean_dim(B::float_mul(xf.clone(), xf.clone()), 1);
    let r = B::float_recip(B::float_sqrt(B::float_add_scalar(var, eps.into())));
    let normed = cast::<B>(B::float_mul(xf, r.clone()), dtype);
    let w = B::float_reshape(cast::<B>(w, dtype), Shape::new([1, d]));
    (B::float_mul(normed, w), r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::RmsNorm;
    use crate::model::lora_op::tests::rel;
    use burn::tensor::{DType, Device, Distribution};

    /// The op's output and gradients equal autodiff through `RmsNorm::forward`'s tensor ops, in
    /// f32 and f16, with the weight frozen (LoRA) and trained in f32 (full fine-tuning).
    #[test]
    fn the_norm_op_gives_autodiffs_gradients() {
        let device = Device::flex();
        let rnd = |shape: Vec<usize>| {
            Tensor::<1>::random(
                [shape.iter().product::<usize>()],
                Distribution::Normal(0.0, 1.0),
                (&device, DType::F32),
            )
        };
        let (b, t, d) = (2, 5, 12);
        let x0 = rnd(vec![b, t, d]).reshape([b, t, d]);
        let w0 = rnd(vec![d]).add_scalar(1.0);
        let g0 = rnd(vec![b, t, d]).reshape([b, t, d]);
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 3e-3)] {
            for w_trained in [false, true] {
                let leaves = || {
                    let x = x0.clone().cast(dtype).autodiff().require_grad();
                    let w = match w_trained {
                        true => w0.clone().autodiff().require_grad(),
                        false => w0.clone().cast(dtype),
                    };
                    (x, w)
                };
                let g = g0.clone().cast(dtype).autodiff();
                let (x, w) = leaves();
                let y = rms_norm(x.clone(), w.clone(), 1e-5);
                assert_eq!(y.dtype(), dtype);
                let grads = (y.clone() * g.clone()).sum().backward();
                let (xp, wp) = leaves();
                let norm = RmsNorm {
                    weight: wp.clone(),
                    eps: 1e-5,
                };
                let yp = norm.forward_plain(xp.clone());
                let pgrads = (yp.clone() * g.clone()).sum().backward();
                let dy = rel(&y.inner(), &yp.clone().inner());
                let dx = rel(&x.grad(&grads).unwrap(), &xp.grad(&pgrads).unwrap());
                // The layers' layout: the same values as rows `[B·T, d]`, no reshape in the op.
                let (xr, wr) = leaves();
                let xr2 = xr.clone().reshape([b * t, d]).detach().require_grad();
                let yr = rms_norm(xr2.clone(), wr.clone(), 1e-5);
                let rgrads = (yr.clone() * g.clone().reshape([b * t, d]))
                    .sum()
                    .backward();
                let dyr = rel(&yr.inner().reshape([b, t, d]), &yp.inner());
                let dxr = rel(
                    &xr2.grad(&rgrads).unwrap().reshape([b, t, d]),
                    &xp.grad(&pgrads).unwrap(),
                );
                assert!(dyr < tol && dxr < tol, "{dtype:?} rows: y {dyr}, dx {dxr}");
                assert!(
                    dy < tol && dx < tol,
                    "{dtype:?} w trained {w_trained}: y {dy}, dx {dx}"
                );
                match w_trained {
                    true => {
                        let dw = rel(&w.grad(&grads).unwrap(), &wp.grad(&pgrads).unwrap());
                        assert!(dw < tol, "{dtype:?}: dw {dw}");
                    }
                    false => assert!(w.grad(&grads).is_none()),
                }
            }
        }
    }
}
