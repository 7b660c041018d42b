//! cubecl kernels for LoRA's three skinny products ([`crate::model::lora_op`]), on burn's
//! cubecl backend (Vulkan on Linux; fusion wraps it and runs each as one opaque operation).
//!
//! The rank r (1–64) is a compile-time constant, so each thread keeps its r partial sums in
//! registers; all sums are f32 whatever the operands' dtypes, and the factors are read in theirs
//! (f32 beside f16 activations), so nothing is cast on the way in.
//! - project (`[m, k] · [r, k]ᵀ`): one subgroup per row of x walks k, each lane multiplying its
//!   element of x by the r weights of that column (w is small and stays in cache), then the
//!   subgroup sums the r partials.
//! - expand (`[m, r] · [r, n]`): one thread per output element, r multiply-adds.
//! - reduce (`[m, r]ᵀ · [m, k]`): one thread per column of x and block of rows writes r f32
//!   partial sums; a second kernel adds the blocks up and writes the result as `[r, k]` or, for
//!   dB, already in B's `[n, r]` layout. Splitting the rows gives the long reduction enough
//!   threads, which a square GEMM tile of r rows does not.

use burn::backend::ops::FloatTensorOps;
use burn::tensor::{DType, Shape};
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::features::Plane;
use burn_cubecl::cubecl::ir::{ElemType, FloatKind};
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::{self, CubeDim, calculate_cube_count_elemwise};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;

use crate::model::lora_op::{
    LoraOps, dims2, plain_expand, plain_project, plain_reduce, row_blocks,
};

/// Largest rank the kernels take; a larger one runs the plain products.
pub const MAX_RANK: usize = 64;

/// Threads per cube.
const CUBE: u32 = 256;

#[cube(launch_unchecked)]
fn project_kernel<F: Float, W: Float>(
    x: &[F],
    w: &[W],
    out: &mut [F],
    m: usize,
    k: usize,
    scale: f32,
    #[comptime] r: usize,
    #[comptime] w_t: bool,
    #[define(F, W)] _dtypes: [ElemType; 2],
) {
    let row = CUBE_POS * usize::cast_from(CUBE_DIM_Y) + usize::cast_from(UNIT_POS_Y);
    if row >= m {
        terminate!();
    }
    let lane = usize::cast_from(UNIT_POS_X);
    let step = usize::cast_from(CUBE_DIM_X);
    let mut acc = Array::<f32>::new(r);
    #[unroll]
    for j in 0..r {
        acc[j] = 0.0;
    }
    let base = row * k;
    let mut c = lane;
    while c < k {
        let xv = f32::cast_from(x[base + c]);
        #[unroll]
        for j in 0..r {
            let wv = if comptime!(w_t) {
                w[c * r + j]
            } else {
                w[j * k + c]
            };
            acc[j] += xv * f32::cast_from(wv);
        }
        c += step;
    }
    #[unroll]
    for j in 0..r {
        let sum = plane_sum(acc[j]);
        if lane == 0 {
            out[row * r + j] = F::cast_from(sum * scale);
        }
    }
}

#[cube(launch_unchecked)]
fn expand_kernel<F: Float, W: Float>(
    u: &[F],
    w: &[W],
    out: &mut [F],
    m: usize,
    n: usize,
    scale: f32,
    #[comptime] r: usize,
    #[comptime] w_t: bool,
    #[define(F, W)] _dtypes: [ElemType; 2],
) {
    let pos = ABSOLUTE_POS;
    if pos >= m * n {
        terminate!();
    }
    let i = pos / n;
    let c = pos % n;
    let mut acc = 0.0f32;
    #[unroll]
    for j in 0..r {
        let wv = if comptime!(w_t) {
            w[c * r + j]
        } else {
            w[j * n + c]
        };
        acc += f32::cast_from(u[i * r + j]) * f32::cast_from(wv);
    }
    out[pos] = F::cast_from(acc * scale);
}

