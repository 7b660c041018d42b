//! What the model's autodiff operations (`attention_op`, `lora_op`, `norm_op`) share: dtype
//! casts on backend primitives, bringing a call's tensors into one autodiff graph, and the
//! environment switches that turn an op or its kernels off for comparison.

use burn::backend::{Backend, FloatDType, TensorMetadata, tensor::FloatTensor};
use burn::tensor::{DType, Tensor};

/// `x` in f32 (unchanged when it is).
pub(crate) fn f32_of<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    cast::<B>(x, DType::F32)
}

/// `x` in `dtype` (unchanged when it is).
pub(crate) fn cast<B: Backend>(x: FloatTensor<B>, dtype: DType) -> FloatTensor<B> {
    match x.dtype() == dtype {
        true => x,
        false => B::float_cast(x, FloatDType::from(dtype)),
    }
}

/// `t` in the autodiff graph when `tracked` (as a constant if it was not in it), as it is
/// otherwise: a frozen input meeting trainable weights (or the reverse) joins their graph.
pub(crate) fn joined<const D: usize>(t: Tensor<D>, tracked: bool) -> Tensor<D> {
    match tracked && !t.is_autodiff() {
        true => t.autodiff(),
        false => t,
    }
}

/// `t` on the same side as a tensor that `autodiff` says is (or is not) in the autodiff graph:
/// an input that carries no gradient (a mask, RoPE's tables) beside an op's tracked or untracked
/// inputs.
pub(crate) fn beside<const D: usize>(t: Tensor<D>, autodiff: bool) -> Tensor<D> {
    match (autodiff, t.is_autodiff()) {
        (true, false) => t.autodiff(),
        (false, true) => t.inner(),
        _ => t,
    }
}

/// A two-way switch from the environment: `on` is true, `off` false, unset `default`; any other
/// value is said on stderr, naming both, and taken as unset.
pub(crate) fn env_switch(var: &str, on: &str, off: &str, default: bool) -> bool {
    match std::env::var(var) {
        Ok(v) if v == on => true,
        Ok(v) if v == off => false,
        Err(_) => default,
        Ok(other) => {
            let using = if default { on } else { off };
            eprintln!(
                "warning: {var} is `{other}`, which is neither {on} nor {off}; using {using}"
            );
            default
        }
    }
}
