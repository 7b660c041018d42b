//! LoRA's side branch `scale · (x Aᵀ) Bᵀ` as one autodiff operation built from three skinny
//! products (a burn backend extension).
//!
//! Every product of a rank-r branch has r (8–64) on one side: x·Aᵀ is `[m, k] × [k, r]`, its
//! gradients dA = dXAᵀ·x and dB = dδᵀ·XA sum thousands of rows into `[r, k]` and `[n, r]`, shapes a
//! square-tiled GEMM serves poorly. Stated as two matmuls, autodiff also records casts of the f32
//! factors to the activations' dtype and transposed copies around them. The branch needs only
//! three shapes of product:
//! - `project(x, w, s)` = s · x wᵀ, x `[m, k]`, w `[r, k]` → `[m, r]` (xa = x Aᵀ; with `w_t`, w
//!   is `[k, r]`: dXA = dδ B with B as it is)
//! - `expand(u, w, s)` = s · u w, u `[m, r]`, w `[r, n]` → `[m, n]` (dx = dXA A; with `w_t`, w is
//!   `[n, r]`: δ = XA Bᵀ)
//! - `reduce(u, x, s)` = s · uᵀ x in f32, u `[m, r]`, x `[m, k]` → `[r, k]` (dA; with `out_t` the
//!   transpose `[k, r]`: dB in B's layout)
//!
//! Each has a plain body (one matmul, used on the CPU and wherever no kernel applies) and, on
//! cubecl's runtimes, a kernel of its own (`model::lora_kernels`, Linux; r ≤ 64, and project only
//! where subgroups have one fixed size). The branch's backward is written here once in terms of
//! the three, so autodiff records one node per adapted projection. Measured on an
//! H200, training runs within the run-to-run spread of the two-matmul branch (README, *LoRA's
//! branch is one op*); `TUNA_LORA_BRANCH=plain` selects that branch again.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Backend, Dispatch, backend_extension};
use burn::backend::{TensorMetadata, tensor::FloatTensor};
use burn::tensor::{DType, Shape, Tensor};

use crate::model::op_common::{cast, joined};

/// The three skinny products and the branch built from them. The default bodies are plain
/// tensor ops; cubecl's backend overrides the products with its kernels. The factors keep their
/// own dtype (f32 in half-precision training): the products read them as they are, so no cast
/// of A or B is recorded, and the factors' gradients come out in f32.
#[backend_extension(
    Flex,
    Cube: cfg(feature = "gpu"),
    Fusion: cfg(all(feature = "gpu", not(target_os = "macos"))),
    Autodiff,
)]
pub trait LoraOps: Backend {
    /// `scale · x wᵀ` → `[m, r]` in x's dtype: x `[m, k]`, w `[r, k]`, or w `[k, r]` and `w_t`
    /// (B's layout, for `dδ · B`).
    #[fusion(dtype = x, shape = project_shape(x, w, w_t))]
    fn lora_project(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        scale: f32,
        w_t: bool,
    ) -> FloatTensor<Self> {
        plain_project::<Self>(x, w, scale, w_t)
    }

    /// `scale · u w` → `[m, n]` in u's dtype: u `[m, r]`, w `[r, n]`, or w `[n, r]` and `w_t`
    /// (B's layout, for `XA · Bᵀ`).
    #[fusion(dtype = u, shape = expand_shape(u, w, w_t))]
    fn lora_expand(
        u: FloatTensor<Self>,
        w: FloatTensor<Self>,
        scale: f32,
        w_t: bool,
    ) -> FloatTensor<Self> {
        plain_expand::<Self>(u, w, scale, w_t)
    }

    /// `scale · uᵀ x` as f32: u `[m, r]`, x `[m, k]` → `[r, k]`, or its transpose `[k, r]` with
    /// `out_t` (B's layout, for dB). The kernels sum in f32; the plain body multiplies in x's
    /// dtype and casts the result.
    #[fusion(dtype = DType::F32, shape = reduce_shape(u, x, out_t))]
    fn lora_reduce(
        u: FloatTensor<Self>,
        x: FloatTensor<Self>,
        scale: f32,
        out_t: bool,
    ) -> FloatTensor<Self> {
        plain_reduce::<Self>(u, x, scale, out_t)
    }

    /// The branch `scale · (x aᵀ) bᵀ`: x `[m, k]`, a `[r, k]`, b `[n, r]` → `[m, n]` in x's
    /// dtype. Without autodiff this is the forward alone; autodiff records it as one node (see
    /// the module docs).
    #[fusion(default)]
    fn lora_delta(
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        branch_forward::<Self>(x, a, b, scale).1
    }
}