/// Each thread: one column `c` of x and one block of rows, r scaled f32 sums into
/// `partial[block, j, c]`.
#[cube(launch_unchecked)]
fn reduce_kernel<F: Float, U: Float>(
    u: &[U],
    x: &[F],
    partial: &mut [f32],
    m: usize,
    k: usize,
    rows: usize,
    blocks: usize,
    scale: f32,
    #[comptime] r: usize,
    #[define(F, U)] _dtypes: [ElemType; 2],
) {
    let pos = ABSOLUTE_POS;
    if pos >= blocks * k {
        terminate!();
    }
    let block = pos / k;
    let c = pos % k;
    let mut acc = Array::<f32>::new(r);
    #[unroll]
    for j in 0..r {
        acc[j] = 0.0;
    }
    let start = block * rows;
    let mut end = start + rows;
    if end > m {
        end = m;
    }
    for i in start..end {
        let xv = f32::cast_from(x[i * k + c]);
        #[unroll]
        for j in 0..r {
            acc[j] += f32::cast_from(u[i * r + j]) * xv;
        }
    }
    #[unroll]
    for j in 0..r {
        partial[(block * r + j) * k + c] = acc[j] * scale;
    }
}

/// The blocks' partial sums added up: `out[j, c]`, or `out[c, j]` with `out_t`, in f32.
#[cube(launch_unchecked)]
fn sum_blocks_kernel(
    partial: &[f32],
    out: &mut [f32],
    r: usize,
    k: usize,
    blocks: usize,
    #[comptime] out_t: bool,
) {
    let pos = ABSOLUTE_POS;
    if pos >= r * k {
        terminate!();
    }
    let mut sum = 0.0f32;
    for b in 0..blocks {
        sum += partial[b * r * k + pos];
    }
    if comptime!(out_t) {
        let j = pos / k;
        let c = pos % k;
        out[c * r + j] = sum;
    } else {
        out[pos] = sum;
    }
}

fn storage(dtype: DType) -> Option<ElemType> {
    let kind = match dtype {
        DType::F16 => FloatKind::F16,
        DType::BF16 => FloatKind::BF16,
        DType::F32 => FloatKind::F32,
        _ => return None,
    };
    Some(ElemType::Float(kind))
}

/// An uninitialized `shape` tensor on `like`'s device.
fn alloc<const N: usize>(like: &CubeTensor, shape: [usize; N], dtype: DType) -> CubeTensor {
    empty_device_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::new(shape),
        dtype,
    )
}

/// Whether the kernels take operands of this rank and dtypes (the element types to launch
/// with): the plain products otherwise.
fn applies(r: usize, a: &CubeTensor, b: &CubeTensor) -> Option<[ElemType; 2]> {
    if r == 0 || r > MAX_RANK || a.qparams.is_some() || b.qparams.is_some() || !kernels_on() {
        return None;
    }
    Some([storage(a.dtype)?, storage(b.dtype)?])
}

/// `TUNA_LORA_KERNELS=0` keeps the branch op on burn's matmuls (to measure what the kernels
/// give), read once per process.
fn kernels_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| crate::model::op_common::env_switch("TUNA_LORA_KERNELS", "1", "0", true))
}

impl LoraOps for CubeBackend {
    fn lora_project(x: CubeTensor, w: CubeTensor, scale: f32, w_t: bool) -> CubeTensor {
        let ([m, k], [w0, w1]) = (dims2(&x), dims2(&w));
        let (r, kw) = if w_t { (w1, w0) } else { (w0, w1) };
        assert_eq!(
            k, kw,
            "lora_project: x [m, {k}] against a weight of {kw} columns"
        );
        let (Some(dtypes), Some(plane)) = (applies(r, &x, &w), plane_size(&x)) else {
            return plain_project::<Self>(x, w, scale, w_t);
        };
        let (x, w) = (into_contiguous(x), into_contiguous(w));
        let out = alloc(&x, [m, r], x.dtype);
        let cube_dim = CubeDim::new_2d(plane, CUBE / plane);
        let count = calculate_cube_count_elemwise(&x.client, m * plane as usize, cube_dim);
        let client = x.client.clone();
        unsafe {
            project_kernel::launch_unchecked(
                &client,
                count,
                cube_dim,
                x.into_buffer_arg(),
                w.into_buffer_arg(),
                out.clone().into_buffer_arg(),
                m,
                k,
                scale,
                r,
                w_t,
                dtypes,
            )
        };
        out
    }

