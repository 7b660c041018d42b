//! `tuna bench matmul --lora`: LoRA's six skinny products per adapter and step (rank r against
//! thousands of rows), each stated several ways through burn's tensor API and by the branch op's
//! kernels (`op …`, [`crate::model::lora_op`]), timed and checked against the plain statement
//! autodiff uses; first, the op's products against the plain ones at ragged shapes and other
//! ranks (`check` rows). `TUNA_LORA_BENCH=short` times only the plain statements and the op's.
//!
//! Each timing is of a whole call (the host's dispatch and allocation included), not of a kernel:
//! on the H200 even the op's trivial expand kernel shows 40–213 µs here while cubecl's profile of
//! training puts it at 20–55 µs. So these figures rank statements of one product only roughly;
//! the rows-in-blocks statement that ran 2–3× faster here made the training step slower
//! (`h200-2026-12-03e/call4-lora-train/`) and was not adopted.

use std::time::Instant;

use anyhow::Result;
use burn::tensor::{DType, Device, Tensor, TensorData};
use serde_json::{Value, json};

use crate::bench::keep_busy;
use crate::data::dataset::SplitMix64;
use crate::model::lora_op;

fn random(rng: &mut SplitMix64, shape: [usize; 2], device: &Device, dtype: DType) -> Tensor<2> {
    let n = shape[0] * shape[1];
    let data: Vec<f32> = (0..n)
        .map(|_| ((rng.next() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32)
        .collect();
    Tensor::<2>::from_data(TensorData::new(data, shape), (device, DType::F32)).cast(dtype)
}

/// `lhs [m, k] · rhs [k, n]` as `s` products over k-slices, summed (in f32, cast back).
pub fn split_k(lhs: Tensor<2>, rhs: Tensor<2>, s: usize) -> Tensor<2> {
    let ([m, k], [_, n]) = (lhs.dims(), rhs.dims());
    let dtype = lhs.dtype();
    let l = lhs.reshape([m, s, k / s]).swap_dims(0, 1);
    let r = rhs.reshape([s, k / s, n]);
    l.matmul(r)
        .cast(DType::F32)
        .sum_dim(0)
        .reshape([m, n])
        .cast(dtype)
}

/// `lhsᵀ · rhs` for `lhs [rows, m]`, `rhs [rows, n]` (a gradient's reduction over the rows), as
/// `s` products over row blocks, summed: only reshapes of the row axis, no copies.
pub fn split_rows_t(lhs: Tensor<2>, rhs: Tensor<2>, s: usize) -> Tensor<2> {
    let ([rows, m], [_, n]) = (lhs.dims(), rhs.dims());
    let dtype = lhs.dtype();
    let l = lhs.reshape([s, rows / s, m]).swap_dims(1, 2);
    let r = rhs.reshape([s, rows / s, n]);
    l.matmul(r)
        .cast(DType::F32)
        .sum_dim(0)
        .reshape([m, n])
        .cast(dtype)
}

/// `a [m, r] · b [r, n]` for a short `r` as `r` broadcast multiply-adds (one fused elementwise
/// kernel under burn's fusion), accumulated in f32.
pub fn outer_sum(a: Tensor<2>, b: Tensor<2>) -> Tensor<2> {
    let ([m, r], [_, n]) = (a.dims(), b.dims());
    let dtype = a.dtype();
    let (a, b) = (a.cast(DType::F32), b.cast(DType::F32));
    let mut acc = Tensor::<2>::zeros([m, n], (&a.device(), DType::F32));
    for j in 0..r {
        acc = acc + a.clone().narrow(1, j, 1) * b.clone().narrow(0, j, 1);
    }
    acc.cast(dtype)
}

type Form = (String, Box<dyn Fn() -> Tensor<2>>);

fn forms(
    rows: usize,
    d_in: usize,
    d_out: usize,
    r: usize,
    device: &Device,
    dtype: DType,
) -> Vec<(String, Vec<Form>)> {
    let mut rng = SplitMix64((rows + d_in * 3 + d_out) as u64);
    let x = random(&mut rng, [rows, d_in], device, dtype);
    let a = random(&mut rng, [r, d_in], device, dtype);
    let b = random(&mut rng, [d_out, r], device, dtype);
    let xa = random(&mut rng, [rows, r], device, dtype);
    let dd = random(&mut rng, [rows, d_out], device, dtype);
    let dxa = random(&mut rng, [rows, r], device, dtype);
    let mut out: Vec<(String, Vec<Form>)> = Vec::new();
    macro_rules! form {
        ($name:expr, $($v:ident),* => $e:expr) => {{
            $(let $v = $v.clone();)*
            ($name.to_string(), Box::new(move || { $(let $v = $v.clone();)* $e }) as Box<dyn Fn() -> Tensor<2>>)
        }};
    }
    // xa = x Aᵀ: [rows, d_in] · [d_in, r].
    let mut v = vec![form!("plain", x, a => x.matmul(a.transpose()))];
    for s in [4, 8, 16] {
        if d_in % s == 0 {
            v.push(form!(format!("split-k {s}"), x, a => split_k(x, a.transpose(), s)));
        }
    }
    v.push(form!("(A xᵀ)ᵀ", x, a => a.matmul(x.transpose()).transpose()));
    v.push(form!("op project", x, a => lora_op::project(x, a, 1.0, false)));
    out.push((format!("xa = x·Aᵀ {rows}x{d_in}x{r}"), v));
    // delta = xa Bᵀ: [rows, r] · [r, d_out].
    out.push((
        format!("delta = xa·Bᵀ {rows}x{r}x{d_out}"),
        vec![
            form!("plain", xa, b => xa.matmul(b.transpose())),
            form!("outer sum", xa, b => outer_sum(xa, b.transpose())),
            form!("op expand", xa, b => lora_op::expand(xa, b, 1.0, true)),
        ],
    ));
    // d(xa) = dδ B: [rows, d_out] · [d_out, r].
    let mut v = vec![form!("plain", dd, b => dd.matmul(b))];
    for s in [4, 8, 16] {
        if d_out % s == 0 {
            v.push(form!(format!("split-k {s}"), dd, b => split_k(dd, b, s)));
        }
    }
    v.push(form!("(Bᵀ dδᵀ)ᵀ", dd, b => b.transpose().matmul(dd.transpose()).transpose()));
    v.push(form!("op project", dd, b => lora_op::project(dd, b, 1.0, true)));
    out.push((format!("dxa = dδ·B {rows}x{d_out}x{r}"), v));
    // dB = dδᵀ xa: [d_out, rows] · [rows, r] (autodiff: (xaᵀ dδ)ᵀ).
    let mut v = vec![
        form!("plain xaᵀ·dδ", xa, dd => xa.transpose().matmul(dd).transpose()),
        form!("dδᵀ·xa", xa, dd => dd.transpose().matmul(xa)),
    ];
    for s in [4, 8, 16, 32] {
        v.push(form!(format!("split-rows {s}"), xa, dd => split_rows_t(dd, xa, s)));
        v.push(form!(format!("split-rows {s} xaᵀ"), xa, dd => split_rows_t(xa, dd, s).transpose()));
    }
    v.push(form!("op reduce", xa, dd => lora_op::reduce(xa, dd, 1.0, true)));
    out.push((format!("dB = dδᵀ·xa {d_out}x{rows}x{r}"), v));
    // dA = d(xa)ᵀ x: [r, rows] · [rows, d_in] (autodiff: (xᵀ d(xa))ᵀ).
    let mut v = vec![
        form!("plain xᵀ·dxa", x, dxa => x.transpose().matmul(dxa).transpose()),
        form!("dxaᵀ·x", x, dxa => dxa.transpose().matmul(x)),
    ];
    for s in [4, 8, 16, 32] {
        v.push(form!(format!("split-rows {s}"), x, dxa => split_rows_t(dxa, x, s)));
        v.push(form!(format!("split-rows {s} xᵀ"), x, dxa => split_rows_t(x, dxa, s).transpose()));
    }
    v.push(form!("op reduce", x, dxa => lora_op::reduce(dxa, x, 1.0, false)));
    out.push((format!("dA = dxaᵀ·x {r}x{rows}x{d_in}"), v));
    // dx = d(xa) A: [rows, r] · [r, d_in].
    out.push((
        format!("dx = dxa·A {rows}x{r}x{d_in}"),
        vec![
            form!("plain", dxa, a => dxa.matmul(a)),
            form!("outer sum", dxa, a => outer_sum(dxa, a)),
            form!("op expand", dxa, a => lora_op::expand(dxa, a, 1.0, false)),
        ],
    ));
    out
}

fn rel_err(got: &Tensor<2>, want: &Tensor<2>) -> f64 {
    let g = got.clone().cast(DType::F32);
    let w = want.clone().cast(DType::F32);
    let num: f32 = (g - w.clone()).square().sum().into_scalar_f32();
    let den: f32 = w.square().sum().into_scalar_f32();
    (num as f64 / den.max(1e-30) as f64).sqrt()
}

trait ScalarF32 {
    fn into_scalar_f32(self) -> f32;
}

impl ScalarF32 for Tensor<1> {
    fn into_scalar_f32(self) -> f32 {
        self.into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map(|v| v[0])
            .unwrap_or(f32::NAN)
    }
}

/// The op's three products against the plain statements at ragged shapes and other ranks (rows
/// not a multiple of a cube's, r of 1, 16 and 64), in `dtype`: the relative L2 error of each.
fn check_op(device: &Device, dtype: DType) -> Vec<Value> {
    let mut out = Vec::new();
    for (m, k, n, r) in [
        (1000, 100, 72, 16),
        (4096, 576, 192, 64),
        (333, 64, 48, 1),
        (4099, 2048, 256, 8),
    ] {
        let mut rng = SplitMix64((m * 7 + k + r) as u64);
        let x = random(&mut rng, [m, k], device, dtype);
        let a = random(&mut rng, [r, k], device, dtype);
        let u = random(&mut rng, [m, r], device, dtype);
        let w = random(&mut rng, [r, n], device, dtype);
        // The factors in f32 beside x in `dtype`, as training holds them.
        let (af, wf) = (a.clone().cast(DType::F32), w.clone().cast(DType::F32));
        let at = af.clone().transpose().reshape([k, r]);
        let wt = wf.clone().transpose().reshape([n, r]);
        let ux = u.clone().transpose().matmul(x.clone()).mul_scalar(1.5);
        let errs = [
            (
                "project",
                rel_err(
                    &lora_op::project(x.clone(), af, 0.5, false),
                    &x.clone().matmul(a.clone().transpose()).mul_scalar(0.5),
                ),
            ),
            (
                "project w_t",
                rel_err(
                    &lora_op::project(x.clone(), at, 0.5, true),
                    &x.clone().matmul(a.clone().transpose()).mul_scalar(0.5),
                ),
            ),
            (
                "expand",
                rel_err(
                    &lora_op::expand(u.clone(), wf, 2.0, false),
                    &u.clone().matmul(w.clone()).mul_scalar(2.0),
                ),
            ),
            (
                "expand w_t",
                rel_err(
                    &lora_op::expand(u.clone(), wt, 2.0, true),
                    &u.clone().matmul(w.clone()).mul_scalar(2.0),
                ),
            ),
            (
                "reduce",
                rel_err(&lora_op::reduce(u.clone(), x.clone(), 1.5, false), &ux),
            ),
            (
                "reduce out_t",
                rel_err(
                    &lora_op::reduce(u.clone(), x.clone(), 1.5, true),
                    &ux.transpose(),
                ),
            ),
        ];
        for (product, err) in errs {
            let row = json!({"check": product, "m": m, "k": k, "n": n, "r": r, "rel_err": err});
            eprintln!("{row}");
            out.push(row);
        }
    }
    out
}

/// `short`: only the plain statements and the op's (`TUNA_LORA_BENCH=short`).
pub fn bench(device: &Device, dtype: DType, iters: usize) -> Result<Value> {
    let short = std::env::var("TUNA_LORA_BENCH").is_ok_and(|v| v == "short");
    let mut rows_out = check_op(device, dtype);
    for (model, d_in, d_out) in [
        ("tinyllama q", 2048, 2048),
        ("tinyllama v", 2048, 256),
        ("smollm2 q", 576, 576),
    ] {
        for (product, mut forms) in forms(4096, d_in, d_out, 8, device, dtype) {
            if short {
                forms.retain(|(name, _)| name.starts_with("plain") || name.starts_with("op "));
            }
            let want = (forms[0].1)();
            for (name, f) in &forms {
                let got = f();
                let err = rel_err(&got, &want);
                keep_busy(device, 0.3, || {
                    let _ = f();
                });
                let t0 = Instant::now();
                let keep: Vec<_> = (0..iters).map(|_| f()).collect();
                let _ = device.sync();
                let us = t0.elapsed().as_secs_f64() / iters as f64 * 1e6;
                drop(keep);
                let row = json!({"model": model, "product": product, "form": name, "us": us, "rel_err": err});
                eprintln!("{row}");
                rows_out.push(row);
            }
        }
    }
    Ok(json!({"bench": "lora-products", "rows": rows_out}))
}