/// The branch's forward, `(x aᵀ, s · (x aᵀ) bᵀ)`: the first is what the backward keeps.
fn branch_forward<B: LoraOps>(
    x: FloatTensor<B>,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    scale: f32,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let xa = B::lora_project(x, a, 1.0, false);
    let out = B::lora_expand(xa.clone(), b, scale, true);
    (xa, out)
}

impl LoraOps for burn::backend::Flex {}

/// On macOS the products keep their plain bodies (the kernels are built and measured on
/// Vulkan only).
#[cfg(all(feature = "gpu", target_os = "macos"))]
impl LoraOps for burn::backend::Cube {}

impl<B: Backend + LoraOps, C: CheckpointStrategy> LoraOps for Autodiff<B, C> {
    fn lora_delta(
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        match Branch
            .prepare::<C>([x.node(), a.node(), b.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, a, b) = (x.into_primitive(), a.into_primitive(), b.into_primitive());
                let (xa, out) = branch_forward::<B>(x.clone(), a.clone(), b.clone(), scale);
                prep.finish(Kept { x, a, b, xa, scale }, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::lora_delta(
                x.into_primitive(),
                a.into_primitive(),
                b.into_primitive(),
                scale,
            )),
        }
    }
}

/// `scale · (x aᵀ) bᵀ` through [`LoraOps`] on whatever backend x lives on (autodiff or not), in
/// x's dtype; the factors may be f32 beside a half-precision x.
pub fn lora_delta(x: Tensor<2>, a: Tensor<2>, b: Tensor<2>, scale: f64) -> Tensor<2> {
    // A frozen input (the first adapted layer's) meets trainable factors, or the reverse: all
    // three join the autodiff graph, the untracked ones as constants.
    let tracked = x.is_autodiff() || a.is_autodiff() || b.is_autodiff();
    let (x, a, b) = (joined(x, tracked), joined(a, tracked), joined(b, tracked));
    Tensor::from_dispatch(<Dispatch as LoraOps>::lora_delta(
        x.into_dispatch(),
        a.into_dispatch(),
        b.into_dispatch(),
        scale as f32,
    ))
}

/// [`LoraOps::lora_project`] on tensors.
pub fn project(x: Tensor<2>, w: Tensor<2>, scale: f32, w_t: bool) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as LoraOps>::lora_project(
        x.into_dispatch(),
        w.into_dispatch(),
        scale,
        w_t,
    ))
}

/// [`LoraOps::lora_expand`] on tensors.
pub fn expand(u: Tensor<2>, w: Tensor<2>, scale: f32, w_t: bool) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as LoraOps>::lora_expand(
        u.into_dispatch(),
        w.into_dispatch(),
        scale,
        w_t,
    ))
}

/// [`LoraOps::lora_reduce`] on tensors.
pub fn reduce(u: Tensor<2>, x: Tensor<2>, scale: f32, out_t: bool) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as LoraOps>::lora_reduce(
        u.into_dispatch(),
        x.into_dispatch(),
        scale,
        out_t,
    ))
}

#[derive(Debug)]
struct Branch;

/// What the backward reads: the input, the factors as given, x·Aᵀ and the scale.
#[derive(Debug, Clone)]
struct Kept<B: Backend> {
    x: FloatTensor<B>,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    xa: FloatTensor<B>,
    scale: f32,
}

impl<B: Backend + LoraOps> Backward<B, 3> for Branch {
    type State = Kept<B>;

    /// With δ = s·XA·Bᵀ and XA = x·Aᵀ: dB = s·dδᵀ·XA, dXA = s·dδ·B, dA = dXAᵀ·x, dx = dXA·A.
    /// The factors' gradients come out in f32 and are cast to the factors' dtype.
    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_a, node_b] = ops.parents;
        let d = grads.consume::<B>(&ops.node);
        let Kept { x, a, b, xa, scale } = ops.state;
        let (a_dtype, b_dtype) = (a.dtype(), b.dtype());
        if let Some(node) = node_b {
            let db = B::lora_reduce(xa, d.clone(), scale, true);
            grads.register::<B>(node.id, cast::<B>(db, b_dtype));
        }
        if node_x.is_none() && node_a.is_none() {
            return;
        }
        let dxa = B::lora_project(d, b, scale, true);
        if let Some(node) = node_a {
            let da = B::lora_reduce(dxa.clone(), x, 1.0, false);
            grads.register::<B>(node.id, cast::<B>(da, a_dtype));
        }
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::lora_expand(dxa, a, 1.0, false));
        }
    }
}

pub(crate) fn dims2(x: &impl TensorMetadata) -> [usize; 2] {
    let shape = x.shape();
    [shape[0], shape[1]]
}

/// Output shape for fusion's record of the op.
#[cfg_attr(not(all(feature = "gpu", not(target_os = "macos"))), allow(dead_code))]
fn project_shape(x: &Shape, w: &Shape, w_t: &bool) -> Shape {
    Shape::new([x[0], if *w_t { w[1] } else { w[0] }])
}

