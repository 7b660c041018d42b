//! What the model's autodiff operations (`attention_op`, `lora_op`, `norm_op`) share: dtype
//! casts on backend primitives, and bringing a call's tensors into one autodiff graph.

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