    fn lora_expand(u: CubeTensor, w: CubeTensor, scale: f32, w_t: bool) -> CubeTensor {
        let ([m, r], [w0, w1]) = (dims2(&u), dims2(&w));
        let (rw, n) = if w_t { (w1, w0) } else { (w0, w1) };
        assert_eq!(
            r, rw,
            "lora_expand: u [m, {r}] against a weight of rank {rw}"
        );
        let Some(dtypes) = applies(r, &u, &w) else {
            return plain_expand::<Self>(u, w, scale, w_t);
        };
        let (u, w) = (into_contiguous(u), into_contiguous(w));
        let out = alloc(&u, [m, n], u.dtype);
        let cube_dim = CubeDim::new_1d(CUBE);
        let count = calculate_cube_count_elemwise(&u.client, m * n, cube_dim);
        let client = u.client.clone();
        unsafe {
            expand_kernel::launch_unchecked(
                &client,
                count,
                cube_dim,
                u.into_buffer_arg(),
                w.into_buffer_arg(),
                out.clone().into_buffer_arg(),
                m,
                n,
                scale,
                r,
                w_t,
                dtypes,
            )
        };
        out
    }

    fn lora_reduce(u: CubeTensor, x: CubeTensor, scale: f32, out_t: bool) -> CubeTensor {
        let ([m, r], [mx, k]) = (dims2(&u), dims2(&x));
        assert_eq!(m, mx, "lora_reduce: u [{m}, r] against x [{mx}, k]");
        let Some([ux, xx]) = applies(r, &u, &x) else {
            return plain_reduce::<Self>(u, x, scale, out_t);
        };
        let (u, x) = (into_contiguous(u), into_contiguous(x));
        let (rows, blocks) = row_blocks(m, k);
        let client = x.client.clone();
        let partial = alloc(&x, [blocks, r, k], DType::F32);
        let cube_dim = CubeDim::new_1d(CUBE);
        let count = calculate_cube_count_elemwise(&client, blocks * k, cube_dim);
        unsafe {
            reduce_kernel::launch_unchecked(
                &client,
                count,
                cube_dim,
                u.into_buffer_arg(),
                x.into_buffer_arg(),
                partial.clone().into_buffer_arg(),
                m,
                k,
                rows,
                blocks,
                scale,
                r,
                [xx, ux],
            )
        };
        if blocks == 1 && !out_t {
            return Self::float_reshape(partial, Shape::new([r, k]));
        }
        let shape = if out_t { [k, r] } else { [r, k] };
        let out = alloc(&partial, shape, DType::F32);
        let count = calculate_cube_count_elemwise(&client, r * k, cube_dim);
        unsafe {
            sum_blocks_kernel::launch_unchecked(
                &client,
                count,
                cube_dim,
                partial.into_buffer_arg(),
                out.clone().into_buffer_arg(),
                r,
                k,
                blocks,
                out_t,
            )
        };
        out
    }
}

/// The subgroup size, when the device has subgroup operations and one fixed size (the project
/// kernel gives each row one subgroup of `CUBE_DIM_X` lanes; a variable size, as on AMD and
/// Intel, leaves project to the plain matmul).
fn plane_size(x: &CubeTensor) -> Option<u32> {
    let props = x.client.properties();
    if !props.features.plane.contains(Plane::Ops) {
        return None;
    }
    let hw = &props.hardware;
    (hw.plane_size_min == hw.plane_size_max
        && hw.plane_size_max > 1
        && CUBE % hw.plane_size_max == 0)
        .then_some(hw.plane_size_max)
}