/// Output shape for fusion's record of the op.
#[cfg_attr(not(all(feature = "gpu", not(target_os = "macos"))), allow(dead_code))]
fn expand_shape(u: &Shape, w: &Shape, w_t: &bool) -> Shape {
    Shape::new([u[0], if *w_t { w[0] } else { w[1] }])
}

/// Output shape for fusion's record of the op.
#[cfg_attr(not(all(feature = "gpu", not(target_os = "macos"))), allow(dead_code))]
fn reduce_shape(u: &Shape, x: &Shape, out_t: &bool) -> Shape {
    match *out_t {
        true => Shape::new([x[1], u[1]]),
        false => Shape::new([u[1], x[1]]),
    }
}

fn scaled<B: Backend>(x: FloatTensor<B>, scale: f32) -> FloatTensor<B> {
    match scale == 1.0 {
        true => x,
        false => B::float_mul_scalar(x, scale.into()),
    }
}

/// [`LoraOps::lora_project`] in tensor ops.
pub(crate) fn plain_project<B: Backend>(
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    scale: f32,
    w_t: bool,
) -> FloatTensor<B> {
    let w = cast::<B>(w, x.dtype());
    let w = if w_t { w } else { B::float_swap_dims(w, 0, 1) };
    scaled::<B>(B::float_matmul(x, w), scale)
}

/// [`LoraOps::lora_expand`] in tensor ops: `u w` is project's `u wᵀ` with w's layout flag
/// flipped.
pub(crate) fn plain_expand<B: Backend>(
    u: FloatTensor<B>,
    w: FloatTensor<B>,
    scale: f32,
    w_t: bool,
) -> FloatTensor<B> {
    plain_project::<B>(u, w, scale, !w_t)
}

/// [`LoraOps::lora_reduce`] in tensor ops.
pub(crate) fn plain_reduce<B: Backend>(
    u: FloatTensor<B>,
    x: FloatTensor<B>,
    scale: f32,
    out_t: bool,
) -> FloatTensor<B> {
    let u = cast::<B>(u, x.dtype());
    let out = scaled::<B>(
        cast::<B>(B::float_matmul(B::float_swap_dims(u, 0, 1), x), DType::F32),
        scale,
    );
    match out_t {
        // The transposed view (row-major on Flex, which copies on reshape; cubecl's backend may
        // keep the strided view, which holds the same values).
        true => {
            let [r, k] = dims2(&out);
            B::float_reshape(B::float_swap_dims(out, 0, 1), Shape::new([k, r]))
        }
        false => out,
    }
}

/// Rows per block and block count for the reduce kernel (`model::lora_kernels`): enough threads
/// (blocks × k, about 65,536) to fill the device, at least 16 rows a block. The f32 partials are
/// transient, 2r / rows times the size of an f16 x (0.4× at r 8 and SmolLM2's k = 576, 3.6× at
/// r 64).
#[cfg_attr(not(all(feature = "gpu", not(target_os = "macos"))), allow(dead_code))]
pub(crate) fn row_blocks(m: usize, k: usize) -> (usize, usize) {
    let want = (1usize << 16).div_ceil(k.max(1));
    let rows = m.div_ceil(want.max(1)).max(16).min(m.max(1));
    (rows, m.max(1).div_ceil(rows))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use burn::tensor::{DType, Device, Distribution};

    /// Relative L2 distance of `a` from `b`, in f32.
    pub(crate) fn rel<const D: usize>(a: &Tensor<D>, b: &Tensor<D>) -> f32 {
        let d = (a.clone().cast(DType::F32) - b.clone().cast(DType::F32))
            .square()
            .sum();
        let n = b.clone().cast(DType::F32).square().sum();
        (d.into_scalar::<f32>() / n.into_scalar::<f32>().max(1e-30)).sqrt()
    }

    /// The op's output and its hand-written gradients of x, A and B equal burn's autodiff of the
    /// two plain matmuls (the factors cast to x's dtype, as the plain path does); with x frozen
    /// (the first adapted layer's input) only A and B get one. In f16 the factors stay f32 and
    /// their gradients come back f32.
    #[test]
    fn the_branch_op_gives_autodiffs_gradients() {
        let device = Device::flex();
        let (m, k, r, n, scale) = (37, 24, 4, 20, 2.5);
        let rnd = |shape: [usize; 2]| {
            Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), (&device, DType::F32))
        };
        let (x0, a0, b0, g0) = (rnd([m, k]), rnd([r, k]), rnd([n, r]), rnd([m, n]));
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 2e-3)] {
            let g = g0.clone().cast(dtype).autodiff();
            for x_tracked in [true, false] {
                let leaves = || {
                    let x = x0.clone().cast(dtype);
                    let x = match x_tracked {
                        true => x.autodiff().require_grad(),
                        false => x,
                    };
                    (
                        x,
                        a0.clone().autodiff().require_grad(),
                        b0.clone().autodiff().require_grad(),
                    )
                };
                let (x, a, b) = leaves();
                let op = lora_delta(x.clone(), a.clone(), b.clone(), scale);
                assert_eq!(op.dtype(), dtype);
                let grads = (op.clone() * g.clone()).sum().backward();
                let (xp, ap, bp) = leaves();
                let plain = xp
                    .clone()
                    .matmul(ap.clone().cast(dtype).transpose())
                    .matmul(bp.clone().cast(dtype).transpose())
                    .mul_scalar(scale);
                let pgrads = (plain.clone() * g.clone()).sum().backward();
                let dy = rel(&op.inner(), &plain.inner());
                assert!(dy < tol, "{dtype:?}: output {dy}");
                let (ga, gb) = (a.grad(&grads).unwrap(), b.grad(&grads).unwrap());
                assert_eq!((ga.dtype(), gb.dtype()), (DType::F32, DType::F32));
                let da = rel(&ga, &ap.grad(&pgrads).unwrap());
                let db = rel(&gb, &bp.grad(&pgrads).unwrap());
                assert!(da < tol && db < tol, "{dtype:?}: dA {da}, dB {db}");
                match x_tracked {
                    true => {
                        let dx = rel(&x.grad(&grads).unwrap(), &xp.grad(&pgrads).unwrap());
                        assert!(dx < tol, "{dtype:?}: dx {dx}");
                    }
                    false => assert!(x.grad(&grads).is_none()),
                }
            }
        }
    }

    /// Every row falls in exactly one block, none is empty, and long reductions are split.
    #[test]
    fn row_blocks_cover_the_rows() {
        for m in [1, 15, 16, 17, 333, 1000, 4096, 4099, 32768] {
            for k in [1, 64, 576, 2048, 5632, 100_000] {
                let (rows, blocks) = row_blocks(m, k);
                assert!(rows >= 1 && blocks >= 1, "m {m} k {k}");
                assert!(
                    blocks * rows >= m && (blocks - 1) * rows < m,
                    "m {m} k {k}: {rows} x {blocks}"
                );
            }
        }
        assert!(
            row_blocks(4096, 576).1 >= 64,
            "SmolLM2's dA gets enough blocks"
        );
    }

    #[test]
    fn the_plain_products_are_the_three_shapes() {
        let device = Device::flex();
        let t = |v: Vec<f32>, s: [usize; 2]| {
            Tensor::<2>::from_data(burn::tensor::TensorData::new(v, s), &device)
        };
        let x = t(vec![1., 2., 3., 4., 5., 6.], [3, 2]);
        let w = t(vec![1., 0., 1., 1.], [2, 2]);
        let p = project(x.clone(), w.clone(), 2.0, false);
        // 2 · x wᵀ: rows (1, 3), (3, 7), (5, 11) doubled.
        assert_eq!(
            p.into_data().try_to_vec::<f32>().unwrap(),
            vec![2., 6., 6., 14., 10., 22.]
        );
        let e = expand(x.clone(), w.clone(), 1.0, false);
        assert_eq!(
            e.into_data().try_to_vec::<f32>().unwrap(),
            vec![3., 2., 7., 4., 11., 6.]
        );
        let u = t(vec![1., 0., 0., 1., 1., 1.], [3, 2]);
        let rd = reduce(u.clone(), x.clone(), 1.0, false);
        // uᵀ x: (x0 + x2, x1 + x2).
        assert_eq!(
            rd.into_data().try_to_vec::<f32>().unwrap(),
            vec![6., 8., 8., 10.]
        );
        // The transposed layouts: w given as wᵀ, the result of reduce transposed.
        let wt = t(vec![1., 1., 0., 1.], [2, 2]);
        let pt = project(x.clone(), wt.clone(), 2.0, true);
        assert_eq!(
            pt.into_data().try_to_vec::<f32>().unwrap(),
            vec![2., 6., 6., 14., 10., 22.]
        );
        let et = expand(x.clone(), wt, 1.0, true);
        assert_eq!(
            et.into_data().try_to_vec::<f32>().unwrap(),
            vec![3., 2., 7., 4., 11., 6.]
        );
        let x2 = t(vec![1., 2., 3., 4., 5., 7.], [3, 2]);
        // uᵀ x2 = [[6, 9], [8, 11]], transposed.
        let rt = reduce(u, x2, 1.0, true);
        assert_eq!(
            rt.into_data().try_to_vec::<f32>().unwrap(),
            vec![6., 8., 9., 11.]
        );
    }
}
